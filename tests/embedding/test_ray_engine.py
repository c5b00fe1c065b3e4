"""The Ray engine of `embed` against the local engine: the same embeddings (cosine >= 0.999 for every
poster), the same counts, the same skipped files, also after the Ray job was SIGKILLed and rerun.

One local Ray (2 CPUs, a small object store) serves the whole module; the kill test's subprocess
joins it as a second driver."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from clipposter.embedding import ray_engine
from clipposter.embedding.cache import EmbeddingCache
from clipposter.embedding.embed import embed_records, make_loader
from clipposter.embedding.ray_engine import decode_batch, embed_records_ray
from clipposter.errors import ClipposterError, PosterError
from clipposter.ingest.sources import from_folder
from clipposter.ingest.synthetic import generate_posters
from clipposter.records import PosterRecord
from helpers import run_cli, tiny_args

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray for the module: 2 CPUs, a 200 MB object store, its files under a temporary folder."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    temp = tempfile.mkdtemp(prefix="cpray")  # short: Ray's socket paths must fit in 107 characters
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024, _temp_dir=temp,
             log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def forbid_ray(monkeypatch):
    def refuse(address):
        raise AssertionError("a Ray job was started although nothing needed encoding")

    monkeypatch.setattr(ray_engine, "_start_ray", refuse)


def copies(records):
    return [PosterRecord.from_dict(r.to_dict()) for r in records]


@pytest.fixture
def messy_folder(tmp_path, synthetic_set):
    """30 posters, one poster twice under another name, and three files that are not usable posters."""
    _, records = synthetic_set
    root = tmp_path / "posters"
    root.mkdir()
    for r in records[:30]:
        shutil.copy(r.image, root / (r.id + ".jpg"))
    shutil.copy(records[0].image, root / "same-as-first.jpg")
    good = (root / "syn-00000.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "notes.jpg").write_text("this is not an image")
    return root


def by_id(cache, ids):
    return cache.embeddings_for_ids(ids)


def assert_same_cache(a: EmbeddingCache, b: EmbeddingCache):
    """Same records, same distinct posters, and embeddings of every record within cosine 0.999."""
    ids = sorted(r.id for r in a.records())
    assert ids == sorted(r.id for r in b.records())
    assert (a.num_posters, a.num_records) == (b.num_posters, b.num_records)
    cos = np.sum(by_id(a, ids) * by_id(b, ids), axis=1)
    assert cos.min() >= 0.999, dict(zip(ids, cos))


def skipped(summary):
    return sorted((os.path.basename(p), r.replace(os.path.dirname(p), "")) for p, r in summary.skipped_files)


def test_decode_tasks_preprocess_as_the_backbone_does(tiny_backbone, messy_folder):
    """The decode tasks rebuild the preprocessing from the identity alone: the same pixels, to the bit,
    as the local engine's loader, and the same reason for a file that is not a poster."""
    paths = [str(messy_folder / "syn-00003.jpg"), str(messy_folder / "notes.jpg"), str(messy_folder / "syn-00007.jpg")]
    out = decode_batch({"hash": np.array(["a", "b", "c"]), "path": np.array(paths)},
                       identity=tiny_backbone.identity.to_dict(), max_pixels=10**8, max_bytes=10**8)
    load = make_loader(tiny_backbone)
    for i in (0, 2):
        np.testing.assert_array_equal(out["pixels"][i], load(paths[i]).numpy())
    with pytest.raises(PosterError) as caught:
        load(paths[1])
    assert list(out["error"]) == ["", str(caught.value), ""]
    assert not out["pixels"][1].any()


