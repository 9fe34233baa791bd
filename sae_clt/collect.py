"""Stage `collect`: run the subject over its inputs and record hook points into a store.

All hook points of a dataset are recorded in one forward pass per batch (forward hooks for
outputs, forward-pre hooks for inputs), so rows stay aligned across hook points; the pass stops
at the last hook point needed. Rows are shuffled within each shard before writing.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

import torch

from .hooks import StopForward, expand_hook_points, recording
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


def within_norm_bound(acts: dict[str, torch.Tensor], keep: torch.Tensor, multiple: float) -> torch.Tensor:
    """Rows whose norm at every hook point is at most ``multiple`` x that hook's median norm
    over the kept rows of the batch (attention-sink tokens can be 100x the typical norm)."""
    ok = torch.ones_like(keep)
    for x in acts.values():
        norms = x.norm(dim=1)
        if keep.any():
            ok &= norms <= multiple * norms[keep].median()
    return ok


def collect(dataset: DatasetSpec, subject, store_dir: Path) -> dict:
    """Write ``dataset``'s activation store from a loaded ``subject``; returns the manifest."""
    cfg = dataset.collect
    available = subject.hook_points()
    points = expand_hook_points(cfg.hook_points, available)  # patterns such as encoder.layer.* become names
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
    text = cfg.text
    tokens, started = 0, time.perf_counter()
    with torch.no_grad(), progress_bar(total=cfg.n_instances, desc=f"collect {dataset.id}", unit="inst") as bar:
        for inputs, provenance, keep in batches:
            with recording(subject.model, points, available, stop_after=True) as store:
                with contextlib.suppress(StopForward):
                    subject.forward(inputs)
            n_inputs = int(provenance["instance_id"].unique().numel())
            acts = {p: store[p].reshape(-1, store[p].shape[-1]).float() for p in points}  # [rows, d] each
            rows = next(iter(acts.values())).shape[0]
            keep = torch.ones(rows, dtype=torch.bool) if keep is None else keep.clone()
            if text is not None and text.outlier_norm_multiple is not None:
                keep &= within_norm_bound(acts, keep, text.outlier_norm_multiple)
            if writer is None:
                dims = {p: int(x.shape[-1]) for p, x in acts.items()}
                meta = {
                    "subject": {"id": subject.spec.id, "kind": subject.kind, "fingerprint": subject.fingerprint()},
                    "n_instances": cfg.n_instances,
                    "meta": output_meta(dataset, cfg.seed, ["subject", "collect"]),
                }
                check_free_disk(store_dir, cfg.n_instances * rows // n_inputs, dims, cfg.dtype)
                writer = StoreWriter(store_dir, dims, cfg.dtype, meta, drop_nonfinite=cfg.drop_nonfinite)
            for p in points:
                pending_acts[p].append(acts[p][keep])
            for k, v in provenance.items():
                pending_prov.setdefault(k, []).append(v[keep])
            pending_instances += n_inputs
            tokens += int(keep.sum())
            bar.update(n_inputs)
            bar.set_postfix(rows_per_s=f"{tokens / max(time.perf_counter() - started, 1e-9):,.0f}")
            if pending_instances >= cfg.instances_per_shard:
                flush()
        if pending_instances:
            flush()
    return writer.finish()
