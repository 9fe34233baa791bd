"""Stage `collect`: run the subject over its inputs and record hook points into a store.

All hook points of a dataset are recorded in one forward pass per batch (forward hooks for
outputs, forward-pre hooks for inputs), so rows stay aligned across hook points; the pass stops
at the last hook point needed. Rows are shuffled within each shard before writing.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import torch

from .hooks import StopForward, recording
from .progress import progress_bar
from .provenance import output_meta
from .spec import DatasetSpec
from .store import StoreWriter

BYTES_PER_VALUE = {"float32": 4, "float16": 2, "bfloat16": 2}


def estimated_store_bytes(n_rows: int, dims: dict[str, int], dtype: str) -> int:
    """Shard payload: activations plus 12 bytes of provenance per row (headers are negligible)."""
    return n_rows * (sum(dims.values()) * BYTES_PER_VALUE[dtype] + 12)


def check_free_disk(store_dir: Path, n_rows: int, dims: dict[str, int], dtype: str) -> None:
    from .errors import DataError

    need = estimated_store_bytes(n_rows, dims, dtype)
    existing = next(p for p in [store_dir, *store_dir.parents] if p.exists())
    free = shutil.disk_usage(existing).free
    if need * 1.05 > free:
        raise DataError(f"{store_dir}: the store needs about {need / 1e9:.2f} GB ({n_rows} rows x {sum(dims.values())} values, {dtype}); "
                        f"only {free / 1e9:.2f} GB are free there. Free space, store fewer rows, use float16, "
                        "or point $ACTIVATIONS_ROOT at a larger disk")


def collect(dataset: DatasetSpec, subject, store_dir: Path) -> dict:
    """Write ``dataset``'s activation store from a loaded ``subject``; returns the manifest."""
    cfg = dataset.collect
    points = cfg.hook_points
    available = subject.hook_points()
    if store_dir.exists():
        shutil.rmtree(store_dir)  # a fresh collection replaces an old or partial one
    gen = torch.Generator().manual_seed(cfg.seed)
    writer = None
    pending_acts: dict[str, list[torch.Tensor]] = {p: [] for p in points}
    pending_prov: dict[str, list[torch.Tensor]] = {}
    pending_instances = 0

    def flush() -> None:
        nonlocal pending_instances, pending_prov
        acts = {p: torch.cat(xs) for p, xs in pending_acts.items()}
        prov = {k: torch.cat(v) for k, v in pending_prov.items()}
        perm = torch.randperm(next(iter(acts.values())).shape[0], generator=gen)
        writer.write_shard(acts, prov, perm)
        for xs in pending_acts.values():
            xs.clear()
        pending_prov, pending_instances = {}, 0

    batches = subject.input_batches(cfg.n_instances, cfg.seed, cfg.batch_size)
    with torch.no_grad(), progress_bar(total=cfg.n_instances, desc=f"collect {dataset.id}", unit="inst") as bar:
        for inputs, provenance in batches:
            with recording(subject.model, points, available, stop_after=True) as store:
                with contextlib.suppress(StopForward):
                    subject.forward(inputs)
            if writer is None:
                dims = {p: int(store[p].shape[-1]) for p in points}
                meta = {
                    "subject": {"id": subject.spec.id, "kind": subject.kind, "fingerprint": subject.fingerprint()},
                    "n_instances": cfg.n_instances,
                    "meta": output_meta(dataset, cfg.seed, ["subject", "collect"]),
                }
                rows_per_instance = store[points[0]].reshape(-1, dims[points[0]]).shape[0] // inputs.shape[0]
                check_free_disk(store_dir, cfg.n_instances * rows_per_instance, dims, cfg.dtype)
                writer = StoreWriter(store_dir, dims, cfg.dtype, meta, drop_nonfinite=cfg.drop_nonfinite)
            for p in points:
                pending_acts[p].append(store[p].reshape(-1, store[p].shape[-1]).float())
            for k, v in provenance.items():
                pending_prov.setdefault(k, []).append(v)
            pending_instances += inputs.shape[0]
            bar.update(inputs.shape[0])
            if pending_instances >= cfg.instances_per_shard:
                flush()
        if pending_instances:
            flush()
    return writer.finish()
