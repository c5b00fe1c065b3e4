"""The poster index: nearest-neighbour search over the cache's image embeddings.

`PosterIndex` answers "which posters look like this?" for a poster file, a poster id, a free text
(through the CLIP text encoder) or a raw embedding, and finds near-duplicate pairs. Scores are
cosine similarities (the cache stores L2-normalised vectors, so cosine = inner product).

The engines (exact, hnsw, ivfpq) are described in `clipposter.search.engines`. `kind="auto"` picks
exact below `threshold` posters and ivfpq above it: ivfpq builds 1M × 512 in under half a minute
here where HNSW takes ~1.5 minutes for 100k, and it is the engine that reached the latency/recall
target on the worst-case benchmark (see docs/search.md and docs/benchmarks.md). The approximate
engines are tuned at build time to reach `target_recall` (`clipposter.search.tuning`).


The index is saved in `<cache>/index/` with the cache state it was built from (row count and a
fingerprint of sampled rows). Opening it again checks that state: new cache rows are added
incrementally (ivfpq encodes them with the codebooks trained earlier, without retraining, and says
so); a cache whose old rows changed, or another backbone, gets a full rebuild.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from clipposter.embedding.cache import EmbeddingCache, RecordSummary
from clipposter.errors import ClipposterError, ConfigError
from clipposter.files import atomic_path, directory_lock, write_json
from clipposter.search.config import (DEFAULT_DUPLICATE_THRESHOLD, DEFAULT_TARGET_RECALL, DEFAULT_THRESHOLD,
                                      INDEX_DIR, KINDS, check_target_recall, check_threshold, format_bytes,
                                      parse_memory_budget, resolve_kind)
from clipposter.search.engines import (GEMM_MIN_QUERIES, Engine, ExactEngine, HNSWEngine, IVFPQEngine, LazyStore,
                                       blocked_topk, gather_rows, import_faiss)
from clipposter.search.results import DuplicatePair, GenrePredictions, Hit
from clipposter.search.tuning import tune_hnsw, tune_ivf, tune_k_factor, tune_sample

__all__ = ["PosterIndex", "Hit", "DuplicatePair", "GenrePredictions", "cache_fingerprint", "resolve_kind",
           "KINDS", "DEFAULT_THRESHOLD", "DEFAULT_TARGET_RECALL", "INDEX_DIR", "INDEX_FORMAT"]

log = logging.getLogger(__name__)

INDEX_FORMAT = 1
_FINGERPRINT_ROWS = 257


def cache_fingerprint(cache: EmbeddingCache, rows: int | None = None) -> str:
    """A hash of the cache's first `rows` embedding rows (sampled) and its backbone: rows are
    append-only, so equal fingerprints mean the old rows are the same and only new ones need adding."""
    n = cache.num_posters if rows is None else rows
    h = hashlib.sha256()
    h.update(f"{cache.identity.key}:{cache.dtype}:{cache.dim}:{n}".encode())
    if n:
        picks = np.unique(np.linspace(0, n - 1, min(n, _FINGERPRINT_ROWS)).astype(np.int64))
        # read a few rows around each pick, not through one map whose read-ahead pulls in most of the file
        h.update(np.ascontiguousarray(gather_rows(_reader(cache), n, picks, window=8, dtype=None)).tobytes())
    return h.hexdigest()[:32]


class PosterIndex:
    """Nearest-neighbour search over the posters of one embedding cache.

    Build with `PosterIndex.build(cache)`, or `PosterIndex.open(cache)` to load the saved index of
    `<cache>/index/` (extended with new posters, or rebuilt when the cache changed) or build one.
    """

    def __init__(self, cache: EmbeddingCache, engine: Engine, requested_kind: str, threshold: int,
                 target_recall: float, meta: dict | None = None):
        self.cache = cache
        self.engine = engine
        self.requested_kind = requested_kind
        self.threshold = threshold
        self.target_recall = target_recall
        self.meta = dict(meta or {})
        self._load_records()

    # ----- building ------------------------------------------------------------------------------
    @classmethod
    def build(cls, cache: EmbeddingCache, kind: str = "auto", threshold: int = DEFAULT_THRESHOLD, *,
              target_recall: float = DEFAULT_TARGET_RECALL, hnsw_m: int = 32, hnsw_ef_construction: int = 80,
              nlist: int | None = None, shards: int | None = None, seed: int = 0,
              memory_budget: int | str | None = None, progress: bool = True) -> "PosterIndex":
        """Index every poster of the cache. kind: auto | exact | hnsw | ivfpq (see the module notes).

        memory_budget: bytes (or "2GB") the index may hold. When today's in-memory build would need
        more, auto and ivfpq build IVF-PQ within it (`clipposter.search.budget`); exact and hnsw,
        which hold every vector, are refused.

        ivfpq options: nlist (IVF lists; default: tried at ~sqrt(n) from 20k posters, dropped when the
        data has no cluster structure) and shards (parallel code shards; default: one per core from
        200k posters). hnsw options: hnsw_m, hnsw_ef_construction.
        """
        threshold = check_threshold(threshold)
        target_recall = check_target_recall(target_recall)
        budget = parse_memory_budget(memory_budget)
        matrix = cache.image_matrix()
        n = len(matrix)
        if n == 0:
            raise ClipposterError(f"the cache {cache.root} holds no posters; run `clipposter embed` first")
        resolved = resolve_kind(kind, n, threshold)
        started = time.perf_counter()
        store = LazyStore(matrix, progress)
        meta: dict = {}
        plan = cls._budget_plan(kind, resolved, matrix, budget, nlist)
        if plan is not None:
            from clipposter.search.budget import build_within_budget

            engine = build_within_budget(matrix, store, _reader(cache), plan, auto_nlist=nlist is None,
                                         target_recall=target_recall, seed=seed, progress=progress, meta=meta)
        elif resolved == "exact":
            engine: Engine = ExactEngine(matrix, store)
        elif resolved == "hnsw":
            engine = HNSWEngine(matrix, store, m=hnsw_m, ef_construction=hnsw_ef_construction)
            engine.add(matrix, 0, progress)
            if n > 1:
                meta["tuned_recall_at_10"] = round(tune_hnsw(engine, tune_sample(matrix, seed, progress),
                                                              target_recall), 4)
        else:
            engine = cls._build_ivfpq(matrix, store, nlist, shards, target_recall, seed, progress, meta)
        meta["build_seconds"] = round(time.perf_counter() - started, 3)
        index = cls(cache, engine, kind, threshold, target_recall, meta)
        index.meta.update({"posters": n, "fingerprint": cache_fingerprint(cache, n)})
        return index

    @staticmethod
    def _budget_plan(kind: str, resolved: str, matrix: np.ndarray, budget: int | None, nlist: int | None):
        """The plan of a budgeted build, or None when today's in-memory build fits (or no budget is set)."""
        if budget is None:
            return None
        from clipposter.search.budget import in_memory_bytes, plan_budget

        n, dim = matrix.shape
        need = in_memory_bytes(resolved, n, dim, matrix.dtype.itemsize)
        if need <= budget:
            return None
        if kind in ("exact", "hnsw"):
            raise ConfigError("memory_budget", f"of {format_bytes(budget)} is below what a {kind} index of {n:,} "
                                               f"posters holds ({format_bytes(need)}: every vector in memory); "
                                               f"use kind 'auto' or 'ivfpq', or give a larger budget")
        log.info("an in-memory %s index of %d posters needs ~%s, over the memory budget of %s: building IVF-PQ "
                 "chunk by chunk", resolved, n, format_bytes(need), format_bytes(budget))
        return plan_budget(n, dim, budget, nlist)

    @staticmethod
    def _build_ivfpq(matrix, store, nlist, shards, target_recall, seed, progress, meta) -> IVFPQEngine:
        n, dim = matrix.shape
        rng = np.random.default_rng(seed)
        # 16 centroids per sub-quantizer need few points; a bounded sample keeps training fast at 1M.
        train_rows = np.sort(rng.choice(n, size=min(n, 50_000), replace=False))
        sample_vecs = np.asarray(matrix[train_rows], dtype=np.float32)
        auto_nlist = nlist is None
        if auto_nlist:
            # Below ~20k posters one list is both fast and exact enough; above, try ~sqrt(n) lists.
            nlist = 1 if n < 20_000 else int(min(4096, max(16, math.sqrt(n))))
        if nlist < 1:
            raise ConfigError("nlist", f"must be at least 1, got {nlist}")
        tune = tune_sample(matrix, seed + 1, progress) if n > 1 else None
        # Parallel shards pay once a scan is long enough to outweigh starting the threads (~0.1 ms).
        if shards is None:
            shards = import_faiss().omp_get_max_threads() if n >= 200_000 else 1
        if shards < 1:
            raise ConfigError("shards", f"must be at least 1, got {shards}")
        engine = IVFPQEngine(matrix, store)
        engine.train(sample_vecs, nlist, seed, shards)
        if nlist > 1 and tune is not None:
            tune_ivf(engine, tune, matrix, target_recall)
            if engine.params["nprobe"] is None:
                if auto_nlist:
                    engine = IVFPQEngine(matrix, store)
                    engine.train(sample_vecs, 1, seed, shards)
                    engine.notes.append(f"IVF with {nlist} lists would need over a quarter of them probed to find "
                                        f"the neighbours (no cluster structure): one list, every code scanned")
                else:
                    engine.params["nprobe"] = nlist
        engine.add(matrix, 0, progress)
        if tune is not None:
            meta["tuned_recall_at_10"] = round(tune_k_factor(engine, tune, target_recall), 4)
        else:
            engine.params["k_factor"] = 1
        return engine

    # ----- persistence ---------------------------------------------------------------------------
    @property
    def directory(self) -> Path:
        return Path(self.cache.root) / INDEX_DIR

    def save(self) -> Path:
        """Write the index into `<cache>/index/` (faiss file first, then the JSON that vouches for it)."""
        d = self.directory
        with directory_lock(d):
            files = []
            for i, part in enumerate(self.engine.parts()):
                name = f"rows.{i}.faiss"
                with atomic_path(d / name) as tmp:
                    import_faiss().write_index(part, str(tmp))
                files.append(name)
            for stale in d.glob("rows.*.faiss"):
                if stale.name not in files:
                    stale.unlink()
            state = {"format": INDEX_FORMAT, "kind": self.engine.kind, "requested_kind": self.requested_kind,
                     "threshold": self.threshold, "target_recall": self.target_recall,
                     "backbone_key": self.cache.identity.key, "dim": self.cache.dim, "dtype": self.cache.dtype,
                     "params": self.engine.params, "notes": self.engine.notes, "faiss_files": files,
                     **{k: v for k, v in self.meta.items() if k not in ("loaded_from",)}}
            write_json(d / "index.json", state, allow_nan=True, default=_json_default)
        return d

    @classmethod
    def load(cls, cache: EmbeddingCache, progress: bool = True) -> "PosterIndex | None":
        """The saved index brought up to date with the cache (new rows added), or None when there is
        none or it no longer matches the cache (other backbone, changed rows, damaged files)."""
        d = Path(cache.root) / INDEX_DIR
        try:
            state = json.loads((d / "index.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s (%s); rebuilding", d / "index.json", exc)
            return None
        if (state.get("format") != INDEX_FORMAT or state.get("backbone_key") != cache.identity.key
                or state.get("dim") != cache.dim or state.get("dtype") != cache.dtype):
            log.info("saved index was made for another cache state; rebuilding")
            return None
        matrix = cache.image_matrix()
        built_rows = int(state.get("posters", -1))
        if (built_rows < 0 or built_rows > len(matrix)
                or cache_fingerprint(cache, built_rows) != state.get("fingerprint")):
            log.info("cache rows changed since the index was built; rebuilding")
            return None
        store = LazyStore(matrix[:built_rows] if built_rows < len(matrix) else matrix, progress)
        kind = state.get("kind")
        try:
            if kind == "exact":
                engine: Engine = ExactEngine(matrix[:built_rows], store)
            elif kind in ("hnsw", "ivfpq"):
                parts = [import_faiss().read_index(str(d / name)) for name in state.get("faiss_files", [])]
                held = sum(p.ntotal for p in parts)
                if not parts or held != built_rows or (kind == "hnsw" and len(parts) != 1):
                    log.warning("saved index holds %d rows, its description %d; rebuilding", held, built_rows)
                    return None
                if kind == "hnsw":
                    engine = HNSWEngine(matrix[:built_rows], store, index=parts[0])
                elif state.get("params", {}).get("rerank") == "cache rows":
                    from clipposter.search.budget import BudgetIVFEngine

                    engine = BudgetIVFEngine(matrix[:built_rows], store, _reader(cache),
                                             int(state["params"].get("chunk_rows", 65_536)), parts=parts)
                else:
                    engine = IVFPQEngine(matrix[:built_rows], store, parts=parts)
                engine.params.update(state.get("params", {}))
            else:
                return None
        except RuntimeError as exc:  # faiss raises RuntimeError on damaged or truncated files
            log.warning("cannot read the saved index (%s); rebuilding", str(exc).splitlines()[0])
            return None
        engine.notes = list(state.get("notes", []))
        meta = {k: state[k] for k in ("build_seconds", "tuned_recall_at_10", "posters", "fingerprint")
                if k in state}
        index = cls(cache, engine, state.get("requested_kind", kind), int(state.get("threshold", DEFAULT_THRESHOLD)),
                    float(state.get("target_recall", DEFAULT_TARGET_RECALL)), meta)
        index.meta["loaded_from"] = str(d)
        if len(matrix) > built_rows:
            index.refresh(progress=progress)
        return index

    @classmethod
    def open(cls, cache: EmbeddingCache, kind: str = "auto", threshold: int = DEFAULT_THRESHOLD, *,
             rebuild: bool = False, save: bool = True, progress: bool = True, **build_options) -> "PosterIndex":
        """The saved index if it fits the cache and the requested kind, else a freshly built (and saved) one."""
        threshold = check_threshold(threshold)
        resolve_kind(kind, 0, threshold)  # validates the name before any work
        index = None if rebuild else cls.load(cache, progress=progress)
        if index is not None:
            wanted = resolve_kind(kind, index.ntotal, threshold)
            budget = parse_memory_budget(build_options.get("memory_budget"))
            if wanted != index.kind and not (kind == "auto" and not index.engine.keeps_vectors):
                log.info("saved index is %s, %s wanted; rebuilding", index.kind, wanted)
                index = None
            elif budget is not None and index.engine.keeps_vectors and index.engine.nbytes() > budget:
                log.info("saved index holds %s, over the memory budget; rebuilding",
                         format_bytes(index.engine.nbytes()))
                index = None
        changed = index is None or index.meta.get("added_rows", 0) > 0
        if index is None:
            index = cls.build(cache, kind, threshold, progress=progress, **build_options)
        if save and changed:
            try:
                index.save()
            except OSError as exc:  # a read-only cache still searches, it just cannot keep the index
                log.warning("cannot save the index into %s: %s", index.directory, exc)
        return index

    def refresh(self, progress: bool = True) -> int:
        """Add cache rows embedded since the index was built; returns how many were added."""
        matrix = self.cache.image_matrix()
        start = self.engine.ntotal if self.engine.kind != "exact" else len(self.engine.matrix)
        if len(matrix) < start or cache_fingerprint(self.cache, start) != self.meta.get("fingerprint"):
            raise ClipposterError(f"the cache {self.cache.root} changed under the index (rows rewritten); "
                                  f"rebuild the index (rebuild=True)")
        added = len(matrix) - start
        if added:
            self.engine.add(matrix, start, progress)
            if self.engine.kind == "ivfpq":
                p = self.engine.params
                note = (f"{p['rows_added_after_training']} rows were added with codebooks trained on "
                        f"{p['rows_at_training']} rows (no retraining); rebuild if the collection changed character")
                self.engine.notes = [n for n in self.engine.notes if "no retraining" not in n] + [note]
                log.info(note)
            self.meta["added_rows"] = self.meta.get("added_rows", 0) + added
            self.meta["posters"] = len(matrix)
            self.meta["fingerprint"] = cache_fingerprint(self.cache, len(matrix))
        self._load_records()
        return added

    # ----- ids and genres ------------------------------------------------------------------------
    def _load_records(self) -> None:
        # Only id → row up front (two columns, not whole records: parsing every record's JSON took
        # 13 s for 1M posters); genres, titles and images are read for the few ids a query returns.
        n = self.ntotal
        self._id_row = self.cache.id_rows(below=n)
        self._row_ids: list[list[str]] = [[] for _ in range(n)]
        for rid, row in self._id_row.items():
            self._row_ids[row].append(rid)
        self._has_ids = np.fromiter((bool(ids) for ids in self._row_ids), dtype=bool, count=n)
        self._every_row_has_ids = bool(self._has_ids.all())
        self._details: dict[str, RecordSummary] = {}
        self._genres_of: dict[str, list[str]] | None = None

    def _fetch_details(self, ids: Sequence[str]) -> None:
        """Genres, title and image path of these ids, read once and kept."""
        todo = [i for i in dict.fromkeys(ids) if i not in self._details]
        if todo:
            self._details.update(self.cache.record_summaries(todo))

    def _all_genres(self) -> dict[str, list[str]]:
        """Labelled genres of every id (only a genre filter needs them all)."""
        if self._genres_of is None:
            self._genres_of = {pid: g for pid, g in self.cache.labelled_genres().items() if pid in self._id_row}
        return self._genres_of

    def ids_at(self, row: int) -> list[str]:
        """The poster ids whose content is cache row `row` ([] for a row this index does not hold yet)."""
        return list(self._row_ids[row]) if 0 <= row < self.ntotal else []

    @property
    def kind(self) -> str:
        return self.engine.kind

    @property
    def ntotal(self) -> int:
        return self.engine.ntotal

    @property
    def ids(self) -> list[str]:
        return sorted(self._id_row)

    def info(self) -> dict:
        """What the index is, how big, and how it was tuned."""
        return {"kind": self.kind, "requested_kind": self.requested_kind, "posters": self.ntotal,
                "ids": len(self._id_row), "threshold": self.threshold, "target_recall": self.target_recall,
                "params": dict(self.engine.params), "bytes": self.engine.nbytes(), "notes": list(self.engine.notes),
                "directory": str(self.directory),
                **{k: v for k, v in self.meta.items() if k != "fingerprint"}}

    def warm(self) -> "PosterIndex":
        """Copy the vectors search needs out of the cache now rather than at the first query."""
        self.engine.warm()
        return self

    def _genre_sets(self, predicted: GenrePredictions | None) -> list[frozenset[str]] | None:
        return predicted.sets(self.ntotal) if predicted is not None else None

    def _id_filter(self, genres: Sequence[str] | None, predicted_sets: list[frozenset[str]] | None):
        """(allowed row mask, per-id predicate) for a filter requiring every genre in `genres`."""
        if not genres:
            return None, None
        wanted = {g.strip().lower() for g in genres if g.strip()}
        if not wanted:
            return None, None
        if predicted_sets is not None:
            names = {g for s in predicted_sets for g in s}

            def ok(pid: str) -> bool:
                return wanted <= {g.lower() for g in predicted_sets[self._id_row[pid]]}
        else:
            labels = self._all_genres()
            names = {g for gs in labels.values() for g in gs}

            def ok(pid: str) -> bool:
                return wanted <= {g.lower() for g in labels[pid]}
        known = {g.lower() for g in names}
        unknown = [g.strip() for g in genres if g.strip() and g.strip().lower() not in known]
        if unknown:
            source = "predicted for" if predicted_sets is not None else "labelled on"
            raise ClipposterError(f"genre {unknown[0]!r} is {source} no poster in the cache; known genres: "
                                  f"{', '.join(sorted(names)) or 'none'}")
        mask = np.fromiter((any(ok(i) for i in ids) for ids in self._row_ids), dtype=bool, count=self.ntotal)
        return mask, ok

    # ----- queries -------------------------------------------------------------------------------
    def _prepare(self, vectors) -> np.ndarray:
        q = np.asarray(vectors, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.cache.dim:
            raise ClipposterError(f"query embeddings must have width {self.cache.dim} (this cache's backbone), "
                                  f"got shape {np.asarray(vectors).shape}")
        norms = np.linalg.norm(q, axis=1, keepdims=True)
        if not np.all(np.isfinite(norms)) or np.any(norms == 0):
            raise ClipposterError("a query embedding is zero or not finite; it has no direction to search")
        return np.ascontiguousarray(q / norms)

    def search(self, vectors, k: int = 10, *, genres: Sequence[str] | None = None,
               predicted: GenrePredictions | None = None,
               exclude: Sequence[Sequence[str]] | None = None) -> list[list[Hit]]:
        """Top-k posters for each query embedding (normalised here), best first, each id once.

        genres: keep posters that have every one of these genres (labels from the cache, or from
        `predicted` when given). exclude: per query, ids to leave out (the query poster itself).
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ClipposterError(f"k must be a positive number of results, got {k!r}")
        q = self._prepare(vectors)
        excl = [set(e) for e in exclude] if exclude is not None else [set() for _ in range(len(q))]
        if len(excl) != len(q):
            raise ValueError("one exclusion list per query")
        predicted_sets = self._genre_sets(predicted)
        mask, ok = self._id_filter(genres, predicted_sets)
        if mask is None and not self._every_row_has_ids:
            mask = self._has_ids  # rows without a record (none in normal caches) can never be returned
        results: list[list[Hit] | None] = [None] * len(q)
        allowed = int(mask.sum()) if mask is not None else self.ntotal
        if allowed == 0:
            return [[] for _ in range(len(q))]
        # Enough rows that dropping excluded ids still leaves k; every allowed row holds ≥ 1 allowed id.
        want = [min(allowed, k + len(e)) for e in excl]
        if mask is not None and (self.kind == "exact" or allowed <= self.threshold):
            # A selective filter: score only the allowed rows, exactly (cheaper than over-fetching).
            rows = np.flatnonzero(mask)
            store_rows = rows if allowed < self.ntotal else None
            scores, found = self._exact(q, max(want), store_rows)
            results = [self._hits(s, f, e, ok, k, predicted_sets) for s, f, e in zip(scores, found, excl)]
            return results
        todo = list(range(len(q)))
        fetch = [w if mask is None else min(self.ntotal, math.ceil(w * self.ntotal / allowed * 1.5) + 8)
                 for w in want]
        while todo:
            depth = max(fetch[i] for i in todo)
            scores, found = self.engine.search(q[todo], depth)
            again = []
            for j, i in enumerate(todo):
                hits = self._hits(scores[j], found[j], excl[i], ok, k, predicted_sets)
                if len(hits) >= min(k, allowed - len(excl[i])) or depth >= self.ntotal:
                    results[i] = hits
                elif depth * 4 >= self.ntotal:
                    # The filter removes most rows near this query: finish it with an exact filtered scan.
                    s2, f2 = self._exact(q[i:i + 1], want[i], np.flatnonzero(mask) if mask is not None else None)
                    results[i] = self._hits(s2[0], f2[0], excl[i], ok, k, predicted_sets)
                else:
                    fetch[i] = depth * 4
                    again.append(i)
            todo = again
        return [r if r is not None else [] for r in results]

    def _exact(self, q: np.ndarray, k: int, rows: np.ndarray | None):
        if self.kind == "exact":
            return self.engine.search(q, k, rows)
        if len(q) >= GEMM_MIN_QUERIES or not self.engine.keeps_vectors:
            allowed = None
            if rows is not None:
                allowed = np.zeros(self.ntotal, bool)
                allowed[rows] = True
            chunks = None if self.engine.keeps_vectors else _reader(self.cache)(0, self.ntotal, 16_384)
            return blocked_topk(self.engine.matrix, q, k, allowed, chunks=chunks)
        return self.engine.store.get().search(q, min(k, self.ntotal), rows)

    def _hits(self, scores, rows, exclude: set[str], ok, k: int, predicted_sets) -> list[Hit]:
        chosen: list[tuple[str, float, int]] = []
        for s, r in zip(scores, rows):
            if r < 0:
                continue
            for pid in self._row_ids[r]:
                if pid in exclude or (ok is not None and not ok(pid)):
                    continue
                chosen.append((pid, float(min(s, 1.0)), int(r)))  # fp16 rounding can pass 1.0
                if len(chosen) == k:
                    break
            if len(chosen) == k:
                break
        self._fetch_details([pid for pid, _, _ in chosen])
        hits = []
        for pid, score, r in chosen:
            genres, title, image = self._details[pid]
            hits.append(Hit(id=pid, score=score, row=r, genres=list(genres), title=title, image=image,
                            predicted_genres=sorted(predicted_sets[r]) if predicted_sets is not None else None))
        return hits

    def row_of(self, poster_id: str) -> int:
        try:
            return self._id_row[poster_id]
        except KeyError:
            raise ClipposterError(f"poster id {poster_id!r} is not in the cache {self.cache.root} "
                                  f"({len(self._id_row)} posters indexed); check the id or embed it first") from None

    def search_ids(self, ids: Sequence[str], k: int = 10, *, include_self: bool = False, **filters) -> list[list[Hit]]:
        """Posters most like the given cached posters (by their cached embeddings)."""
        rows = [self.row_of(i) for i in ids]
        vecs = np.asarray(self.engine.matrix[np.asarray(rows, dtype=np.int64)], dtype=np.float32)
        exclude = [[] if include_self else [i] for i in ids]
        return self.search(vecs, k, exclude=exclude, **filters)

    def search_text(self, texts: Sequence[str], k: int = 10, *, backbone=None, pretrained: str | None = None,
                    device: str = "auto", **filters) -> list[list[Hit]]:
        """Posters that best match free texts, through the cache backbone's CLIP text encoder."""
        texts = [str(t) for t in texts]
        if not texts or any(not t.strip() for t in texts):
            raise ClipposterError("a text query is empty; give some words to search for")
        backbone = self._backbone(backbone, pretrained, device)
        return self.search(backbone.encode_texts(texts), k, **filters)

    def embed_images(self, paths: Sequence[str], *, backbone=None, pretrained: str | None = None,
                     device: str = "auto") -> tuple[np.ndarray, list[list[str]], list[bool]]:
        """Embeddings of poster files: cached ones (same content hash) from the cache, others encoded
        with the cache's backbone (loaded only then). Returns (embeddings, ids sharing each file's
        content, cached flags); an unusable file raises PosterError naming it."""
        from clipposter.embedding.embed import resolve_posters

        if backbone is not None:
            self.cache.identity.check_same(backbone.identity, f"the cache {self.cache.root}")
        resolved = resolve_posters(paths, cache=self.cache,
                                   backbone=backbone or (lambda: self._backbone(None, pretrained, device)))
        resolved.raise_first_failure()
        same = [self.ids_at(p.row) if p.row is not None else [] for p in resolved]
        return resolved.embeddings(), same, [p.source == "cache" for p in resolved]

    def search_image(self, paths: Sequence[str], k: int = 10, *, include_self: bool = False, backbone=None,
                     pretrained: str | None = None, device: str = "auto", **filters) -> list[list[Hit]]:
        """Posters most like poster files. A file already in the cache (by content) uses its cached
        embedding and, unless include_self, leaves out the posters with exactly that content."""
        vecs, same, _ = self.embed_images(paths, backbone=backbone, pretrained=pretrained, device=device)
        exclude = [[] if include_self else s for s in same]
        return self.search(vecs, k, exclude=exclude, **filters)


    def _backbone(self, backbone, pretrained: str | None, device: str):
        from clipposter.embedding.backbone import load_backbone_like

        if backbone is None:
            return load_backbone_like(self.cache.identity, self.cache.backbone_spec, pretrained=pretrained,
                                      device=device)
        self.cache.identity.check_same(backbone.identity, f"the cache {self.cache.root}")
        return backbone

    # ----- near-duplicates -----------------------------------------------------------------------
    def duplicates(self, threshold: float = DEFAULT_DUPLICATE_THRESHOLD, *, exact: bool | None = None,
                   progress: bool = True, batch: int = 1024) -> list[DuplicatePair]:
        """Pairs of poster ids whose embeddings have cosine ≥ threshold, best first (see
        `clipposter.search.duplicates.find_duplicates`)."""
        from clipposter.search.duplicates import find_duplicates

        return find_duplicates(self, threshold, exact=exact, progress=progress, batch=batch)

    @property
    def row_ids(self) -> list[list[str]]:
        """The poster ids of each indexed row (several when one file was embedded under several ids)."""
        return self._row_ids



def _reader(cache: EmbeddingCache):
    """The cache's rows start..stop in chunks, each read from a map released before the next."""
    def read(start: int, stop: int, chunk_rows: int):
        return cache.iter_embeddings(chunk_rows, start, stop)
    return read


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)
