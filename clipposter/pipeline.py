"""`clipposter demo`: the main job end to end.

synthetic posters (or `--source`) → embed → train the genre head and the caption head briefly →
evaluate both beside their baselines → build the poster index → write the HTML report.

It uses the real ViT-B-32/openai and gpt2 weights when they can be had (a local copy, or the hub
when it answers). When they cannot, it says so in one line (and in the report's header) and runs
every stage with a tiny CLIP trained contrastively on synthetic posters of their own seed (trained
once, then reused from the user cache; see clipposter.embedding.contrastive) and a tiny GPT-2 whose
tokenizer it trains on the posters' own texts: the pipeline still runs offline, zero-shot genres and
text search mean something on synthetic posters, but the scores say nothing about CLIP or GPT-2.

Everything lands in one run folder; `run.json` names its parts, so `clipposter report --run` and
`clipposter app --run` reopen it. A rerun reuses what is done: cached posters cost nothing, and a
head is retrained only when its inputs (posters, backbone, LM, settings) changed. A run killed while
training the caption head resumes from its last epoch checkpoint.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from clipposter.embedding.backbone import TINY_MODEL, Backbone, load_backbone
from clipposter.embedding.contrastive import SYNTHETIC_SEED, ContrastiveConfig, SyntheticBackbone, synthetic_backbone
from clipposter.embedding.cache import EmbeddingCache
from clipposter.embedding.embed import embed_records, embed_texts, reference_and_prompt_texts
from clipposter.errors import ClipposterError
from clipposter.heads.genre.config import SMALL_DATA_ARCHITECTURE, SMALL_DATA_OPTIONS, SMALL_DATA_POSTERS
from clipposter.files import replace_dir, write_json

log = logging.getLogger(__name__)

REAL_BACKBONE = ("ViT-B-32", "openai")
REAL_LM = "gpt2"
DEFAULT_HUB = "https://huggingface.co"
STAGE_FILE = "demo-stage.json"
DEFAULT_POSTERS = 600  # a test split of ~60 posters: enough that the scores beside their baselines mean something

# Heads are trained "briefly": settings for a few hundred posters (the paper's defaults are for
# ~35K posters and ten times the steps). Larger sources get the paper's ML-Decoder settings.
# The genre head takes its settings from its own small-data rule (as `train genres` does).
SMALL_DATA = SMALL_DATA_POSTERS
GENRE_RULE = {"posters": SMALL_DATA_POSTERS, "small": {**SMALL_DATA_ARCHITECTURE, **SMALL_DATA_OPTIONS}}
CAPTION_TINY_LM = {"epochs": 20, "lr": 3e-3, "batch_size": 16, "warmup_steps": 10, "max_tokens": 24}
CAPTION_REAL_LM = {"epochs": 2, "lr": 1e-4, "batch_size": 16, "warmup_steps": None, "max_tokens": 40}
# The offline backbone: clipposter-tiny trained on this many synthetic posters of their own seed (never
# the demo's posters), `train backbone`'s settings with 20 epochs instead of 30 so that the first
# offline run costs about 30 s more; measured in docs/backbone.md.
OFFLINE_BACKBONE_POSTERS = 400
OFFLINE_BACKBONE_SETTINGS = ContrastiveConfig(epochs=20)


def hub_endpoint() -> str:
    """The hub the download libraries will ask: huggingface_hub reads HF_ENDPOINT (a mirror or an
    on-premise hub) once, at import."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return os.environ.get("HF_ENDPOINT", DEFAULT_HUB).rstrip("/")
    return constants.ENDPOINT.rstrip("/")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # a redirect is an answer: the hub is there


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick reachability probe of `hub_endpoint()`, so an offline machine (or a hub that accepts
    connections and never answers) does not wait through the hub client's retries: any HTTP answer
    within `timeout` seconds counts. HF_HUB_OFFLINE=1 answers no without asking the network."""
    from clipposter.heads.caption.lm import offline as _offline

    if _offline():
        return False
    request = urllib.request.Request(hub_endpoint() + "/", method="HEAD")
    try:
        with urllib.request.build_opener(_NoRedirect).open(request, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True  # 4xx/5xx or a redirect: it answered
    except (OSError, ValueError):  # refused, unresolvable, timed out, or not a URL
        return False


def pick_backbone(device: str = "auto", online: bool | None = None,
                  fallback: Callable[[], Backbone] | None = None) -> tuple[Backbone, str | None]:
    """The real backbone when its weights can be had, else `fallback()` (default: the tiny random one)
    and the reason why not."""
    online = hub_reachable() if online is None else online
    if online:
        try:
            return load_backbone(*REAL_BACKBONE, device=device), None
        except ClipposterError as exc:
            reason = str(exc)
    else:
        reason = _unreachable()
    return (fallback() if fallback is not None else load_backbone(TINY_MODEL, None, device=device)), reason


def offline_backbone(seed: int = 0, device: str = "auto", progress: bool = False) -> SyntheticBackbone:
    """The demo's backbone when CLIP's weights cannot be had: clipposter-tiny trained on
    OFFLINE_BACKBONE_POSTERS synthetic posters drawn with a seed other than the demo's `seed`, so none
    of the demo's validation or test posters is ever trained on. Trained once, then reused from the
    user cache (clipposter.embedding.contrastive.backbone_cache_root)."""
    own = SYNTHETIC_SEED if seed != SYNTHETIC_SEED else SYNTHETIC_SEED + 1
    with _torch_threads(1):
        return synthetic_backbone(OFFLINE_BACKBONE_POSTERS, own, OFFLINE_BACKBONE_SETTINGS, device=device,
                                  progress=progress)


def pick_lm(texts: Sequence[str], folder: Path, online: bool) -> tuple[str, str | None]:
    """gpt2 when it loads (local HF cache, or the hub when reachable); else a tiny GPT-2 built in
    `folder` with a tokenizer trained on `texts`. Returns (LM name or folder, reason it is not gpt2)."""
    from clipposter.heads.caption.lm import load_language_model
    from clipposter.heads.caption.tiny_lm import build_tiny_lm

    if online or _in_hf_cache(REAL_LM):
        try:
            load_language_model(REAL_LM, hub=online)
            return REAL_LM, None
        except ClipposterError as exc:
            reason = str(exc)
    else:
        reason = f"{_unreachable()} and no local copy"
    if not (folder / "config.json").is_file():
        if not texts:
            raise ClipposterError("the posters have no taglines or overviews to train the tiny language model's "
                                  "tokenizer on; give a source with a tagline column")
        replace_dir(lambda tmp: build_tiny_lm(tmp, texts), folder)
    return str(folder), reason


def _unreachable() -> str:
    from clipposter.heads.caption.lm import offline as _offline

    return "HF_HUB_OFFLINE is set" if _offline() else f"cannot reach {hub_endpoint()}"


def _in_hf_cache(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # an old or missing hub client just means "not cached"
        return False


@dataclass
class DemoResult:
    out: str
    report: str
    run_file: str
    notice: str | None
    stages: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"out": self.out, "report": self.report, "run": self.run_file, "notice": self.notice,
                "stages": self.stages, "seconds": round(self.seconds, 2)}


def _fingerprint(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stage_current(folder: Path, fingerprint: str, marker: str = "config.json") -> bool:
    """A head folder holds `marker` (by default a finished head) made from the same inputs."""
    try:
        stage = json.loads((folder / STAGE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return stage.get("fingerprint") == fingerprint and (folder / marker).is_file()


def _mark_stage(folder: Path, fingerprint: str, **extra) -> None:
    write_json(folder / STAGE_FILE, {"fingerprint": fingerprint, **extra})


class _Stages:
    """Times the stages and says what each did, one line per stage on stderr."""

    def __init__(self, verbose: bool):
        self.verbose = verbose
        self.done: dict[str, dict] = {}

    def start(self, name: str, what: str) -> float:
        if self.verbose:
            print(f"[{len(self.done) + 1}] {what}", file=sys.stderr, flush=True)
        return time.perf_counter()

    def end(self, name: str, started: float, **info) -> None:
        self.done[name] = {"seconds": round(time.perf_counter() - started, 2), **info}


def run_demo(out: str | Path, n: int = DEFAULT_POSTERS, source: str | None = None, *, seed: int = 0, backbone: Backbone | None = None,
             lm: str | None = None, online: bool | None = None, evaluate_captions_with: str = "all-MiniLM-L6-v2",
             report_limit: int = 60, progress: bool = True) -> DemoResult:
    """Run the main job into `out` and return where everything went.

    backbone / lm: use these instead of choosing (tests pass the tiny ones); online: skip the hub
    probe with a known answer."""
    from clipposter.ingest.sources import load_source
    from clipposter.ingest.synthetic import generate_posters

    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stages = _Stages(progress)
    notices: list[str] = []

    if source is None and n < 50:
        raise ClipposterError(f"-n {n}: the demo needs at least 50 posters to train and evaluate on three splits")
    t = stages.start("posters", f"posters: {'synthetic, ' + str(n) if source is None else source}")
    if source is None:
        records = generate_posters(out / "synthetic", n=n, seed=seed, progress=progress)
    else:
        records = load_source(source, seed=seed)
        if not records:
            raise ClipposterError(f"{source}: no posters found; check the path and the manifest columns")
    stages.end("posters", t, posters=len(records))

    if online is None and (backbone is None or lm is None):
        online = hub_reachable()
    t = stages.start("backbone", "backbone")
    offline: list[SyntheticBackbone] = []
    if backbone is None:
        def fallback() -> Backbone:
            offline.append(offline_backbone(seed, progress=progress))
            return offline[0].backbone

        backbone, reason = pick_backbone(online=online, fallback=fallback)
        if reason:
            notices.append(f"pretrained {REAL_BACKBONE[0]}/{REAL_BACKBONE[1]} weights unavailable ({reason}): "
                           f"using {offline[0].describe()}")
    trained = {"trained_seconds": round(offline[0].seconds, 2), "trained_now": offline[0].trained_now,
               "trained_in": str(offline[0].folder)} if offline else {}
    stages.end("backbone", t, backbone=backbone.identity.describe(), **trained)

    t = stages.start("embed", f"embedding with {backbone.identity.describe()}")
    cache_dir = out / f"cache-{backbone.identity.key}"
    with EmbeddingCache.open(cache_dir, backbone.identity, backbone_spec=backbone.spec) as cache:
        summary = embed_records(records, cache, backbone, progress=progress)
        texts = embed_texts(cache, backbone, reference_and_prompt_texts(records))
    if summary.skipped == summary.records:
        raise ClipposterError(f"none of the {summary.records} posters could be used; see the warnings above")
    stages.end("embed", t, **summary.to_dict(), texts=texts)

    cache = EmbeddingCache.open(cache_dir)
    small = len(cache.records("train")) < SMALL_DATA
    try:
        with _torch_threads(1 if small else None):
            return _heads_index_report(out, cache, cache_dir, records, backbone, lm, online, source, n, seed,
                                       small, stages, notices, evaluate_captions_with, report_limit, started)
    finally:
        cache.close()


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """Small heads train on one intra-op thread: they gain nothing from a second, and on a 2-core
    machine that other jobs share, spinning OpenMP threads made the demo five times slower."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _heads_index_report(out, cache, cache_dir, records, backbone, lm, online, source, n, seed, small, stages,
                        notices, evaluate_captions_with, report_limit, started) -> DemoResult:
    """Stages 4-10 of run_demo, over the embedded cache."""
    from clipposter.analysis import PosterAnalyzer
    from clipposter.heads.caption.evaluation import evaluate_captions, load_sentence_scorer
    from clipposter.heads.caption.model import CaptionHead
    from clipposter.heads.caption.train import TrainConfig, train_caption_head
    from clipposter.heads.genre import GenreHead, evaluate_genres, train_genre_head
    from clipposter.heads.genre.evaluation import write_genre_evaluation
    from clipposter.report.build import build_report
    from clipposter.report.charts import write_genre_f1_chart
    from clipposter.run import RUN_FILE, write_run
    from clipposter.search.index import PosterIndex

    ids = sorted(r.id for r in cache.records())
    data_key = _fingerprint(ids=ids, backbone=backbone.identity.key)

    t = stages.start("lm", "language model")
    if lm is None:
        corpus = [x for r in records for x in (r.tagline, r.overview) if x]
        lm, reason = pick_lm(corpus, out / "tiny-lm", bool(online))
        if reason:
            notices.append(f"{REAL_LM} weights unavailable: using a tiny GPT-2 trained from scratch on these "
                           f"posters' texts")
    tiny_lm = lm != REAL_LM
    stages.end("lm", t, lm="tiny GPT-2 (random init, BPE trained on the posters' texts)" if tiny_lm else lm)

    # ---- genre head
    genre_dir = out / "genres"
    key = _fingerprint(data=data_key, settings=GENRE_RULE, seed=seed)
    t = stages.start("genres", "training the genre head (ML-Decoder)")
    if _stage_current(genre_dir, key):
        head = GenreHead.from_pretrained(genre_dir, identity=cache.identity)
        stages.end("genres", t, reused=True)
    else:
        shutil.rmtree(genre_dir, ignore_errors=True)
        result = train_genre_head(cache, options={"seed": seed}, backbone=backbone, progress=stages.verbose)
        head = result.head
        head.save_pretrained(genre_dir)
        head = GenreHead.from_pretrained(genre_dir, identity=cache.identity)
        _mark_stage(genre_dir, key)
        stages.end("genres", t, epochs=len(result.history), warnings=result.warnings)

    t = stages.start("genre_eval", "evaluating the genre head beside its baselines")
    genre_eval = evaluate_genres(head, cache, seed=seed, progress=stages.verbose)
    chart = write_genre_f1_chart(genre_eval, genre_dir / "evaluation.svg")
    genre_eval["chart"] = str(chart) if chart else None
    write_genre_evaluation(genre_eval, head.genres, genre_dir / "evaluation.json")
    stages.end("genre_eval", t, **_genre_headline(genre_eval))

    # ---- caption head
    cap_settings = CAPTION_TINY_LM if tiny_lm else CAPTION_REAL_LM
    caption_dir = out / "taglines"
    key = _fingerprint(data=data_key, lm=lm if not tiny_lm else "tiny", settings=cap_settings, seed=seed)
    t = stages.start("captions", f"training the caption head (ClipCap prefix + {'tiny GPT-2' if tiny_lm else lm})")
    if _stage_current(caption_dir, key):
        stages.end("captions", t, reused=True)
    else:
        # A run of the same inputs killed mid-training left an epoch checkpoint: continue from it.
        resume = _stage_current(caption_dir, key, marker="checkpoints/latest.json")
        if not resume:
            shutil.rmtree(caption_dir, ignore_errors=True)
            caption_dir.mkdir(parents=True)
            _mark_stage(caption_dir, key, complete=False)
        s = cap_settings
        train_summary = train_caption_head(
            cache, caption_dir, lm=lm, max_tokens=s["max_tokens"], resume=resume, progress=stages.verbose,
            train=TrainConfig(epochs=s["epochs"], lr=s["lr"], batch_size=s["batch_size"],
                              warmup_steps=s["warmup_steps"], seed=seed))
        _mark_stage(caption_dir, key, complete=True)
        stages.end("captions", t, resumed_from_epoch=train_summary.resumed_from_epoch,
                   examples=train_summary.train_examples, last=train_summary.history[-1])
    caption_head = CaptionHead.load(caption_dir)

    t = stages.start("caption_eval", "evaluating the caption head beside chance and constant texts")
    caption_eval = None
    split = "test" if cache.records("test") else "validation"
    try:
        scorer = load_sentence_scorer(evaluate_captions_with)
        report = evaluate_captions(caption_head, cache, split=split, scorer=scorer, seed=seed, progress=stages.verbose)
        caption_eval = report.to_dict()
        write_json(caption_dir / "evaluation.json", caption_eval, default=str, allow_nan=True)
        stages.end("caption_eval", t, **_caption_headline(caption_eval))
    except ClipposterError as exc:
        notices.append(f"caption evaluation skipped: {exc}")
        stages.end("caption_eval", t, skipped=str(exc))

    t = stages.start("index", "building the poster index")
    index = PosterIndex.open(cache, progress=stages.verbose)
    stages.end("index", t, kind=index.kind, posters=index.ntotal)

    notice = None
    if notices:
        notice = "; ".join(notices)
        if any("unavailable" in x for x in notices):
            notice += "; the scores show that the pipeline works, not how good CLIP or GPT-2 are"
    run = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "notice": notice,
           "source": source or f"synthetic ({n} posters, seed {seed})",
           "backbone": backbone.identity.describe(), "lm": "tiny GPT-2" if tiny_lm else lm,
           "cache": cache_dir.name, "genre_head": genre_dir.name, "caption_head": caption_dir.name,
           "report": "report.html",
           "evaluation": {"genres": "genres/evaluation.json",
                          "captions": "taglines/evaluation.json" if caption_eval else None}}
    write_run(out, run)

    t = stages.start("report", "writing the report")
    analyzer = PosterAnalyzer(cache, head, caption_head, index, backbone=backbone,
                              run_info={**run, "run_dir": str(out.resolve())})
    report_path = out / "report.html"
    report_summary = build_report(analyzer, report_path, genre_eval=genre_eval, caption_eval=caption_eval,
                                  evaluate=False, limit=report_limit,
                                  header_extra={"notice": notice, "source": run["source"],
                                                "backbone": run["backbone"], "lm": run["lm"]})
    stages.end("report", t, **{k: v for k, v in report_summary.items() if k != "path"})
    return DemoResult(out=str(out), report=str(report_path), run_file=str(out / RUN_FILE), notice=notice,
                      stages=stages.done, seconds=time.perf_counter() - started)


