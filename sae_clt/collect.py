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
                writer = StoreWriter(store_dir, dims, cfg.dtype, meta)
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
