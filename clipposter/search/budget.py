"""Building the poster index within a memory budget: IVF-PQ trained on a sample, filled chunk by chunk,
re-ranked from the cache's own rows.

The in-memory engines hold every vector once more than the cache file: the exact store and ivfpq's
re-ranking store are faiss copies of all rows (n × dim × 2 bytes in float16), HNSW holds them in
float32. Under `memory_budget` the index keeps only what it cannot read back from the cache:

- the coarse quantizer (nlist centroids) and one 4-bit PQ code + row id per poster (72 bytes at 512-d);
- training uses a seeded sample of 30-256 points per list (faiss' advice for k-means), as large as the
  budget allows, and fewer lists when even 30 per list do not fit;
- rows are read and encoded `chunk_rows` at a time through `EmbeddingCache.iter_embeddings`, each chunk
  released before the next, so a build never maps the whole file nor converts it to float32;
- a query scans its probed lists, then re-ranks its k × k_factor candidates exactly against the
  rows gathered from the memory-mapped cache (a few hundred rows, ~1 ms), not against a copy.

The codes stay in memory: a budget smaller than them is refused with the size it needs. Inverted lists
on disk (faiss OnDiskInvertedLists) would lift that limit but need the 8-bit `IndexIVFPQ` layout, whose
scans are several times slower than the 4-bit fast-scan codes; at 100M posters the codes take 7.2 GB,
which one machine holds (see docs/scaling.md).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from clipposter.errors import ConfigError
from clipposter.search.config import format_bytes
from clipposter.search.engines import TUNE_K, IVFPQEngine, gather_rows, import_faiss, pq_subquantizers
from clipposter.search.tuning import TUNE_QUERIES, tune_ivf, tune_k_factor, tune_sample

log = logging.getLogger(__name__)

RERANK_FROM_CACHE = "cache rows"  # params["rerank"] of an index that keeps no copy of the vectors
IN_MEMORY_TRAIN_ROWS = 50_000  # the in-memory ivfpq build's training sample
IN_MEMORY_ADD_ROWS = 65_536  # and its float32 add chunk
MIN_POINTS_PER_LIST, MAX_POINTS_PER_LIST = 30, 256  # faiss' k-means advice, points per centroid
MIN_LISTS = 16
ID_BYTES = 8  # an IVF list stores each code's row id as int64

Reader = Callable[[int, int, int], Iterator[tuple[int, np.ndarray]]]  # (start, stop, chunk_rows) → chunks


def in_memory_bytes(kind: str, n: int, dim: int, itemsize: int) -> int:
    """Peak memory of today's in-memory engines for n posters (build and first query), past the cache's
    own mapped file: what `memory_budget` is compared with."""
    vectors = n * dim * itemsize  # the exact store / re-ranking store: faiss's copy of every row
    if kind == "exact":
        return vectors
    if kind == "hnsw":
        return n * dim * 4 + n * 64 * 4  # float32 vectors + ~2M neighbour ids per node at M=32
    codes = n * pq_subquantizers(dim) // 2
    return vectors + codes + (min(n, IN_MEMORY_TRAIN_ROWS) + min(n, IN_MEMORY_ADD_ROWS)) * dim * 4


@dataclass
class BudgetPlan:
    """How a budgeted build spends its memory."""

    budget: int
    nlist: int
    train_rows: int
    chunk_rows: int  # rows read, converted and encoded at a time
    scan_rows: int  # rows per block of the tuning's exact scan (its scores are TUNE_QUERIES × scan_rows)
    tune_bytes: int  # for the re-ranking depth tuning's candidate lists
    index_bytes: int  # what the index keeps: codes, ids, centroids
    notes: list[str] = field(default_factory=list)


def plan_budget(n: int, dim: int, budget: int, nlist: int | None = None) -> BudgetPlan:
    """Lists, sample and chunk sizes for n posters of width dim within `budget` bytes; a budget that
    cannot hold the index is a ConfigError naming the size it needs."""
    auto = nlist is None
    if auto:
        nlist = int(min(65_536, max(MIN_LISTS, math.sqrt(n))))
    if nlist < 1:
        raise ConfigError("nlist", f"must be at least 1, got {nlist}")
    nlist = min(nlist, n)
    per_code = pq_subquantizers(dim) // 2 + ID_BYTES

    def kept(lists: int) -> int:
        return n * per_code + lists * dim * 4 + 2 * (16 * 4 * dim)  # codes + ids, centroids, PQ codebooks

    def least(lists: int) -> int:  # the index, and a working share holding 30 points per list twice over
        return kept(lists) + 4 * min(n, MIN_POINTS_PER_LIST * lists) * dim * 4 + (1 << 20)

    fewest = min(nlist, MIN_LISTS)
    if budget < least(fewest):
        raise ConfigError("memory_budget", f"of {format_bytes(budget)} cannot hold the index of {n:,} posters: its "
                                           f"codes and lists alone take {format_bytes(kept(fewest))}; give at least "
                                           f"{format_bytes(least(fewest))}")
    notes = []
    if budget < least(nlist):
        if not auto:
            raise ConfigError("memory_budget", f"of {format_bytes(budget)} cannot train {nlist} lists on "
                                               f"{MIN_POINTS_PER_LIST} points each; give at least "
                                               f"{format_bytes(least(nlist))} or fewer lists (`nlist`)")
        wanted = nlist
        while nlist > fewest and budget < least(nlist):
            nlist = max(fewest, int(nlist * 0.9))
        notes.append(f"{nlist} IVF lists instead of {wanted}: the memory budget holds a training sample of "
                     f"{MIN_POINTS_PER_LIST} points per list for no more")
    work = budget - kept(nlist)
    train_rows = int(min(n, MAX_POINTS_PER_LIST * nlist, work // 2 // (dim * 4)))
    # An add chunk lives as its stored rows, their float32 copy and faiss's assignment buffers.
    chunk_rows = int(min(IN_MEMORY_ADD_ROWS, max(256, work // 4 // (dim * 4 * 3))))
    scan_rows = int(min(IN_MEMORY_ADD_ROWS, max(256, work // 4 // (TUNE_QUERIES * 4 * 3 + dim * 4))))
    return BudgetPlan(budget, nlist, max(1, train_rows), chunk_rows, scan_rows, work // 4, kept(nlist), notes)


class BudgetIVFEngine(IVFPQEngine):
    """IVF-PQ codes in memory, vectors left in the cache: candidates from the PQ scan are re-ranked
    exactly against rows gathered from the memory-mapped cache. Rows are added through `reader`."""

    keeps_vectors = False

    def __init__(self, matrix, store, reader: Reader, chunk_rows: int = IN_MEMORY_ADD_ROWS, parts=None):
        super().__init__(matrix, store, parts=parts)
        self.reader = reader
        self.chunk_rows = chunk_rows

    def train(self, sample, nlist, seed, shards=1):
        super().train(sample, nlist, seed, 1)
        self.params["rerank"] = RERANK_FROM_CACHE

    def add(self, matrix, start, progress):
        from tqdm.auto import tqdm

        self.matrix = matrix
        end = len(matrix)
        if start == 0 and self.ntotal == 0:
            self.params["rows_at_training"] = end
        with tqdm(total=end - start, desc="encoding PQ codes", unit="row", disable=not progress) as bar:
            for _, block in self.reader(start, end, self.chunk_rows):
                self.base.add(np.asarray(block, dtype=np.float32))
                bar.update(len(block))
        self.params["rows_added_after_training"] = end - self.params["rows_at_training"]

    def search(self, q, k):
        k = min(k, self.ntotal)
        depth = min(self.params["k_factor"] * max(k, TUNE_K + 1), self.ntotal)
        if self.params.get("nlist", 1) > 1:
            self.base.nprobe = self.params["nprobe"]
        _, cand = self.base.search(q, depth)
        scores = np.full((len(q), k), -np.inf, np.float32)
        rows = np.full((len(q), k), -1, np.int64)
        for i, found in enumerate(cand):
            found = np.sort(found[found >= 0])  # sorted rows read the file in order
            if not len(found):
                continue
            exact = np.asarray(self.matrix[found], dtype=np.float32) @ q[i]
            best = np.argsort(-exact, kind="stable")[:k]
            scores[i, :len(best)] = exact[best]
            rows[i, :len(best)] = found[best]
        return scores, rows

    def nbytes(self) -> int:
        faiss = import_faiss()
        lists = self.params.get("nlist", 1)
        codes = self.ntotal * (self.base.code_size + (ID_BYTES if lists > 1 else 0))
        return int(codes + (lists * self.base.d * 4 if lists > 1 else 0)
                   + faiss.vector_to_array(self.base.pq.centroids).nbytes)

    def warm(self) -> None:
        """Nothing to load: re-ranking reads the cache's rows as queries need them."""


