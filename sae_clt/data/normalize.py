"""Stage `normalize`: split by instance and fit normalisation on the training split (the
minibatches themselves are streamed by ``loader.PairLoader``).

Outputs (``runs/datasets/<id>/normalize/``):
  normalize.safetensors  ``<hook>.mean`` and ``<hook>.scale`` per hook point (x_norm = (x - mean) / scale),
                         and ``val_instances`` (bool per instance: held out for validation)
  normalize.json         the parameters' provenance and per-hook statistics of the training split
Validation rows are every row of a held-out instance, so no instance is seen on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DataError
from ..io import read_json, save_safetensors, write_json
from ..progress import progress_bar
from ..provenance import output_meta
from ..spec.models import DatasetSpec
from ..stages.table import stage
from .hook_groups import GroupDict
from .store import ActivationStore, RunningStats, sha256_file

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
    val_mask = split_instances(store.manifest["n_instances"], cfg.val_fraction, cfg.seed)
    hooks = list(store.hook_dims)
    stats = {h: RunningStats(d) for h, d in store.hook_dims.items()}
    with progress_bar(store.n_shards, desc=f"normalize {dataset.id}", unit="shard") as bar:
        for i in range(store.n_shards):
            shard = store.read_shard(i, hooks + ["instance_id"])
            train_rows = (~val_mask[shard["instance_id"]]).nonzero().squeeze(1)
            for h in hooks:
                stats[h].update(shard[h], train_rows)
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
    meta = output_meta(dataset, cfg.seed, [*stage("collect").sections, *stage("normalize").sections])  # all the store's inputs
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
    digest: str = ""  # SHA-256 of the file it was loaded from: what a training checkpoint was trained under

    @classmethod
    def load(cls, norm_dir: Path) -> "Normalization":
        from safetensors.torch import load_file

        path = Path(norm_dir) / NORM_FILE
        if not path.exists():
            raise DataError(f"{path}: missing; run the normalize stage first")

        t = load_file(path)
        hooks = [k[: -len(".scale")] for k in t if k.endswith(".scale")]
        return cls(GroupDict({h: t[f"{h}.mean"] for h in hooks}), GroupDict({h: t[f"{h}.scale"] for h in hooks}),
                   t["val_instances"], GroupDict({h: t[f"{h}.raw_mean"] for h in hooks}), sha256_file(path))

    def to(self, device: torch.device | str) -> "Normalization":
        """This normalisation with its statistics on ``device`` (a copy; itself when they are there
        already). The split stays on the CPU, where the loader reads it."""
        device = torch.device(device)
        if all(t.device == device for t in self.mean.values()):
            return self

        def moved(table: dict) -> GroupDict:
            return GroupDict({h: t.to(device) for h, t in table.items()})

        return Normalization(moved(self.mean), moved(self.scale), self.val_instances, moved(self.raw_mean), self.digest)

    def apply(self, hook: str, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean[hook]) / self.scale[hook]

    def invert(self, hook: str, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale[hook] + self.mean[hook]


def summary_of(norm_dir: Path) -> dict:
    return read_json(Path(norm_dir) / NORM_JSON)
