"""Changes to latent activations: a list of ``LatentEdit`` (spec ``interventions[].edits``)
applied in order to a code tensor ``z`` of shape ``[rows, d_sae]``, on every row."""

from __future__ import annotations

from typing import Iterable

import torch
from pydantic import ValidationError

from ..errors import SpecError
from ..spec.models import LatentEdit, describe_error


def parse_edits(edits: Iterable, where: str = "edits") -> list[LatentEdit]:
    """``LatentEdit`` objects from edits given as such or as plain dicts (a spec's YAML form)."""
    out = []
    for i, edit in enumerate(edits):
        if isinstance(edit, LatentEdit):
            out.append(edit)
            continue
        try:
            out.append(LatentEdit.model_validate(edit))
        except ValidationError as exc:
            raise SpecError(where, [f"{where}[{i}]" + "".join(f".{p}" for p in err["loc"]) + f": {describe_error(err, LatentEdit)}"
                                    for err in exc.errors()]
                            + ["an edit is {feature: N, op: set|scale|clamp|add, value: V[, low: L]}"]) from None
    return out


def check_edits(edits: list[LatentEdit], d_sae: int, where: str = "edits") -> None:
    """Refuse edits of latents the dictionary does not have, naming each."""
    problems = [f"{where}[{i}]: feature {e.feature} is out of range: the dictionary has {d_sae} latents (0 to {d_sae - 1})"
                for i, e in enumerate(edits) if not 0 <= e.feature < d_sae]
    if problems:
        raise SpecError(where, problems)


def apply_edits(z: torch.Tensor, edits: list[LatentEdit]) -> torch.Tensor:
    """A copy of ``z`` [rows, d_sae] with each edit applied to its latent's column, in order.

    set: z = value; scale: z = z * value; clamp: z = min(z, value), then max(z, low) when low is
    set; add: z = z + value. Columns no edit names are returned bit for bit.
    """
    out = z.clone()
    for e in edits:
        col = out[:, e.feature]
        if e.op == "set":
            col = torch.full_like(col, e.value)
        elif e.op == "scale":
            col = col * e.value
        elif e.op == "clamp":
            col = col.clamp(max=e.value) if e.low is None else col.clamp(min=e.low, max=e.value)
        elif e.op == "add":
            col = col + e.value
        else:  # the spec model admits only the four ops
            raise SpecError("edits", [f"edit of feature {e.feature}: unknown op {e.op!r} (set, scale, clamp, add)"])
        out[:, e.feature] = col
    return out
