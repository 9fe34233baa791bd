"""Several hook points read or written together, as one wide activation.

A cross-layer transcoder reads one source per layer and writes one target per layer. The
rest of the pipeline sees such a group as a single hook point whose name joins the members
with ``+`` (``encoder.layers.0+encoder.layers.1``) and whose rows are the members' rows side by
side: dimensions add up, normalisation statistics concatenate. ``GroupDict`` gives dictionaries
keyed by hook point (dims, means, scales) that answer for group names too.
"""

from __future__ import annotations

SEP = "+"


def join(hooks: str | list[str]) -> str:
    return hooks if isinstance(hooks, str) else SEP.join(hooks)


def members(name: str) -> list[str]:
    return name.split(SEP)


def is_group(name: str) -> bool:
    return SEP in name


class GroupDict(dict):
    """A dict keyed by hook point; a missing group name is built from its members (ints add up,
    tensors concatenate along their last dimension)."""

    def __missing__(self, key):
        if not isinstance(key, str) or not is_group(key):
            raise KeyError(key)
        parts = [self[m] for m in members(key)]
        if isinstance(parts[0], int):
            return sum(parts)
        import torch

        return torch.cat(parts, dim=-1)

    def __contains__(self, key) -> bool:
        if isinstance(key, str) and is_group(key):
            return all(dict.__contains__(self, m) for m in members(key))
        return dict.__contains__(self, key)


def dim_label(name: str, dim: int, dims: dict) -> str:
    """``hook[d]`` for a dimension of a (possibly grouped) hook point."""
    for m in members(name):
        if dim < dims[m]:
            return f"{m}[{dim}]"
        dim -= dims[m]
    raise IndexError(dim)
