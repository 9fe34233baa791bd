"""The training loader: normalised ``(x_src, x_tgt)`` minibatches of one split streamed from an
activation store (memory-mapped shards, a background prefetch thread, shuffling across shards),
and data echoing."""

from __future__ import annotations

from typing import Iterator

import torch

from ..kernels.ops import gather_normalize, take_rows
from ..threads import prefetched
from .hook_groups import HookGroup
from .normalize import Normalization
from .store import ActivationStore


class ShardGroup:
    """A few shards' tensors (as read: memory-mapped, as stored) addressed as one table whose rows
    are the shards' rows one after another -- without copying them together."""

    def __init__(self, shards: list[dict[str, torch.Tensor]]):
        self.shards = shards

    def parts(self, name: str) -> list[torch.Tensor]:
        return [shard[name] for shard in self.shards]

    def column(self, name: str) -> torch.Tensor:
        parts = self.parts(name)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def take(self, name: str, idx: torch.Tensor) -> torch.Tensor:
        return take_rows(self.parts(name), idx)

    def touch(self) -> "ShardGroup":
        """Read one value per memory page of every tensor, so the pages come from disk (or the page
        cache) now, on the prefetch thread, rather than in the middle of a training step."""
        for shard in self.shards:
            for t in shard.values():
                flat = t.reshape(-1)
                if flat.numel():
                    flat[:: max(1, 4096 // t.element_size())].sum()
        return self


class BatchBuffers:
    """Float32 batch tensors whose memory is used again once the consumer has let go of a batch.

    A fresh [4096, 384] float32 batch every step page-faults its 6 MB in again: 1-3 ms a batch on
    a 2-core VM, 2-5 % of a bf16 training step. A buffer is handed out again only when nothing
    references its memory any more (the batch and every view of it dropped); otherwise, or
    where torch cannot tell, a new tensor is made, so a consumer that keeps batches (data
    echoing, evaluation) is never overwritten."""

    def __init__(self, keep: int = 6):
        self.keep = keep
        self._storages: list[torch.UntypedStorage] = []
        self._use_count = getattr(torch._C, "_storage_Use_Count", None)  # private: absent means no reuse
        if self._use_count is not None and not self._counts_references():
            self._use_count = None

    def _counts_references(self) -> bool:
        """Whether the use count behaves as relied on here (a live tensor counts, a dropped one
        does not); a torch where it does not gets no reuse rather than overwritten batches."""
        try:
            probe = torch.empty(1)
            storage = probe.untyped_storage()
            alive = self._use_count(storage._cdata)
            del probe
            return alive == 2 and self._use_count(storage._cdata) == 1
        except Exception:  # noqa: BLE001 - a changed private API: no reuse
            return False

    def _free(self, storage: torch.UntypedStorage) -> bool:
        return self._use_count(storage._cdata) == 1  # only this pool's own reference is left

    def take(self, rows: int, cols: int) -> torch.Tensor:
        if self._use_count is not None:
            for storage in self._storages:
                if storage.nbytes() >= rows * cols * 4 and self._free(storage):
                    return torch.empty(0, dtype=torch.float32).set_(storage, 0, (rows, cols))
        batch = torch.empty(rows, cols, dtype=torch.float32)
        if self._use_count is not None and len(self._storages) < self.keep:
            self._storages.append(batch.untyped_storage())
        return batch


class PairLoader:
    """Streams normalised (x_src, x_tgt) minibatches of one split from a store.

    Each epoch visits shards in a seeded random order, ``mix_shards`` at a time, and shuffles
    the rows of those shards together; batches span group boundaries. The shards are memory
    maps, and each batch's rows are gathered from them straight into normalised float32: memory
    holds the pages of two groups (the one being consumed and the next), never the whole store.
    """

    def __init__(self, store: ActivationStore, norm: Normalization, source: str, target: str,
                 split: str, batch_size: int, seed: int, drop_last: bool = False, shuffle: bool = True,
                 mix_shards: int = 2, shards: list[int] | None = None, echo: int = 1):
        if split not in ("train", "val"):
            raise ValueError(split)
        store.check_hooks([source, target], "the spec")
        self.store, self.norm = store, norm
        self.source, self.target = HookGroup(source), HookGroup(target)
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.drop_last, self.shuffle = drop_last, shuffle
        self.mix_shards = mix_shards
        if echo < 1:
            raise ValueError(f"echo must be at least 1, got {echo}")
        self.echo = echo  # data echoing: each row is used this many times (see echoed)
        self.shards = list(range(store.n_shards)) if shards is None else list(shards)  # a rank's own shards
        self.rows_per_epoch = self._count_rows()
        self.buffers = BatchBuffers()

    def _rows(self, instance_id: torch.Tensor) -> torch.Tensor:
        is_val = self.norm.val_instances[instance_id]
        return (is_val if self.split == "val" else ~is_val).nonzero().squeeze(1)

    def _count_rows(self) -> int:
        total = 0
        for i in self.shards:
            total += int(self._rows(self.store.read_shard(i, ["instance_id"], check=False)["instance_id"]).numel())
        return total

    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.rows_per_epoch, self.batch_size)
        return (full if self.drop_last or rest == 0 else full + 1) * self.echo

    def _groups(self, epoch: int) -> Iterator[tuple["ShardGroup", torch.Tensor]]:
        """``mix_shards`` shards at a time (memory-mapped, as stored), with the order in which to
        visit this split's rows of them: shuffled together, so rows mix across shards as well as
        within them."""
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.shards), generator=gen) if self.shuffle else torch.arange(len(self.shards))
        names = list(dict.fromkeys([*self.source.members, *self.target.members, "instance_id", "position"]))
        order = [self.shards[i] for i in order.tolist()]
        for g in range(0, len(order), self.mix_shards):
            group = ShardGroup([self.store.read_shard(i, names, as_stored=True) for i in order[g:g + self.mix_shards]]).touch()
            rows = self._rows(group.column("instance_id"))
            if self.shuffle:
                rows = rows[torch.randperm(rows.numel(), generator=gen)]
            yield group, rows

    def _batch(self, group: "ShardGroup", idx: torch.Tensor, with_provenance: bool) -> tuple[torch.Tensor, ...]:
        """Normalised float32 rows ``idx`` of a group, gathered from its shards and converted a
        batch at a time (one pass with the compiled kernel); with their instance ids and positions
        if asked."""
        def one(hook: str) -> torch.Tensor:
            parts = group.parts(hook)
            out = self.buffers.take(idx.numel(), parts[0].shape[1])
            return gather_normalize(parts, idx, self.norm.mean[hook], self.norm.scale[hook], out=out)

        def rows(group: HookGroup) -> torch.Tensor:  # a hook group: its members side by side
            return one(group) if not group.is_group else torch.cat([one(m) for m in group.members], dim=1)

        x = rows(self.source)
        y = x if self.target == self.source else rows(self.target)
        return (x, y, group.take("instance_id", idx), group.take("position", idx)) if with_provenance else (x, y)

    def epoch(self, epoch: int = 0, with_provenance: bool = False, echo: bool = True) -> Iterator[tuple[torch.Tensor, ...]]:
        """Minibatches of one epoch (each row ``self.echo`` times unless ``echo`` is false; see
        :func:`echoed`)."""
        batches = self._read_epoch(epoch, with_provenance)
        if self.echo == 1 or not echo:
            return batches
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch + 7_919)
        return echoed(batches, self.echo, gen)

    def _read_epoch(self, epoch: int, with_provenance: bool) -> Iterator[tuple[torch.Tensor, ...]]:
        """Minibatches of one epoch as read. Shards are opened and their pages read on a background
        thread one group ahead, so reading overlaps training; batches span group boundaries.
        Memory: the mapped pages of two groups plus one batch in float32, whatever the store's size."""
        carry: tuple[torch.Tensor, ...] | None = None  # rows left over from the previous group
        for group, rows in prefetched(self._groups(epoch), depth=1):
            start = 0
            if carry is not None:  # complete the partial batch with this group's first rows
                need = self.batch_size - carry[0].shape[0]
                head = self._batch(group, rows[:need], with_provenance)
                carry = _joined(carry, head)
                start = min(need, rows.numel())
                if carry[0].shape[0] < self.batch_size:
                    continue
                yield carry
                carry = None
            while rows.numel() - start >= self.batch_size:
                batch = self._batch(group, rows[start:start + self.batch_size], with_provenance)
                start += self.batch_size
                yield batch
            if start < rows.numel():
                carry = self._batch(group, rows[start:], with_provenance)
        if carry is not None and carry[0].shape[0] and not self.drop_last:
            yield carry


def _joined(first: tuple[torch.Tensor, ...], second: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Two partial batches as one; an SAE's y stays the same tensor as its x."""
    out = [torch.cat([first[0], second[0]])]
    for a, b in zip(first[1:], second[1:]):
        out.append(out[0] if a is first[0] and b is second[0] else torch.cat([a, b]))
    return tuple(out)


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
