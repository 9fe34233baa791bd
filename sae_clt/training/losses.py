"""Training losses beside the reconstruction: AuxK (dead latents model the residual, top-k kinds)
and usage regularisation (a KL pull of every latent's firing frequency towards a target)."""

from __future__ import annotations

import torch

from ..dictionaries.dictionary import Dictionary


class UsageKL:
    """Usage regularisation: the mean over latents of KL(target ‖ p_i) between Bernoulli firing
    rates. p_i mixes the running (hard) firing frequency with this batch's soft one,
    mean_b σ((pre_bi - θ_i) / T), so the gradient reaches silent latents through their
    pre-activations (θ = 0 for relu kinds, the learned threshold for jumprelu)."""

    def __init__(self, d_sae: int, target: float, decay: float, temperature: float, device: torch.device | str = "cpu"):
        self.frequency = torch.full((d_sae,), target, dtype=torch.float64, device=device)  # starts at the target: no early push
        self.target, self.decay, self.temperature = target, decay, temperature

    def loss(self, model: Dictionary, pre: torch.Tensor) -> torch.Tensor:
        theta = model.cfg.act.firing_threshold(model)
        soft = torch.sigmoid((pre - theta) / self.temperature).mean(0)
        p = (self.decay * self.frequency.to(soft.dtype) + (1 - self.decay) * soft).clamp(1e-6, 1 - 1e-6)
        t = self.target
        return (t * torch.log(t / p) + (1 - t) * torch.log((1 - t) / (1 - p))).mean()

    def update(self, fired_fraction: torch.Tensor) -> None:
        self.frequency.mul_(self.decay).add_(fired_fraction.double(), alpha=1 - self.decay)


def aux_k_loss(model: Dictionary, pre: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor, aux_k: int) -> torch.Tensor:
    """AuxK: the top-``aux_k`` dead latents (by pre-activation) reconstruct the main residual;
    normalised by the residual's variance so its scale does not drift with training."""
    dead_idx = dead.nonzero().squeeze(1)
    if dead_idx.numel() == 0 or aux_k == 0:
        return pre.new_zeros(())
    k = min(aux_k, dead_idx.numel())
    pre_dead = pre[:, dead_idx]  # [B, n_dead]: only the dead columns
    values, local = pre_dead.topk(k, dim=-1, sorted=False)
    # Dense decode over the dead rows: one [B, n_dead] @ [n_dead, d_out] matmul is far cheaper
    # than a gather of B * aux_k decoder rows and its scatter-add backward.
    z = torch.zeros_like(pre_dead).scatter(-1, local, torch.relu(values))
    recon = z @ model.W_dec[dead_idx]
    target = residual.detach()
    return ((recon - target) ** 2).sum(-1).mean() / ((target - target.mean(0)) ** 2).sum(-1).mean().clamp_min(1e-12)
