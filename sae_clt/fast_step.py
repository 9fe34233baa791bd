"""A TopK training step with a hand-written backward that touches only the active latents.

The plain step (``train.train_step``) lets autograd differentiate a dense [B, d_sae] graph.
Here every piece after the encoder matmul works on the k active entries per row:

    forward   pre = addmm(b_enc, x - b_dec·[sae], W_enc)      dense, the one big matmul
              (values, idx) = topk(pre, k); a = relu(values)  [B, k]
              ŷ = embedding_bag(idx, W_dec, a) + b_dec        gather of k decoder rows
    backward  g_ŷ = 2 (ŷ - y) / B
              g_a[b, j] = g_ŷ[b] · W_dec[idx[b, j]]           sampled dense-dense product (SDDMM)
              g_pre = g_a · [a > 0]
              ∇W_enc = (G_preᵀ x)ᵀ, ∇W_dec = Aᵀ g_ŷ            sparse [d_sae, B] (CSR) @ dense [B, d]
              ∇b_enc = scatter-add of g_pre; ∇b_dec = Σ g_ŷ - W_enc ∇b_enc (sae: b_dec enters the input)
    AuxK      the dead latents' columns only, by autograd on that small sub-problem.

Then the same decoder-gradient projection, clipping, Adam and renormalisation as the plain
step. ``precision: bf16`` runs the encoder matmul in bfloat16 (weights cast once per step,
fp32 master weights and everything else fp32). Tests pin it to the plain step (exactly in
float64); ``benchmarks/train_throughput.py`` measures both.
"""

from __future__ import annotations

import warnings

import torch
from torch.nn import functional as F

from .dictionary import Dictionary
from .metrics import fvu_batch

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")


def select_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest entries of each row (unsorted)."""
    from .kernels import topk_rows

    return topk_rows(pre, k)


class LatentRows:
    """The sparsity pattern of a batch grouped by latent: a [d_sae, B] CSR layout shared by
    both weight gradients (one argsort per step instead of one COO coalesce per product)."""

    def __init__(self, idx: torch.Tensor, n_latents: int):
        n_rows, k = idx.shape
        flat = idx.reshape(-1)
        self.order = flat.argsort(stable=True)
        self.rows = self.order // k
        self.crow = torch.zeros(n_latents + 1, dtype=torch.long)
        self.crow[1:] = torch.bincount(flat, minlength=n_latents).cumsum(0)
        self.shape = (n_latents, n_rows)

    def matmul(self, weights: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Σ_b weights[b, j] · dense[b] into row idx[b, j]: [d_sae, d]."""
        sparse = torch.sparse_csr_tensor(self.crow, self.rows, weights.reshape(-1)[self.order], self.shape)
        return torch.sparse.mm(sparse, dense)


def _aux_k(W_dec: torch.Tensor, pre: torch.Tensor, residual: torch.Tensor, x_in: torch.Tensor, dead_idx: torch.Tensor,
           aux_k: int):
    """AuxK (the loss of train.aux_k_loss) with a hand-written backward. When few of the dead
    latents are active per row, through the active entries only (gather, sampled and sparse
    products as in the main loss); otherwise dense products over the dead columns. Returns the loss and its gradients with
    respect to the dead latents' encoder columns [d_in, n_dead], biases and decoder rows."""
    n_rows, n_dead = pre.shape[0], dead_idx.numel()
    k = min(aux_k, n_dead)
    pre_dead = pre.index_select(1, dead_idx).to(residual.dtype)  # [B, n_dead]
    values, local = select_topk(pre_dead, k)
    acts = torch.relu(values)
    w_dead = W_dec.index_select(0, dead_idx)
    centred = residual - residual.mean(0)
    variance = centred.square_().sum(-1).mean().clamp_min(1e-12)
    if 8 * k > n_dead:
        # Many of the dead latents active per row: dense products beat gathers and scatters.
        z = torch.zeros_like(pre_dead).scatter_(1, local, acts)
        err = (z @ w_dead).sub_(residual)
        loss = err.square().sum(-1).mean() / variance
        g_recon = err.mul_(2.0 / (n_rows * variance))
        g_pre = (g_recon @ w_dead.t()).mul_(z > 0)
        return loss, x_in.t() @ g_pre, g_pre.sum(0), z.t() @ g_recon
    recon = F.embedding_bag(local, w_dead, per_sample_weights=acts, mode="sum")
    err = recon.sub_(residual)
    loss = err.square().sum(-1).mean() / variance
    g_recon = err.mul_(2.0 / (n_rows * variance))
    g_acts = _sampled_rows(g_recon, w_dead, local)
    g_pre = g_acts * (values > 0)
    pattern = LatentRows(local, n_dead)
    g_enc = pattern.matmul(g_pre, x_in).t()  # [d_in, n_dead]
    g_bias = torch.zeros(n_dead, dtype=g_pre.dtype).index_add_(0, local.reshape(-1), g_pre.reshape(-1))
    g_dec = pattern.matmul(acts, g_recon)  # [n_dead, d_out]
    return loss, g_enc, g_bias, g_dec


