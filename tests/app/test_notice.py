"""The notice of a run on random weights in the app: at the top of the page and in every answer's JSON,
derived from what the cache and the caption head record (the report shows the same one)."""
from __future__ import annotations

import html

import pytest

from weights_fixtures import weights_run

pytest.importorskip("gradio")  # the page is built; test_app.py says when a missing app extra is a failure
pytestmark = pytest.mark.usefixtures("single_torch_thread")

RANDOM_BACKBONE = ("the backbone clipposter-tiny has random weights (random-seed0): the scores show that the "
                   "pipeline works, not how good CLIP is")
RANDOM_LM = ("the caption head's language model started from random weights: the scores show that the pipeline "
             "works, not how good a pretrained language model is")


@pytest.mark.parametrize("backbone, lm, expected", [("random", "loaded", RANDOM_BACKBONE),
                                                     ("checkpoint", "random", RANDOM_LM),
                                                     ("checkpoint", "loaded", None)])
def test_page_and_handlers_say_when_the_weights_are_random(tmp_path_factory, synthetic_set, tiny_backbone,
                                                           tmp_path, backbone, lm, expected):
    """The app on a cache embedded with `--pretrained random` (or a caption head on a randomly
    initialised LM) shows the same notice as the report, at the top of the page and in every
    answer's JSON; on a backbone loaded from a checkpoint file and an LM of trained weights, none."""
    from clipposter.analysis import PosterAnalyzer
    from clipposter.app.handlers import AppHandlers, Thumbnails
    from clipposter.app.page import build_app

    parts = weights_run(tmp_path_factory, synthetic_set, tiny_backbone, backbone, lm)
    with PosterAnalyzer.open(parts["cache"], parts["genre_head"], parts["caption_head"], device="cpu") as analyzer:
        handlers = AppHandlers(analyzer, samples=1, k=0, num_return=1, thumbnails=Thumbnails(tmp_path / "t"))
        view = handlers.analyse_sample(handlers.sample_ids[0], "greedy", 1, 0)
        search = handlers.search("a haunted house", 1)
        blocks = build_app(analyzer, samples=1, thumbnails=Thumbnails(tmp_path / "t"))
    assert view.ok and search.ok, (view.error, search.error)
    assert handlers.notice == expected
    assert view.details.get("notice") == expected and search.details.get("notice") == expected
    shown = [b.value for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "cp-notice"]
    if expected is None:
        assert shown == []
    else:
        assert len(shown) == 1 and html.escape(expected) in shown[0] and 'role="alert"' in shown[0]
