"""Tensor subjects (a torch module fed from a tensor file; recorded activation files): an
instance is the input index, its shape and at most 64 of its values (flattened, first ones).
A files subject has no inputs: its views hold no values, the examples' positions say the rest."""

from __future__ import annotations

from ..examples import sig

KIND = "tensor"
MAX_VALUES = 64


def render(subject, dataset, instance_ids: list[int]) -> dict[int, dict]:
    inputs = getattr(subject, "inputs", None)
    if not inputs:
        return {i: {"values": [], "shape": []} for i in instance_ids}
    first = inputs[0]  # forward()'s first argument
    out = {}
    for i in instance_ids:
        row = first[i]
        out[i] = {"values": [sig(float(v)) for v in row.reshape(-1)[:MAX_VALUES].double().tolist()], "shape": list(row.shape)}
    return out
