"""The registry of sparse activations σ: each class owns everything about one activation.

A class says how pre-activations become codes (``activate``), which parameters it adds to a
dictionary, its sparsity penalty, the threshold its inference form uses (what SAELens-style
JumpReLU files store), its names in SAELens and sparsify, and which parts of the training
recipe apply to it (the fast TopK step, AuxK, usage regularisation). The spec's allowed values
for ``model.activation`` are this registry's keys: adding an activation is one ``@register``
class, here or in a user's own module imported before the spec is read.

    pre = x @ W_enc + b_enc   →   z = σ(pre)   →   ŷ = z @ W_dec + b_dec
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, ClassVar

from .registry import lookup

if TYPE_CHECKING:  # torch is imported where it is used: the spec reads this registry without it
    import torch

    Dictionary = torch.nn.Module  # a sae_clt.dictionary.Dictionary (not imported: that module imports this one)


class Activation:
    """Base class. Subclasses set ``name`` and ``description`` and override ``activate``."""

    name: ClassVar[str]
    description: ClassVar[str]
    exact_k: ClassVar[bool] = False  # exactly k active latents per row: the code is (values, indices) [B, k]
    uses_k: ClassVar[bool] = False  # k sets the number of active latents (model.k <= model.d_sae)
    fast_step: ClassVar[bool] = False  # the hand-written TopK backward (training/fast_step) covers it
    aux_k: ClassVar[bool] = False  # AuxK revives its dead latents (it has no threshold to lower)
    threshold_firing: ClassVar[bool] = False  # fires above a threshold: usage regularisation applies
    saelens_sae: ClassVar[str | None] = None  # SAELens 6 architecture of an SAE with it; None: SAELens has none
    saelens_transcoder_prefix: ClassVar[str | None] = None  # "" → transcoder, "jumprelu_" → jumprelu_transcoder
    sparsify: ClassVar[bool] = False  # sparsify's SparseCoder stores it
    default_init: ClassVar[str] = "data"  # train.init: auto resolves to this ("data" or "transpose")

    def add_parameters(self, model: "Dictionary") -> None:
        """Register the parameters or buffers this activation needs on a new dictionary."""

    def activate(self, model: "Dictionary", pre: "torch.Tensor", training: bool = False) -> "torch.Tensor":
        """Dense codes [B, d_sae] from pre-activations (differentiable when training)."""
        raise NotImplementedError

    def firing_threshold(self, model: "Dictionary") -> "torch.Tensor | float":
        """The level above which a latent fires (for usage regularisation)."""
        return 0.0

    def inference_threshold(self, model: "Dictionary", dtype: "torch.dtype | None" = None) -> "torch.Tensor | None":
        """The per-latent θ of the inference form ReLU(pre)·[pre > θ] (computed in ``dtype``), or
        None where the inference form has no threshold."""
        return None

    def penalty(self, model: "Dictionary", pre: "torch.Tensor", active: "torch.Tensor", indices: "torch.Tensor | None",
                cfg) -> "tuple[float, torch.Tensor]":
        """(coefficient, sparsity term) of the training loss: by default the L1 of the codes
        weighted by the decoder row norms (or its tanh form), scaled by ``train.l1_coeff``."""
        if indices is None:
            weighted = active * model.W_dec.norm(dim=1)
        else:  # a sparse [B, k] code: unit-norm rows need no weighting
            weighted = active if cfg.unit_norm_decoder else active * model.W_dec.norm(dim=1)[indices]
        if cfg.sparsity_penalty == "tanh":
            weighted = (cfg.tanh_scale * weighted).tanh()
        return cfg.l1_coeff, weighted.sum(-1).mean()

    def configure(self, model: "Dictionary", spec_model) -> None:
        """Set this activation's parameters from the spec's model section before training."""

    def wants_data_init(self, spec_model) -> bool:
        """Whether ``init_from_data`` needs a sample of rows before training."""
        return False

    def init_from_data(self, model: "Dictionary", x: "torch.Tensor", spec_model) -> None:
        """Initialise this activation's parameters from sample source rows (after the weights')."""

    def after_training(self, model: "Dictionary", batches: "Callable[[], list[torch.Tensor]]") -> dict:
        """Finish a trained dictionary (e.g. calibrate a threshold) from a few batches of source
        rows; returns what to record in the training summary."""
        return {}


ACTIVATIONS: dict[str, Activation] = {}


def register(cls: type[Activation]) -> type[Activation]:
    """Class decorator: make ``cls.name`` a valid ``model.activation``."""
    ACTIVATIONS[cls.name] = cls()
    return cls


def activation(name: str) -> Activation:
    return lookup(ACTIVATIONS, name, "activation")


@register
class TopK(Activation):
    name = "topk"
    description = "the k largest of ReLU(pre) per row (clt: per layer)"
    exact_k = uses_k = fast_step = aux_k = sparsify = True
    saelens_sae = "topk"
    default_init = "transpose"

    def activate(self, model, pre, training=False):
        values, indices = model.sparse_code(pre)
        return pre.new_zeros(pre.shape).scatter(-1, indices, values)


@register
class BatchTopK(Activation):
    name = "batchtopk"
    description = "the k·B largest over a batch while training; saved as JumpReLU with one calibrated threshold"
    uses_k = fast_step = aux_k = True
    saelens_sae, saelens_transcoder_prefix = "jumprelu", "jumprelu_"  # its inference form is a JumpReLU
    default_init = "transpose"

    def add_parameters(self, model):
        model.register_buffer("threshold", model.b_enc.new_zeros(model.cfg.d_sae))  # set by after_training

    def activate(self, model, pre, training=False):
        if training:
            flat = pre.relu().reshape(-1)
            values, indices = flat.topk(min(model.cfg.k * pre.shape[0], flat.numel()), sorted=False)
            return flat.new_zeros(flat.shape).scatter(0, indices, values).reshape(pre.shape)
        return pre * (pre > model.threshold)

    def inference_threshold(self, model, dtype=None):
        return model.threshold.detach().to(dtype or model.threshold.dtype).clamp_min(0)

    def after_training(self, model, batches):
        """One threshold such that, over the batches, as many pre-activations exceed it as BatchTopK
        keeps (k per row on average)."""
        import torch

        with torch.no_grad():
            pres = torch.cat([model.pre_acts(x).reshape(-1) for x in batches()])
            n_keep = min(model.cfg.k * (pres.numel() // model.cfg.d_sae), pres.numel())
            theta = float(pres.topk(n_keep, sorted=True).values[-1].clamp_min(0))
            model.threshold.fill_(theta)
        return {"batchtopk_threshold": theta}


@register
class JumpReLU(Activation):
    name = "jumprelu"
    description = "pre where pre > θ_i, per-latent thresholds learned through a straight-through estimator, with an L0 penalty"
    threshold_firing = True
    saelens_sae, saelens_transcoder_prefix = "jumprelu", "jumprelu_"

    def add_parameters(self, model):
        import torch

        model.log_threshold = torch.nn.Parameter(torch.full((model.cfg.d_sae,), math.log(0.001)))  # kept positive through the log

    def activate(self, model, pre, training=False):
        from .straight_through import jumprelu  # imports torch: the spec models use this registry without it

        return jumprelu(pre, model.log_threshold.exp(), model.cfg.jumprelu_bandwidth)

    def firing_threshold(self, model):
        return model.log_threshold.exp().detach()

    def inference_threshold(self, model, dtype=None):
        return model.log_threshold.detach().to(dtype or model.log_threshold.dtype).exp()

    def penalty(self, model, pre, active, indices, cfg):
        from .straight_through import step_l0

        return cfg.l0_coeff, step_l0(pre, model.log_threshold.exp(), model.cfg.jumprelu_bandwidth).mean()

    def configure(self, model, spec_model):
        if spec_model.jumprelu_init_threshold is not None:
            model.log_threshold.data.fill_(math.log(spec_model.jumprelu_init_threshold))

    def wants_data_init(self, spec_model):
        return spec_model.jumprelu_init_threshold is None

    def init_from_data(self, model, x, spec_model):
        """Each latent's threshold at the quantile of its pre-activations over the rows ``x`` that it
        exceeds on k / d_sae of them: training starts at L0 ≈ k on the data's own scale."""
        if self.wants_data_init(spec_model):
            init_thresholds_at_quantile(model, x, spec_model.k)


@register
class ReLU(Activation):
    name = "relu"
    description = "ReLU, with the L1 penalty (train.l1_coeff)"
    threshold_firing = True
    saelens_sae, saelens_transcoder_prefix = "standard", ""

    def activate(self, model, pre, training=False):
        return pre.relu()


@register
class ReLUClipped(Activation):
    name = "relu_clipped"
    description = "ReLU capped at model.relu_ceiling, with the L1 penalty"
    threshold_firing = True

    def activate(self, model, pre, training=False):
        return pre.clamp(0, model.cfg.relu_ceiling)


def init_thresholds_at_quantile(model: "Dictionary", x: "torch.Tensor", l0: int) -> None:
    """Each latent's JumpReLU threshold at the quantile of its pre-activations over the rows ``x``
    that it exceeds on l0 / d_sae of them: training starts at L0 ≈ l0 on the data's own scale."""
    import torch

    with torch.no_grad():
        pre = model.pre_acts(x).float()
        level = 1.0 - min(max(l0 / model.cfg.d_sae, 1.0 / pre.shape[0]), 1.0)
        model.log_threshold.copy_(torch.quantile(pre, level, dim=0).clamp_min(1e-6).log())
