"""The search engines under `PosterIndex`: exact, HNSW and IVF-PQ, all over the cache's embedding rows.

Three engines sit under the same interface, all over the cache's embedding rows:

  exact   every row scored. Single queries run faiss's fused float16 scan over the cache's own bytes
          (numpy's float16 → float32 conversion costs ~4 ns/element on a 2-core box, which made one
          query over 100k × 512 take ~200 ms; the fused scan is several times faster). Batches of
          queries use float32 matrix products over blocks of the memory-mapped matrix, so the
          conversion is paid once per block, not per query.
  hnsw    faiss IndexHNSWFlat (graph). Excellent on real CLIP embeddings, which lie near a
          low-dimensional surface; slow to build on 2 cores and weak on structureless data.
  ivfpq   faiss IVF + product-quantised fast-scan codes (4 bits per 4 dimensions, 64 bytes for
          512-d), then exact re-ranking of k × k_factor candidates against the cache's float16
          vectors. The IVF partition is kept only when it pays: on data without cluster structure
          (the random-vector benchmark) probing enough lists to find the neighbours costs more than
          scanning every code, so the index drops to one list, split into one shard per core that

All three return (scores, rows) sorted best-first for unit-norm float32 queries, row -1 = none.
faiss is an optional dependency (the `scale` extra): it is imported on first use, and exact search
works without it through numpy alone.
"""
from __future__ import annotations

import abc
import math
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import numpy as np

from clipposter.errors import ClipposterError

TUNE_K = 10  # the k the approximate engines are tuned for (recall@10)
GEMM_MIN_QUERIES = 32  # from this many queries on, exact search uses blocked matrix products
_ADD_CHUNK = 65_536  # rows per add() call, so progress bars move and memory stays bounded
_BLOCK_BYTES = 64 << 20  # float32 bytes per block of converted rows in blocked products


def import_faiss():
    """faiss, imported on first use: it is an optional dependency (the `scale` extra)."""
    try:
        import faiss
    except ImportError:
        raise ClipposterError("this needs faiss, which is not installed: pip install 'clipposter[scale]' "
                              "(faiss-cpu), or search exactly (kind='exact')") from None
    return faiss


def have_faiss() -> bool:
    try:
        import_faiss()
    except ClipposterError:
        return False
    return True


@contextmanager
def _omp_threads(n: int) -> Iterator[None]:
    """Run faiss with n OpenMP threads for a while. Training runs thousands of tiny k-means steps; on a
    busy 2-core machine their thread barriers made PQ training of 3,000 vectors take 5 s instead of
    0.08 s, so training runs on one thread (it is a small share of the build)."""
    faiss = import_faiss()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _as_codes(block: np.ndarray) -> np.ndarray:
    """The raw bytes of a block of stored rows, as faiss's add_sa_codes takes them. faiss's fp16 scalar
    quantiser code is IEEE half precision, the cache's own format, so no re-encoding happens."""
    return np.ascontiguousarray(block).view(np.uint8)


