"""Reconstruction and sparsity metrics, defined once (see DESIGN.md), accumulated in float64.

FVU = Σ‖y − ŷ‖² / Σ‖y − ȳ‖² pooled over rows and dims, ȳ the per-dim mean of the evaluation
rows: predicting that mean gives exactly 1. R² per dim = 1 − SSE_d / SST_d.
"""

from __future__ import annotations

import torch


class ReconstructionMeter:
    """Streams (y, ŷ) batches; sums are exact to float64 so batch size does not change results."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.n = 0
        self.sum_y = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sum_yy = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sse = torch.zeros(dim, dtype=torch.float64, device=device)
        self.cos_sum = 0.0

    def update(self, y: torch.Tensor, y_hat: torch.Tensor) -> None:
        y, y_hat = y.double(), y_hat.double()
        self.n += y.shape[0]
        self.sum_y += y.sum(0)
        self.sum_yy += (y * y).sum(0)
        self.sse += ((y - y_hat) ** 2).sum(0)
        self.cos_sum += float(torch.nn.functional.cosine_similarity(y, y_hat, dim=1, eps=1e-12).sum())

    def sst_per_dim(self) -> torch.Tensor:
        return self.sum_yy - self.sum_y**2 / self.n

    def r2_per_dim(self) -> torch.Tensor:
        return 1 - self.sse / self.sst_per_dim().clamp_min(1e-30)

    def summary(self) -> dict:
        sst = float(self.sst_per_dim().sum())
        sse = float(self.sse.sum())
        r2 = self.r2_per_dim()
        return {
            "fvu": sse / sst,
            "explained_variance": 1 - sse / sst,
            "mse": sse / (self.n * self.sse.numel()),
            "cosine": self.cos_sum / self.n,
            "r2_mean": float(r2.mean()),
            "r2_median": float(r2.median()),
            "r2_min": float(r2.min()),
            "rows": self.n,
        }


class SparsityMeter:
    """L0 per row and firing counts per latent."""

    def __init__(self, d_sae: int, device: torch.device | str = "cpu"):
        self.n = 0
        self.fires = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.l0_hist: dict[int, int] = {}
        self.l0_sum = 0

    def update(self, z: torch.Tensor) -> None:
        active = z != 0
        per_row = active.sum(1)
        self.n += z.shape[0]
        self.fires += active.sum(0).double()
        self.l0_sum += int(per_row.sum())
        values, counts = per_row.unique(return_counts=True)
        for v, c in zip(values.tolist(), counts.tolist()):
            self.l0_hist[v] = self.l0_hist.get(v, 0) + c

    def density(self) -> torch.Tensor:
        return self.fires / max(self.n, 1)

    def summary(self, dense_threshold: float) -> dict:
        density = self.density()
        return {
            "l0": self.l0_sum / max(self.n, 1),
            "dead_fraction": float((density == 0).double().mean()),
            "dense_fraction": float((density > dense_threshold).double().mean()),
            "density_median_alive": float(density[density > 0].median()) if bool((density > 0).any()) else 0.0,
        }


def decoder_redundancy(w_dec: torch.Tensor, threshold: float = 0.9, alive: torch.Tensor | None = None) -> float:
    """Fraction of (alive) latents whose decoder direction has cosine > threshold with another."""
    w = w_dec if alive is None else w_dec[alive]
    if w.shape[0] < 2:
        return 0.0
    w = torch.nn.functional.normalize(w.double(), dim=1)
    cos = w @ w.t()
    cos.fill_diagonal_(-1)
    return float((cos.max(dim=1).values > threshold).double().mean())


def fvu_batch(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    """FVU of one batch (training curves); same definition, batch mean as ȳ."""
    y, y_hat = y.double(), y_hat.double()
    return float(((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
