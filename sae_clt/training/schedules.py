"""Schedules over training steps, all from one warm-up helper: the learning rate (linear warm-up,
then linear decay to zero or constant), the penalty ramp (linear warm-up, then constant) and the
usage-regularisation coefficient (linear warm-up, then a half cosine down to zero)."""

from __future__ import annotations

import math


def warmup_then(step: int, total: int, warmup: int, after: str = "constant") -> float:
    """A factor in [0, 1]: (step + 1) / warmup during the first ``warmup`` steps, then ``after``:
    "constant" (1), "linear" (down to 0 at ``total``) or "cosine" (a half cosine down to 0)."""
    if step < warmup:
        return (step + 1) / warmup
    if after == "constant":
        return 1.0
    if after == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    if after == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    raise ValueError(f"unknown schedule {after!r}")


def lr_factor(step: int, total: int, warmup: int, decay: str) -> float:
    """train.decay: "linear" (to zero after the warm-up) or "constant"."""
    return warmup_then(step, total, warmup, decay)


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """0 → 1 linearly over ``warmup`` steps, then a half cosine from 1 down to 0 at ``total``."""
    return warmup_then(step, total, warmup, "cosine")


def ramp(step: int, steps: int) -> float:
    """0 → 1 linearly over ``steps`` steps (at least one), then 1: the penalty coefficients' warm-up."""
    return warmup_then(step, 0, max(1, steps), "constant")