class ExactStore:
    """The cache's rows held in a faiss flat index in their stored precision (float16 or float32):
    exact inner products, an ID selector for filters, and the re-ranking store of ivfpq."""

    def __init__(self, dim: int, dtype: np.dtype):
        faiss = import_faiss()
        self.dtype = np.dtype(dtype)
        if self.dtype == np.float16:
            self.index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        else:
            self.index = faiss.IndexFlatIP(dim)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def add_from(self, matrix: np.ndarray, start: int, progress: bool) -> None:
        from tqdm.auto import tqdm

        end = len(matrix)
        with tqdm(total=end - start, desc="loading vectors", unit="row", disable=not progress or end - start
                  < _ADD_CHUNK, leave=False) as bar:
            for s in range(start, end, _ADD_CHUNK):
                block = np.asarray(matrix[s:s + _ADD_CHUNK])
                if block.dtype != self.dtype:
                    block = block.astype(self.dtype)
                self.index.add_sa_codes(_as_codes(block))
                bar.update(len(block))

    def search(self, q: np.ndarray, k: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        params = None
        if rows is not None:
            faiss = import_faiss()
            params = faiss.SearchParameters()
            sel = faiss.IDSelectorBatch(np.ascontiguousarray(rows, dtype=np.int64))
            params.sel = sel
        scores, idx = self.index.search(q, k, params=params)
        return scores, idx

    def nbytes(self) -> int:
        return self.ntotal * self.index.code_size


def blocked_topk(matrix: np.ndarray, q: np.ndarray, k: int, allowed: np.ndarray | None = None,
                  progress: bool = False, chunks: Iterable[tuple[int, np.ndarray]] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product over a (possibly memory-mapped, float16) matrix, in float32 blocks,
    so memory stays at one block however large the collection. `allowed`: boolean mask over rows.
    chunks: (first row, rows) blocks to scan instead of slices of `matrix` (which then gives only the
    shape), e.g. `EmbeddingCache.iter_embeddings`, so that the scan does not keep the file mapped."""
    from tqdm.auto import tqdm

    n, dim = matrix.shape
    nq = len(q)
    k = min(k, n)
    best_s = np.full((nq, k), -np.inf, np.float32)
    best_i = np.full((nq, k), -1, np.int64)
    if chunks is None:
        block = max(1024, _BLOCK_BYTES // (4 * dim))
        chunks = ((s, matrix[s:s + block]) for s in range(0, n, block))
    for s, blk in tqdm(chunks, desc="exact scan", unit="block", disable=not progress, leave=False):
        blk = np.asarray(blk, dtype=np.float32)
        sc = q @ blk.T
        if allowed is not None:
            sc[:, ~allowed[s:s + len(blk)]] = -np.inf
        cand_s = np.concatenate([best_s, sc], axis=1)
        cand_i = np.concatenate([best_i, np.broadcast_to(np.arange(s, s + len(blk)), (nq, len(blk)))], axis=1)
        top = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
        best_s = np.take_along_axis(cand_s, top, axis=1)
        best_i = np.take_along_axis(cand_i, top, axis=1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    best_s = np.take_along_axis(best_s, order, axis=1)
    best_i = np.take_along_axis(best_i, order, axis=1)
    best_i[~np.isfinite(best_s)] = -1
    return best_s, best_i


def gather_rows(read: Callable[[int, int, int], Iterator[tuple[int, np.ndarray]]], n: int, rows: np.ndarray,
                window: int = 64, dtype=np.float32) -> np.ndarray:
    """Copies of the given rows (in `dtype`; None: as stored), read `window` rows at a time through `read(start, stop, chunk_rows)`
    (e.g. `EmbeddingCache.iter_embeddings`): a random gather through one long-lived map would fault in the
    kernel's read-ahead around every row and keep most of the file resident."""
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    out = None
    groups = rows[order] // window
    for g in np.unique(groups):
        at = order[groups == g]
        for start, block in read(int(g * window), int(min(n, (g + 1) * window)), window):
            if out is None:
                out = np.empty((len(rows), block.shape[1]), dtype or block.dtype)
            out[at] = block[rows[at] - start]
    return out if out is not None else np.zeros((0, 0), np.float32)


class Engine(abc.ABC):
    """Common interface of the three engines; all return (scores, rows) sorted best-first, row -1 = none."""

    kind: str
    keeps_vectors = True  # False: exact scans read the cache in chunks instead of an in-memory store

    def __init__(self, matrix: np.ndarray, store: "LazyStore"):
        self.matrix = matrix
        self.store = store
        self.params: dict = {}
        self.notes: list[str] = []

    @property
    @abc.abstractmethod
    def ntotal(self) -> int:
        """Rows the engine holds."""

    @abc.abstractmethod
    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) of the k best rows per query, best-first."""

    @abc.abstractmethod
    def add(self, matrix: np.ndarray, start: int, progress: bool) -> None:
        """Take in the cache rows from `start` on."""

    @abc.abstractmethod
    def nbytes(self) -> int:
        """Memory the engine's own structures use."""

    def parts(self) -> list:
        """The faiss indexes to persist (what cannot be rebuilt cheaply from the cache), in order."""
        return []

    def warm(self) -> None:
        """Load what searching needs (vectors copied from the cache), so the first query is not slow."""


class LazyStore:
    """The exact store, built from the cache on first use (exact search, re-ranking, filtered fallback)."""

    def __init__(self, matrix: np.ndarray, progress: bool):
        self.matrix = matrix
        self.progress = progress
        self._store: ExactStore | None = None

    def get(self) -> ExactStore:
        if self._store is None:
            self._store = ExactStore(self.matrix.shape[1], self.matrix.dtype)
            self._store.add_from(self.matrix, 0, self.progress)
        return self._store

    def extend(self, matrix: np.ndarray) -> None:
        self.matrix = matrix
        if self._store is not None and self._store.ntotal < len(matrix):
            self._store.add_from(matrix, self._store.ntotal, self.progress)

    @property
    def built(self) -> bool:
        return self._store is not None


class ExactEngine(Engine):
    kind = "exact"

    @property
    def ntotal(self) -> int:
        return len(self.matrix)

    def search(self, q, k, rows=None):
        # Without faiss (an optional dependency) exact search still works, through numpy alone.
        if len(q) >= GEMM_MIN_QUERIES or not have_faiss():
            allowed = None
            if rows is not None:
                allowed = np.zeros(len(self.matrix), bool)
                allowed[rows] = True
            return blocked_topk(self.matrix, q, k, allowed)
        return self.store.get().search(q, min(k, self.ntotal), rows)

    def add(self, matrix, start, progress):
        self.matrix = matrix
        self.store.extend(matrix)

    def nbytes(self) -> int:
        return len(self.matrix) * self.matrix.shape[1] * self.matrix.dtype.itemsize

    def warm(self) -> None:
        if have_faiss():  # without faiss, exact search reads the memory-mapped cache directly
            self.store.get()


class HNSWEngine(Engine):
    kind = "hnsw"

    def __init__(self, matrix, store, index=None, m: int = 32, ef_construction: int = 80):
        super().__init__(matrix, store)
        faiss = import_faiss()
        if index is None:
            index = faiss.IndexHNSWFlat(matrix.shape[1], m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
        self.index = index
        self.params = {"M": int(index.hnsw.nb_neighbors(1)), "efConstruction": int(index.hnsw.efConstruction),
                       "efSearch": int(index.hnsw.efSearch)}

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def add(self, matrix, start, progress):
        from tqdm.auto import tqdm

        self.matrix = matrix
        self.store.extend(matrix)  # the exact store (filtered fallback), if it was ever built
        end = len(matrix)
        with tqdm(total=end - start, desc="building HNSW graph", unit="row", disable=not progress) as bar:
            for s in range(start, end, _ADD_CHUNK // 8):
                block = np.asarray(matrix[s:min(end, s + _ADD_CHUNK // 8)], dtype=np.float32)
                self.index.add(block)
                bar.update(len(block))

    def set_search_params(self, ef_search: int) -> None:
        self.index.hnsw.efSearch = int(ef_search)
        self.params["efSearch"] = int(ef_search)

    def search(self, q, k):
        params = import_faiss().SearchParametersHNSW()
        params.efSearch = max(self.params["efSearch"], k)  # efSearch below k returns fewer than k results
        return self.index.search(q, min(k, self.ntotal), params=params)

    def nbytes(self) -> int:
        # float32 vectors + about M*2 neighbour ids (int32) per row at layer 0, plus upper layers
        faiss = import_faiss()
        return int(self.ntotal * self.index.d * 4 + faiss.vector_to_array(self.index.hnsw.neighbors).nbytes
                   + faiss.vector_to_array(self.index.hnsw.offsets).nbytes)

    def parts(self):
        return [self.index]


def pq_subquantizers(dim: int) -> int:
    """4 dimensions per 4-bit sub-quantizer: 1 bit per dimension of code (64 bytes for 512-d)."""
    for per in (4, 2, 8, 1):
        if dim % per == 0 and (dim // per) % 2 == 0:  # fast-scan packs codes in pairs of sub-quantizers
            return dim // per
    raise ClipposterError(f"embedding width {dim} cannot be product-quantised; use kind 'exact' or 'hnsw'")


class IVFPQEngine(Engine):
    """PQ fast-scan codes, optionally behind an IVF partition, re-ranked exactly.

    Without IVF the codes are split into contiguous row ranges (shards), one per core: faiss scans
    and re-ranks a single query on one thread, and scanning every code plus re-ranking thousands of
    candidates is the whole cost of a query, so each shard scans its codes and re-ranks its own
    candidates against its own slice of the float16 vectors, in parallel, and only the shards' top-k
    are merged. New rows go to the last shard; ids stay successive (shard i starts where i-1 ends).
    """

    kind = "ivfpq"

    def __init__(self, matrix, store, parts: list | None = None, params: dict | None = None):
        super().__init__(matrix, store)
        self._parts = list(parts or [])
        self.params = dict(params or {})
        self._quantizer = None  # keeps the coarse quantizer alive while the IVF index refers to it
        # IndexShards wrappers, kept: a threaded one starts a worker thread per shard when it is made
        # (1.2 ms per shard here, a quarter of a query), and its workers live as long as it does.
        self._scanners: dict[bool, object] = {}
        self._refiners: dict[bool, tuple[object, list]] = {}
        self._stores: list[ExactStore] | None = None  # per-shard re-ranking vectors (shards > 1)

    @property
    def base(self):
        """The first faiss index (all of them share the trained codebooks)."""
        return self._parts[0]

    @property
    def ntotal(self) -> int:
        return int(sum(p.ntotal for p in self._parts))

    def train(self, sample: np.ndarray, nlist: int, seed: int, shards: int = 1) -> None:
        faiss = import_faiss()
        dim = sample.shape[1]
        m = pq_subquantizers(dim)
        sample = np.ascontiguousarray(sample, dtype=np.float32)
        nlist = min(nlist, len(sample))
        if nlist <= 1:
            base = faiss.IndexPQFastScan(dim, m, 4, faiss.METRIC_INNER_PRODUCT)
        else:
            # The coarse k-means is one big matrix product per iteration, which threads well: train
            # it here on all threads; the index then sees a trained quantizer and trains only the PQ.
            kmeans = faiss.Kmeans(dim, nlist, niter=10, seed=seed, spherical=True,
                                 min_points_per_centroid=1, max_points_per_centroid=64)
            kmeans.train(sample)
            self._quantizer = faiss.IndexFlatIP(dim)
            self._quantizer.add(kmeans.centroids)
            base = faiss.IndexIVFPQFastScan(self._quantizer, dim, nlist, m, 4, faiss.METRIC_INNER_PRODUCT)
            # Codes of raw vectors, not residuals: one lookup table serves every probed list, so
            # probing many lists costs no extra table computations.
            base.by_residual = False
            shards = 1  # an IVF query scans a few lists, not every code
        base.pq.cp.seed = seed
        # 16 centroids per sub-quantizer: a few hundred points train them; without this faiss warns
        # on stderr about "at least 624 training points" for every small collection.
        base.pq.cp.min_points_per_centroid = 1
        with _omp_threads(1):
            base.train(sample)
        self._parts = [base] + [faiss.clone_index(base) for _ in range(max(1, shards) - 1)]
        self.params.update({"nlist": max(1, nlist), "shards": len(self._parts), "pq_subquantizers": m,
                            "pq_bits": 4, "trained_rows": len(sample), "rows_at_training": 0})

    def add(self, matrix, start, progress):
        from tqdm.auto import tqdm

        self.matrix = matrix
        end = len(matrix)
        if start == 0 and self.ntotal == 0:
            self.params["rows_at_training"] = end
            bounds = np.linspace(0, end, len(self._parts) + 1).astype(np.int64)
        else:
            bounds = np.array([0] * len(self._parts) + [end])
            bounds[-2] = start  # later rows all go to the last shard, keeping row ids successive
        with tqdm(total=end - start, desc="encoding PQ codes", unit="row", disable=not progress) as bar:
            for part, lo, hi in zip(self._parts, bounds[:-1], bounds[1:]):
                for s in range(max(lo, start), hi, _ADD_CHUNK):
                    block = np.asarray(matrix[s:min(hi, s + _ADD_CHUNK)], dtype=np.float32)
                    part.add(block)
                    bar.update(len(block))
        if len(self._parts) == 1:
            self.store.extend(matrix)
        elif self._stores is not None:
            last = self._stores[-1]
            lo = end - self._parts[-1].ntotal  # first row of the last shard
            last.add_from(matrix[lo:end], last.ntotal, progress)
        self.store.extend(matrix)  # the full exact store, if a filtered fallback ever built it
        self._scanners.clear()  # shard sizes changed
        self._refiners.clear()
        self.params["rows_added_after_training"] = end - self.params["rows_at_training"]

    def _scanner(self, nq: int):
        """One faiss index over all codes. Shards are searched in parallel threads for few queries; a
        batch is already parallel over its queries inside each shard, so shards then run in turn."""
        faiss = import_faiss()
        if self.params.get("nlist", 1) > 1:
            self.base.nprobe = self.params["nprobe"]
        if len(self._parts) == 1:
            return self.base
        threaded = nq < faiss.omp_get_max_threads()
        if threaded not in self._scanners:
            shards = faiss.IndexShards(self.base.d, threaded, True)
            for part in self._parts:
                shards.add_shard(part)
            self._scanners[threaded] = shards
        return self._scanners[threaded]

    def candidates(self, q: np.ndarray, n: int) -> np.ndarray:
        """Rows of the n best PQ scores (approximate), for tuning the re-ranking depth."""
        _, idx = self._scanner(len(q)).search(q, min(n, self.ntotal))
        return idx

    def _shard_stores(self) -> list[ExactStore]:
        if self._stores is None:
            stores, lo = [], 0
            for part in self._parts:
                st = ExactStore(self.matrix.shape[1], self.matrix.dtype)
                st.add_from(self.matrix[lo:lo + part.ntotal], 0, self.store.progress)
                stores.append(st)
                lo += part.ntotal
            self._stores = stores
        return self._stores

    def warm(self) -> None:
        if len(self._parts) == 1:
            self.store.get()
        else:
            self._shard_stores()

    def _shard_depths(self, depth: int, k: int) -> list[int]:
        """Candidates each shard re-ranks for a global depth. A shard holds about its share of the
        global candidates; 25% more absorbs the uneven split (a share of a few thousand candidates
        varies by a few percent), at the price of re-ranking a little more."""
        return [max(k, min(p.ntotal, math.ceil(1.25 * depth * p.ntotal / self.ntotal + 8))) for p in self._parts]

    def rerank_depth(self, k: int = TUNE_K) -> int:
        """How many candidates a query for k results re-ranks exactly, all shards together."""
        k = min(k, self.ntotal)
        # The depth was tuned for k=10 (+1 for the query itself): small k keeps that depth, or the
        # re-ranking pool would shrink with k and miss neighbours the tuning counted on.
        depth = min(self.params["k_factor"] * max(k, TUNE_K + 1), self.ntotal)
        if len(self._parts) == 1:
            return depth
        return min(self.ntotal, len(self._parts) * max(self._shard_depths(depth, k)))

    def search(self, q, k):
        faiss = import_faiss()
        k = min(k, self.ntotal)
        depth = min(self.params["k_factor"] * max(k, TUNE_K + 1), self.ntotal)
        if self.params.get("nlist", 1) > 1:
            self.base.nprobe = self.params["nprobe"]
        # The depth goes in per-call parameters, not into the shared faiss objects, so concurrent
        # searches (an app serving several users) cannot change each other's depth.
        params = faiss.IndexRefineSearchParameters()
        if len(self._parts) == 1:
            params.k_factor = max(1.0, depth / k)
            return faiss.IndexRefine(self.base, self.store.get().index).search(q, k, params=params)
        threaded = len(q) < faiss.omp_get_max_threads()
        if threaded not in self._refiners:
            refiners = [faiss.IndexRefine(part, st.index) for part, st in zip(self._parts, self._shard_stores())]
            shards = faiss.IndexShards(self.base.d, threaded, True)
            for r in refiners:
                shards.add_shard(r)
            self._refiners[threaded] = (shards, refiners)
        shards, _ = self._refiners[threaded]
        # every shard gets the largest shard's depth (shards are equal-sized but for the last one)
        params.k_factor = max(self._shard_depths(depth, k)) / k
        return shards.search(q, k, params=params)

    def nbytes(self) -> int:
        faiss = import_faiss()
        codes = self.ntotal * self.base.code_size
        if self.params.get("nlist", 1) > 1:
            codes += self.params["nlist"] * self.base.d * 4  # centroids
        store = self.ntotal * self.matrix.shape[1] * self.matrix.dtype.itemsize  # re-ranking vectors
        return int(codes + faiss.vector_to_array(self.base.pq.centroids).nbytes + store)

    def parts(self):
        return list(self._parts)
