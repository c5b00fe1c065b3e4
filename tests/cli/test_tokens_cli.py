"""Token sequences from the command line: `synth --cue region`, `embed --tokens` (its size printed before
the run), `cache info`, `train genres --memory tokens` and `predict` of poster files with that head."""
from __future__ import annotations

import json

import numpy as np
import pytest

from clipposter.embedding.cache import EmbeddingCache
from clipposter.heads.genre.head import GenreHead
from clipposter.ingest.synthetic import generate_posters
from helpers import run_cli, tiny_args

pytestmark = pytest.mark.usefixtures("single_torch_thread")
N = 120


@pytest.fixture(scope="module")
def token_run(tmp_path_factory, tiny_checkpoint):
    """Region-cue posters, embedded with tokens, and a token-memory head trained on them (CLI only)."""
    from clipposter.cli.main import main  # capsys is function-scoped: the fixture calls main directly

    root = tmp_path_factory.mktemp("tokens")
    assert main(["synth", "--out", str(root / "set"), "-n", str(N), "--seed", "1", "--size", "128x128",
                 "--cue", "region", "--json"]) == 0
    assert main(["embed", str(root / "set" / "manifest.csv"), "--cache", str(root / "cache"), "--tokens",
                 "--no-texts", "--json", *tiny_args(tiny_checkpoint)]) == 0
    assert main(["train", "genres", "--cache", str(root / "cache"), "--out", str(root / "head"), "--memory",
                 "tokens", "--epochs", "3", "--json", *tiny_args(tiny_checkpoint)[2:]]) == 0
    return root


def test_synth_region_cue_and_size(capsys, tmp_path):
    code, out, err = run_cli(capsys, "synth", "--out", tmp_path / "s", "-n", 3, "--size", "96x64", "--cue", "region",
                             "--json")
    assert code == 0, err
    same = generate_posters(tmp_path / "lib", n=3, seed=0, size=(96, 64), cue="region")
    from PIL import Image

    for rec in same:
        made = tmp_path / "s" / "posters" / (rec.id + ".jpg")
        assert Image.open(made).size == (96, 64)
        assert made.read_bytes() == open(rec.image, "rb").read()
    code, _, err = run_cli(capsys, "synth", "--out", tmp_path / "t", "--size", "big")
    assert code == 2 and err.strip() == "error: --size must be WIDTHxHEIGHT in pixels (like 200x300), got 'big'"


def test_embed_tokens_prints_the_size_first_and_cache_info_shows_it(capsys, tmp_path, tiny_checkpoint, token_run):
    manifest = token_run / "set" / "manifest.csv"
    code, out, err = run_cli(capsys, "embed", manifest, "--cache", tmp_path / "c", "--tokens", "--no-texts",
                             *tiny_args(tiny_checkpoint))
    assert code == 0, err
    # clipposter-tiny: 65 tokens of width 64, float16: 8,320 bytes a poster, 120 posters at most 975 KB.
    line = f"tokens: 65 × 64 float16 per poster (8.1 KB); the {N} posters of {manifest} add at most 975.0 KB"
    assert line in err
    code, out, err = run_cli(capsys, "cache", "info", "--cache", tmp_path / "c")
    assert code == 0 and "tokens     65 × 64 per poster (8.1 KB), 975.0 KB in all" in out
    code, out, _ = run_cli(capsys, "cache", "info", "--cache", tmp_path / "c", "--json")
    assert json.loads(out)["tokens"] == {"shape": [65, 64], "bytes_per_poster": 8320, "bytes": 8320 * N}
    # A cache embedded without tokens says so, and refuses tokens for new posters; a token cache
    # refuses to go without them.
    generate_posters(tmp_path / "five", n=5, seed=3)
    code, _, err = run_cli(capsys, "embed", tmp_path / "five" / "manifest.csv", "--cache", tmp_path / "p", "--no-texts",
                           *tiny_args(tiny_checkpoint))
    assert code == 0, err
    code, out, _ = run_cli(capsys, "cache", "info", "--cache", tmp_path / "p", "--json")
    assert json.loads(out)["tokens"] is None
    code, _, err = run_cli(capsys, "embed", manifest, "--cache", tmp_path / "p", "--tokens", "--no-texts")
    assert code == 2 and err.startswith("error: --tokens is set, but the 5 posters of the cache") and \
        err.count("\n") == 1
    code, _, err = run_cli(capsys, "embed", manifest, "--cache", tmp_path / "c", "--no-tokens", "--no-texts")
    assert code == 2 and err.startswith("error: --tokens is off, but the cache")


