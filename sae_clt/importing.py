"""`saeclt import-acts`: activations recorded elsewhere become a dataset specs can name.

The files stay where they are. The command checks them (2-D float tensors with aligned rows)
and writes two specs: ``specs/subjects/<id>.yaml`` (kind ``files``, listing them) and
``specs/datasets/<id>.yaml`` (every tensor as a hook point). From there the pipeline is the
usual one: ``collect`` copies the rows into a sharded, checksummed store, then normalize,
train, evaluate (without the causal check: there is no model), report and export.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from .errors import DataError
from .spec import SPEC_ID_PATTERN, load_spec


def _relative_or_absolute(path: Path, root: Path) -> str:
    """Paths inside the project are written relative to it (the project stays movable)."""
    path = path.resolve()
    try:
        return path.relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def _experiment_yaml(exp_id: str, dataset_id: str, point: str, dim: int) -> str:
    return yaml.safe_dump({
        "id": exp_id,
        "dataset": dataset_id,
        "source": point,
        "target": point,
        "model": {"architecture": "sae", "d_sae": 8 * dim, "activation": "topk", "k": max(1, min(32, dim // 4))},
        "train": {"seed": 0},
        "evaluate": {},
        "export": {},
    }, sort_keys=False)


def import_activations(files: list[Path], dataset_id: str, root: Path, rows_per_instance: int = 1,
                       val_fraction: float = 0.1, experiment_id: str | None = None, force: bool = False) -> list[Path]:
    """Check the files and write the subject and dataset specs (and an SAE experiment spec if
    ``experiment_id``); returns the paths written."""
    from .subjects.files import scan_files

    for name, value in (("--id", dataset_id), ("--experiment", experiment_id)):
        if value is not None and not re.match(SPEC_ID_PATTERN, value):
            raise DataError(f"{name} {value!r}: use letters, digits, '_' and '-' only (it names DVC stages and files)")
    sources = scan_files([Path(f) for f in files])
    n_rows = next(iter(sources.values())).shape[0]
    if n_rows < rows_per_instance * 10:
        raise DataError(f"{files[0]}: {n_rows} rows = fewer than 10 inputs of {rows_per_instance} rows; too few to split and train on")
    if n_rows % rows_per_instance:
        raise DataError(f"{files[0]}: {n_rows} rows is not a multiple of --rows-per-instance {rows_per_instance}")
    n_instances = n_rows // rows_per_instance
    dims = {name: s.shape[1] for name, s in sources.items()}

    subject_path = root / "specs" / "subjects" / f"{dataset_id}.yaml"
    dataset_path = root / "specs" / "datasets" / f"{dataset_id}.yaml"
    targets = [subject_path, dataset_path]
    if experiment_id:
        targets.append(root / "specs" / f"{experiment_id}.yaml")
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise DataError(f"{existing[0]}: already exists; choose another --id / --experiment or pass --force to overwrite")

    # Shards of about 256 MB at float32, whole inputs each.
    row_bytes = 4 * sum(dims.values()) + 12
    per_shard = max(1, min(n_instances, (256 << 20) // (row_bytes * rows_per_instance)))
    subject = {"id": dataset_id, "kind": "files", "files": [_relative_or_absolute(Path(f), root) for f in files],
               "rows_per_instance": rows_per_instance}
    dataset = {
        "id": dataset_id,
        "subject": dataset_id,
        "collect": {"n_instances": n_instances, "seed": 1, "hook_points": list(dims), "dtype": "float32",
                    "instances_per_shard": per_shard, "batch_size": max(1, min(per_shard, 65536 // rows_per_instance))},
        "normalize": {"val_fraction": val_fraction},
    }
    header = "# Written by `saeclt import-acts`: activations recorded elsewhere (see saeclt import-acts --help).\n"
    texts = [header + yaml.safe_dump(subject, sort_keys=False), header + yaml.safe_dump(dataset, sort_keys=False)]
    if experiment_id:
        point = next(iter(dims))
        texts.append("# A TopK SAE on the imported activations; edit freely.\n" + _experiment_yaml(experiment_id, dataset_id, point, dims[point]))

    from .io import atomic_write_text

    for path, text in zip(targets, texts):
        atomic_write_text(path, text)
    try:  # the specs written must load: fail now, not at `saeclt run`
        load_spec(subject_path, "subjects")
        load_spec(dataset_path, "datasets")
        if experiment_id:
            load_spec(targets[2], "experiments")
    except Exception:
        for path in targets:
            path.unlink(missing_ok=True)
        raise
    return targets


def describe_import(files: list[Path], dataset_id: str) -> str:
    from .subjects.files import scan_files

    sources = scan_files([Path(f) for f in files])
    lines = [f"{name}: {s.shape[0]:,} rows x {s.shape[1]} ({os.path.basename(s.path)})" for name, s in sources.items()]
    return "\n".join(lines)
