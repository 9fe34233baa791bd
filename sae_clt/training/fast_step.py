"""A TopK (and BatchTopK) training step with a hand-written backward that touches only the
active latents.

The plain step (``train.train_step``) lets autograd differentiate a dense [B, d_sae] graph.
Here every piece after the encoder matmul works on the k active entries per row, through the
three operations of ``kernels.py`` (compiled CPU kernels, or their torch reference versions):

    forward   pre = (x - b_dec·[sae]) @ W_enc [+ b_enc]       dense, the one big matmul
              (values, idx) = topk_rows(pre, k [, b_enc])     bias fused into the top-k (bf16, fp32)
              a = relu(values)                                [B, k]
    decode_backward:
              ŷ = Σ_j a_j W_dec[idx_j] + b_dec                gather of k decoder rows
              g_ŷ = 2 (ŷ - y) / B;  g_pre[b, j] = g_ŷ[b] · W_dec[idx[b, j]] · [a > 0]
    latent_grads:
              ∇W_enc[:, l] = Σ g_pre·x_in[b], ∇W_dec[l] = Σ a·g_ŷ[b], ∇b_enc[l] = Σ g_pre
              over the entries of latent l (a scatter, no [B, d_sae] intermediate)
              ∇b_dec = Σ g_ŷ - W_enc ∇b_enc (sae: b_dec enters the input)
    AuxK      the same operations on the dead latents' pre-activations (copied out of ``pre`` by
              the top-k kernel), only as many per row as the most any row has positive; or, where
              many dead latents are active per row, four dense matmuls over [B, n_dead].

Then the same decoder-gradient projection, clipping, Adam and renormalisation as the plain
step; with torch's Adam and no clipping, all four parameters' update is one fused pass each
(``kernels.adam_update``: projection, Adam, renormalisation, and the bf16 copies the next step
reads). ``precision: bf16`` runs the encoder matmul in bfloat16 (fp32 master weights) and lets
the gathers and scatters read bf16 copies of W_dec, the input and the error gradient; sums,
errors, gradients and Adam stay fp32. Tests pin it to the plain step (exactly in
float64); ``benchmarks/train_throughput.py`` measures both.
"""

from __future__ import annotations

import math

import torch

from ..dictionaries.dictionary import Dictionary
from ..kernels.ops import adam_update, center_bf16, decode_backward, kernels_run_on, latent_grads, positive_entries, topk_rows
from .curves import FIRING


def _aux_k(w_dead: torch.Tensor, pre_dead: torch.Tensor, g_main: torch.Tensor, main_scale: float, x_in: torch.Tensor,
           aux_k: int, variance: float, row_sq_err: torch.Tensor | None = None):
    """AuxK (the loss of train.aux_k_loss) with a hand-written backward through the active entries
    of the dead latents only: the same kernels as the main loss, on the dead latents'
    pre-activations [B, n_dead] and decoder rows [n_dead, d_out]. The residual they fit,
    y - ŷ, is read from the main loss's gradient g_main = main_scale·(ŷ - y); ``variance`` is the
    residual's (Σ_d Var_b, its FVU denominator). ``x_in`` may be the bf16 copy of the encoder
    input (the scatter then reads a bf16 copy of the error gradient too, and ``w_dead`` holds rows
    of the decoder's bf16 copy). ``row_sq_err``: each row's |ŷ - y|² from the main loss, if at
    hand (the loss of rows where no dead latent is active). Returns the loss and
    its gradients with respect to the dead latents' encoder columns [d_in, n_dead], biases and
    decoder rows."""
    n_rows, n_dead = pre_dead.shape
    # Only positive pre-activations contribute (ReLU): each row's positive ones, compacted to as
    # many per row as the row with the most has. Dead latents rarely have many (in the throughput
    # benchmark at most ~13 of ~150 per row), so the kernels below see a few entries per row
    # instead of every dead latent, and while aux_k is at least that many the selection is all of
    # them (no top-k). Exact: the entries dropped have zero activation and gradient.
    values, local, per_row = positive_entries(pre_dead)
    # Dense matmuls cost ~ n_dead per row, the sparse kernels ~ the positives per row at about 8x
    # the price per item (bf16 and fp32 alike on this CPU): dense while that is cheaper and no row
    # needs a top-aux_k selection (the compaction's width is the most positives any row has).
    if values.shape[1] <= aux_k and n_dead * n_rows <= DENSE_AUX_RATIO * int(per_row.sum()):
        return _aux_k_dense(w_dead, pre_dead, g_main, main_scale, x_in, variance)
    if values.shape[1] > aux_k:  # some row has more than aux_k: its top aux_k
        values, local = topk_rows(pre_dead, aux_k)
    acts = torch.relu(values.to(g_main.dtype)).contiguous()
    variance = max(variance, 1e-12)
    zero = torch.zeros(g_main.shape[1], dtype=g_main.dtype, device=g_main.device)
    low = x_in.dtype == torch.bfloat16
    # A row where no dead latent is active reconstructs nothing: its gradients are zero and its loss
    # is the residual's |y - ŷ|². Dead latents fire on few rows (in MiniLM training 0.3-0.6
    # positives per row), so the kernels below get only the rows that have one; the rest add their
    # squared residual to the loss.
    live = per_row > 0
    rest_sq_err = None
    if int(live.count_nonzero()) <= 0.75 * n_rows:
        rows = live.nonzero().squeeze(1)
        if row_sq_err is None:
            row_sq_err = (g_main / main_scale).square().sum(1)
        rest_sq_err = row_sq_err[~live].sum().to(g_main.dtype)
        local, acts = local.index_select(0, rows), acts.index_select(0, rows)
        g_main, x_in = g_main.index_select(0, rows), x_in.index_select(0, rows)
    # recon - residual = recon + g_main / main_scale
    _, g_recon, g_pre, sq_err, *g_low = decode_backward(local, acts, w_dead, zero, g_main, 2.0 / (n_rows * variance),
                                                        sign=-1.0 / main_scale, low_g=low)
    total_sq_err = sq_err.sum() if rest_sq_err is None else sq_err.sum() + rest_sq_err
    loss = total_sq_err / n_rows / variance
    g_enc, g_dec, g_bias, _ = latent_grads(local, g_pre, x_in, acts, g_low[0] if low else g_recon, n_dead)
    return loss, g_enc, g_bias, g_dec


