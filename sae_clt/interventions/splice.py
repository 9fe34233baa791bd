"""``intervene``: a trained dictionary spliced into the subject at the experiment's target hook
point(s), patched the way the evaluate stage's causal check patches it.

For a row with raw source ``x`` and raw target ``y`` (the activation the subject computed):

    z      = encode(norm(x))                      the dictionary's code
    z'     = apply_edits(z, edits)                edit mode only (otherwise z' = z)
    ŷ(z)   = norm⁻¹(decode(z, norm(x)))           the reconstruction, in raw activation space

- bypass: nothing is patched;
- no_change: ``ŷ(z) + (y - ŷ(z))`` with the error term (``y`` up to float error), ``ŷ(z)`` without
  it (evaluate's ``dictionary`` variant);
- edit: ``y + ŷ(z') - ŷ(z)`` with the error term, computed as ``y + ((z' - z) @ W_dec) * scale`` so
  that an unchanged code gives ``y`` back exactly; ``ŷ(z')`` without it.

A cross-layer transcoder is patched at every target layer at once; target ``j`` is computed from
the sources of layers ``0..j`` recorded in the same, already patched, forward pass (the
replacement model of ``causal_check_layers``).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from ..data.hooks import patching
from ..errors import DataError, SpecError
from .edits import apply_edits, check_edits, parse_edits

MODES = ("bypass", "no_change", "edit")


def normalize_mode(mode: str) -> str:
    """A mode name as the spec spells it (``no-change`` is accepted for ``no_change``)."""
    name = str(mode).replace("-", "_")
    if name not in MODES:
        raise SpecError("mode", [f"mode: {mode!r} is not a mode; choose bypass, no_change (no-change) or edit"])
    return name


def check_normalization(dictionary, norm, exp) -> None:
    """Refuse a dictionary whose saved normalisation differs from the store's: its codes would be
    read in another space than the one it was trained in."""
    pairs = [("source_mean", norm.mean[exp.source_key]), ("source_scale", norm.scale[exp.source_key]),
             ("target_mean", norm.mean[exp.target_key]), ("target_scale", norm.scale[exp.target_key])]
    for name, expected in pairs:
        saved = getattr(dictionary, name)
        if saved.shape != expected.shape or not torch.allclose(saved, expected.float(), rtol=1e-5, atol=1e-6):
            raise DataError(f"experiment '{exp.id}': the dictionary's {name} differs from the dataset's normalisation "
                            f"(shape {list(saved.shape)} vs {list(expected.shape)}); it was trained on other activations: "
                            f"retrain it (saeclt stage train specs/{exp.id}.yaml)")


def splice_rows(dictionary, norm, exp, x_raw: torch.Tensor, y_raw: torch.Tensor, mode: str, edits: list,
                keep_error: bool, cols: slice = slice(None)) -> torch.Tensor:
    """The patched target rows [rows, d] (columns ``cols`` of the dictionary's output) for raw
    source rows ``x_raw`` and the subject's own target rows ``y_raw``."""
    x = norm.apply(exp.source_key, x_raw.float())
    z = dictionary.encode(x)
    if mode == "no_change" and keep_error:
        recon = norm.invert(exp.target_key, dictionary.decode(z, x))[:, cols]
        return recon + (y_raw.float() - recon)
    z_edit = apply_edits(z, edits) if mode == "edit" else z
    if keep_error:
        delta = ((z_edit - z) @ dictionary.W_dec)[:, cols] * norm.scale[exp.target_key][cols]
        return y_raw.float() + delta
    return norm.invert(exp.target_key, dictionary.decode(z_edit, x))[:, cols]


# The new target rows for raw source rows x [rows, d_in], the subject's own target rows y
# [rows, d] and the columns of the dictionary's output that target takes (a clt's layer j).
RowsFn = Callable[[torch.Tensor, torch.Tensor, slice], torch.Tensor]


def splicing(subject, exp, layered: bool, d_in: int, d_out: int, rows: RowsFn) -> contextlib.AbstractContextManager:
    """The subject with the experiment's target hook point(s) replaced by ``rows(x, y, cols)``;
    the one splice behind interventions and the evaluate stage's causal check.

    An SAE or transcoder: one target, its source read in the same forward pass. A clt (``layered``):
    every target layer at once, layer j from the sources of layers 0..j recorded in the same,
    already patched, pass (zeros for later sources, which cannot reach target j): the replacement
    model."""
    available = subject.hook_points()
    if not layered:
        source, target = str(exp.source_key), str(exp.target_key)

        def replace(original: torch.Tensor, recorded: dict) -> torch.Tensor:
            x = recorded.get(source, original) if source != target else original
            out = rows(x.reshape(-1, x.shape[-1]), original.reshape(-1, original.shape[-1]), slice(None))
            return out.reshape(*original.shape[:-1], out.shape[-1]).to(original.dtype)

        return patching(subject.model, target, replace, available, read=[source])

    sources, targets = exp.source_key.members, exp.target_key.members
    width_in, width_out = d_in // len(sources), d_out // len(targets)

    def make(j: int):
        def replace(original: torch.Tensor, recorded: dict) -> torch.Tensor:
            n = original.numel() // original.shape[-1]
            parts = [torch.zeros(n, width_in, device=original.device) if i > j else
                     (original if hook == targets[j] else recorded[hook]).reshape(n, -1).float()
                     for i, hook in enumerate(sources)]
            out = rows(torch.cat(parts, dim=1), original.reshape(n, -1), slice(j * width_out, (j + 1) * width_out))
            return out.reshape(*original.shape[:-1], width_out).to(original.dtype)
        return replace

    stack = contextlib.ExitStack()
    for j, target in enumerate(targets):  # in layer order: later layers read earlier patched outputs
        stack.enter_context(patching(subject.model, target, make(j), available, read=list(sources[: j + 1])))
    return stack


@contextlib.contextmanager
def intervene(subject, dictionary, norm, exp, mode: str = "edit", edits=(), keep_error: bool = True) -> Iterator[None]:
    """Run the subject, inside the ``with`` block, with ``dictionary`` spliced in at ``exp``'s
    target hook point(s).

    ``subject``: a loaded subject (``sae_clt.subjects.load_subject``) with ``prepare_task`` done;
    ``dictionary``: a trained ``Dictionary`` (moved to the subject's device, ``subject.to(device)``); ``norm``: the dataset's ``Normalization``; ``exp``:
    the ``ExperimentSpec``. ``mode``: bypass | no_change | edit; ``edits``: ``LatentEdit`` objects
    or dicts (edit mode only); ``keep_error``: add the reconstruction error back.

        with intervene(subject, dictionary, norm, exp, "edit", [{"feature": 3, "op": "set", "value": 0}]):
            effects = subject.task_effects(reference)
    """
    mode = normalize_mode(mode)
    edits = parse_edits(edits)
    if mode == "edit" and not edits:
        raise SpecError("edits", ["mode edit needs at least one edit (feature, op, value)"])
    if mode != "edit" and edits:
        raise SpecError("edits", [f"mode {mode} takes no edits; use mode edit to change latents"])
    check_edits(edits, dictionary.cfg.d_sae)
    if mode == "bypass":
        yield
        return
    if getattr(subject, "model", None) is None:
        raise DataError(f"experiment '{exp.id}': the subject has no model to patch (its activations were imported)")
    device = getattr(subject, "device", torch.device("cpu"))  # where the subject runs, the splice computes
    dictionary, norm = dictionary.to(device), norm.to(device)
    check_normalization(dictionary, norm, exp)

    def rows(x: torch.Tensor, y: torch.Tensor, cols: slice) -> torch.Tensor:
        return splice_rows(dictionary, norm, exp, x, y, mode, edits, keep_error, cols)

    cfg = dictionary.cfg
    with torch.no_grad(), splicing(subject, exp, cfg.layout.layered, cfg.d_in, cfg.d_out, rows):
        yield
