"""Subject models: the networks whose activations saeclt studies.

Every subject kind (the table ``spec.SUBJECT_KINDS``) is one module here offering ``load``,
``architecture`` and ``prepare``; the subject they return has the same small interface (see
``tsp.TSPSubject``, ``hf.HFSubject``, ``torch_module.TorchSubject``): ``model`` (the nn.Module
hooks attach to), ``hook_points()``, ``input_batches(n, seed, batch_size)`` yielding (inputs,
provenance, row mask or None), ``forward(inputs)``, ``task_metric()``, ``fingerprint()`` and
``configure(dataset)`` where inputs depend on the dataset (text windows, tensor files).
``files.FilesSubject`` has no model: it yields recorded activations directly
(``activation_batches``) and has no causal check.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ..spec.models import SUBJECT_KINDS


def _module(spec):
    return importlib.import_module(SUBJECT_KINDS[spec.kind].module)


def load_subject(spec, subject_dir: Path, root: Path | None = None):
    """The subject of ``spec``, ready for collection and evaluation (trained weights from ``subject_dir``)."""
    return _module(spec).load(spec, subject_dir, root or Path.cwd())


def subject_architecture(spec, root: Path | None = None):
    """A subject of the spec's shape (untrained where it would need training): enough to list
    and check hook points."""
    return _module(spec).architecture(spec, root or Path.cwd())


def train_subject(spec, out_dir: Path, metrics_path: Path, log=print, root: Path | None = None) -> dict:
    """Stage `subject`: train the built-in policy, or load and record a given model or files."""
    return _module(spec).prepare(spec, root or Path.cwd(), out_dir, metrics_path, log=log)
