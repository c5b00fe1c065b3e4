"""`clipposter demo`: the main job end to end on synthetic posters (or the user's own).

It uses the real ViT-B-32/openai weights when they can be fetched. When they cannot (no network),
it says so in one line and runs every stage with the tiny random backbone instead, so the pipeline
still runs offline; scores from random weights say nothing about CLIP.
"""
from __future__ import annotations

import socket
import sys
from pathlib import Path

from .backbone import TINY_MODEL, Backbone, load_backbone
from .cache import EmbeddingCache
from .embed import embed_records, embed_texts, reference_and_prompt_texts
from .errors import ClipposterError

REAL_BACKBONE = ("ViT-B-32", "openai")
HUB_HOST = ("huggingface.co", 443)


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick reachability probe, so an offline machine does not wait through the hub client's retries."""
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def pick_backbone(device: str = "auto") -> tuple[Backbone, str | None]:
    """The real backbone when its weights can be had, else the tiny random one and a one-line notice."""
    if hub_reachable():
        try:
            return load_backbone(*REAL_BACKBONE, device=device), None
        except ClipposterError as exc:
            reason = str(exc)
    else:
        reason = f"cannot reach {HUB_HOST[0]}"
    notice = (f"pretrained {REAL_BACKBONE[0]}/{REAL_BACKBONE[1]} weights unavailable ({reason}); "
              f"running with the tiny random backbone {TINY_MODEL}: figures show the pipeline works, "
              f"not how good CLIP is")
    return load_backbone(TINY_MODEL, None, device=device), notice


def run_demo(out: str | Path, n: int = 300, source: str | None = None, progress: bool = True) -> dict:
    from .sources import load_source
    from .synthetic import generate_posters

    out = Path(out)
    if source is None:
        records = generate_posters(out / "synthetic", n=n, seed=0, progress=progress)
    else:
        records = load_source(source, seed=0)
    backbone, notice = pick_backbone()
    if notice:
        print(f"note: {notice}", file=sys.stderr)
    cache_dir = out / f"cache-{backbone.identity.key}"
    with EmbeddingCache.open(cache_dir, backbone.identity, backbone_spec=backbone.spec) as cache:
        summary = embed_records(records, cache, backbone, progress=progress)
        texts = embed_texts(cache, backbone, reference_and_prompt_texts(records))
        info = cache.info()
    lines = [f"posters: {summary.encoded} encoded, {summary.cached} cached, {summary.skipped} skipped "
             f"({summary.posters_per_second:.1f} posters/s)",
             f"texts cached (taglines, overviews, genre prompts): {texts}",
             f"cache: {info.path} ({info.posters} posters, backbone {backbone.identity.describe()})",
             f"next: clipposter cache info {info.path}"]
    return {"notice": notice, "summary": summary.to_dict(), "cache": info.to_dict(), "text": "\n".join(lines)}
