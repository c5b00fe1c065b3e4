"""The genre losses' formulas in plain numpy, the reference the loss tests compare against."""
from __future__ import annotations

import numpy as np


def loss_by_hand(x, y, kind, w=None, focal_gamma=2.0, asl_gamma_neg=4.0, asl_gamma_pos=0.0, asl_clip=0.05):
    """Each loss's formula in plain numpy, written from its definition (float64; moderate logits)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    w = np.ones(x.shape[1]) if w is None else np.asarray(w, np.float64)
    p = 1.0 / (1.0 + np.exp(-x))
    if kind == "bce":
        pos, neg = np.log(p), np.log(1 - p)
    elif kind == "focal":
        pos, neg = (1 - p) ** focal_gamma * np.log(p), p ** focal_gamma * np.log(1 - p)
    else:  # asl: easy negatives shifted down by the clip, p_m = max(p - clip, 0)
        pm = np.maximum(p - asl_clip, 0.0)
        pos, neg = (1 - p) ** asl_gamma_pos * np.log(p), pm ** asl_gamma_neg * np.log(1 - pm)
    return float(-(w * y * pos + (1 - y) * neg).mean())
