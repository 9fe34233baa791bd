"""`saeclt import-acts`: activations recorded elsewhere become a dataset specs can name.

The files stay where they are. The command checks them (2-D float tensors with aligned rows)
and writes two specs: ``specs/subjects/<id>.yaml`` (kind ``files``, listing them) and
``specs/datasets/<id>.yaml`` (every tensor as a hook point). From there the pipeline is the
usual one: ``collect`` copies the rows into a sharded, checksummed store, then normalize,
train, evaluate (without the causal check: there is no model), report and export.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import yaml

from ..errors import DataError, SpecError
from ..io import atomic_write_bytes, atomic_write_text
from ..spec.models import SPEC_ID_MAX_LENGTH, SPEC_ID_PATTERN, SPEC_KINDS, SUBJECT_KINDS, load_spec
from ..subjects.files import check_outside_outputs, scan_files

# File names are limited to 255 bytes; saeclt writes ``<id>.yaml`` / ``<id>.json`` through a
# temporary file ``.<id>.yaml.XXXXXXXX.tmp`` beside them (19 bytes more than the id).
# The generated experiment's batch: at most 4096 rows, small enough for this many steps per epoch.
IMPORT_MAX_BATCH, MIN_STEPS_PER_EPOCH = 4096, 32


def _quoted(value: str, limit: int = 60) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


def check_id(option: str, value: str) -> None:
    """An id saeclt can use as a spec file name and in DVC stage names, else SpecError naming the option."""
    if not re.fullmatch(SPEC_ID_PATTERN, value):  # fullmatch: no trailing newline slips past "$"
        raise SpecError(option, [f"{option} {_quoted(value)}: use letters, digits, '_' and '-' only "
                                 "(it names spec files and DVC stages)"])
    if len(value) > SPEC_ID_MAX_LENGTH:
        raise SpecError(option, [f"{option} {_quoted(value)}: {len(value)} characters, at most {SPEC_ID_MAX_LENGTH} "
                                 "(it names spec, metrics and temporary files, whose names are limited to 255 bytes)"])


def train_batch_size(train_rows: int) -> int:
    """The largest power of two up to IMPORT_MAX_BATCH that leaves MIN_STEPS_PER_EPOCH steps per epoch."""
    target = max(1, train_rows // MIN_STEPS_PER_EPOCH)
    return min(IMPORT_MAX_BATCH, 1 << (target.bit_length() - 1))


def _relative_or_absolute(path: Path, root: Path) -> str:
    """Paths inside the project are written relative to it (the project stays movable)."""
    path = path.resolve()
    try:
        return path.relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def _experiment(exp_id: str, dataset_id: str, point: str, dim: int, batch_size: int) -> dict:
    return {
        "id": exp_id,
        "dataset": dataset_id,
        "source": point,
        "target": point,
        "model": {"architecture": "sae", "d_sae": 8 * dim, "activation": "topk", "k": max(1, min(32, dim // 4))},
        "train": {"seed": 0, "batch_size": batch_size},
        "evaluate": {},
        "export": {},
    }


def _check_spec(data: dict, kind: str, path: Path) -> None:
    """The spec ``data`` would pass load_spec at ``path`` (checked before anything is written)."""
    from pydantic import ValidationError

    model = SUBJECT_KINDS[data["kind"]].spec if kind == "subjects" else SPEC_KINDS[kind]
    try:
        model.model_validate(data)
    except ValidationError as exc:
        raise SpecError(str(path), [f"{path}: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                                    for err in exc.errors()]) from None


def _write_all(targets: list[tuple[Path, str]], texts: list[str]) -> None:
    """Write every file or none: if one write (or the check after) fails, the files written
    here are removed (or given back their previous content) and folders made here removed."""

    made = sorted({d for p, _ in targets for d in [p.parent, *p.parent.parents] if not d.exists()}, key=lambda d: -len(d.parts))
    written: list[tuple[Path, bytes | None]] = []
    try:
        for (path, _), text in zip(targets, texts):
            previous = path.read_bytes() if path.exists() else None
            atomic_write_text(path, text)
            written.append((path, previous))
        for path, kind in targets:  # the specs written must load: fail now, not at `saeclt run`
            load_spec(path, kind)
    except BaseException:
        for path, previous in reversed(written):
            if previous is None:
                path.unlink(missing_ok=True)
            else:
                atomic_write_bytes(path, previous)
        for folder in made:
            try:
                folder.rmdir()
            except OSError:
                pass
        raise


def import_activations(files: list[Path], dataset_id: str, root: Path, rows_per_instance: int = 1,
                       val_fraction: float = 0.1, experiment_id: str | None = None, force: bool = False) -> list[Path]:
    """Check the files and write the subject and dataset specs (and an SAE experiment spec if
    ``experiment_id``); returns the paths written. Everything is checked before the first file
    is written, and a failure part-way leaves none of them."""

    check_id("--id", dataset_id)
    if experiment_id is not None:
        check_id("--experiment", experiment_id)
    if isinstance(rows_per_instance, bool) or not isinstance(rows_per_instance, int) or rows_per_instance < 1:
        raise SpecError("--rows-per-instance", [f"--rows-per-instance {rows_per_instance}: expected a whole number of at "
                                                "least 1 (the consecutive rows that form one input)"])
    if not (isinstance(val_fraction, (int, float)) and math.isfinite(val_fraction) and 0 < val_fraction < 1):
        raise SpecError("--val-fraction", [f"--val-fraction {val_fraction}: expected a fraction between 0 and 1 (exclusive)"])
    if not files:
        raise SpecError("FILES", ["import-acts: name at least one activation file"])
    paths = [Path(f) for f in files]
    check_outside_outputs(paths, root, sorted({dataset_id, *(p.stem for p in (root / "specs" / "datasets").glob("*.yaml"))}),
                          "import-acts", "FILES")
    sources = scan_files(paths)
    n_rows = next(iter(sources.values())).shape[0]
    if n_rows < rows_per_instance * 10:
        raise DataError(f"{files[0]}: {n_rows} rows = fewer than 10 inputs of {rows_per_instance} rows; too few to split and train on")
    if n_rows % rows_per_instance:
        raise DataError(f"{files[0]}: {n_rows} rows is not a multiple of --rows-per-instance {rows_per_instance}")
    n_instances = n_rows // rows_per_instance
    n_train = n_instances - max(1, round(n_instances * val_fraction))  # as normalize splits
    if n_train < 1:
        raise SpecError("--val-fraction", [f"--val-fraction {val_fraction}: holds out all {n_instances} inputs; "
                                           "none would be left to train on"])
    dims = {name: s.shape[1] for name, s in sources.items()}

    subject_path = root / "specs" / "subjects" / f"{dataset_id}.yaml"
    dataset_path = root / "specs" / "datasets" / f"{dataset_id}.yaml"
    targets = [subject_path, dataset_path]
    if experiment_id:
        targets.append(root / "specs" / f"{experiment_id}.yaml")
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise DataError(f"{existing[0]}: already exists; choose another --id / --experiment or pass --force to overwrite")
    not_files = [p for p in existing if not p.is_file()]
    if not_files:
        raise DataError(f"{not_files[0]}: exists and is not a file; move it away or choose another --id / --experiment")

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
    specs = [(subject, "subjects", subject_path), (dataset, "datasets", dataset_path)]
    header = "# Written by `saeclt import-acts`: activations recorded elsewhere (see saeclt import-acts --help).\n"
    texts = [header + yaml.safe_dump(subject, sort_keys=False), header + yaml.safe_dump(dataset, sort_keys=False)]
    if experiment_id:
        point = next(iter(dims))
        batch = train_batch_size(n_train * rows_per_instance)
        experiment = _experiment(experiment_id, dataset_id, point, dims[point], batch)
        specs.append((experiment, "experiments", targets[2]))
        texts.append(f"# A TopK SAE on the imported activations; edit freely. train.batch_size is sized to the "
                     f"{n_train * rows_per_instance:,} training rows.\n" + yaml.safe_dump(experiment, sort_keys=False))
    for data, kind, path in specs:
        _check_spec(data, kind, path)
    _write_all([(path, kind) for _, kind, path in specs], texts)
    return targets


def describe_import(files: list[Path], dataset_id: str) -> str:
    sources = scan_files([Path(f) for f in files])
    lines = [f"{name}: {s.shape[0]:,} rows x {s.shape[1]} ({os.path.basename(s.path)})" for name, s in sources.items()]
    return "\n".join(lines)