def _genre_headline(report: dict) -> dict:
    """Micro-F1 of the head and of each baseline on the per-genre split, for the summary lines."""
    split = report.get("per_genre_split") or "validation"
    out = {"split": split}
    for name, model in report["models"].items():
        setting = "calibrated" if "calibrated" in model["results"] else "top-k"
        scores = model["results"][setting].get(split)
        label = "head" if name == report["head"]["name"] else name
        out[f"{label}_micro_f1"] = round(scores["micro"]["f1"], 3) if scores else None
    return out


def _caption_headline(report: dict) -> dict:
    systems = report["scores"]["systems"]
    return {"split": report["split"], "posters": report["posters"],
            **{f"{system}_{metric}": round(systems[system][metric], 3)
                                         for system in ("generated", "chance", "constant")
                                         for metric in ("cosine", "margin", "retrieval") if system in systems}}


def format_demo(result: DemoResult) -> str:
    s = result.stages
    lines = []
    if result.notice:
        lines.append(f"note: {result.notice}")
    emb = s.get("embed", {})
    lines.append(f"posters: {emb.get('encoded', 0)} encoded, {emb.get('cached', 0)} already cached, "
                 f"{emb.get('skipped', 0)} skipped; backbone {s['backbone']['backbone']}; LM {s['lm']['lm']}")
    b = s.get("backbone", {})
    if "trained_in" in b:
        how = f"trained in {b['trained_seconds']:.0f} s, kept in" if b["trained_now"] else "reused from"
        lines.append(f"offline backbone: {how} {b['trained_in']}")
    g = s.get("genre_eval", {})
    if g:
        lines.append(f"genres ({g['split']}): micro-F1 {g.get('head_micro_f1')} (image-blind constant "
                     f"{g.get('constant_micro_f1')}, linear probe {g.get('linear-probe_micro_f1')}, "
                     f"zero-shot {g.get('zero-shot_micro_f1')})")
    c = s.get("caption_eval", {})
    if c and "skipped" not in c:
        lines.append(f"taglines ({c['split']}, {c['posters']} posters): cosine / margin / retrieval@10 "
                     f"{c['generated_cosine']:.3f} / {c['generated_margin']:+.3f} / {c['generated_retrieval']:.2f} "
                     f"(a random training tagline {c['chance_cosine']:.3f} / {c['chance_margin']:+.3f} / "
                     f"{c['chance_retrieval']:.2f}; the best constant tagline {c['constant_cosine']:.3f} / +0.000 / "
                     f"{c['constant_retrieval']:.2f})")
    idx = s.get("index", {})
    lines.append(f"index: {idx.get('kind')} over {idx.get('posters')} posters")
    lines.append(f"done in {result.seconds:.0f} s; run folder {result.out}")
    lines.append(f"next: clipposter app --run {result.out}   |   clipposter search --cache "
                 f"{Path(result.out) / json.loads(Path(result.run_file).read_text())['cache']} --text \"...\"")
    lines.append(f"report: {result.report}")
    return "\n".join(lines)