def _sampled_rows(g: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[B, k]: g[b] · rows[idx[b, j]] (a sampled dense-dense product, no [B, n] intermediate)."""
    n_rows, k = idx.shape
    crow = torch.arange(0, n_rows * k + 1, k)
    mask = torch.sparse_csr_tensor(crow, idx.reshape(-1), torch.zeros(n_rows * k, dtype=g.dtype), (n_rows, rows.shape[0]))
    return torch.sparse.sampled_addmm(mask, g, rows.t()).values().reshape(n_rows, k)


class FastTopKStep:
    """Callable like ``train.train_step`` for TopK dictionaries; keeps its buffers across steps."""

    def __init__(self, model: Dictionary, opt: torch.optim.Optimizer, cfg, world=None):
        self.model, self.opt, self.cfg, self.world = model, opt, cfg, world
        self.bf16 = cfg.precision == "bf16"
        self._pre: torch.Tensor | None = None
        self.refit = None  # a refit.DecoderRefit collecting this step's codes, when set
        self.refit_weight = 1.0

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor, rows_since_fired: torch.Tensor, lr: float) -> dict[str, float]:
        model, cfg = self.model, self.cfg
        for group in self.opt.param_groups:
            group["lr"] = lr
        W_enc, b_enc, W_dec, b_dec = model.W_enc, model.b_enc, model.W_dec, model.b_dec
        n_rows, k, n_latents = x.shape[0], model.cfg.k, model.cfg.d_sae
        sae = model.cfg.apply_b_dec_to_input

        # Forward: the encoder matmul, top-k, the decoder as a gather of k rows per input
        x_in = x - b_dec if sae else x
        dtype = torch.bfloat16 if self.bf16 else W_enc.dtype
        if self._pre is None or self._pre.shape != (n_rows, n_latents) or self._pre.dtype != dtype:
            self._pre = torch.empty(n_rows, n_latents, dtype=dtype)  # reused: no page faults on a fresh output
        if self.bf16:
            pre = torch.addmm(b_enc.to(dtype), x_in.to(dtype), W_enc.to(dtype), out=self._pre)
        else:
            pre = torch.addmm(b_enc, x_in, W_enc, out=self._pre)
        values, idx = select_topk(pre, k)
        values = values.to(x.dtype)
        acts = torch.relu(values)
        y_hat = F.embedding_bag(idx, W_dec, per_sample_weights=acts, mode="sum") + b_dec

        if self.refit is not None:
            self.refit.add(idx, acts, y, self.refit_weight)

        # Bookkeeping of dead latents (as the plain step)
        fired = torch.zeros_like(rows_since_fired, dtype=torch.bool)
        fired[idx[acts > 0]] = True
        if self.world is not None:  # data-parallel: combine across ranks
            fired = self.world.any(fired)
        rows_since_fired += n_rows * (self.world.size if self.world is not None else 1)
        rows_since_fired[fired] = 0
        dead = rows_since_fired >= cfg.dead_after_rows

        # Backward of the reconstruction loss, through the active entries only
        err = y_hat - y
        mse = (err * err).sum(-1).mean()
        g_yhat = err * (2.0 / n_rows)
        g_acts = _sampled_rows(g_yhat, W_dec, idx)
        g_pre = g_acts * (values > 0)
        pattern = LatentRows(idx, n_latents)
        g_W_enc = pattern.matmul(g_pre, x_in).t()
        g_b_enc = torch.zeros(n_latents, dtype=x.dtype).index_add_(0, idx.reshape(-1), g_pre.reshape(-1))
        g_W_dec = pattern.matmul(acts, g_yhat)
        g_b_dec = g_yhat.sum(0)

        # AuxK: the dead latents model the residual
        aux = x.new_zeros(())
        dead_idx = dead.nonzero().squeeze(1)
        if cfg.aux_k and dead_idx.numel():
            aux, g_enc_dead, g_bias_dead, g_dec_dead = _aux_k(W_dec, pre, y - y_hat, x_in, dead_idx, cfg.aux_k)
            g_W_enc = g_W_enc.contiguous()
            g_W_enc.index_add_(1, dead_idx, g_enc_dead, alpha=cfg.aux_coeff)
            g_b_enc.index_add_(0, dead_idx, g_bias_dead, alpha=cfg.aux_coeff)
            g_W_dec.index_add_(0, dead_idx, g_dec_dead, alpha=cfg.aux_coeff)
        if sae:  # b_dec is also subtracted from the input: its gradient there is -W_enc · Σ_rows ∂L/∂pre
            g_b_dec -= W_enc @ g_b_enc
        loss = mse + cfg.aux_coeff * aux
        if not torch.isfinite(loss):
            return {"loss": float(loss)}

        # Update: as the plain step
        W_enc.grad, b_enc.grad, W_dec.grad, b_dec.grad = g_W_enc.contiguous(), g_b_enc, g_W_dec.contiguous(), g_b_dec
        if self.world is not None:
            self.world.average_grads(model.parameters())
        model.remove_parallel_grad()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.opt.step()
        model.normalize_decoder()
        return {"loss": float(loss), "mse": float(mse), "aux_loss": float(aux),
                "fvu": fvu_batch(y, y_hat), "l0": float((acts > 0).sum(-1).to(torch.float32).mean()),
                "dead_fraction": float(dead.double().mean())}
