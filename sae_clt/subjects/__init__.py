"""Subject models: the networks whose activations saeclt studies.

Every subject kind offers the same small interface (see ``tsp.TSPSubject``, ``hf.HFSubject``,
``torch_module.TorchSubject``): ``model`` (the nn.Module hooks attach to), ``hook_points()``,
``input_batches(n, seed, batch_size)`` yielding (inputs, provenance, row mask or None),
``forward(inputs)``, ``task_metric()``, ``fingerprint()`` and ``configure(dataset)`` where
inputs depend on the dataset (text windows, tensor files). ``files.FilesSubject`` has no model:
it yields recorded activations directly (``activation_batches``) and has no causal check.
"""

from __future__ import annotations

from pathlib import Path


def load_subject(spec, subject_dir: Path, root: Path | None = None):
    root = root or Path.cwd()
    if spec.kind == "tsp":
        from .tsp import TSPSubject

        return TSPSubject.load(spec, subject_dir)
    if spec.kind == "torch":
        from .torch_module import TorchSubject

        return TorchSubject.load(spec, root)
    if spec.kind == "files":
        from .files import FilesSubject

        return FilesSubject.load(spec, root)
    from .hf import HFSubject

    return HFSubject.load(spec, root)


def subject_architecture(spec, root: Path | None = None):
    """A subject of the spec's shape (untrained where it would need training): enough to list
    and check hook points."""
    if spec.kind == "tsp":
        from .tsp import TSPSubject

        return TSPSubject.architecture_only(spec)
    if spec.kind == "torch":
        from .torch_module import TorchSubject

        return TorchSubject.load(spec, root or Path.cwd(), with_weights=False)
    return load_subject(spec, Path(), root)


def train_subject(spec, out_dir: Path, metrics_path: Path, log=print, root: Path | None = None) -> dict:
    """Stage `subject`: train the built-in policy, or load and record a given model or files."""
    root = root or Path.cwd()
    if spec.kind == "tsp":
        from .tsp import train_subject as train_tsp

        return train_tsp(spec, out_dir, metrics_path, log=log)
    if spec.kind == "torch":
        from .torch_module import prepare_subject
    elif spec.kind == "files":
        from .files import prepare_subject
    else:
        from .hf import prepare_subject
    return prepare_subject(spec, root, out_dir, metrics_path, log=log)
