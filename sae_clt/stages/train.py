"""Stage `train`: fit the experiment's dictionary on the training split.  specs/<e>.yaml ->
runs/experiments/<e>/dictionary/, metrics/<e>/train.json, metrics/<e>/curves/"""

from __future__ import annotations

from pathlib import Path

from ..training.loop import train
from .common import log
from .inputs import check_fits_in_memory, experiment_inputs


def run(spec_path: Path) -> None:
    resolved, store, norm = experiment_inputs(spec_path)
    exp, p = resolved.experiment, resolved.paths
    check_fits_in_memory(exp, store, spec_path, exp.train.batch_size, "train.batch_size")
    train(exp, store, norm, p.dictionary_dir(exp.id), p.curves_dir(exp.id), p.train_metrics(exp.id), log=log,
          checkpoint_dir=p.checkpoint_dir(exp.id))