@pytest.mark.slow
def test_ray_gives_the_local_engines_embeddings_and_counts(tmp_path, tiny_backbone, messy_folder, ray_cluster,
                                                           monkeypatch):
    local = EmbeddingCache.open(tmp_path / "local", tiny_backbone.identity, backbone_spec=tiny_backbone.spec)
    expected = embed_records(from_folder(messy_folder), local, tiny_backbone, batch_size=8, progress=False)
    assert (expected.encoded, expected.cached, expected.skipped) == (30, 1, 3)

    cache = EmbeddingCache.open(tmp_path / "ray", tiny_backbone.identity, backbone_spec=tiny_backbone.spec)
    # a third of the posters committed already: Ray encodes only the rest
    pre = embed_records([r for r in from_folder(messy_folder) if r.id.startswith("syn-")][:10], cache,
                        tiny_backbone, progress=False)
    assert pre.encoded == 10
    before = np.array(cache.image_matrix())
    got = embed_records_ray(from_folder(messy_folder), cache, batch_size=4, concurrency=1, progress=False)
    # after the local engine's shard, a shard of each block Ray streamed back (not one for the whole job)
    blocks = [e.posters for e in cache.shard_entries if e.posters][1:]
    assert len(blocks) > 1 and sum(blocks) == got.encoded
    assert (got.records, got.encoded + 10, got.cached - 10, got.skipped) == (
        expected.records, expected.encoded, expected.cached, expected.skipped)
    assert skipped(got) == skipped(expected)
    assert got.posters_per_second > 0
    np.testing.assert_array_equal(np.array(cache.image_matrix())[:len(before)], before)  # old rows untouched
    assert_same_cache(local, cache)
    # the poster shown twice has one row, shared by both records
    np.testing.assert_array_equal(by_id(cache, ["same-as-first"]), by_id(cache, ["syn-00000"]))

    # a rerun over committed posters does the hashing alone (a file that fails to decode would be
    # tried again, as the local engine does)
    forbid_ray(monkeypatch)
    good = [r for r in from_folder(messy_folder) if r.id.startswith(("syn-", "same-"))]
    again = embed_records_ray(good, cache, batch_size=4, progress=False)
    assert (again.encoded, again.cached, again.skipped) == (0, 31, 0)


@pytest.mark.slow
def test_ray_stores_the_local_engines_token_sequences(tmp_path, tiny_backbone, messy_folder, ray_cluster):
    """With tokens, every poster's token sequence is stored with its block, as the local engine stores
    it, and a rerun that leaves `tokens` unset follows the cache: the posters it adds get theirs too, so
    a genre head with memory="tokens" can read every poster."""
    from clipposter.heads.genre.data import require_tokens

    records = from_folder(messy_folder)
    good = sorted((r for r in records if r.id.startswith("syn-")), key=lambda r: r.id)
    local = EmbeddingCache.open(tmp_path / "local", tiny_backbone.identity, backbone_spec=tiny_backbone.spec)
    embed_records(copies(records), local, tiny_backbone, batch_size=8, tokens=True, progress=False)
    cache = EmbeddingCache.open(tmp_path / "ray", tiny_backbone.identity, backbone_spec=tiny_backbone.spec)
    first = embed_records_ray(copies(good[:12]), cache, batch_size=4, concurrency=1, tokens=True, progress=False)
    assert (first.encoded, first.tokens) == (12, True)
    rest = embed_records_ray(records, cache, batch_size=4, concurrency=1, progress=False)
    assert (rest.encoded, rest.cached, rest.skipped, rest.tokens) == (18, 13, 3, True)

    assert cache.token_shape == tiny_backbone.token_shape == require_tokens(cache)
    ids = sorted(r.id for r in local.records())
    stored = cache.tokens_for_ids(ids)
    assert stored.dtype == np.float16 and stored.shape == (len(ids), *tiny_backbone.token_shape)
    expected = local.tokens_for_ids(ids).astype(np.float32)
    np.testing.assert_allclose(stored.astype(np.float32), expected, atol=2e-3)
    cos = np.sum(stored.astype(np.float32) * expected, axis=-1)  # every token row of every poster
    assert cos.min() >= 0.999
    # row 0 of a sequence is the poster's pooled embedding
    np.testing.assert_allclose(stored[:, 0].astype(np.float32), cache.embeddings_for_ids(ids), atol=2e-3)
    # the poster shown twice shares its row, tokens included
    np.testing.assert_array_equal(cache.tokens_for_ids(["same-as-first"]), cache.tokens_for_ids(["syn-00000"]))


def test_tokens_on_a_cache_without_them_is_refused_before_any_ray_work(tmp_path, tiny_backbone, messy_folder,
                                                                       monkeypatch):
    cache = EmbeddingCache.open(tmp_path / "c", tiny_backbone.identity, backbone_spec=tiny_backbone.spec)
    embed_records([r for r in from_folder(messy_folder) if r.id.startswith("syn-")][:4], cache, tiny_backbone,
                  progress=False)
    forbid_ray(monkeypatch)
    with pytest.raises(ClipposterError, match="^tokens is set, but the 4 posters of the cache .* without token"):
        embed_records_ray(from_folder(messy_folder), cache, tokens=True, progress=False)
    assert cache.num_posters == 4


