"""The main job: `clipposter demo` runs every stage offline and leaves a run folder that the report,
the app and a rerun can use."""
from __future__ import annotations

import html
import json
import shutil

import pytest

import clipposter.cli.main as cli
from clipposter.analysis import PosterAnalyzer
from clipposter.run import read_run
from clipposter.pipeline import run_demo

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_demo_run_has_every_part(demo_run):
    run = read_run(demo_run)
    for key in ("cache", "genre_head", "caption_head", "report"):
        assert (demo_run / run[key]).exists(), key
    assert (demo_run / "genres" / "evaluation.json").is_file()
    chart = (demo_run / "genres" / "evaluation.svg").read_text()
    assert chart.startswith("<?xml") and "Per-genre F1 on" in chart
    captions = json.loads((demo_run / "taglines" / "evaluation.json").read_text())
    assert set(captions["scores"]["systems"]) == {"generated", "chance", "constant"}
    html = (demo_run / "report.html").read_text()
    # the backbone was given; the LM fell back to the tiny one (no hub asked), and the run says so
    assert "gpt2 weights unavailable" in run["notice"] and "ViT-B-32" not in run["notice"]
    with PosterAnalyzer.from_run(demo_run) as analyzer:
        ids = analyzer.sample_ids(3, split="test")
        assert len(ids) == 3
        for a in analyzer.analyze_ids(ids, k=4):
            assert a.id in html
            assert set(a.probabilities) == set(analyzer.genres)
            assert len(a.neighbours) == 4 and a.id not in {h.id for h in a.neighbours}
            assert a.taglines and all(isinstance(t, str) for t in a.taglines)


def test_demo_genre_head_beats_the_image_blind_baseline(demo_run):
    report = json.loads((demo_run / "genres" / "evaluation.json").read_text())
    split = report["per_genre_split"]
    head = report["models"][report["head"]["name"]]["results"]["calibrated"][split]["micro"]["f1"]
    constant = report["models"]["constant"]["results"]["top-k"][split]["micro"]["f1"]
    assert head > constant + 0.15


