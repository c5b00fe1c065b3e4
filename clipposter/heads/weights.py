"""Checks shared by the heads' loaders.

`check_finite(state_dict, path)` refuses weights holding NaN or infinite values: a head loaded with
them predicts NaN (or nothing) for every poster without a word, so loading stops with one line
naming the file and the first such tensor.
"""
from __future__ import annotations

import os
from typing import Mapping

from clipposter.errors import ClipposterError


def check_finite(state_dict: Mapping, path: str | os.PathLike) -> None:
    """Raise ClipposterError naming `path` and the first floating-point tensor of `state_dict` (in
    its order) that holds a NaN or an infinite value."""
    import torch

    for name, tensor in state_dict.items():
        if not torch.is_tensor(tensor) or not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        finite = torch.isfinite(tensor)
        if bool(finite.all()):
            continue
        nan = int(torch.isnan(tensor).sum())
        inf = tensor.numel() - int(finite.sum()) - nan
        what = " and ".join(w for w, n in (("NaN", nan), ("infinite values", inf)) if n)
        raise ClipposterError(f"{path}: tensor {name} holds {what} ({nan + inf} of {tensor.numel()} values); the "
                              f"file is damaged or the training diverged: retrain the head")