@pytest.mark.slow
def test_a_backbone_that_differs_on_the_workers_is_one_line(tmp_path, tiny_backbone, synthetic_set, ray_cluster):
    """The actors check the backbone they load against the cache's identity, as the local engine
    does: here the checkpoint the cache records was replaced by other weights after the cache was made."""
    from clipposter.embedding.backbone import TINY_MODEL, load_backbone, save_tiny_backbone

    ckpt = save_tiny_backbone(tmp_path / "moving.safetensors", seed=0)
    made_with = load_backbone(TINY_MODEL, str(ckpt), device="cpu")
    cache = EmbeddingCache.open(tmp_path / "c", made_with.identity, backbone_spec=made_with.spec)
    save_tiny_backbone(ckpt, seed=1)
    with pytest.raises(ClipposterError) as caught:
        embed_records_ray(copies(synthetic_set[1][:4]), cache, batch_size=2, concurrency=1, progress=False)
    message = str(caught.value)
    assert "was made with backbone" in message and "\n" not in message and "Traceback" not in message
    assert cache.num_posters == 0


def placements(encoders: int, free: tuple[float, ...], size: float):
    """Every way Ray could put `encoders` actors of `size` CPUs on nodes with `free` CPUs: the CPUs
    each node has left."""
    if encoders == 0:
        yield free
        return
    for n, f in enumerate(free):
        if f >= size - 1e-9:
            yield from placements(encoders - 1, free[:n] + (f - size,) + free[n + 1:], size)


@pytest.mark.parametrize("nodes", [(1,), (2,), (1, 1), (3, 1), (1, 1, 1, 1), (2, 2, 4), (16,)])
@pytest.mark.parametrize("encoders", [1, 2, 3, 5, 8])
def test_wherever_ray_puts_the_encoders_a_node_has_a_decode_slot(nodes, encoders):
    """The job cannot wait forever: the encoders fit, and whichever nodes they land on, one node still
    has the CPU a decode task asks for (with 1 CPU per decode task, two encoders of half a CPU on two
    1-CPU nodes would leave half a CPU on each)."""
    decode, encoder = ray_engine.cpu_slots(float(sum(nodes)), encoders)
    assert 0 < decode <= 1 and 0 < encoder <= 1
    left = list(placements(encoders, tuple(float(c) for c in nodes), encoder))
    assert left, "the encoders do not fit"
    for free in left:
        assert max(free) >= decode - 1e-9, (nodes, encoders, decode, encoder, free)
    if sum(nodes) >= encoders + 1:  # room for whole CPUs: each encoder has one
        assert encoder == 1


@pytest.mark.slow
def test_two_worker_nodes_give_the_local_engines_embeddings(tmp_path, tiny_checkpoint, tiny_backbone, messy_folder,
                                                          monkeypatch):
    """On a cluster of 2 one-CPU worker nodes (and a head without CPUs), two encoders finish the job
    with the local engine's embeddings and counts: the driver, a process of its own, joins the cluster
    at its address as `--address` does."""
    Cluster = pytest.importorskip("ray.cluster_utils").Cluster

    temp = tempfile.mkdtemp(prefix="cpray")  # the cluster notes its address under Ray's temporary folder
    monkeypatch.setenv("RAY_TMPDIR", temp)
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 0, "include_dashboard": False, "temp_dir": os.path.join(temp, "ray"),
                                      "object_store_memory": 100 * 1024 * 1024})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, object_store_memory=100 * 1024 * 1024)
        cluster.wait_for_nodes()
        cache_dir = tmp_path / "ray"
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-m", "clipposter.cli.main", "embed", str(messy_folder), "--cache",
                               str(cache_dir), *tiny_args(tiny_checkpoint), "--engine", "ray", "--address",
                               cluster.address, "--concurrency", "2", "--batch-size", "4", "--no-texts", "--json"],
                              capture_output=True, text=True, env=env, timeout=240)
    finally:
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)["summary"]
    assert (summary["encoded"], summary["cached"], summary["skipped"]) == (30, 1, 3)
    local = EmbeddingCache.open(tmp_path / "local", tiny_backbone.identity, backbone_spec=tiny_backbone.spec)
    embed_records(from_folder(messy_folder), local, tiny_backbone, batch_size=8, progress=False)
    with EmbeddingCache.open(cache_dir, mode="r") as cache:
        assert_same_cache(local, cache)


