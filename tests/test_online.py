"""The online path, against a local stand-in of the Hugging Face hub (tests/hub_stub.py).

What a user with internet runs first — `clipposter demo` fetching ViT-B-32/openai and gpt2,
`--pretrained openai`, `hf-hub:` backbones — runs here in subprocesses whose HF_ENDPOINT is the stub
and whose HF_HOME is a fresh folder, so the probe, the downloads, the HF cache folder and the
real-weight branch of the demo run as they would against huggingface.co. The stub serves small
random weights under the exact repository and file names open_clip and transformers ask for; ViT-B-32
is a narrow one-layer model under its real name (the real size encodes ~7 texts/s on this machine),
registered in the subprocess by a sitecustomize hook. A hub that answers 404 or never answers must
give the one-line fallback, fast.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import hub_stub
from hub_stub import SMALL_VIT_B_32, HubStub

ROOT = Path(__file__).resolve().parents[1]
VIT_REPO = "timm/vit_base_patch32_clip_224.openai"  # where open_clip resolves ViT-B-32 'openai'
HF_HUB_REPO = "clipposter-test/tiny-clip"
TEXT = "a lonely detective hunts a killer in the rain"
BPE_TEXTS = [
    "a family drama about love and loss", "the night they came home", "one man against the whole city",
    "love is a battlefield", "in space no one can hear you scream", "a comedy of errors and weddings",
    "the detective follows the killer through the rain", "a lonely hero hunts for the truth",
] * 4


@pytest.fixture(scope="module")
def repos():
    gpt2, reference_tokenizer = hub_stub.gpt2_repo(BPE_TEXTS)
    return {"gpt2": gpt2, "tokenizer": reference_tokenizer,
            "vit": {"open_clip_model.safetensors": hub_stub.small_clip_weights(SMALL_VIT_B_32, seed=0)},
            "hf_hub": hub_stub.open_clip_hub_repo(SMALL_VIT_B_32, seed=1)}


def _serve(stub: HubStub, repos: dict) -> HubStub:
    stub.add_repo("openai-community/gpt2", repos["gpt2"], alias="gpt2")
    stub.add_repo(VIT_REPO, repos["vit"])
    stub.add_repo(HF_HUB_REPO, repos["hf_hub"])
    return stub


@pytest.fixture(scope="module")
def hub(repos):
    with _serve(HubStub(), repos) as stub:
        yield stub


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """PYTHONPATH hook that registers the small ViT-B-32 config in a subprocess's open_clip."""
    root = tmp_path_factory.mktemp("site")
    return {"site": hub_stub.write_sitecustomize(root / "site"),
            "configs": hub_stub.model_config_dir(root / "configs", "ViT-B-32", SMALL_VIT_B_32)}


