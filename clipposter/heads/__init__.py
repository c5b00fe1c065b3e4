"""Heads trained on the embedding cache, one package each: `genre` (the ML-Decoder genre head and its
baselines) and `caption` (taglines and plots). Import from the head's package, e.g.
`from clipposter.heads.genre import GenreHead, TrainConfig, train_genre_head`."""
