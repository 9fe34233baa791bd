"""Closed-form decoder refit: the least-squares decoder for the codes the encoder produces.

With the encoder fixed, the best decoder (and bias) is a linear least-squares problem:
    [Z 1] [W_dec; b_dec] ≈ Y,  solved from ZᵀZ (d_sae+1 square) and ZᵀY (d_sae+1 by d_out).
Both are accumulated from the sparse codes during the last part of the one training pass
(``train.decoder_refit_frac``, while the learning rate decays and the codes have settled), so
no data is read twice; each row adds the outer product of its k active values. At the end the
system is solved in float64 with a small ridge and the decoder replaced; for an SAE the encoder
bias absorbs the change of b_dec (which it subtracts from its input), so the codes are unchanged.
Decoder rows are no longer constrained to unit norm after the refit.
"""

from __future__ import annotations

import torch

from ..kernels.ops import gram_accumulate, latent_grads


class DecoderRefit:
    def __init__(self, d_sae: int, d_out: int, device: torch.device | str = "cpu"):
        self.n = d_sae + 1  # the last index is the bias column (a constant 1)
        self.gram = torch.zeros(self.n * self.n, dtype=torch.float64, device=device)
        self.cross = torch.zeros(self.n, d_out, dtype=torch.float64, device=device)
        self.rows = 0

    @torch.no_grad()
    def add(self, idx: torch.Tensor, acts: torch.Tensor, y: torch.Tensor, weight: float = 1.0) -> None:
        """Rows' active latents ``idx`` [B, k] with values ``acts`` [B, k] and targets ``y``;
        ``weight`` counts later (better settled) codes more."""

        b, d_sae = idx.shape[0], self.n - 1
        acts = acts.contiguous()  # float32 in training (the compiled kernels); float64 stays exact
        y = y.to(acts.dtype).contiguous()
        gram = self.gram.view(self.n, self.n)
        gram_accumulate(idx, acts, gram[:d_sae], weight)  # ZᵀZ over the latents
        # Zᵀ Y by the gradient scatter kernel, as its [d_sae, d_out] output (not the transposed
        # one: no transposed write, and a contiguous add below); the code sums for the bias
        # row and column
        _, zty, _, _ = latent_grads(idx, torch.zeros_like(acts), y, acts, y, d_sae)
        sums = torch.zeros(d_sae, dtype=acts.dtype, device=acts.device).index_add_(0, idx.reshape(-1), acts.reshape(-1)).double() * weight
        gram[:d_sae, d_sae] += sums
        gram[d_sae, :d_sae] += sums
        gram[d_sae, d_sae] += weight * b
        self.cross[:d_sae].add_(zty.double(), alpha=weight)
        self.cross[d_sae].add_(y.double().sum(0), alpha=weight)
        self.rows += b

    def state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps so a resumed run continues the same sums."""
        return {"refit_gram": self.gram, "refit_cross": self.cross, "refit_rows": torch.tensor([self.rows])}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> "DecoderRefit":
        refit = cls(state["refit_cross"].shape[0] - 1, state["refit_cross"].shape[1], device)
        refit.gram.copy_(state["refit_gram"])
        refit.cross.copy_(state["refit_cross"])
        refit.rows = int(state["refit_rows"][0])
        return refit

    @torch.no_grad()
    def apply(self, model, ridge: float = 1e-4) -> None:
        """Replace the model's decoder and decoder bias with the least-squares solution."""
        if self.rows == 0:
            return
        gram = self.gram.view(self.n, self.n)
        scale = gram.diagonal().mean().clamp_min(1e-12)
        solution = torch.linalg.solve(gram + ridge * scale * torch.eye(self.n, dtype=torch.float64, device=gram.device), self.cross)
        old_b_dec = model.b_dec.detach().clone()
        model.W_dec.copy_(solution[:-1].to(model.W_dec.dtype))
        model.b_dec.copy_(solution[-1].to(model.b_dec.dtype))
        if model.cfg.apply_b_dec_to_input:  # keep pre = (x - b_dec) W_enc + b_enc unchanged
            model.b_enc.sub_((old_b_dec - model.b_dec) @ model.W_enc)
