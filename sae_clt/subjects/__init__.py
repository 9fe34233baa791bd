"""Subject models: the networks whose activations saeclt studies.

Every subject kind offers the same small interface (see ``tsp.TSPSubject``): ``model`` (the
nn.Module hooks attach to), ``hook_points()``, ``input_batches(n, seed, batch_size)`` yielding
(inputs, per-row provenance), ``forward(inputs)``, ``task_metric()`` and ``fingerprint()``.
"""

from __future__ import annotations

from pathlib import Path


def load_subject(spec, subject_dir: Path):
    if spec.kind == "tsp":
        from .tsp import TSPSubject

        return TSPSubject.load(spec, subject_dir)
    raise NotImplementedError(spec.kind)


def subject_architecture(spec):
    """An untrained subject of the spec's shape: enough to list and check hook points."""
    if spec.kind == "tsp":
        from .tsp import TSPSubject

        return TSPSubject.architecture_only(spec)
    raise NotImplementedError(spec.kind)


def train_subject(spec, out_dir: Path, metrics_path: Path, log=print) -> dict:
    if spec.kind == "tsp":
        from .tsp import train_subject as train_tsp

        return train_tsp(spec, out_dir, metrics_path, log=log)
    raise NotImplementedError(spec.kind)
