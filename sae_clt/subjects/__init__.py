"""Subject models: the networks whose activations saeclt studies.

Every subject kind offers the same small interface (see ``tsp.TSPSubject``, ``hf.HFSubject``):
``model`` (the nn.Module hooks attach to), ``hook_points()``, ``input_batches(n, seed,
batch_size)`` yielding (inputs, per-row provenance, row mask or None), ``forward(inputs)``,
``task_metric()`` and ``fingerprint()``; ``configure(dataset)`` where inputs depend on the
dataset (text windows).
"""

from __future__ import annotations

from pathlib import Path


def load_subject(spec, subject_dir: Path, root: Path | None = None):
    if spec.kind == "tsp":
        from .tsp import TSPSubject

        return TSPSubject.load(spec, subject_dir)
    from .hf import HFSubject

    return HFSubject.load(spec, root or Path.cwd())


def subject_architecture(spec, root: Path | None = None):
    """A subject of the spec's shape (untrained where it would need training): enough to list
    and check hook points."""
    if spec.kind == "tsp":
        from .tsp import TSPSubject

        return TSPSubject.architecture_only(spec)
    from .hf import HFSubject

    return HFSubject.load(spec, root or Path.cwd())


def train_subject(spec, out_dir: Path, metrics_path: Path, log=print, root: Path | None = None) -> dict:
    """Stage `subject`: train the built-in policy, or load and record a given model."""
    if spec.kind == "tsp":
        from .tsp import train_subject as train_tsp

        return train_tsp(spec, out_dir, metrics_path, log=log)
    from .hf import prepare_subject

    return prepare_subject(spec, root or Path.cwd(), out_dir, metrics_path, log=log)