def build_within_budget(matrix, store, reader: Reader, plan: BudgetPlan, *, auto_nlist: bool, target_recall: float,
                        seed: int, progress: bool, meta: dict) -> BudgetIVFEngine:
    """Train on a seeded sample, tune, then encode the cache chunk by chunk (see the module notes)."""
    n, dim = matrix.shape
    for note in plan.notes:
        log.warning(note)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    picks = np.sort(rng.choice(n, size=plan.train_rows, replace=False))

    def gather(rows):
        return gather_rows(reader, n, rows)

    sample = gather(picks)
    tune = tune_sample(matrix, seed + 1, progress, chunks=reader(0, n, plan.scan_rows), gather=gather) \
        if n > 1 else None
    engine = BudgetIVFEngine(matrix, store, reader, plan.chunk_rows)
    engine.train(sample, plan.nlist, seed)
    if plan.nlist > 1 and tune is not None:
        tune_ivf(engine, tune, matrix, target_recall, gather=gather)
        if engine.params["nprobe"] is None:
            if auto_nlist:
                engine = BudgetIVFEngine(matrix, store, reader, plan.chunk_rows)
                engine.train(sample, 1, seed)
                engine.notes.append(f"IVF with {plan.nlist} lists would need over a quarter of them probed to "
                                    f"find the neighbours (no cluster structure): one list, every code scanned")
            else:
                engine.params["nprobe"] = plan.nlist
    del sample
    meta["train_seconds"] = round(time.perf_counter() - started, 3)
    started = time.perf_counter()
    engine.add(matrix, 0, progress)
    meta["add_seconds"] = round(time.perf_counter() - started, 3)
    if tune is not None:
        meta["tuned_recall_at_10"] = round(tune_k_factor(engine, tune, target_recall, plan.tune_bytes), 4)
    else:
        engine.params["k_factor"] = 1
    engine.notes = plan.notes + engine.notes
    engine.params.update({"memory_budget": plan.budget, "chunk_rows": plan.chunk_rows})
    return engine