DENSE_AUX_RATIO = 8.0  # dense AuxK while n_dead <= this x the mean positive dead pre-activations per row


def _aux_k_dense(w_dead: torch.Tensor, pre_dead: torch.Tensor, g_main: torch.Tensor, main_scale: float,
                 x_in: torch.Tensor, variance: float):
    """AuxK as ``_aux_k`` (every positive dead pre-activation selected), through four dense matmuls
    over the [B, n_dead] activations instead of the gather/scatter kernels: cheaper where many dead
    latents are active per row (a few dozen dead latents, each firing on many rows). The matmuls
    run in ``x_in``'s dtype: with a bf16 input (and ``w_dead`` the bf16 copy's rows) in bf16, the
    gradients then rounded through bf16 as the bf16 encoder matmul's are; returned in
    ``g_main``'s dtype."""
    n_rows, dtype, low = pre_dead.shape[0], g_main.dtype, x_in.dtype
    acts = pre_dead.to(dtype).clamp_min(0)
    acts_low = acts.to(low)
    variance = max(variance, 1e-12)
    # recon - residual, the residual y - ŷ being -g_main / main_scale
    diff = torch.mm(acts_low, w_dead).to(dtype).add_(g_main, alpha=1.0 / main_scale)
    flat = diff.view(-1)
    loss = torch.dot(flat, flat) / n_rows / variance
    g_recon = diff.mul_(2.0 / (n_rows * variance)).to(low)
    g_pre = torch.mm(g_recon, w_dead.t()).to(dtype).mul_(acts > 0)
    g_dec = torch.mm(acts_low.t(), g_recon).to(dtype)
    g_enc = torch.mm(x_in.t(), g_pre.to(low)).to(dtype)
    return loss, g_enc, g_pre.sum(0), g_dec


def _mean_variance(y: torch.Tensor) -> float:
    """Σ_d Var_b(y[b, d]) (the FVU denominator per row) from Σ|y|² and the mean row, in float64:
    one pass instead of the column-wise ``var`` (about 8 ms at [4096, 384] here)."""
    flat = y.reshape(-1)
    mean = y.mean(0).double()
    total = float(torch.dot(flat, flat)) / y.shape[0] - float(mean @ mean)
    return max(total, 1e-30)


