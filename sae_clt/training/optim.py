"""The optimiser: fused Adam (the default), or sign descent with schedule-free averaging."""

from __future__ import annotations

import sys

import torch

from ..dictionaries.dictionary import Dictionary
from ..errors import PipelineError


def _skip_dynamo_import() -> None:
    """torch.optim.Optimizer's add_param_group, state_dict, load_state_dict and zero_grad are
    wrapped to keep torch.compile from tracing them, and the wrapper imports torch._dynamo on its
    first call: 1-3 s on a 2-core CPU, a fifth of a short training run, for a compiler saeclt
    never uses. Each wrapper caches its disabled form on the wrapped function; giving it the
    function itself skips the import. (Where torch lays this out differently nothing changes.)"""
    if "torch._dynamo" in sys.modules:
        return
    for method in ("add_param_group", "state_dict", "load_state_dict", "zero_grad"):
        inner = getattr(getattr(torch.optim.Optimizer, method, None), "__wrapped__", None)
        if inner is not None and getattr(inner, "__dynamo_disable", None) is None:
            setattr(inner, "__dynamo_disable", inner)


def make_optimizer(model: Dictionary, cfg) -> torch.optim.Optimizer:
    """adam: fused Adam (the schedule's learning rate is set each step); signum_schedule_free:
    sign descent wrapped in schedule-free averaging (EleutherAI sparsify's default recipe),
    evaluated and saved at the averaged weights."""
    _skip_dynamo_import()
    params = list(model.parameters())
    if cfg.optimizer == "adam":
        thresholds = [p for name, p in model.named_parameters() if name == "log_threshold"]
        if thresholds and cfg.jumprelu_threshold_lr_scale != 1.0:  # jumprelu: its thresholds on their own rate
            others = [p for name, p in model.named_parameters() if name != "log_threshold"]
            params = [{"params": others}, {"params": thresholds, "lr_scale": cfg.jumprelu_threshold_lr_scale}]
        return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    try:
        from schedulefree import ScheduleFreeWrapper
    except ImportError:
        raise PipelineError("train.optimizer signum_schedule_free needs the schedulefree package (pip install schedulefree)") from None

    class SignDescent(torch.optim.Optimizer):
        """Steepest descent in the max norm: every weight moves by lr along its gradient's sign."""

        def __init__(self, params, lr):
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad.sign(), alpha=-group["lr"])

    opt = ScheduleFreeWrapper(SignDescent(params, cfg.lr), momentum=cfg.beta1)
    opt.train()
    return opt
