"""The small-data rule: below SMALL_DATA_POSTERS labelled training posters the ML-Decoder trains with
settings for a few hundred posters instead of the paper's (for ~35K); explicit settings win."""
from __future__ import annotations

import numpy as np
import pytest

from clipposter.embedding.cache import EmbeddingCache
from clipposter.errors import ConfigError
from clipposter.heads.genre import config
from clipposter.heads.genre.config import TrainConfig
from clipposter.heads.genre.train import train_genre_head
from clipposter.records import PosterRecord

pytestmark = pytest.mark.usefixtures("single_torch_thread")

GENRES = ["Action", "Comedy", "Drama", "Horror"]


@pytest.fixture(scope="module")
def few_posters(tmp_path_factory, tiny_backbone):
    """300 training and 60 validation posters: random embeddings, one to two of four genres."""
    rng = np.random.default_rng(0)
    cache = EmbeddingCache.open(tmp_path_factory.mktemp("small-data") / "cache", tiny_backbone.identity,
                                backbone_spec=tiny_backbone.spec)
    emb = rng.standard_normal((360, tiny_backbone.embed_dim))
    hashes = [f"{i:064x}" for i in range(360)]
    recs = [(PosterRecord(id=f"p{i:03d}", genres=list(rng.choice(GENRES, size=rng.integers(1, 3), replace=False)),
                          split="train" if i < 300 else "validation"), h) for i, h in enumerate(hashes)]
    cache.add_posters(hashes, emb / np.linalg.norm(emb, axis=1, keepdims=True), recs)
    yield cache
    cache.close()


def test_the_rule_applies_below_the_limit_and_can_be_forced_either_way():
    limit = config.SMALL_DATA_POSTERS
    small = config.small_data_settings(496)
    assert small == {"train_posters": 496, "limit": limit,
                     "architecture": {"width": 64, "mlp_hidden": 64, "num_heads": 4, "dropout": 0.3},
                     "options": {"lr": 1e-3, "epochs": 40, "batch_size": 32, "patience": 5}}
    assert config.small_data_settings(limit - 1) is not None
    assert config.small_data_settings(limit) is None
    assert config.small_data_settings(496, small_data=False) is None
    assert config.small_data_settings(10 * limit, small_data=True)["train_posters"] == 10 * limit
    with pytest.raises(ConfigError, match="^small_data must be auto, True or False") as caught:
        config.small_data_settings(496, small_data="sometimes")
    assert caught.value.field == "small_data"


def test_few_posters_train_with_the_small_data_settings(few_posters, tiny_backbone):
    result = train_genre_head(few_posters, options={"epochs": 2}, backbone=tiny_backbone, progress=False)
    cfg, training = result.head.config, result.head.training
    assert (cfg["width"], cfg["mlp_hidden"], cfg["num_heads"], cfg["dropout"]) == (64, 64, 4, 0.3)
    assert (training["lr"], training["batch_size"], training["patience"]) == (1e-3, 32, 5)
    assert training["epochs"] == 2 and training["small_data"] is True  # the explicit setting wins
    assert result.small_data == {"train_posters": 300, "limit": config.SMALL_DATA_POSTERS,
                                 "architecture": {"width": 64, "mlp_hidden": 64, "num_heads": 4, "dropout": 0.3},
                                 "options": {"lr": 1e-3, "batch_size": 32, "patience": 5}}
    assert result.to_dict()["small_data"] == result.small_data


def test_explicit_settings_win_field_by_field(few_posters, tiny_backbone):
    result = train_genre_head(few_posters, architecture={"width": 32, "num_heads": 2},
                              options={"epochs": 1, "lr": 3e-3}, backbone=tiny_backbone, progress=False)
    cfg = result.head.config
    assert (cfg["width"], cfg["num_heads"], cfg["mlp_hidden"], cfg["dropout"]) == (32, 2, 64, 0.3)
    assert result.head.training["lr"] == 3e-3 and result.head.training["batch_size"] == 32
    assert result.small_data["architecture"] == {"mlp_hidden": 64, "dropout": 0.3}
    assert result.small_data["options"] == {"batch_size": 32, "patience": 5}
    # A TrainConfig sets every training option; the architecture still follows the rule.
    whole = train_genre_head(few_posters, options=TrainConfig(epochs=1), backbone=tiny_backbone, progress=False)
    assert whole.head.training["lr"] == 1e-4 and whole.head.training["batch_size"] == 256
    assert whole.head.config["width"] == 64 and whole.small_data["options"] == {}


def test_the_rule_can_be_turned_off_and_leaves_other_kinds_alone(few_posters, tiny_backbone):
    paper = train_genre_head(few_posters, options={"epochs": 1}, small_data=False, backbone=tiny_backbone,
                             progress=False)
    assert paper.head.config["width"] == 768 and paper.head.training["lr"] == 1e-4
    assert paper.small_data is None and paper.head.training["small_data"] is False
    probe = train_genre_head(few_posters, kind="linear-probe", backbone=tiny_backbone, progress=False)
    assert probe.small_data is None


def test_unknown_training_option_is_a_config_error(few_posters, tiny_backbone):
    with pytest.raises(ConfigError, match="^learning_rate is not a training option") as caught:
        train_genre_head(few_posters, options={"learning_rate": 1.0}, backbone=tiny_backbone, progress=False)
    assert caught.value.field == "learning_rate"