class FastTopKStep:
    """Callable like ``train.train_step`` for TopK dictionaries; keeps its buffers across steps."""

    def __init__(self, model: Dictionary, opt: torch.optim.Optimizer, cfg, world=None):
        self.model, self.opt, self.cfg, self.world = model, opt, cfg, world
        self.bf16 = cfg.precision == "bf16"
        self.batch_topk = not model.cfg.act.exact_k  # BatchTopK: k·B over the batch, not k per row
        self._pre: torch.Tensor | None = None
        self.refit = None  # a refit.DecoderRefit collecting this step's codes, when set
        self.refit_weight = 1.0
        self.want_metrics = True  # False: return only the loss (the training loop asks on logging steps)
        self._adam_group = self._fused_adam_group()
        self._low: dict[str, tuple[torch.Tensor, int]] = {}  # bf16 copies of the weights and the version they copy

    def _fused_adam_group(self) -> dict | None:
        """The param group of the four parameters when their update can run fused (torch's Adam
        without weight decay, amsgrad or clipping, float32 parameters on the CPU, all in one
        group), else None. (On a GPU torch's own fused Adam is one pass over every parameter; the
        projection and renormalisation around it are two more over W_dec.)"""
        model, opt = self.model, self.opt
        if type(opt) is not torch.optim.Adam or self.cfg.grad_clip is not None or model.W_enc.dtype != torch.float32 \
                or model.W_enc.device.type != "cpu":
            return None
        for group in opt.param_groups:
            ids = {id(p) for p in group["params"]}
            if all(id(p) in ids for p in (model.W_enc, model.b_enc, model.W_dec, model.b_dec)):
                plain = not (group["weight_decay"] or group["amsgrad"] or group["maximize"] or group.get("capturable")
                             or group.get("differentiable") or group.get("decoupled_weight_decay"))
                return group if plain else None
        return None

    def _bf16(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """A bf16 copy of a weight matrix: the one the fused update wrote, while nothing has written
        the weights since (their version counter), else made afresh."""
        low, version = self._low.get(name, (None, None))
        if low is None or version != weight._version or low.shape != weight.shape:
            low = weight.detach().to(torch.bfloat16)
            self._low[name] = (low, weight._version)
        return low

    def _fused_weight_update(self) -> None:
        """Adam on the four parameters in one pass each (W_dec's gradient projected onto its rows'
        complement first and its rows renormalised after, as the plain step), writing the bf16
        copies of the weight matrices the next step reads. The optimizer's state is used and kept
        as torch's Adam keeps it, so checkpoints and resuming see no difference."""
        model, group = self.model, self._adam_group
        beta1, beta2 = group["betas"]
        for name, project in (("W_enc", False), ("W_dec", True), ("b_enc", False), ("b_dec", False)):
            weight = getattr(model, name)
            state = self.opt.state[weight]
            if not state:  # as torch.optim.Adam initialises it (fused: a float32 step count)
                state["step"] = torch.zeros((), dtype=torch.float32, device=weight.device)
                state["exp_avg"] = torch.zeros_like(weight, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(weight, memory_format=torch.preserve_format)
            state["step"] += 1
            low = None
            if self.bf16 and weight.dim() == 2:
                low = self._low.get(name, (None, None))[0]
                if low is None or low.shape != weight.shape:
                    low = torch.empty(weight.shape, dtype=torch.bfloat16, device=weight.device)
            as_rows = (lambda t: t.view(1, -1)) if weight.dim() == 1 else (lambda t: t)  # biases: one row
            adam_update(as_rows(weight), as_rows(weight.grad), as_rows(state["exp_avg"]), as_rows(state["exp_avg_sq"]),
                        group["lr"], beta1, beta2, group["eps"], float(state["step"]), project=project, normalize=project,
                        low=low)
            if low is not None:
                self._low[name] = (low, weight._version)

    @staticmethod
    def _batch_topk(pre, bias, idx, acts, k):
        """BatchTopK: of each row's largest candidates, keep the k·B largest activations of the
        whole batch (the rest become inactive entries, which the kernels skip). Exact while no
        row holds more than its candidates of the batch's top k·B; else the candidates widen."""
        n_rows, n_latents = pre.shape
        keep = min(k * n_rows, n_rows * n_latents)
        while True:
            flat = acts.reshape(-1)
            threshold = flat.kthvalue(flat.numel() - keep + 1).values if keep < flat.numel() else flat.new_tensor(0.0)
            # a row whose every candidate is kept may hold more of the top k·B than it has candidates
            full_rows = bool((acts.min(dim=1).values >= threshold).any()) and threshold > 0
            if not full_rows or idx.shape[1] >= n_latents:
                break
            values, idx = topk_rows(pre, min(n_latents, 2 * idx.shape[1]), bias)
            acts = torch.relu(values.to(acts.dtype))
        acts = torch.where(acts >= threshold, acts, torch.zeros_like(acts)) if threshold > 0 else acts
        return idx, acts

    def _encode(self, x: torch.Tensor, rows_since_fired: torch.Tensor):
        """The encoder matmul (into a reused buffer: no page faults on a fresh output), then top-k.
        In bf16 the input is centred straight into a bf16 buffer (one pass) and the bias is added
        inside the top-k kernel, in fp32. Returns (pre, the encoder's input as the weight-gradient
        scatters read it, latents [B, k], activations [B, k], AuxK's candidates and their
        pre-activations)."""
        model, cfg = self.model, self.cfg
        W_enc, b_enc, b_dec = model.W_enc, model.b_enc, model.b_dec
        n_rows, k, n_latents = x.shape[0], model.cfg.k, model.cfg.d_sae
        sae = model.cfg.apply_b_dec_to_input
        dtype = torch.bfloat16 if self.bf16 else W_enc.dtype
        if self._pre is None or self._pre.shape != (n_rows, n_latents) or self._pre.dtype != dtype or self._pre.device != x.device:
            self._pre = torch.empty(n_rows, n_latents, dtype=dtype, device=x.device)
            self._x_low = torch.empty(n_rows, x.shape[1], dtype=dtype, device=x.device)
        per_row = min(n_latents, 4 * k) if self.batch_topk else k  # batchtopk: a row may keep more than k
        # AuxK's candidates: the latents that will count as dead unless they fire in this batch (a
        # superset of the dead set found later); the top-k kernel copies their pre-activations out
        # while it has each row in cache, instead of a second pass over the [B, d_sae] buffer.
        batch_rows = n_rows * (self.world.size if self.world is not None else 1)
        candidates = (rows_since_fired >= cfg.dead_after_rows - batch_rows).nonzero().squeeze(1) if cfg.aux_k else None
        if candidates is not None and not candidates.numel():
            candidates = None
        if self.bf16:
            x_in = center_bf16(x, b_dec, self._x_low) if sae else x.to(dtype)
            weight = self._bf16("W_enc", W_enc)
        else:
            x_in = torch.sub(x, b_dec, out=self._x_low) if sae else x
            weight = W_enc
        # With the compiled kernels the bias goes into the top-k kernel (addmm would first write it
        # into all B x d_sae outputs, 1-6 ms here), in float32 (float64 keeps addmm: the kernel
        # adds float32 biases). Without them (a GPU, or SAECLT_KERNELS=torch) the matmul adds it in
        # its epilogue, and the top-k selects in the matmul's own dtype (no float32 copy of the
        # [B, d_sae] output).
        fused_bias = kernels_run_on(x) and (self.bf16 or W_enc.dtype == torch.float32)
        if fused_bias:
            pre = torch.mm(x_in, weight, out=self._pre)
        else:
            pre = torch.addmm(b_enc.detach().to(dtype), x_in, weight, out=self._pre)
        values, idx, *pre_candidates = topk_rows(pre, per_row, b_enc if fused_bias else None, columns=candidates)
        acts = torch.relu(values.to(x.dtype))
        if self.batch_topk:
            idx, acts = self._batch_topk(pre, b_enc if fused_bias else None, idx, acts, k)
        return pre, x_in, idx, acts, candidates, pre_candidates

    def _add_aux_k(self, grads, x: torch.Tensor, x_in: torch.Tensor, dead: torch.Tensor, candidates, pre_candidates,
                   g_yhat: torch.Tensor, sq_err: torch.Tensor, mse: torch.Tensor, scale: float) -> torch.Tensor:
        """AuxK: the dead latents model the residual; their gradients are added to ``grads``
        (g_W_enc, g_b_enc, g_W_dec). Returns the AuxK loss."""
        cfg, W_dec = self.cfg, self.model.W_dec
        g_W_enc, g_b_enc, g_W_dec, g_b_dec = grads
        dead_idx = dead.nonzero().squeeze(1)
        if not (cfg.aux_k and dead_idx.numel()):
            return x.new_zeros(())
        n_rows = x.shape[0]
        pre_dead = pre_candidates[0].to(x.dtype)
        if pre_dead.shape[1] != dead_idx.numel():  # some candidates fired in this batch: not dead
            pre_dead = pre_dead.index_select(1, dead[candidates].nonzero().squeeze(1))
        # the residual's variance from what is at hand: mean |e|² - |mean e|², e = ŷ - y = g_ŷ / scale
        mean_error = g_b_dec / (scale * n_rows)
        variance = float(mse) - float(mean_error @ mean_error)
        # (bf16: rows of W_dec's bf16 copy, as the main loss reads)
        w_dead = (self._bf16("W_dec", W_dec) if self.bf16 else W_dec).index_select(0, dead_idx)
        aux, g_enc_dead, g_bias_dead, g_dec_dead = _aux_k(w_dead, pre_dead, g_yhat, scale, x_in, cfg.aux_k, variance,
                                                          row_sq_err=sq_err)
        g_W_enc.index_add_(1, dead_idx, g_enc_dead, alpha=cfg.aux_coeff)
        g_b_enc.index_add_(0, dead_idx, g_bias_dead, alpha=cfg.aux_coeff)
        g_W_dec.index_add_(0, dead_idx, g_dec_dead, alpha=cfg.aux_coeff)
        return aux

    def _apply(self, grads) -> None:
        """The update, as the plain step's: Adam (fused with the decoder's projection and
        renormalisation where it can be), after averaging across ranks."""
        model, cfg = self.model, self.cfg
        model.W_enc.grad, model.b_enc.grad, model.W_dec.grad, model.b_dec.grad = grads
        if self.world is not None:
            self.world.average_grads(model.parameters())
        if self._adam_group is not None:
            self._fused_weight_update()
        else:
            model.remove_parallel_grad()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            self.opt.step()
            model.normalize_decoder()
            self._low.clear()  # (torch's fused Adam writes the weights without bumping their version)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor, rows_since_fired: torch.Tensor, lr: float) -> dict[str, float]:
        model, cfg = self.model, self.cfg
        for group in self.opt.param_groups:
            group["lr"] = lr
        W_enc, W_dec, b_dec = model.W_enc, model.W_dec, model.b_dec
        n_rows, n_latents = x.shape[0], model.cfg.d_sae
        pre, x_in, idx, acts, candidates, pre_candidates = self._encode(x, rows_since_fired)

        # The decoder as a gather of k rows, and the backward of the reconstruction loss through
        # the active entries only. (bf16: the gathers and scatters read bf16 copies of W_dec, x
        # and g, half the bytes of these memory-bound passes; sums, errors and gradients stay
        # float32.) The scatter also counts how often each latent fired.
        scale = 2.0 / n_rows
        # last step's gradients (already applied by Adam) are this step's output buffers
        reuse = (W_enc.grad, W_dec.grad) if W_enc.grad is not None and W_dec.grad is not None else None
        if self.bf16:
            _, g_yhat, g_pre, sq_err, g_low = decode_backward(idx, acts, self._bf16("W_dec", W_dec), b_dec, y, scale, low_g=True)
            g_W_enc, g_W_dec, g_b_enc, counts = latent_grads(idx, g_pre, x_in, acts, g_low, n_latents, out=reuse)
        else:
            _, g_yhat, g_pre, sq_err = decode_backward(idx, acts, W_dec, b_dec, y, scale)
            g_W_enc, g_W_dec, g_b_enc, counts = latent_grads(idx, g_pre, x_in, acts, g_yhat, n_latents, out=reuse)
        mse = sq_err.sum() / n_rows
        g_b_dec = g_yhat.sum(0)
        if self.refit is not None:
            self.refit.add(idx, acts, y, self.refit_weight)

        # Bookkeeping of dead latents (as the plain step), then AuxK on them
        fired = counts > 0
        if self.world is not None:  # data-parallel: combine across ranks
            fired = self.world.any(fired)
        rows_since_fired += n_rows * (self.world.size if self.world is not None else 1)
        rows_since_fired.masked_fill_(fired, 0)  # (a boolean index would wait for the GPU)
        dead = rows_since_fired >= cfg.dead_after_rows
        grads = (g_W_enc, g_b_enc, g_W_dec, g_b_dec)
        aux = self._add_aux_k(grads, x, x_in, dead, candidates, pre_candidates, g_yhat, sq_err, mse, scale)
        if model.cfg.apply_b_dec_to_input:  # b_dec is also subtracted from the input: its gradient there is -W_enc · Σ_rows ∂L/∂pre
            g_b_dec -= W_enc @ g_b_enc
        loss = float(mse + cfg.aux_coeff * aux)  # (one wait for the device a step, where there is one)
        if not math.isfinite(loss):
            return {"loss": loss}
        self._apply(grads)
        if not self.want_metrics:  # steps that are not logged skip the metrics' extra passes
            return {"loss": loss}
        return {"loss": loss, "mse": float(mse), "aux_loss": float(aux),
                "fvu": float(mse) / _mean_variance(y), "l0": float((acts > 0).sum(-1).to(torch.float32).mean()),
                "dead_fraction": float(dead.double().mean()), FIRING: counts.double() / n_rows}