def test_rerun_reuses_finished_stages(demo_run, tiny_backbone, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(demo_run, out)
    result = run_demo(out, n=160, seed=5, backbone=tiny_backbone, online=False, progress=False)
    stages = result.stages
    assert stages["embed"]["encoded"] == 0 and stages["embed"]["cached"] == 160
    assert stages["genres"].get("reused") and stages["captions"].get("reused")
    assert (out / "report.html").is_file()


@pytest.mark.slow
def test_killed_caption_training_resumes(demo_run, tiny_backbone, tmp_path, monkeypatch):
    """A run killed after the caption head's second epoch picks up from that checkpoint."""
    import clipposter.heads.caption.train as caption

    out = tmp_path / "run"
    shutil.copytree(demo_run, out)
    shutil.rmtree(out / "taglines")
    shutil.rmtree(out / "genres")
    save = caption._save_checkpoint

    def save_then_die(head, folder, epoch, *args, **kwargs):
        path = save(head, folder, epoch, *args, **kwargs)
        if epoch == 2:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(caption, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_demo(out, n=160, seed=5, backbone=tiny_backbone, online=False, progress=False)
    monkeypatch.setattr(caption, "_save_checkpoint", save)
    result = run_demo(out, n=160, seed=5, backbone=tiny_backbone, online=False, progress=False)
    assert result.stages["captions"]["resumed_from_epoch"] == 2
    assert result.stages["genres"].get("reused")
    assert (out / "taglines" / "config.json").is_file()


@pytest.mark.slow
def test_demo_on_own_posters(synthetic_set, tiny_backbone, tmp_path):
    folder, records = synthetic_set
    result = run_demo(tmp_path / "own", source=str(folder / "manifest.csv"), backbone=tiny_backbone,
                      online=False, progress=False)
    assert result.stages["posters"]["posters"] == len(records)
    assert json.loads((tmp_path / "own" / "run.json").read_text())["source"].endswith("manifest.csv")


@pytest.mark.slow
def test_demo_cli_offline_says_so_and_prints_the_report(tmp_path, monkeypatch, capsys):
    """Without reachable weights the demo says so in one line and in the report, and still runs every
    stage with a tiny CLIP trained on synthetic posters of another seed and a tiny GPT-2; its zero-shot
    genres then beat the image-blind constant."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "cli-run"
    assert cli.main(["demo", "--out", str(out), "-n", "80", "--seed", "2"]) == 0
    printed = capsys.readouterr().out
    notes = [line for line in printed.splitlines() if line.startswith("note: ")]
    trained = "clipposter-tiny, a tiny CLIP trained on 400 synthetic posters, not CLIP's weights"
    assert len(notes) == 1 and trained in notes[0] and "HF_HUB_OFFLINE" in notes[0]
    report = out / "report.html"
    assert printed.strip().splitlines()[-1] == f"report: {report}"
    assert trained in html.unescape(report.read_text())
    run = json.loads((out / "run.json").read_text())
    assert run["lm"] == "tiny GPT-2" and run["backbone"].startswith("clipposter-tiny (sha256:")
    evaluation = json.loads((out / "genres" / "evaluation.json").read_text())
    micro = {name: model["results"]["calibrated" if "calibrated" in model["results"] else "top-k"]
             for name, model in evaluation["models"].items()}
    for split in ("validation", "test"):
        assert micro["zero-shot"][split]["map"] > micro["constant"][split]["map"] + 0.2, split


def test_demo_refuses_too_few_posters(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path / "x"), "-n", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: -n 10")


def test_search_cli_filters_on_a_heads_predicted_genres(demo_run, capsys):
    """`search --genre G --genre-head DIR` keeps posters the head predicts G for, labelled or not."""
    from clipposter.embedding.cache import EmbeddingCache
    from clipposter.heads.genre.head import GenreHead

    run = read_run(demo_run)
    with EmbeddingCache.open(run["cache"]) as cache:
        head = GenreHead.from_pretrained(run["genre_head"], identity=cache.identity)
        query = cache.records("test")[0].id
        probs = head.predict_proba(cache.embeddings_for_ids([r.id for r in cache.records()]))
        by_id = dict(zip([r.id for r in cache.records()], probs))
    genre = "Horror"
    g = head.genres.index(genre)
    cut = head.thresholds_for()[g]
    predicted = {i for i, p in by_id.items() if p[g] >= cut} - {query}
    assert cli.main(["search", "--cache", run["cache"], "--id", query, "-k", "200", "--genre", genre,
                     "--genre-head", run["genre_head"], "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["results"]
    assert {h["id"] for h in hits} == predicted
    assert all(genre in h["predicted_genres"] for h in hits)
    assert cli.main(["search", "--cache", run["cache"], "--id", query, "--genre-head", run["genre_head"]]) == 2
    assert "give the genres with --genre" in capsys.readouterr().err


def test_the_offline_backbone_is_trained_once_on_posters_the_demo_never_draws(monkeypatch):
    """Offline, the demo's backbone is a tiny CLIP trained on synthetic posters of a seed other than the
    demo's own (so none of its validation or test posters), kept in $CLIPPOSTER_CACHE (the suite's own,
    see conftest.py) and reused by later runs."""
    import clipposter.pipeline as pipeline
    from clipposter.embedding.contrastive import SYNTHETIC_SEED, ContrastiveConfig, backbone_cache_root

    monkeypatch.setattr(pipeline, "OFFLINE_BACKBONE_POSTERS", 24)
    monkeypatch.setattr(pipeline, "OFFLINE_BACKBONE_SETTINGS", ContrastiveConfig(epochs=1, batch_size=8))
    first = pipeline.offline_backbone(seed=5, device="cpu")
    assert first.trained_now and first.seed == SYNTHETIC_SEED and first.posters == 24
    assert first.folder.parent == backbone_cache_root()
    again = pipeline.offline_backbone(seed=6, device="cpu")  # any demo seed but the backbone's: the same one
    assert not again.trained_now and again.backbone.identity == first.backbone.identity
    clash = pipeline.offline_backbone(seed=SYNTHETIC_SEED, device="cpu")
    assert clash.seed != SYNTHETIC_SEED and clash.folder != first.folder


def test_pick_backbone_falls_back_to_what_it_is_given(monkeypatch):
    from clipposter.pipeline import pick_backbone

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    given = object()
    assert pick_backbone(online=False, fallback=lambda: given) == (given, "HF_HUB_OFFLINE is set")
