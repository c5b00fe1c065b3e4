"""Writing a synthetic poster set: the JPEGs, their records and manifest.csv.

Everything about poster i is a function of (seed, i) alone: reruns are byte-identical, and a
resumed run skips posters whose files already exist without changing any record.
"""
from __future__ import annotations

import io
import os
import random
import sys
from pathlib import Path
from typing import Iterable, Sequence

from clipposter.errors import ClipposterError, ConfigError
from clipposter.files import atomic_write_bytes
from clipposter.ingest.sources import write_manifest
from clipposter.ingest.synthetic.render import CUES, render_poster
from clipposter.ingest.synthetic.text import SYNTHETIC_GENRES, make_overview, make_tagline, make_title, sample_genres
from clipposter.records import PosterRecord, assign_splits

JPEG_QUALITY = 90


def _poster_rng(seed: int, index: int) -> random.Random:
    # String seeding hashes with SHA-512: stable across Python versions and platforms.
    return random.Random(f"clipposter-synthetic:{seed}:{index}")


def generate_posters(out_dir: str | os.PathLike, n: int = 200, seed: int = 0, size: tuple[int, int] = (200, 300),
                     genres: Sequence[str] = SYNTHETIC_GENRES, progress: bool = False,
                     cue: str = "global") -> list[PosterRecord]:
    """Write n synthetic posters to out_dir/posters/<id>.jpg and out_dir/manifest.csv.

    `cue`: "global" (the genres' art fills the poster) or "region" (it fills one quadrant and decoy
    genre art the rest; see `render_poster`). The records do not depend on `cue`, only the pixels.

    `size` is (width, height). Same seed gives byte-identical files and identical records; an
    existing poster file is kept as is, so an interrupted run can simply be started again.
    Returns the records with absolute image paths and seeded splits.
    """
    genres = tuple(genres)
    unknown = [g for g in genres if g not in SYNTHETIC_GENRES]
    if unknown:
        raise ClipposterError(f"synthetic posters know only {', '.join(SYNTHETIC_GENRES)}; got {', '.join(unknown)}")
    if not genres:
        raise ClipposterError("synthetic posters need at least one genre")
    if cue not in CUES:
        raise ConfigError("cue", f"must be one of {', '.join(CUES)}, got {cue!r}")
    if n < 0:
        raise ClipposterError(f"number of posters must be >= 0, got {n}")
    w, h = int(size[0]), int(size[1])
    if w < 32 or h < 32:
        raise ClipposterError(f"poster size must be at least 32x32, got {w}x{h}")

    out = Path(out_dir).resolve()
    poster_dir = out / "posters"
    poster_dir.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(max(n - 1, 0))))

    indices: Iterable[int] = range(n)
    if progress:
        try:
            from tqdm import tqdm

            indices = tqdm(indices, total=n, desc="synthetic posters", unit="poster")
        except ImportError:
            print(f"generating {n} synthetic posters in {out}", file=sys.stderr)

    records: list[PosterRecord] = []
    for i in indices:
        rnd = _poster_rng(seed, i)
        chosen = sample_genres(rnd, genres)
        title = make_title(rnd, chosen)
        tagline = make_tagline(rnd, chosen)
        overview = make_overview(rnd, chosen)
        rec_id = f"syn-{i:0{width}d}"
        image_path = poster_dir / f"{rec_id}.jpg"
        if not image_path.exists():
            # Rendering draws from its own stream, so skipping it never shifts the texts.
            img = render_poster(random.Random(rnd.getrandbits(64)), chosen, title, (w, h), cue=cue)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=JPEG_QUALITY)
            atomic_write_bytes(image_path, buf.getvalue())
        records.append(PosterRecord(id=rec_id, image=str(image_path), genres=chosen, tagline=tagline,
                                    overview=overview, title=title))
    assign_splits(records, seed=seed)
    write_manifest(records, out / "manifest.csv")
    return records
