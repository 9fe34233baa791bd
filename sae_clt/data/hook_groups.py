"""Several hook points read or written together, as one wide activation.

A cross-layer transcoder reads one source per layer and writes one target per layer. The rest
of the pipeline sees such a group as a single hook point: a ``HookGroup`` keeps its members as a
tuple, and its text (the members joined by ``+``, ``encoder.layers.0+encoder.layers.1``) is the
name under which stores, normalisations, metrics and saved dictionaries know it. Its rows are the
members' rows side by side: dimensions add up, normalisation statistics concatenate. ``GroupDict``
gives dictionaries keyed by hook point (dims, means, scales) that answer for groups too.
"""

from __future__ import annotations

SEP = "+"


class HookGroup(str):
    """One hook point or several, in order. A ``str`` (its name) with a ``members`` tuple, so it
    keys dicts, prints and serialises as the name, and no caller splits names."""

    members: tuple[str, ...]

    def __new__(cls, points: "str | list[str] | tuple[str, ...]") -> "HookGroup":
        if isinstance(points, HookGroup):
            return points
        parts = tuple(points.split(SEP)) if isinstance(points, str) else tuple(points)
        if not parts or any(not p or SEP in p for p in parts):
            raise ValueError(f"hook group {points!r}: expected one or more non-empty hook point names")
        group = super().__new__(cls, SEP.join(parts))
        group.members = parts
        return group

    @property
    def is_group(self) -> bool:
        return len(self.members) > 1


class GroupDict(dict):
    """A dict keyed by hook point; a missing group name is built from its members (ints add up,
    tensors concatenate along their last dimension)."""

    def __missing__(self, key):
        if not isinstance(key, str) or not HookGroup(key).is_group:
            raise KeyError(key)
        parts = [self[m] for m in HookGroup(key).members]
        if isinstance(parts[0], int):
            return sum(parts)
        import torch

        return torch.cat(parts, dim=-1)

    def __contains__(self, key) -> bool:
        if isinstance(key, str) and HookGroup(key).is_group:
            return all(dict.__contains__(self, m) for m in HookGroup(key).members)
        return dict.__contains__(self, key)


def dim_label(group: str, dim: int, dims: dict) -> str:
    """``hook[d]`` for a dimension of a (possibly grouped) hook point."""
    for m in HookGroup(group).members:
        if dim < dims[m]:
            return f"{m}[{dim}]"
        dim -= dims[m]
    raise IndexError(dim)
