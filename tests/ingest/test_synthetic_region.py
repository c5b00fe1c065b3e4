"""Region-cue synthetic posters: the genres' art sits in one quadrant, decoy genre art fills the rest."""
import random

import numpy as np
import pytest

from clipposter.errors import ConfigError
from clipposter.ingest.synthetic import cue_box, generate_posters, render_poster


def box_and_rest(genres, seed, cue):
    img = np.asarray(render_poster(random.Random(seed), genres, "T", (120, 120), cue=cue), dtype=np.float32)
    left, top, side = cue_box((120, 120))
    inside = img[top:top + side, left:left + side]
    mask = np.ones(img.shape[:2], bool)
    mask[top:top + side, left:left + side] = False
    mask[int(120 * 0.82):] = False  # the title band
    return inside.mean(), img[mask].mean()


def test_the_genre_sets_the_quadrant_and_not_the_rest():
    # Horror art is dark, Comedy art bright yellow: in the quadrant they always differ, outside it the
    # decoys (drawn independently of the genres) make both sets look alike on average.
    horror = np.array([box_and_rest(["Horror"], s, "region") for s in range(24)])
    comedy = np.array([box_and_rest(["Comedy"], s, "region") for s in range(24)])
    assert horror[:, 0].max() < 90 < 150 < comedy[:, 0].min()
    assert abs(horror[:, 1].mean() - comedy[:, 1].mean()) < 25
    # With the global cue the whole poster follows the genre.
    g_horror = np.array([box_and_rest(["Horror"], s, "global") for s in range(8)])
    g_comedy = np.array([box_and_rest(["Comedy"], s, "global") for s in range(8)])
    assert g_comedy[:, 1].mean() - g_horror[:, 1].mean() > 100


def test_cue_box_lies_in_the_central_square():
    assert cue_box((200, 300)) == (0, 50, 100)
    assert cue_box((128, 128)) == (0, 0, 64)
    left, top, side = cue_box((300, 120))
    assert top + side <= int(120 * 0.82)


def test_region_posters_keep_the_records_and_a_bad_cue_names_the_parameter(tmp_path):
    plain = generate_posters(tmp_path / "a", n=6, seed=2, size=(64, 64))
    region = generate_posters(tmp_path / "b", n=6, seed=2, size=(64, 64), cue="region")
    assert [(r.id, r.genres, r.tagline, r.split) for r in plain] == [(r.id, r.genres, r.tagline, r.split)
                                                                     for r in region]
    assert open(plain[0].image, "rb").read() != open(region[0].image, "rb").read()
    with pytest.raises(ConfigError, match="^cue must be one of global, region, got 'corner'"):
        generate_posters(tmp_path / "c", n=1, cue="corner")
