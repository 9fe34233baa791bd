"""Batches between the host and a GPU through pinned (page-locked) memory, so copies run
asynchronously while the GPU computes.

- ``to_device(batches, device)``: the loader's CPU batches on the GPU. A background thread copies
  each batch into a pinned buffer and launches its host-to-device copy on a side stream; the
  consumer's stream waits for that copy only (an event), so reading, normalising and copying the
  next batch overlap the current step. A pinned buffer is refilled only once its previous copy has
  completed (its event).
- ``HostStaging``: a collection's activations (on the GPU) copied into pinned host buffers
  asynchronously; the caller runs the next forward pass before it waits for them (one batch behind).

On the CPU both are pass-throughs: the batches are the loader's own tensors, unchanged.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ..threads import prefetched

PINNED_SLOTS = 3  # pinned buffers in flight (one being copied, one queued, one being filled)


class _PinnedPool:
    """Pinned host buffers by (slot, position in the batch), grown as needed, each with the event
    of the last copy that read or wrote it."""

    def __init__(self, slots: int):
        self.slots = slots
        self.buffers: dict[tuple[int, int], torch.Tensor] = {}
        self.events: list[torch.cuda.Event | None] = [None] * slots

    def take(self, slot: int, index: int, like: torch.Tensor) -> torch.Tensor:
        """A pinned tensor shaped and typed like ``like`` in slot ``slot`` (wait for its last copy first)."""
        buffer = self.buffers.get((slot, index))
        need = like.numel() * like.element_size()
        if buffer is None or buffer.numel() < need:
            buffer = torch.empty(need, dtype=torch.uint8, pin_memory=True)
            self.buffers[(slot, index)] = buffer
        return buffer[:need].view(like.dtype).view(like.shape)

    def wait(self, slot: int) -> None:
        event = self.events[slot]
        if event is not None:
            event.synchronize()


def to_device(batches: Iterator[tuple[torch.Tensor, ...]], device: torch.device,
              slots: int = PINNED_SLOTS) -> Iterator[tuple[torch.Tensor, ...]]:
    """``batches`` (tuples of CPU tensors; one tensor may appear twice, an SAE's y being its x) on
    ``device``. On a GPU: staged through pinned memory by a background thread, copied on a side
    stream, the consumer's stream made to wait for each batch's copy. Elsewhere: ``batches`` as they are."""
    device = torch.device(device)
    if device.type != "cuda":
        yield from batches
        return
    pool = _PinnedPool(slots)
    copy_stream = torch.cuda.Stream(device)

    def staged() -> Iterator[tuple[tuple[torch.Tensor, ...], torch.cuda.Event]]:
        for n, batch in enumerate(batches):
            slot = n % slots
            pool.wait(slot)  # the copy that last read this slot's buffers is done
            seen: dict[int, torch.Tensor] = {}
            out = []
            with torch.cuda.stream(copy_stream):
                for i, tensor in enumerate(batch):
                    if id(tensor) not in seen:
                        pinned = pool.take(slot, i, tensor)
                        pinned.copy_(tensor)
                        seen[id(tensor)] = pinned.to(device, non_blocking=True)
                    out.append(seen[id(tensor)])
                event = torch.cuda.Event()
                event.record(copy_stream)
            pool.events[slot] = event
            yield tuple(out), event

    current = torch.cuda.current_stream(device)
    for batch, event in prefetched(staged(), depth=slots - 1):
        current.wait_event(event)
        for tensor in batch:  # made on the copy stream, used on this one: keep the allocator from reusing it early
            tensor.record_stream(current)
        yield batch


class HostStaging:
    """Device activations copied to pinned host memory without waiting: ``copy`` queues the
    copies of one batch and returns its host tensors; ``ready`` waits for them. Two sets of
    buffers alternate, so a batch's host tensors stay valid until the batch after next is copied."""

    def __init__(self, slots: int = 2):
        self.pool = _PinnedPool(slots)
        self.count = 0

    def copy(self, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
        """(host tensors, slot): the copies are queued on the current stream, not waited for."""
        slot = self.count % self.pool.slots
        self.count += 1
        self.pool.wait(slot)
        host = {}
        stream = torch.cuda.current_stream(next(iter(tensors.values())).device)  # the tensors' GPU's, not the current GPU's
        with torch.cuda.stream(stream):
            for i, (name, tensor) in enumerate(tensors.items()):
                pinned = self.pool.take(slot, i, tensor)
                pinned.copy_(tensor, non_blocking=True)
                host[name] = pinned
        event = torch.cuda.Event()
        event.record(stream)
        self.pool.events[slot] = event
        return host, slot

    def ready(self, slot: int) -> None:
        """Wait until the copies of ``slot`` are complete."""
        self.pool.wait(slot)
