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
from .hook_groups import is_group, members
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
        from .hook_groups import GroupDict

        return cls(GroupDict({h: t[f"{h}.mean"] for h in hooks}), GroupDict({h: t[f"{h}.scale"] for h in hooks}),
                   t["val_instances"], GroupDict({h: t[f"{h}.raw_mean"] for h in hooks}))

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
                 mix_shards: int = 2, shards: list[int] | None = None, echo: int = 1):
        if split not in ("train", "val"):
            raise ValueError(split)
        store.check_hooks([source, target], "the spec")
        self.store, self.norm = store, norm
        self.source, self.target = source, target
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.drop_last, self.shuffle = drop_last, shuffle
        self.mix_shards = mix_shards
        if echo < 1:
            raise ValueError(f"echo must be at least 1, got {echo}")
        self.echo = echo  # data echoing: each row is used this many times (see echoed)
        self.shards = list(range(store.n_shards)) if shards is None else list(shards)  # a rank's own shards
        self.rows_per_epoch = self._count_rows()

    def _rows(self, shard: dict) -> torch.Tensor:
        is_val = self.norm.val_instances[shard["instance_id"]]
        return (is_val if self.split == "val" else ~is_val).nonzero().squeeze(1)

    def _count_rows(self) -> int:
        total = 0
        for i in self.shards:
            total += int(self._rows(self.store.read_shard(i, ["instance_id"])).numel())
        return total

    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.rows_per_epoch, self.batch_size)
        return (full if self.drop_last or rest == 0 else full + 1) * self.echo

    def _groups(self, epoch: int) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """``mix_shards`` shards at a time, as stored (float16 stays float16), with the order in
        which to visit this split's rows of them: shuffled together, so rows mix across shards
        as well as within them."""
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.shards), generator=gen) if self.shuffle else torch.arange(len(self.shards))
        names = list(dict.fromkeys([*members(self.source), *members(self.target), "instance_id", "position"]))
        order = [self.shards[i] for i in order.tolist()]
        for g in range(0, len(order), self.mix_shards):
            shards = [self.store.read_shard(i, names, as_stored=True) for i in order[g:g + self.mix_shards]]
            if len(shards) == 1:
                group = shards[0]
            else:  # one copy into a preallocated group, not a chain of concatenations
                group = {}
                total = sum(s["instance_id"].shape[0] for s in shards)
                for name in names:
                    first = shards[0][name]
                    group[name] = torch.empty((total, *first.shape[1:]), dtype=first.dtype)
                    start = 0
                    for s in shards:
                        n = s[name].shape[0]
                        group[name][start:start + n] = s[name]
                        start += n
                del shards
            rows = self._rows(group)
            if self.shuffle:
                rows = rows[torch.randperm(rows.numel(), generator=gen)]
            yield group, rows

    def _batch(self, group: dict[str, torch.Tensor], idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Normalised float32 rows ``idx`` of a group (converted a batch at a time)."""
        def one(hook: str) -> torch.Tensor:
            # index_select makes a fresh tensor, so normalising it in place is safe (and, on a
            # fresh [B, d] output, several times cheaper than out-of-place arithmetic).
            x = group[hook].index_select(0, idx).to(torch.float32)
            return x.sub_(self.norm.mean[hook]).div_(self.norm.scale[hook])

        def rows(name: str) -> torch.Tensor:  # a hook group: its members side by side
            return one(name) if not is_group(name) else torch.cat([one(m) for m in members(name)], dim=1)

        x = rows(self.source)
        y = x if self.target == self.source else rows(self.target)
        return x, y, group["instance_id"].index_select(0, idx), group["position"].index_select(0, idx)

    def epoch(self, epoch: int = 0, with_provenance: bool = False, echo: bool = True) -> Iterator[tuple[torch.Tensor, ...]]:
        """Minibatches of one epoch (each row ``self.echo`` times unless ``echo`` is false; see
        :func:`echoed`)."""
        batches = self._read_epoch(epoch, with_provenance)
        if self.echo == 1 or not echo:
            return batches
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch + 7_919)
        return echoed(batches, self.echo, gen)

    def _read_epoch(self, epoch: int, with_provenance: bool) -> Iterator[tuple[torch.Tensor, ...]]:
        """Minibatches of one epoch as read. Shards are read on a background thread one group ahead,
        so reading overlaps training; batches span group boundaries. Memory: two groups as
        stored plus one batch in float32, whatever the store's size."""
        carry: tuple[torch.Tensor, ...] | None = None  # rows left over from the previous group
        for group, rows in prefetched(self._groups(epoch), depth=1):
            start = 0
            if carry is not None:  # complete the partial batch with this group's first rows
                need = self.batch_size - carry[0].shape[0]
                head = self._batch(group, rows[:need])
                carry = tuple(torch.cat([a, b]) for a, b in zip(carry, head))
                start = min(need, rows.numel())
                if carry[0].shape[0] < self.batch_size:
                    continue
                yield carry if with_provenance else carry[:2]
                carry = None
            while rows.numel() - start >= self.batch_size:
                batch = self._batch(group, rows[start:start + self.batch_size])
                start += self.batch_size
                yield batch if with_provenance else batch[:2]
            if start < rows.numel():
                carry = self._batch(group, rows[start:])
        if carry is not None and carry[0].shape[0] and not self.drop_last:
            yield carry if with_provenance else carry[:2]


def echoed(batches: Iterator[tuple[torch.Tensor, ...]], echo: int, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
    """Data echoing (Choi et al. 2019, "Faster neural network training with data echoing"):
    ``echo`` batches are read, then their rows are served ``echo`` times over, each pass in a
    fresh random order, as ``echo²`` batches of the same size. Every row is read from the store
    once but trained on ``echo`` times (in full windows never twice in one batch). Reshuffling across the window
    (example echoing) matters: repeating a batch as is gave a worse fit and more dead latents on
    MiniLM (BENCHMARKS.md). A short last window is echoed the same way."""
    window: list[tuple[torch.Tensor, ...]] = []

    def serve() -> Iterator[tuple[torch.Tensor, ...]]:
        size = max(w[0].shape[0] for w in window)
        columns = [torch.cat(c) if len(window) > 1 else c[0] for c in zip(*window)]
        aliased = [i > 0 and window[0][i] is window[0][0] for i in range(len(columns))]  # an SAE's y is its x
        order = torch.cat([torch.randperm(columns[0].shape[0], generator=gen) for _ in range(echo)])
        for start in range(0, order.numel(), size):
            idx = order[start:start + size]
            picked: list[torch.Tensor] = []
            for column, alias in zip(columns, aliased):
                picked.append(picked[0] if alias else column.index_select(0, idx))
            yield tuple(picked)

    for batch in batches:
        window.append(batch)
        if len(window) == echo:
            yield from serve()
            window = []
    if window:
        yield from serve()


def prefetched(items: Iterator, depth: int = 1) -> Iterator:
    """Iterate ``items`` on a background thread, preparing at most ``depth`` items beyond the
    one being consumed (so memory holds depth + 1 items). Errors raised there are raised
    here; stopping early stops the thread."""
    import queue
    import threading

    ready: queue.Queue = queue.Queue()
    permits = threading.Semaphore(depth)  # released when the consumer takes an item
    stop = threading.Event()

    def produce() -> None:
        try:
            iterator = iter(items)
            while True:
                while not permits.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                try:
                    item = next(iterator)
                except StopIteration:
                    ready.put(("end", None))
                    return
                ready.put(("item", item))
                del item
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
            permits.release()
            yield value
            del value
    finally:
        stop.set()
        thread.join(timeout=5)
