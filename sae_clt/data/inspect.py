"""`saeclt inspect`: what the dictionary will see, before training it."""

from __future__ import annotations

from pathlib import Path

import torch

from ..spec.project import resolve_experiment
from .loader import PairLoader
from .normalize import Normalization, summary_of
from .store import ActivationStore


def inspect_experiment(spec_path: Path, max_rows: int = 200_000) -> str:
    resolved = resolve_experiment(spec_path)
    exp, paths = resolved.experiment, resolved.paths
    store = ActivationStore.open(paths.store_dir(resolved.dataset.id))
    norm = Normalization.load(paths.norm_dir(resolved.dataset.id))
    summary = summary_of(paths.norm_dir(resolved.dataset.id))
    lines = [f"dataset {resolved.dataset.id}: {store.manifest['n_rows']} rows, {summary['n_instances']} instances "
             f"({summary['n_val_instances']} held out), dtype {store.manifest['dtype']}"]
    roles = [("source", h) for h in exp.source_key.members] + [("target", h) for h in exp.target_key.members]
    for role, hook in dict.fromkeys(roles):
        s = summary["train_split"][hook]
        lines.append(f"{role} {hook} (dim {store.hook_dims[hook]}): mean norm {s['mean_norm']:.4g}, "
                     f"centred RMS norm {s['centered_rms_norm']:.4g}, per-dim std min/median/max "
                     f"{s['std_min']:.3g}/{s['std_median']:.3g}/{s['std_max']:.3g}, zeros {100 * s['frac_zeros']:.2f}%")

    loader = PairLoader(store, norm, exp.source_key, exp.target_key, "train", batch_size=min(max_rows, 65536), seed=0)
    xs, ys, n = [], [], 0
    for x, y in loader.epoch(0):
        xs.append(x)
        ys.append(y)
        n += x.shape[0]
        if n >= max_rows:
            break
    x, y = torch.cat(xs)[:max_rows].double(), torch.cat(ys)[:max_rows].double()
    x, y = x - x.mean(0), y - y.mean(0)
    if exp.source_key != exp.target_key:
        # Linear predictability of the target from the source (in-sample R², with bias).
        xb = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
        w = torch.linalg.lstsq(xb, y).solution
        r2 = 1 - ((y - xb @ w) ** 2).sum() / (y**2).sum()
        lines.append(f"source -> target: linear R² {float(r2):.4f} on {x.shape[0]} training rows")
        if x.shape[1] == y.shape[1]:
            corr = (x * y).sum(0) / (x.norm(dim=0) * y.norm(dim=0)).clamp_min(1e-12)
            cos = torch.nn.functional.cosine_similarity(x, y, dim=1)
            lines.append(f"same-index dim correlation: mean {float(corr.mean()):.4f}, min {float(corr.min()):.4f}, max {float(corr.max()):.4f}; "
                         f"row cosine (centred) mean {float(cos.mean()):.4f}")
    eig = torch.linalg.eigvalsh(x.t() @ x / x.shape[0]).flip(0)
    frac = eig.cumsum(0) / eig.sum()
    lines.append(f"source effective dimension: {int((frac < 0.9).sum()) + 1} dims hold 90% of the variance, "
                 f"{int((frac < 0.99).sum()) + 1} hold 99%")
    return "\n".join(lines)
