"""One optimisation step, and the two steppers the training loop drives.

``train_step`` is the autograd reference for every architecture and activation. The fast TopK
step (``fast_step.FastTopKStep``: hand-written backward over the k active latents, optionally
with a closed-form decoder refit at the end) covers TopK and BatchTopK SAEs and transcoders
without extra penalty terms. A stepper owns what its step needs across steps (penalty and
usage schedules, the refit's accumulation) and what of that a checkpoint must carry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..dictionaries.activations import activation
from ..dictionaries.architectures import architecture
from ..dictionaries.dictionary import Dictionary
from ..evaluation.metrics import fvu_batch
from ..spec.models import ExperimentSpec
from .curves import FIRING
from .fast_step import FastTopKStep
from .losses import UsageKL, aux_k_loss
from .refit import DecoderRefit
from .schedules import cosine_with_warmup, ramp


@dataclass
class _Forward:
    """A step's forward pass: pre-activations, reconstruction, the active codes and which latents fired."""

    pre: torch.Tensor
    y_hat: torch.Tensor
    skip: torch.Tensor | int
    z: torch.Tensor | None  # dense codes [B, d_sae], or None where the code stayed sparse
    values: torch.Tensor | None  # sparse codes [B, k] and their latents
    indices: torch.Tensor | None
    counts: torch.Tensor  # rows each latent fired on

    @property
    def active(self) -> torch.Tensor:
        return self.values if self.z is None else self.z

    def dense(self) -> torch.Tensor:
        return self.z if self.z is not None else torch.zeros_like(self.pre).scatter(-1, self.indices, self.values)


def _forward(model: Dictionary, x: torch.Tensor, cfg, sparse: bool) -> _Forward:
    """Encoder (optionally bf16), activation, decoder; ``sparse``: keep a top-k code as [B, k]."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        pre = model.pre_acts(x)  # [B, d_sae]
    pre = pre.to(model.W_dec.dtype)  # back from bf16 (fp32 master weights)
    skip = x @ model.W_skip if model.cfg.layout.skip_path else 0
    if sparse:
        values, indices = model.sparse_code(pre)  # [B, k] each: no dense [B, d_sae] code
        y_hat = model.decode_sparse(values, indices) + skip
        counts = torch.bincount(indices[values > 0], minlength=model.cfg.d_sae)
        return _Forward(pre, y_hat, skip, None, values, indices, counts)
    z = model.activate(pre, training=True)
    return _Forward(pre, z @ model.W_dec + model.b_dec + skip, skip, z, None, None, (z > 0).sum(0))


def _penalty(model: Dictionary, f: _Forward, cfg, penalty_scale: float) -> torch.Tensor:
    """The activation's sparsity penalty (ramped), group lasso and decoder-weight penalties."""
    coeff, sparsity = model.cfg.act.penalty(model, f.pre, f.active, f.indices, cfg)
    penalty = coeff * penalty_scale * sparsity
    if cfg.group_lasso_coeff:
        dense = f.dense()
        groups = dense.reshape(dense.shape[0], -1, cfg.group_size).norm(dim=-1).sum(-1).mean()
        penalty = penalty + cfg.group_lasso_coeff * penalty_scale * groups
    if cfg.decoder_l1_coeff:
        penalty = penalty + cfg.decoder_l1_coeff * model.W_dec.abs().sum()
    if cfg.decoder_l2_coeff:
        penalty = penalty + cfg.decoder_l2_coeff * model.W_dec.square().sum()
    return penalty


