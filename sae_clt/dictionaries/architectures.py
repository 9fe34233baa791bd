"""The registry of dictionary architectures: each class owns the facts of one layout.

Whether the dictionary reconstructs its own input (an SAE: source == target, the decoder bias
subtracted from the input), whether it has a learned linear skip path, whether it is layered
(a cross-layer transcoder: lists of hook points, one encoder per source layer, each feature
decoding to its own and every later target layer, masks keeping that structure), whether the
fast TopK step covers it, and its names in SAELens and sparsify. The spec's allowed values for
``model.architecture`` are this registry's keys. No torch here: the spec reads it.
"""

from __future__ import annotations

from typing import ClassVar

from .registry import lookup


class Architecture:
    name: ClassVar[str]
    description: ClassVar[str]
    reconstructs_input: ClassVar[bool] = False  # source == target; b_dec is subtracted from the input
    skip_path: ClassVar[bool] = False  # ŷ += x @ W_skip
    layered: ClassVar[bool] = False  # lists of hook points; per-layer encoders, decoders to own and later layers
    fast_step: ClassVar[bool] = False  # the fast TopK step covers it
    saelens_transcoder: ClassVar[str | None] = None  # SAELens's name for a transcoder of this layout (prefixed for JumpReLU)
    sparsify: ClassVar[bool] = True  # sparsify's SparseCoder stores it

    def check_hook_points(self, source, target) -> str | None:
        """A problem with the spec's source / target for this layout, or None."""
        if isinstance(source, list) or isinstance(target, list):
            return f"lists of hook points in source/target are for a layered architecture (clt), not {self.name}"
        return None


ARCHITECTURES: dict[str, Architecture] = {}


def register(cls: type[Architecture]) -> type[Architecture]:
    """Class decorator: make ``cls.name`` a valid ``model.architecture``."""
    ARCHITECTURES[cls.name] = cls()
    return cls


def architecture(name: str) -> Architecture:
    return lookup(ARCHITECTURES, name, "architecture")


@register
class SAE(Architecture):
    name = "sae"
    description = "source == target"
    reconstructs_input = fast_step = True

    def check_hook_points(self, source, target):
        problem = super().check_hook_points(source, target)
        if problem is None and source != target:
            problem = f"an sae reconstructs its input: source ({source}) and target ({target}) must be equal"
        return problem


@register
class Transcoder(Architecture):
    name = "transcoder"
    description = "source -> target"
    fast_step = True
    saelens_transcoder = "transcoder"


@register
class SkipTranscoder(Architecture):
    name = "skip_transcoder"
    description = "a transcoder plus a learned linear skip path W_skip (source -> target)"
    skip_path = True
    saelens_transcoder = "skip_transcoder"


@register
class CLT(Architecture):
    name = "clt"
    description = ("cross-layer transcoder, one encoder per source layer, each feature decoding to its own and every later "
                   "target layer (source and target are lists)")
    layered = True
    sparsify = False  # sparsify's cross-layer coders are not written yet

    def check_hook_points(self, source, target):
        if not (isinstance(source, list) and isinstance(target, list) and len(source) == len(target) >= 2):
            return ("a clt reads one source and writes one target per layer: source and target must be lists of equal "
                    f"length (at least 2); got source {source!r}, target {target!r}")
        return None
