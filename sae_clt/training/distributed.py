"""Data-parallel training across processes (`torchrun`): gloo for tensors on the CPU, nccl for
tensors on GPUs (``train.device``: each rank on its own GPU, cuda:LOCAL_RANK), whether or not
the machine has a GPU being beside the point.

    torchrun --standalone --nproc_per_node 2 -m sae_clt stage train specs/minilm_sae_L2.yaml

Each rank reads its own shards of the store (shard i goes to rank i mod world size) and trains
on batch_size / world rows per step; gradients are averaged across ranks before clipping and
the update, so every rank holds the same weights; which latents fired is combined across
ranks, so dead-latent bookkeeping (AuxK, resampling) agrees; rank 0 writes checkpoints,
curves, metrics and the dictionary. A single process (no torchrun) uses the same code with a
world of one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch


def backend_for(device_type: str) -> str:
    """The collective backend for tensors on ``device_type``: nccl moves only GPU tensors."""
    return "nccl" if device_type == "cuda" else "gloo"


@dataclass
class World:
    rank: int = 0
    size: int = 1
    owns_group: bool = field(default=False, compare=False)  # joined by from_env: close() leaves it
    device: torch.device = field(default_factory=lambda: torch.device("cpu"), compare=False)  # where the collectives' tensors live

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @classmethod
    def from_env(cls, device: torch.device | str = "cpu") -> "World":
        """Join the process group torchrun set up (WORLD_SIZE > 1), or a world of one. The
        backend follows where the tensors are (``device``, or its type), not which hardware exists."""
        device = torch.device(device)
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls(device=device)
        import torch.distributed as dist

        owns = not dist.is_initialized()
        if owns:
            if device.type == "cuda":  # nccl: this rank's GPU is the current one
                torch.cuda.set_device(device)
            dist.init_process_group(backend=backend_for(device.type))
        return cls(dist.get_rank(), dist.get_world_size(), owns, device)

    def close(self) -> None:
        """Wait for every rank (rank 0 may still be writing the outputs), then leave the process
        group from_env joined. A rank that exited first with the group still open was now and
        then aborted by the C++ runtime (SIGABRT) while gloo's threads were being torn down."""
        if not (self.active and self.owns_group):
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    # Collective operations; no-ops in a world of one.

    def average_grads(self, params) -> None:
        if not self.active:
            return
        import torch.distributed as dist

        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def any(self, mask: torch.Tensor) -> torch.Tensor:
        """Element-wise OR of a bool tensor across ranks."""
        if not self.active:
            return mask
        import torch.distributed as dist

        as_int = mask.to(torch.int32)
        dist.all_reduce(as_int, op=dist.ReduceOp.MAX)
        return as_int.bool()

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum across ranks."""
        if self.active:
            import torch.distributed as dist

            dist.all_reduce(tensor)
        return tensor

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        if not self.active or not values:
            return values
        import torch.distributed as dist

        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / self.size for k, v in zip(keys, t)}

    def min_int(self, value: int) -> int:
        if not self.active:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t)

    def broadcast_params(self, module: torch.nn.Module) -> None:
        """Rank 0's weights everywhere (initialisation reads rank-local data)."""
        if not self.active:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(tensor, src=0)

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()
