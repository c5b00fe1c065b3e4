"""The synthetic posters carry genre signal that survives the tiny random CLIP backbone, so every
head can be trained and evaluated offline on them."""
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import MultiLabelBinarizer

from clipposter.embedding.cache import EmbeddingCache
from clipposter.embedding.embed import embed_records
from clipposter.ingest.synthetic import SYNTHETIC_GENRES, generate_posters


def best_constant_f1(y_train, y_eval):
    """Micro-F1 of predicting the k most frequent training genres for every poster, best k."""
    order = np.argsort(-y_train.sum(0))
    scores = []
    for k in range(1, 4):
        pred = np.zeros_like(y_eval)
        pred[:, order[:k]] = 1
        scores.append(f1_score(y_eval, pred, average="micro", zero_division=0))
    return max(scores)


def test_linear_probe_on_tiny_backbone_beats_most_frequent_genres(tmp_path, tiny_backbone):
    records = generate_posters(tmp_path / "p", n=400, seed=5)
    cache = EmbeddingCache.open(tmp_path / "c", tiny_backbone.identity)
    embed_records(records, cache, tiny_backbone, progress=False)
    train = [r for r in cache.records() if r.split == "train"]
    held = [r for r in cache.records() if r.split != "train"]
    mlb = MultiLabelBinarizer(classes=list(SYNTHETIC_GENRES))
    y_tr, y_te = mlb.fit_transform([r.genres for r in train]), mlb.transform([r.genres for r in held])
    x_tr = cache.embeddings_for_ids([r.id for r in train])
    x_te = cache.embeddings_for_ids([r.id for r in held])
    probe = OneVsRestClassifier(LogisticRegression(C=10.0, max_iter=2000)).fit(x_tr, y_tr)
    probe_f1 = f1_score(y_te, probe.predict(x_te), average="micro", zero_division=0)
    constant_f1 = best_constant_f1(y_tr, y_te)
    assert probe_f1 > constant_f1 + 0.15, (probe_f1, constant_f1)
