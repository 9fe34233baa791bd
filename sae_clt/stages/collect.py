"""Stage `collect`: run the subject over its inputs and record the hook points into an activation
store.  specs/datasets/<d>.yaml -> runs/datasets/<d>/store/ (or $ACTIVATIONS_ROOT/<d>/ and a pointer)"""

from __future__ import annotations

from pathlib import Path

from ..data.collect import check_activations_root, collect, complete_parts, merge_parts, part_status
from ..data.store import write_pointer
from ..devices import resolve_device
from ..errors import DataError
from ..subjects import load_subject
from .common import dataset_specs, log


def run(spec_path: Path, shard: tuple[int, int] | None = None) -> None:
    """Collect the whole store, or with ``shard = (i, n)`` worker i's part of it; a plain run
    after n complete parts merges them."""
    paths, dataset, subject_spec = dataset_specs(spec_path)
    external = paths.external_store_dir(dataset.id)
    if external is not None:
        check_activations_root(external.parent)
    target = external or paths.store_dir(dataset.id)
    n_parts = complete_parts(target) if shard is None and target.exists() else None
    status = part_status(target) if shard is None and target.exists() else None
    if status and not n_parts:
        raise DataError(f"{target}: {status[0]} of {status[1]} worker parts are complete (saeclt stage collect {spec_path} "
                        f"--shard i/{status[1]}); finish the others, or delete {target}/part-* to collect in one process")
    if n_parts:  # workers (--shard i/n) collected every part: join them
        manifest = merge_parts(target, n_parts)
        log(f"[collect] {dataset.id}: merged {n_parts} worker parts")
    else:
        subject = load_subject(subject_spec, paths.subject_dir(subject_spec.id), paths.root)
        subject.to(resolve_device(dataset.collect.device, "collect.device"))
        subject.configure(dataset)
        manifest = collect(dataset, subject, target, part=shard)
        if shard is not None:
            log(f"[collect] {dataset.id}: part {shard[0]} of {shard[1]}: {manifest['n_rows']} rows; "
                f"`saeclt stage collect {spec_path}` (or saeclt run / dvc repro) merges the parts once all are complete")
            return
    if external is not None:
        write_pointer(paths.store_dir(dataset.id), external)
        log(f"[collect] {dataset.id}: store under $ACTIVATIONS_ROOT at {external}")
    log(f"[collect] {dataset.id}: {manifest['n_rows']} rows x {len(manifest['hook_points'])} hook points in {len(manifest['shards'])} shards")
