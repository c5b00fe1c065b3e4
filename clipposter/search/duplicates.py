"""Near-duplicate posters: pairs whose embeddings have cosine similarity at or above a threshold."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from clipposter.search.config import DEFAULT_DUPLICATE_THRESHOLD, check_cosine
from clipposter.search.results import DuplicatePair

if TYPE_CHECKING:
    from clipposter.search.index import PosterIndex


def find_duplicates(index: "PosterIndex", threshold: float = DEFAULT_DUPLICATE_THRESHOLD, *,
                    exact: bool | None = None, progress: bool = True, batch: int = 1024) -> list[DuplicatePair]:
    """Pairs of poster ids whose embeddings have cosine ≥ threshold, best first. Ids sharing one
    content hash (the same file under two ids) pair with score 1.0.

    exact: blocked all-pairs products (default below the index threshold); otherwise each poster
    queries the index for its neighbours, widening the search while all of them are above it.
    """
    threshold = check_cosine("threshold", threshold)
    n = index.ntotal
    if exact is None:
        exact = index.kind == "exact" or n < index.threshold
    if exact:
        row_pairs = _row_pairs_exact(index, threshold, progress)
    else:
        row_pairs = _row_pairs_ann(index, threshold, progress, batch)
    pairs: dict[tuple[str, str], float] = {}
    for ids in index.row_ids:  # same content, several ids
        for a_i, a in enumerate(ids):
            for b in ids[a_i + 1:]:
                pairs[(a, b) if a < b else (b, a)] = 1.0
    for (ra, rb), s in row_pairs.items():
        for a in index.row_ids[ra]:
            for b in index.row_ids[rb]:
                key = (a, b) if a < b else (b, a)
                pairs[key] = max(pairs.get(key, -1.0), min(float(s), 1.0))
    out = [DuplicatePair(a, b, s) for (a, b), s in pairs.items()]
    out.sort(key=lambda p: (-p.score, p.id_a, p.id_b))
    return out

def _row_pairs_exact(index: "PosterIndex", threshold: float, progress: bool) -> dict[tuple[int, int], float]:
    from tqdm.auto import tqdm

    matrix = index.engine.matrix
    n, dim = matrix.shape
    block = 4096  # a 4096 × 4096 float32 block of scores is 64 MiB
    # Convert once when the float32 copy is modest; otherwise convert blocks as they are needed.
    full = np.asarray(matrix, dtype=np.float32) if n * dim * 4 <= (1 << 30) else None
    pairs: dict[tuple[int, int], float] = {}
    starts = range(0, n, block)
    total = len(starts) * (len(starts) + 1) // 2
    with tqdm(total=total, desc="duplicate scan", unit="block", disable=not progress or total < 4) as bar:
        for i in starts:
            a = full[i:i + block] if full is not None else np.asarray(matrix[i:i + block], dtype=np.float32)
            for j in starts[i // block:]:
                b = full[j:j + block] if full is not None else np.asarray(matrix[j:j + block], dtype=np.float32)
                sc = a @ b.T
                ra, rb = np.nonzero(sc >= threshold)
                keep = i + ra < j + rb  # each unordered pair once, no self-pairs
                ra, rb = ra[keep], rb[keep]
                for x, y, v in zip((i + ra).tolist(), (j + rb).tolist(), sc[ra, rb].tolist()):
                    pairs[(x, y)] = v
                bar.update(1)
    return pairs

def _row_pairs_ann(index: "PosterIndex", threshold: float, progress: bool, batch: int) -> dict[tuple[int, int], float]:
    from tqdm.auto import tqdm

    matrix = index.engine.matrix
    n = index.ntotal
    pairs: dict[tuple[int, int], float] = {}
    with tqdm(total=n, desc="duplicate search", unit="poster", disable=not progress) as bar:
        for s in range(0, n, batch):
            rows = np.arange(s, min(n, s + batch))
            depth = min(n, 16)
            while len(rows):
                q = np.asarray(matrix[rows], dtype=np.float32)
                scores, found = index.engine.search(q, depth)
                saturated = []
                for r, sc, fr in zip(rows, scores, found):
                    for score, other in zip(sc, fr):
                        if other >= 0 and other != r and score >= threshold:
                            key = (int(min(r, other)), int(max(r, other)))
                            pairs[key] = max(pairs.get(key, -1.0), float(score))
                    # every neighbour above the threshold: there may be more further down
                    if depth < n and fr[-1] >= 0 and sc[-1] >= threshold:
                        saturated.append(r)
                rows = np.asarray(saturated, dtype=np.int64)
                depth = min(n, depth * 4)
            bar.update(min(n, s + batch) - s)
    return pairs
