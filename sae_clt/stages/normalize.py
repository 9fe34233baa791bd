"""Stage `normalize`: split the store's instances into training and validation, and fit the
normalisation on the training split.  specs/datasets/<d>.yaml -> runs/datasets/<d>/normalize/,
metrics/datasets/<d>.json"""

from __future__ import annotations

from pathlib import Path

from ..data.normalize import fit_normalization
from ..data.store import ActivationStore
from .common import dataset_specs, log


def run(spec_path: Path) -> None:
    paths, dataset, _ = dataset_specs(spec_path)
    store = ActivationStore.open(paths.store_dir(dataset.id))
    summary = fit_normalization(dataset, store, paths.norm_dir(dataset.id), paths.dataset_metrics(dataset.id))
    log(f"[normalize] {dataset.id}: {summary['n_val_instances']} of {summary['n_instances']} instances held out for validation")
