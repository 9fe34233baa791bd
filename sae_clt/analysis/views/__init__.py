"""Renderers: an instance (one input of the subject) as the dashboard draws it, one small module
per subject kind. Each module offers ``KIND`` (the examples file's ``subject_kind``) and
``render(subject, dataset, instance_ids) -> {instance_id: VIEW}``; ``text`` also offers
``logit_effects`` (causal LMs). Imported statically, so the analyze stage's code dependencies
(dvc.yaml) include them."""

from __future__ import annotations

from . import tensor, text, tsp

# subject kind (the subject's `kind` attribute) -> renderer module
RENDERERS = {"hf": text, "tsp": tsp, "torch": tensor, "files": tensor}


def renderer(subject):
    """The renderer module for ``subject`` (tensor for an unknown kind or no subject)."""
    return RENDERERS.get(getattr(subject, "kind", None), tensor)
