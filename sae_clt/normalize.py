"""Stage `normalize`: split by instance, fit normalisation on the training split, and stream
normalised ``(x_src, x_tgt)`` minibatches from the store.

Outputs (``runs/datasets/<id>/normalize/``):
  normalize.safetensors  ``<hook>.mean`` and ``<hook>.scale`` per hook point (x_norm = (x - mean) / scale),
                         and ``val_instances`` (bool per instance: held out for validation)
  normalize.json         the parameters' provenance and per-hook statistics of the training split
Validation rows are every row of a held-out instance, so no instance is seen on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .errors import DataError
from .io import read_json, save_safetensors, write_json
from .progress import progress_bar
from .provenance import output_meta
from .spec import DatasetSpec
from .store import ActivationStore, RunningStats

NORM_FILE = "normalize.safetensors"
NORM_JSON = "normalize.json"


def split_instances(n_instances: int, val_fraction: float, seed: int) -> torch.Tensor:
    """Bool mask [n_instances]: True for validation instances (a seeded random subset)."""
    n_val = max(1, round(n_instances * val_fraction))
    order = torch.randperm(n_instances, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(n_instances, dtype=torch.bool)
    mask[order[:n_val]] = True
    return mask


def fit_normalization(dataset: DatasetSpec, store: ActivationStore, out_dir: Path, metrics_path: Path) -> dict:
    """Verify the store, fit per-hook normalisation on the training split, write outputs."""
    cfg = dataset.normalize
    store.verify()
    val_mask = split_instances(store.manifest["n_instances"], cfg.val_fraction, cfg.seed)
    hooks = list(store.hook_dims)
    stats = {h: RunningStats(d) for h, d in store.hook_dims.items()}
    with progress_bar(store.n_shards, desc=f"normalize {dataset.id}", unit="shard") as bar:
        for i in range(store.n_shards):
            shard = store.read_shard(i, hooks + ["instance_id"])
            train_rows = ~val_mask[shard["instance_id"]]
            for h in hooks:
                stats[h].update(shard[h][train_rows])
            bar.update(1)

    tensors = {"val_instances": val_mask}
    per_hook = {}
    for h, s in stats.items():
        mean = s.mean if cfg.center else torch.zeros_like(s.mean)
        centered_sq = s.var + (s.mean - mean) ** 2  # E[(x - mean)^2] per dim
        if cfg.scale == "mean_norm":  # one scalar: rows get unit root-mean-square norm
            scale = centered_sq.sum().sqrt().expand_as(mean).clone()
        elif cfg.scale == "per_dim_std":
            scale = centered_sq.sqrt().clamp_min(1e-8)
        else:
            scale = torch.ones_like(mean)
        tensors[f"{h}.mean"] = mean.float()
        tensors[f"{h}.raw_mean"] = s.mean.float()  # for mean-ablation, whatever `center` says
        tensors[f"{h}.scale"] = scale.float()
        per_hook[h] = s.summary()
    meta = output_meta(dataset, cfg.seed, ["subject", "collect", "normalize"])
    save_safetensors(out_dir / NORM_FILE, tensors)
    summary = {
        "n_instances": int(val_mask.numel()),
        "n_val_instances": int(val_mask.sum()),
        "n_rows": store.manifest["n_rows"],
        "train_split": per_hook,
        "normalization": {"center": cfg.center, "scale": cfg.scale},
        "meta": meta,
    }
    write_json(out_dir / NORM_JSON, summary)
    write_json(metrics_path, summary)
    return summary


@dataclass
class Normalization:
    """Per-hook affine normalisation and the validation split, as fitted by the stage."""

    mean: dict[str, torch.Tensor]
    scale: dict[str, torch.Tensor]
    val_instances: torch.Tensor
    raw_mean: dict[str, torch.Tensor]  # training-split mean of the raw activations

    @classmethod
    def load(cls, norm_dir: Path) -> "Normalization":
        from safetensors.torch import load_file

        path = Path(norm_dir) / NORM_FILE
        if not path.exists():
            raise DataError(f"{path}: missing; run the normalize stage first")
        t = load_file(path)
        hooks = [k[: -len(".scale")] for k in t if k.endswith(".scale")]
        return cls({h: t[f"{h}.mean"] for h in hooks}, {h: t[f"{h}.scale"] for h in hooks},
                   t["val_instances"], {h: t[f"{h}.raw_mean"] for h in hooks})

    def apply(self, hook: str, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean[hook]) / self.scale[hook]

    def invert(self, hook: str, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale[hook] + self.mean[hook]


def summary_of(norm_dir: Path) -> dict:
    return read_json(Path(norm_dir) / NORM_JSON)


class PairLoader:
    """Streams normalised (x_src, x_tgt) minibatches of one split from a store.

    Each epoch visits shards in a seeded random order, ``mix_shards`` at a time, and shuffles
    the rows of those shards together; batches span group boundaries. Memory holds two groups
    (the one being consumed and the one prefetched), never the whole store.
    """

    def __init__(self, store: ActivationStore, norm: Normalization, source: str, target: str,
                 split: str, batch_size: int, seed: int, drop_last: bool = False, shuffle: bool = True,
                 mix_shards: int = 2):
        if split not in ("train", "val"):
            raise ValueError(split)
        store.check_hooks([source, target], "the spec")
        self.store, self.norm = store, norm
        self.source, self.target = source, target
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.drop_last, self.shuffle = drop_last, shuffle
        self.mix_shards = mix_shards
        self.rows_per_epoch = self._count_rows()

    def _rows(self, shard: dict) -> torch.Tensor:
        is_val = self.norm.val_instances[shard["instance_id"]]
        return (is_val if self.split == "val" else ~is_val).nonzero().squeeze(1)

    def _count_rows(self) -> int:
        total = 0
        for i in range(self.store.n_shards):
            total += int(self._rows(self.store.read_shard(i, ["instance_id"])).numel())
        return total

    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.rows_per_epoch, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def _groups(self, epoch: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """Normalised rows of this split, ``mix_shards`` shards at a time, shuffled together
        (rows mix across shards as well as within them)."""
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.store.n_shards, generator=gen) if self.shuffle else torch.arange(self.store.n_shards)
        names = list(dict.fromkeys([self.source, self.target, "instance_id", "position"]))
        order = order.tolist()
        for g in range(0, len(order), self.mix_shards):
            pieces = []
            for i in order[g:g + self.mix_shards]:
                shard = self.store.read_shard(i, names)
                rows = self._rows(shard)
                pieces.append((shard[self.source][rows], shard[self.target][rows], shard["instance_id"][rows], shard["position"][rows]))
            parts = tuple(torch.cat(p) for p in zip(*pieces)) if len(pieces) > 1 else pieces[0]
            if self.shuffle:
                perm = torch.randperm(parts[0].shape[0], generator=gen)
                parts = tuple(t[perm] for t in parts)
            yield (self.norm.apply(self.source, parts[0]), self.norm.apply(self.target, parts[1]), parts[2], parts[3])

    def epoch(self, epoch: int = 0, with_provenance: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
        """Minibatches of one epoch. Shards are read and prepared on a background thread one
        group ahead, so reading overlaps training; batches span group boundaries."""
        carry: tuple[torch.Tensor, ...] | None = None  # rows left over from the previous group
        for parts in prefetched(self._groups(epoch), depth=1):
            if carry is not None:
                parts = tuple(torch.cat([a, b]) for a, b in zip(carry, parts))
            n, start = parts[0].shape[0], 0
            while n - start >= self.batch_size:
                batch = tuple(t[start : start + self.batch_size] for t in parts)
                start += self.batch_size
                yield batch if with_provenance else batch[:2]
            carry = tuple(t[start:] for t in parts)
        if carry is not None and carry[0].shape[0] and not self.drop_last:
            yield carry if with_provenance else carry[:2]


def prefetched(items: Iterator, depth: int = 1) -> Iterator:
    """Iterate ``items`` on a background thread, keeping up to ``depth`` ready ahead. Errors
    raised there are raised here; stopping early stops the thread."""
    import queue
    import threading

    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        ready.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ready.put(("end", done))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            ready.put(("error", exc))

    thread = threading.Thread(target=produce, name="saeclt-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = ready.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        while thread.is_alive():
            try:
                ready.get(timeout=0.05)
            except queue.Empty:
                pass