def _env(stub: HubStub, hf_home: Path, site: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=stub.endpoint, HF_HOME=str(hf_home), HF_HUB_ETAG_TIMEOUT="3",
               HF_HUB_DOWNLOAD_TIMEOUT="10", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
               PYTHONPATH=os.pathsep.join([str(site["site"]), str(ROOT)]),
               HUB_STUB_MODEL_CONFIGS=str(site["configs"]), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _python(code: str, env: dict, cwd: Path, *args: str, timeout: float = 120) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _snapshot(hf_home: Path, repo_id: str, commit: str) -> Path:
    return hf_home / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit


def _served_state(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


# ------------------------------------------------------------------------------ the suite's own HF cache

def test_the_suite_runs_on_an_empty_offline_hf_cache():
    """conftest points the whole suite (and its subprocesses) at an empty HF cache with the hub off,
    so no fixture changes behaviour with what the machine's cache holds."""
    from huggingface_hub import constants

    from clipposter.pipeline import _in_hf_cache, hub_reachable

    cache = Path(os.environ["HF_HUB_CACHE"])
    assert Path(os.environ["HF_HOME"]).name.startswith("clipposter-test-hf-") and cache.parent == Path(os.environ["HF_HOME"])
    assert Path(constants.HF_HUB_CACHE) == cache and constants.HF_HUB_OFFLINE
    assert not any(cache.glob("models--*")) and not _in_hf_cache("gpt2")
    assert os.environ["HF_HUB_OFFLINE"] == "1" and not hub_reachable()


# ------------------------------------------------------------------------------ the first online demo

@pytest.mark.slow
def test_first_online_demo_fetches_vit_b_32_and_gpt2_and_trains_on_them(hub, repos, site, tmp_path):
    """A fresh HF cache, a reachable hub: the demo probes HF_ENDPOINT, downloads both models into the
    cache folder, and runs the real-weight branch (no fallback note; the caption head trained on gpt2
    with gpt2's tokenizer)."""
    hf_home = tmp_path / "hf"
    clipposter = Path(sys.executable).with_name("clipposter")
    proc = subprocess.run([str(clipposter), "demo", "-n", "50", "--out", str(tmp_path / "run"), "--json"],
                          env=_env(hub, hf_home, site), cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["notice"] is None, result["notice"]
    stages = result["stages"]
    dim = SMALL_VIT_B_32["embed_dim"]
    assert stages["backbone"]["backbone"] == f"ViT-B-32 (openai, 224px, dim {dim})"
    assert stages["lm"]["lm"] == "gpt2" and stages["captions"]["examples"] > 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["lm"] == "gpt2" and run["notice"] is None

    # the probe asked the configured endpoint; the files landed in the HF cache layout, byte for byte
    assert ("HEAD", "/", 200) in hub.requests
    vit = _snapshot(hf_home, VIT_REPO, hub.commit(VIT_REPO))
    assert (vit / "open_clip_model.safetensors").read_bytes() == repos["vit"]["open_clip_model.safetensors"]
    gpt2 = _snapshot(hf_home, "gpt2", hub.commit("gpt2"))
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt"):
        assert (gpt2 / name).read_bytes() == repos["gpt2"][name], name
    assert (hf_home / "hub" / "models--gpt2" / "refs" / "main").read_text() == hub.commit("gpt2")

    # the caption head carries gpt2's tokenizer: it encodes a text exactly as the served one does
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(tmp_path / "run" / "taglines" / "lm")
    expected = repos["tokenizer"].encode(TEXT).ids
    assert expected and saved.encode(TEXT, add_special_tokens=False) == expected


# ------------------------------------------------------------------------------ loading, library level

LIBRARY_SCRIPT = r'''
import json, os, sys
import torch

TEXT = sys.argv[1]
out = {}


def part(name, fn):
    try:
        out[name] = fn()
    except Exception as exc:
        out[name] = {"error": f"{type(exc).__name__}: {exc}"}


def gpt2_after_model_only():
    # What the demo's first run leaves behind before it asks for the tokenizer: the model's files only.
    from huggingface_hub import hf_hub_download
    from clipposter.errors import ClipposterError
    from clipposter.heads.caption.lm import load_language_model

    for name in ("config.json", "model.safetensors"):
        hf_hub_download("gpt2", name)
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        load_language_model("gpt2")
        offline = None
    except ClipposterError as exc:
        offline = str(exc)
    del os.environ["HF_HUB_OFFLINE"]
    lm, tok = load_language_model("gpt2")
    state = {k: float(v.double().sum()) for k, v in lm.state_dict().items() if k.startswith("transformer.")}
    return {"offline_error": offline, "ids": tok.encode(TEXT, add_special_tokens=False), "sums": state}


def backbones():
    from clipposter.embedding.backbone import load_backbone

    res = {}
    for key, name, tag in (("openai", "ViT-B-32", "openai"), ("hf_hub", "hf-hub:clipposter-test/tiny-clip", None)):
        backbone = load_backbone(name, tag, device="cpu")
        torch.manual_seed(0)
        pixels = torch.rand(2, 3, 224, 224)
        res[key] = {"identity": backbone.identity.to_dict(), "spec": backbone.spec,
                    "text": backbone.encode_texts([TEXT]).tolist(),
                    "image": backbone.encode_image_tensors(pixels).tolist()}
    return res


part("gpt2", gpt2_after_model_only)
part("backbones", backbones)
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def library_run(repos, site, tmp_path_factory):
    """One subprocess against a fresh hub stub and HF cache, loading gpt2 and both backbones."""
    tmp = tmp_path_factory.mktemp("library")
    with _serve(HubStub(), repos) as stub:
        out = _python(LIBRARY_SCRIPT, _env(stub, tmp / "hf", site), tmp, TEXT)
    return out, stub


@pytest.mark.slow
def test_a_cache_holding_only_gpt2s_model_does_not_yield_an_empty_tokenizer(library_run, repos):
    """transformers 5 loads `gpt2` with local_files_only into an empty tokenizer once config.json is
    cached: offline that must be a one-line error, online the tokenizer must come from the hub."""
    out, stub = library_run
    gpt2 = out["gpt2"]
    assert "error" not in gpt2, gpt2
    assert gpt2["offline_error"] is not None and "\n" not in gpt2["offline_error"]
    assert gpt2["offline_error"].startswith("tokenizer 'gpt2' cannot be loaded")  # ConfigError naming the parameter
    expected = repos["tokenizer"].encode(TEXT).ids
    assert expected and gpt2["ids"] == expected
    assert stub.fetched("openai-community/gpt2", "tokenizer.json")
    served = _served_state(repos["gpt2"]["model.safetensors"])
    assert gpt2["sums"] == {k: float(v.double().sum()) for k, v in served.items() if k.startswith("transformer.")}


def _reference_embeddings(weights: bytes, quick_gelu: bool) -> tuple[np.ndarray, np.ndarray]:
    """What a CLIP built from SMALL_VIT_B_32 with the served weights embeds, computed here with
    open_clip's model class directly (no clipposter, no hub)."""
    import open_clip

    cfg = SMALL_VIT_B_32
    model = open_clip.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"],
                           quick_gelu=quick_gelu)
    model.load_state_dict(_served_state(weights))
    model.eval()
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(0)
        pixels = torch.rand(2, 3, 224, 224)
        text = torch.nn.functional.normalize(model.encode_text(open_clip.tokenize([TEXT])), dim=-1)
        image = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
    return text.numpy(), image.numpy()


@pytest.mark.slow
@pytest.mark.parametrize("key,quick_gelu", [("openai", True), ("hf_hub", False)])
def test_pretrained_tag_and_hf_hub_backbones_embed_with_the_served_weights(library_run, repos, key, quick_gelu):
    """`ViT-B-32 --pretrained openai` and `hf-hub:ORG/NAME` load the hub's weights and embed as the
    model they describe does; OpenAI's weights were trained with QuickGELU."""
    out, _ = library_run
    got = out["backbones"]
    assert "error" not in got, got
    weights = (repos["vit"] if key == "openai" else repos["hf_hub"])["open_clip_model.safetensors"]
    text, image = _reference_embeddings(weights, quick_gelu)
    np.testing.assert_allclose(np.array(got[key]["text"]), text, atol=1e-5)
    np.testing.assert_allclose(np.array(got[key]["image"]), image, atol=1e-5)
    identity = got[key]["identity"]
    assert identity["embed_dim"] == SMALL_VIT_B_32["embed_dim"] and identity["image_size"] == 224
    assert identity["weights"] == ("openai" if key == "openai" else "hf-hub")


# ------------------------------------------------------------------------------ the probe and the fallback

@pytest.fixture
def endpoint(monkeypatch):
    """Point this process's huggingface_hub at an endpoint, as HF_ENDPOINT does at import."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return lambda url: monkeypatch.setattr(constants, "ENDPOINT", url)


def test_probe_asks_the_endpoint_the_libraries_use(endpoint):
    from clipposter.pipeline import hub_reachable

    with HubStub() as hub:
        endpoint(hub.endpoint)
        assert hub_reachable(timeout=2)
        assert hub.requests == [("HEAD", "/", 200)]

    with HubStub() as closed:
        url = closed.endpoint
    endpoint(url)  # nothing listens there any more
    started = time.perf_counter()
    assert not hub_reachable(timeout=2) and time.perf_counter() - started < 2


def test_a_hub_that_never_answers_gives_the_one_line_fallback_fast(endpoint):
    """The demo's order: probe (3 s at most), then pick the backbone with the probe's answer."""
    from clipposter.embedding.backbone import TINY_MODEL
    from clipposter.pipeline import hub_reachable, pick_backbone

    with HubStub(mode="hang") as stub:
        endpoint(stub.endpoint)
        started = time.perf_counter()
        online = hub_reachable()
        seconds = time.perf_counter() - started
        assert stub.requests == [("HEAD", "/", 0)]  # it was asked, and kept silent
        backbone, reason = pick_backbone(device="cpu", online=online)
    assert not online and seconds < 5
    assert backbone.identity.model == TINY_MODEL
    assert reason == f"cannot reach {stub.endpoint}"


FALLBACK_SCRIPT = r'''
import json, sys, time
from pathlib import Path
from clipposter.pipeline import hub_reachable, pick_backbone, pick_lm

started = time.perf_counter()
online = hub_reachable()
backbone, reason = pick_backbone(device="cpu", online=online)
lm, lm_reason = pick_lm(sys.argv[2:], Path(sys.argv[1]), online)
print(json.dumps({"online": online, "backbone": backbone.identity.model, "reason": reason, "lm": lm,
                  "lm_reason": lm_reason, "seconds": time.perf_counter() - started}))
'''


@pytest.mark.slow
def test_a_hub_that_answers_404_gives_the_one_line_fallback(repos, site, tmp_path):
    with _serve(HubStub(mode="404"), repos) as stub:
        out = _python(FALLBACK_SCRIPT, _env(stub, tmp_path / "hf", site), tmp_path, str(tmp_path / "tiny-lm"),
                      *BPE_TEXTS)
        statuses = {status for _, _, status in stub.requests}
    assert out["online"] is True and statuses == {404}  # it answered, with nothing
    assert out["backbone"] == "clipposter-tiny"
    assert out["reason"].startswith("cannot fetch pretrained weights ViT-B-32/openai") and "\n" not in out["reason"]
    assert out["lm"] == str(tmp_path / "tiny-lm") and (tmp_path / "tiny-lm" / "config.json").is_file()
    assert out["lm_reason"].startswith("lm 'gpt2' cannot be loaded") and "\n" not in out["lm_reason"]
    assert out["seconds"] < 30
    assert not (tmp_path / "hf" / "hub" / "models--gpt2" / "snapshots").exists()