def test_other_weights_are_refused_before_any_ray_work(tmp_path, tiny_backbone, synthetic_set, monkeypatch):
    from clipposter.embedding.backbone import save_tiny_backbone

    other = save_tiny_backbone(tmp_path / "other.safetensors", seed=1)
    cache = EmbeddingCache.open(tmp_path / "c", tiny_backbone.identity, backbone_spec=tiny_backbone.spec)
    forbid_ray(monkeypatch)
    with pytest.raises(ClipposterError, match="was made with backbone"):
        embed_records_ray(copies(synthetic_set[1][:4]), cache, pretrained=str(other), progress=False)
    with pytest.raises(ClipposterError, match="^concurrency must be at least 1"):
        embed_records_ray(copies(synthetic_set[1][:4]), cache, concurrency=0, progress=False)
    assert cache.num_posters == 0


def test_engine_flags_are_checked_before_any_work(tmp_path, capsys, synthetic_set, tiny_checkpoint):
    src, _ = synthetic_set
    manifest = src / "manifest.csv"
    code, out, err = run_cli(capsys, "embed", manifest, "--cache", tmp_path / "c", *tiny_args(tiny_checkpoint),
                             "--address", "auto")
    assert code == 2 and err.strip() == "error: --address applies to --engine ray only"
    code, out, err = run_cli(capsys, "embed", manifest, "--cache", tmp_path / "c", *tiny_args(tiny_checkpoint),
                             "--engine", "ray", "--decode", "gpu")
    assert code == 2 and err.strip().startswith("error: --decode applies to --engine local only")
    code, out, err = run_cli(capsys, "embed", manifest, "--cache", tmp_path / "c", *tiny_args(tiny_checkpoint),
                             "--engine", "ray", "--concurrency", "0")
    assert code == 2 and err.strip() == "error: --concurrency must be at least 1 encoder, got 0"
    assert not (tmp_path / "c").exists() or EmbeddingCache.open(tmp_path / "c", mode="r").num_posters == 0


def committed_posters(cache_dir) -> int:
    try:
        with EmbeddingCache.open(cache_dir, mode="r") as cache:
            return cache.num_posters
    except (ClipposterError, OSError):
        return 0


@pytest.mark.slow
def test_a_killed_ray_job_resumes_to_the_local_engines_cache(tmp_path, tiny_checkpoint, tiny_backbone, ray_cluster,
                                                            capsys):
    src = tmp_path / "posters"
    records = generate_posters(src, n=160, seed=21)
    cache_dir = tmp_path / "cache"
    args = ["embed", str(src / "manifest.csv"), "--cache", str(cache_dir), *tiny_args(tiny_checkpoint),
            "--engine", "ray", "--batch-size", "4", "--no-texts", "--json"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "stderr.txt", "wb")  # a file, not a pipe: a full pipe would stall the job
    proc = subprocess.Popen([sys.executable, "-m", "clipposter.cli.main", *args, "--address", ray_cluster,
                             "--concurrency", "1"], stdout=subprocess.DEVNULL, stderr=log, env=env)
    committed, deadline = 0, time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        committed = committed_posters(cache_dir)
        if committed >= 8:  # at least two blocks committed
            break
        time.sleep(0.05)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    assert alive, f"the Ray job ended before it could be killed: {(tmp_path / 'stderr.txt').read_text()[-2000:]}"
    at_kill = committed_posters(cache_dir)
    assert 8 <= at_kill < len(records)

    # the rerun joins the module's Ray in this process; it encodes only what was not committed
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    summary = json.loads(out)["summary"]
    assert (summary["encoded"], summary["cached"], summary["skipped"]) == (len(records) - at_kill, at_kill, 0)

    local = EmbeddingCache.open(tmp_path / "local", tiny_backbone.identity, backbone_spec=tiny_backbone.spec)
    embed_records(copies(records), local, tiny_backbone, batch_size=4, progress=False)
    with EmbeddingCache.open(cache_dir, mode="r") as cache:
        assert cache.num_posters == len(records)  # no poster twice
        assert_same_cache(local, cache)
