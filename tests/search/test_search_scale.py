"""PosterIndex under a memory budget: IVF-PQ trained on a sample, filled chunk by chunk from the cache,
re-ranked from the cache's rows. Checked against exact search (numpy), and its peak memory measured in
a subprocess against a control that keeps the vectors in memory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from clipposter.errors import ConfigError
from clipposter.search.budget import BudgetIVFEngine, plan_budget
from clipposter.search.config import parse_memory_budget
from clipposter.search.engines import ExactEngine, IVFPQEngine
from clipposter.search.index import PosterIndex
from helpers import run_cli
from test_search import add_vectors, clustered, recall, true_topk, unit, vector_cache

N, DIM, BUDGET = 30_000, 64, "3MB"  # the in-memory engines need 3.8 MB (exact) and more (ivfpq)


@pytest.fixture(scope="module")
def mixture():
    """Database vectors and held-out queries drawn from the same 40 clusters."""
    x = clustered(np.random.default_rng(0), N + 200, DIM, clusters=40)
    return x[:N], x[N:]


@pytest.fixture(scope="module")
def budget_cache(tmp_path_factory, mixture):
    return vector_cache(tmp_path_factory.mktemp("scale") / "c", mixture[0])


def test_budgeted_build_finds_the_exact_neighbours_on_clustered_data(budget_cache, mixture):
    index = PosterIndex.build(budget_cache, memory_budget=BUDGET, progress=False)
    assert isinstance(index.engine, BudgetIVFEngine) and not index.engine.keeps_vectors
    p = index.engine.params
    assert p["nlist"] > 1 and p["nprobe"] is not None and p["nprobe"] < p["nlist"]
    assert p["trained_rows"] < N  # trained on a sample
    assert index.engine.nbytes() <= parse_memory_budget(BUDGET)
    queries = mixture[1]
    truth, truth_scores = true_topk(budget_cache, queries, 10)
    hits = index.search(queries, 10)
    assert recall(hits, truth) >= 0.9
    # re-ranking is exact: a returned row scores what numpy gives it against the stored float16 row
    rows = np.array([h.row for h in hits[0]])
    expect = np.asarray(budget_cache.image_matrix()[rows], dtype=np.float32) @ unit(queries[0])
    np.testing.assert_allclose([h.score for h in hits[0]], expect, rtol=1e-5, atol=1e-6)
    assert index.engine.store.built is False  # no in-memory copy of the vectors was made


def test_filtered_search_of_a_budgeted_index_scans_the_cache_in_chunks(tmp_path, mixture):
    genres = [["Horror"] if i % 50 == 0 else ["Drama"] for i in range(N)]
    cache = vector_cache(tmp_path / "c", mixture[0], genres=genres)
    index = PosterIndex.build(cache, memory_budget=BUDGET, threshold=10_000, progress=False)
    q = mixture[1][:3]
    hits = index.search(q, 5, genres=["Horror"])
    horror = np.arange(0, N, 50)
    scores = unit(q) @ np.asarray(cache.image_matrix()[horror], dtype=np.float32).T
    for hs, sc in zip(hits, scores):
        assert [h.row for h in hs] == horror[np.argsort(-sc, kind="stable")[:5]].tolist()
    assert index.engine.store.built is False


def test_a_budget_the_in_memory_index_fits_changes_nothing(budget_cache):
    index = PosterIndex.build(budget_cache, memory_budget="1GB", progress=False)
    assert isinstance(index.engine, ExactEngine)
    forced = PosterIndex.build(budget_cache, kind="ivfpq", memory_budget=10**9, progress=False)
    assert type(forced.engine) is IVFPQEngine


@pytest.mark.parametrize("kind", ["exact", "hnsw"])
def test_engines_that_hold_every_vector_are_refused_over_the_budget(budget_cache, kind):
    with pytest.raises(ConfigError) as err:
        PosterIndex.build(budget_cache, kind=kind, memory_budget=BUDGET, progress=False)
    assert err.value.field == "memory_budget" and "every vector in memory" in str(err.value)


def test_a_budget_below_the_codes_is_refused_with_the_size_needed(budget_cache):
    with pytest.raises(ConfigError) as err:
        PosterIndex.build(budget_cache, memory_budget="500KB", progress=False)
    assert err.value.field == "memory_budget" and "give at least" in str(err.value)
    with pytest.raises(ConfigError, match="cannot train 64 lists"):
        PosterIndex.build(budget_cache, memory_budget=BUDGET, nlist=64, progress=False)


def test_a_tight_budget_trains_fewer_lists_and_says_so(caplog):
    plan = plan_budget(N, DIM, parse_memory_budget(BUDGET))
    assert plan.nlist < int(np.sqrt(N)) and plan.notes and "IVF lists instead of" in plan.notes[0]
    roomy = plan_budget(N, DIM, 10**9)
    assert roomy.nlist == int(np.sqrt(N)) and roomy.train_rows == min(N, 256 * roomy.nlist) and not roomy.notes
    # the sample is what 30-256 points per list asks for, within the budget
    assert 30 * plan.nlist <= plan.train_rows <= 256 * plan.nlist


@pytest.mark.parametrize("text, expect", [("2GB", 2 * 10**9), ("512MiB", 512 * 2**20), ("1.5g", 1_500_000_000),
                                          (" 300 kb ", 300_000), (4096, 4096), ("4096", 4096), (None, None)])
def test_memory_budget_sizes(text, expect):
    assert parse_memory_budget(text) == expect


@pytest.mark.parametrize("bad", ["lots", "-1GB", "0", "2 parsecs", "", True, 0.5, float("inf")])
def test_memory_budget_nonsense_is_a_config_error(bad):
    with pytest.raises(ConfigError) as err:
        parse_memory_budget(bad)
    assert err.value.field == "memory_budget"


def test_a_saved_budgeted_index_reopens_without_copying_and_takes_new_posters(tmp_path, mixture):
    cache = vector_cache(tmp_path / "c", mixture[0][:20_000])
    PosterIndex.open(cache, memory_budget="2MB", progress=False)
    add_vectors(cache, mixture[0][20_000:], start=20_000)
    again = PosterIndex.open(cache, progress=False)  # no budget given: the saved low-memory index is kept
    assert isinstance(again.engine, BudgetIVFEngine) and again.meta.get("loaded_from")
    assert again.meta["added_rows"] == N - 20_000 and again.ntotal == N
    new = np.asarray(cache.image_matrix()[[20_001, 29_999]], dtype=np.float32)
    assert [hs[0].row for hs in again.search(new, 1)] == [20_001, 29_999]
    assert again.engine.store.built is False


def test_cli_memory_budget(capsys, caplog, budget_cache):
    code, out, err = run_cli(capsys, "search", "--cache", budget_cache.root, "--id", "v00007", "-k", "3",
                             "--memory-budget", BUDGET, "--rebuild", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["index"]["kind"] == "ivfpq" and result["index"]["params"]["rerank"] == "cache rows"
    assert any(r.levelname == "WARNING" and "IVF lists instead of" in r.getMessage() for r in caplog.records)
    code, out, err = run_cli(capsys, "search", "--cache", budget_cache.root, "--id", "v00007", "--kind", "exact",
                             "--memory-budget", BUDGET, "--rebuild")
    assert code != 0 and err.count("\n") == 1 and err.startswith("error: --memory-budget of 3.0 MB")
    code, out, err = run_cli(capsys, "search", "--cache", budget_cache.root, "--id", "v00007",
                             "--memory-budget", "lots")
    assert code != 0 and err.count("\n") == 1 and err.startswith("error: --memory-budget must be a size")


# ------------------------------------------------------------------------------------------------
# peak memory, measured in a fresh process
# ------------------------------------------------------------------------------------------------
PEAK_N, PEAK_DIM = 120_000, 256  # 61 MB of float16 rows, 123 MB as float32

_MEASURE = textwrap.dedent("""
    import json, sys
    import numpy as np
    from clipposter.embedding.cache import EmbeddingCache
    from clipposter.search.index import PosterIndex

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    cache = EmbeddingCache.open(sys.argv[1], mode="r")
    import faiss  # noqa: F401  (imported before the baseline is read)
    del faiss
    # the id → row map every index reads (the same in both modes) reaches its peak before the baseline
    cache.id_rows()
    before = hwm()
    budget = None if sys.argv[2] == "none" else sys.argv[2]
    index = PosterIndex.build(cache, kind="ivfpq", memory_budget=budget, progress=False)
    index.warm()  # what the first query loads
    print(json.dumps({"grew": hwm() - before, "engine": type(index.engine).__name__}))