def _update(model: Dictionary, opt: torch.optim.Optimizer, loss: torch.Tensor, cfg, world) -> None:
    """Backward and the optimiser's step, keeping decoder rows at unit norm."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    model.enforce_structure(grads=True)  # clt: nothing moves outside the layer structure
    if world is not None:
        world.average_grads(model.parameters())
    if cfg.unit_norm_decoder:
        model.remove_parallel_grad()
    if cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    if cfg.unit_norm_decoder:
        model.normalize_decoder()


def train_step(model: Dictionary, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               rows_since_fired: torch.Tensor, cfg, topk: bool | None = None, lr: float = 1e-3,
               penalty_scale: float = 1.0, prefixes: tuple[int, ...] = (), world=None,
               usage: UsageKL | None = None, usage_scale: float = 0.0) -> dict[str, float]:
    """One optimisation step by autograd (the reference for every architecture and activation);
    updates ``rows_since_fired`` in place; returns the step's metrics. ``penalty_scale`` ramps
    the L1 / L0 / group-lasso coefficients up; ``prefixes`` are Matryoshka prefix sizes;
    ``usage`` (with its scheduled ``usage_scale``) adds the usage KL. (``topk`` is ignored: the
    activation decides.)"""
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    f = _forward(model, x, cfg, sparse=model.cfg.act.exact_k and not prefixes)
    l0 = float((f.active > 0).sum(-1).float().mean())

    # Loss: reconstruction (Matryoshka: also by each prefix of the dictionary alone) + penalties
    mse = ((f.y_hat - y) ** 2).sum(-1).mean()
    recon = mse
    for m in prefixes:
        y_m = f.z[:, :m] @ model.W_dec[:m] + model.b_dec + f.skip
        recon = recon + ((y_m - y) ** 2).sum(-1).mean()
    recon = recon / (1 + len(prefixes))
    penalty = _penalty(model, f, cfg, penalty_scale)
    usage_loss = f.pre.new_zeros(())
    if usage is not None:
        usage_loss = usage.loss(model, f.pre)
        penalty = penalty + cfg.usage_kl_coeff * usage_scale * usage_loss
        usage.update(f.counts.double() / x.shape[0])

    # AuxK on latents silent for too long (top-k kinds); firing is combined across ranks
    fired = f.counts > 0
    if world is not None:
        fired = world.any(fired)
    rows_since_fired += x.shape[0] * (world.size if world is not None else 1)
    rows_since_fired.masked_fill_(fired, 0)  # (a boolean index would wait for the GPU)
    dead = rows_since_fired >= cfg.dead_after_rows
    use_aux = model.cfg.act.aux_k and cfg.aux_k
    aux = aux_k_loss(model, f.pre, y - f.y_hat, dead, cfg.aux_k) if use_aux else f.pre.new_zeros(())
    loss = recon + penalty + cfg.aux_coeff * aux
    if not torch.isfinite(loss):
        return {"loss": float(loss.detach())}
    _update(model, opt, loss, cfg, world)
    metrics = {"loss": float(loss.detach()), "mse": float(mse.detach()), "aux_loss": float(aux.detach()),
               "fvu": fvu_batch(y, f.y_hat.detach()), "l0": l0, "dead_fraction": float(dead.double().mean()),
               "penalty": float(penalty.detach())}
    if usage is not None:
        metrics["usage_kl"] = float(usage_loss.detach())
    metrics[FIRING] = f.counts.double() / x.shape[0]
    return metrics


def uses_fast_step(spec: ExperimentSpec) -> bool:
    """The fast step covers TopK and BatchTopK SAEs and transcoders without L1 or Matryoshka terms."""
    m, t = spec.model, spec.train
    return (t.step == "fast" and activation(m.activation).fast_step and architecture(m.architecture).fast_step
            and t.l1_coeff == 0 and not m.matryoshka_prefixes and not m.tied_decoder and t.unit_norm_decoder
            and t.decoder_l1_coeff == 0 and t.decoder_l2_coeff == 0 and t.group_lasso_coeff == 0)


# --------------------------------------------------------------------------- steppers


class AutogradStepper:
    """``train_step`` with the schedules of its penalty (linear ramp) and usage KL (warm-up, cosine)."""

    def __init__(self, spec: ExperimentSpec, model: Dictionary, opt, cfg, rows_since_fired: torch.Tensor, total_steps: int, world):
        self.model, self.opt, self.cfg, self.clock, self.world = model, opt, cfg, rows_since_fired, world
        self.total = total_steps
        self.prefixes = tuple(spec.model.matryoshka_prefixes)
        self.penalty_steps = int(cfg.l1_warmup_frac * total_steps)
        self.usage = UsageKL(model.cfg.d_sae, cfg.usage_target, cfg.usage_ema, cfg.usage_temperature,
                            model.W_dec.device) if cfg.usage_kl_coeff else None
        self.usage_warmup = int(cfg.usage_warmup_frac * total_steps)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float, step: int) -> dict:
        return train_step(self.model, self.opt, x, y, self.clock, self.cfg, lr=lr, prefixes=self.prefixes,
                          penalty_scale=ramp(step, self.penalty_steps), world=self.world, usage=self.usage,
                          usage_scale=cosine_with_warmup(step, self.total, self.usage_warmup))

    def state(self) -> dict[str, torch.Tensor]:
        return {"usage_frequency": self.usage.frequency} if self.usage is not None else {}

    def restore(self, saved: dict[str, torch.Tensor]) -> None:
        if self.usage is not None and "usage_frequency" in saved:
            self.usage.frequency.copy_(saved["usage_frequency"])

    def finish(self) -> None:
        pass


class FastStepper:
    """The fast TopK step; over the last ``train.decoder_refit_frac`` of the steps it also
    accumulates the codes for the decoder's closed-form refit, applied by ``finish``."""

    def __init__(self, spec: ExperimentSpec, model: Dictionary, opt, cfg, rows_since_fired: torch.Tensor, total_steps: int, world):
        self.model, self.clock, self.world, self.cfg = model, rows_since_fired, world, cfg
        self.fast = FastTopKStep(model, opt, cfg, world=world)
        self.total = total_steps
        self.refit_from = total_steps - int(cfg.decoder_refit_frac * total_steps) if cfg.decoder_refit_frac else None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float, step: int) -> dict:
        fast = self.fast
        if self.refit_from is not None and step >= self.refit_from and fast.refit is None:
            fast.refit = DecoderRefit(self.model.cfg.d_sae, self.model.cfg.d_out, self.model.W_dec.device)
        if fast.refit is not None:  # later codes are closer to the final encoder's: weigh them more
            fast.refit_weight = float((step - self.refit_from + 1) ** 2)
        fast.want_metrics = step % self.cfg.log_every == 0 or step == self.total - 1
        return fast(x, y, self.clock, lr)

    def state(self) -> dict[str, torch.Tensor]:
        return dict(self.fast.refit.state()) if self.fast.refit is not None else {}

    def restore(self, saved: dict[str, torch.Tensor]) -> None:
        if saved:  # resumed mid-accumulation: continue from the saved sums
            self.fast.refit = DecoderRefit.from_state(saved, self.model.W_dec.device)

    def finish(self) -> None:
        """Solve the refit (every rank's codes count: the accumulators are summed first)."""
        refit = self.fast.refit
        if refit is None:
            return
        world = self.world
        if world is not None:
            world.sum_(refit.gram)
            world.sum_(refit.cross)
        refit.apply(self.model)


def make_stepper(spec: ExperimentSpec, model: Dictionary, opt, cfg, rows_since_fired: torch.Tensor, total_steps: int, world):
    kind = FastStepper if uses_fast_step(spec) else AutogradStepper
    return kind(spec, model, opt, cfg, rows_since_fired, total_steps, world)