def test_predict_with_a_token_head_from_cached_and_new_files(capsys, tmp_path, token_run):
    head_dir, cache_dir = token_run / "head", token_run / "cache"
    records = generate_posters(token_run / "set", n=N, seed=1, size=(128, 128), cue="region")
    fresh = generate_posters(tmp_path / "new", n=1, seed=7, size=(128, 128), cue="region")[0].image
    files = [r.image for r in records[:3]] + [fresh]
    code, out, err = run_cli(capsys, "predict", *files, "--head", head_dir, "--cache", cache_dir, "--json")
    assert code == 0, err
    payload = json.loads(out)
    assert (payload["from_cache"], payload["encoded"]) == (3, 1)
    head = GenreHead.from_pretrained(head_dir)
    assert head.memory == "tokens"
    with EmbeddingCache.open(cache_dir, mode="r") as cache:
        expected = head.predict_proba(cache.tokens_for_ids([r.id for r in records[:3]]))
    for pred, probs in zip(payload["predictions"][:3], expected):
        got = np.array([pred["probabilities"][g] for g in head.genres])
        np.testing.assert_allclose(got, probs, atol=1e-6)
    # Without --cache every file is encoded through the head's recorded backbone: the same genres.
    code, out, err = run_cli(capsys, "predict", *files, "--head", head_dir, "--json")
    assert code == 0, err
    again = json.loads(out)
    assert again["encoded"] == 4
    for a, b in zip(again["predictions"], payload["predictions"]):
        for g, p in b["probabilities"].items():
            assert a["probabilities"][g] == pytest.approx(p, abs=5e-3)  # float16 cache vs float32 encode


def test_embed_tokens_reaches_the_ray_engine(capsys, tmp_path, tiny_checkpoint, monkeypatch):
    """The CLI hands the cache's token choice to the Ray engine (whose token path
    tests/embedding/test_ray_engine.py checks against the local engine on a local Ray)."""
    import clipposter.embedding.ray_engine as ray_engine
    from clipposter.embedding.embed import embed_records
    from clipposter.embedding.backbone import load_backbone

    seen = []

    def engine(records, cache, *, tokens=None, progress=True, batch_size=64, **_):
        seen.append(tokens)
        return embed_records(records, cache, load_backbone("clipposter-tiny", str(tiny_checkpoint), device="cpu"),
                             tokens=tokens, progress=progress, batch_size=batch_size)

    monkeypatch.setattr(ray_engine, "embed_records_ray", engine)
    generate_posters(tmp_path / "four", n=4, seed=5)
    code, _, err = run_cli(capsys, "embed", tmp_path / "four" / "manifest.csv", "--cache", tmp_path / "c", "--engine",
                           "ray", "--tokens", "--no-texts", *tiny_args(tiny_checkpoint))
    assert code == 0, err
    assert seen == [True] and "tokens: 65 × 64 float16 per poster" in err
    with EmbeddingCache.open(tmp_path / "c", mode="r") as cache:
        assert cache.token_shape == (65, 64) and cache.num_posters == 4


def test_the_size_comes_before_any_poster_is_read_and_a_full_disk_is_warned_of(capsys, tmp_path, tiny_checkpoint,
                                                                                 monkeypatch):
    import shutil
    from collections import namedtuple

    generate_posters(tmp_path / "six", n=6, seed=4)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 20_000, 20_000))
    code, _, err = run_cli(capsys, "embed", tmp_path / "six" / "manifest.csv", "--cache", tmp_path / "c", "--tokens",
                           "--no-texts", *tiny_args(tiny_checkpoint))
    assert code == 0, err
    size = err.index("tokens: 65 × 64 float16 per poster (8.1 KB); the 6 posters of")
    warning = err.index("warning: the token sequences of 6 posters may need 48.8 KB, more than the 19.5 KB free under")
    assert size < warning < err.index("embedding")  # both before the first poster is encoded
    with EmbeddingCache.open(tmp_path / "c", mode="r") as cache:
        assert cache.num_posters == 6 and cache.token_shape == (65, 64)


def test_refusals_leave_the_cache_as_it_was(capsys, tmp_path, tiny_checkpoint):
    generate_posters(tmp_path / "five", n=5, seed=3)
    manifest = tmp_path / "five" / "manifest.csv"
    code, _, err = run_cli(capsys, "embed", manifest, "--cache", tmp_path / "p", "--no-texts",
                           *tiny_args(tiny_checkpoint))
    assert code == 0, err

    def state(root):
        return {p.relative_to(root): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
                if p.is_file() and not p.name.startswith(".")}

    before = state(tmp_path / "p")
    code, _, err = run_cli(capsys, "embed", manifest, "--cache", tmp_path / "p", "--tokens", "--no-texts")
    assert code == 2 and "--tokens is set" in err
    assert state(tmp_path / "p") == before
    # A backbone without a ViT token sequence is refused before a new cache is made.
    code, _, err = run_cli(capsys, "embed", manifest, "--cache", tmp_path / "rn", "--tokens", "--no-texts",
                           "--backbone", "RN50", "--pretrained", "random")
    assert code == 2 and "has no ViT token sequence" in err and err.count("\n") == 1
    assert not (tmp_path / "rn").exists()