""")


def _peak_growth(root, budget) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(root), budget], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="VmHWM is read from /proc")
def test_budgeted_build_peaks_far_below_a_copy_of_the_vectors(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((300, PEAK_DIM))
    cache = vector_cache(tmp_path / "c", np.zeros((0, PEAK_DIM), np.float32))
    for s in range(0, PEAK_N, 20_000):  # written in parts, so the test process holds little either
        part = unit(centres[rng.integers(0, 300, 20_000)] + 0.35 * rng.standard_normal((20_000, PEAK_DIM)))
        add_vectors(cache, part, start=s)
    cache.close()
    fp16_bytes = PEAK_N * PEAK_DIM * 2
    budgeted = _peak_growth(cache.root, "24MB")
    control = _peak_growth(cache.root, "none")  # keeps the float16 rows in memory for re-ranking
    assert budgeted["engine"] == "BudgetIVFEngine" and control["engine"] == "IVFPQEngine"
    assert control["grew"] > fp16_bytes  # the measurement sees a copy of the rows when there is one
    # no copy of the rows, in float32 or float16, and no mapping of the whole file kept resident (the
    # 24 MB budget, the id map and the interpreter's own allocations make up the rest)
    assert budgeted["grew"] < 0.6 * fp16_bytes, budgeted
    assert budgeted["grew"] < control["grew"] / 4, (budgeted, control)
