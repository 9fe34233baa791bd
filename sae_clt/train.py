"""Stage `train`: fit a dictionary on the training split of a dataset.

Recipe (defaults in spec.TrainSection): Adam with a linear warm-up and a linear decay to zero,
encoder initialised as the decoder transpose, unit-norm decoder rows (gradient along each row
removed, rows renormalised after each step), loss = MSE (summed over dims, mean over rows)
+ l1_coeff · Σ|z|·‖W_dec‖ + aux_coeff · AuxK (topk: dead latents model the residual).
Curves go to one TSV per metric (columns step, <name>), which `dvc plots` renders.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from .dictionary import Dictionary, DictionaryConfig
from .errors import PipelineError
from .io import atomic_write_text, read_json, save_safetensors, write_json
from .metrics import fvu_batch
from .normalize import Normalization, PairLoader
from .progress import progress_bar
from .provenance import output_meta
from .spec import ExperimentSpec, spec_hash
from .store import ActivationStore

TRAIN_SECTIONS = ["dataset", "source", "target", "model", "train"]
CURVES = ("loss", "mse", "aux_loss", "fvu", "l0", "dead_fraction", "lr")


def make_dictionary(spec: ExperimentSpec, store: ActivationStore, norm: Normalization) -> Dictionary:
    cfg = DictionaryConfig(
        architecture=spec.model.architecture,
        d_in=store.hook_dims[spec.source],
        d_out=store.hook_dims[spec.target],
        d_sae=spec.model.d_sae,
        activation=spec.model.activation,
        k=spec.model.k,
        source=spec.source,
        target=spec.target,
    )
    model = Dictionary(cfg, seed=spec.train.seed)
    model.set_normalization(norm.mean[spec.source], norm.scale[spec.source], norm.mean[spec.target], norm.scale[spec.target])
    return model


def sample_rows(loader: PairLoader, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` distinct training rows (x, y) drawn from the start of a seeded epoch."""
    xs, ys, got = [], [], 0
    for x, y in loader.epoch(10_000 + seed):
        xs.append(x)
        ys.append(y)
        got += x.shape[0]
        if got >= n:
            break
    x, y = torch.cat(xs), torch.cat(ys)
    if x.shape[0] < n:  # fewer rows than latents: reuse rows (their latents start identical)
        idx = torch.arange(n) % x.shape[0]
        return x[idx], y[idx]
    return x[:n], y[:n]


def lr_factor(step: int, total: int, warmup: int, decay: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if decay == "constant":
        return 1.0
    return max(0.0, (total - step) / max(1, total - warmup))


def aux_k_loss(model: Dictionary, pre: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor, aux_k: int) -> torch.Tensor:
    """AuxK: the top-``aux_k`` dead latents (by pre-activation) reconstruct the main residual;
    normalised by the residual's variance so its scale does not drift with training."""
    dead_idx = dead.nonzero().squeeze(1)
    if dead_idx.numel() == 0 or aux_k == 0:
        return pre.new_zeros(())
    k = min(aux_k, dead_idx.numel())
    pre_dead = pre[:, dead_idx]  # [B, n_dead]: only the dead columns
    values, local = pre_dead.topk(k, dim=-1, sorted=False)
    # Dense decode over the dead rows: one [B, n_dead] @ [n_dead, d_out] matmul is far cheaper
    # than a gather of B * aux_k decoder rows and its scatter-add backward.
    z = torch.zeros_like(pre_dead).scatter(-1, local, torch.relu(values))
    recon = z @ model.W_dec[dead_idx]
    target = residual.detach()
    return ((recon - target) ** 2).sum(-1).mean() / ((target - target.mean(0)) ** 2).sum(-1).mean().clamp_min(1e-12)


class CurveWriter:
    """One TSV per metric under ``folder`` (columns: step, <metric>), rewritten atomically."""

    def __init__(self, folder: Path, names: tuple[str, ...]):
        self.folder = Path(folder)
        self.rows: dict[str, list[str]] = {name: [f"step\t{name}"] for name in names}

    def add(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.rows[name].append(f"{step}\t{value:.6g}")

    def flush(self) -> None:
        for name, lines in self.rows.items():
            atomic_write_text(self.folder / f"{name}.tsv", "\n".join(lines) + "\n")


class TrainState:
    """Everything a resumed run needs to continue exactly where a killed one stopped: weights,
    Adam moments, the dead-latent clock, the loader position and the curves so far."""

    FILE, META = "state.safetensors", "state.json"

    def __init__(self, folder: Path, fingerprint: str):
        self.folder = Path(folder)
        self.fingerprint = fingerprint  # spec hash of the training sections: a changed spec never resumes

    def save(self, model: Dictionary, opt: torch.optim.Optimizer, rows_since_fired: torch.Tensor, step: int,
             epoch: int, batch_in_epoch: int, curves: "CurveWriter") -> None:
        tensors = {f"model.{k}": v.detach() for k, v in model.state_dict().items()}
        opt_state = opt.state_dict()["state"]
        for idx, state in opt_state.items():
            for name, value in state.items():
                tensors[f"opt.{idx}.{name}"] = value.detach().reshape(-1) if name == "step" else value.detach()
        tensors["rows_since_fired"] = rows_since_fired
        save_safetensors(self.folder / self.FILE, tensors)
        # The JSON goes last: a checkpoint counts only once its JSON names the step it holds.
        write_json(self.folder / self.META, {"fingerprint": self.fingerprint, "step": step, "epoch": epoch,
                                             "batch_in_epoch": batch_in_epoch, "curves": curves.rows})

    def load(self, model: Dictionary, opt: torch.optim.Optimizer, rows_since_fired: torch.Tensor, curves: "CurveWriter"):
        """Restore into the given objects; returns (step, epoch, batch_in_epoch) or None."""
        from safetensors.torch import load_file

        meta_path, file = self.folder / self.META, self.folder / self.FILE
        if not meta_path.exists() or not file.exists():
            return None
        try:
            meta = read_json(meta_path)
            tensors = load_file(file)
        except Exception:  # noqa: BLE001 - a damaged checkpoint is discarded, never trusted
            return None
        if meta.get("fingerprint") != self.fingerprint:
            return None
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        state = opt.state_dict()
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, idx, name = key.split(".", 2)
                state["state"].setdefault(int(idx), {})[name] = value.reshape(()) if name == "step" else value
        opt.load_state_dict(state)
        rows_since_fired.copy_(tensors["rows_since_fired"])
        curves.rows = {k: list(v) for k, v in meta["curves"].items()}
        return meta["step"], meta["epoch"], meta["batch_in_epoch"]

    def clear(self) -> None:
        for name in (self.META, self.FILE):
            (self.folder / name).unlink(missing_ok=True)


def train(spec: ExperimentSpec, store: ActivationStore, norm: Normalization, out_dir: Path, curves_dir: Path,
          metrics_path: Path, log=print, checkpoint_dir: Path | None = None) -> dict:
    cfg = spec.train
    torch.manual_seed(cfg.seed)
    loader = PairLoader(store, norm, spec.source, spec.target, "train", cfg.batch_size, cfg.seed, drop_last=True)
    steps_per_epoch = loader.steps_per_epoch()
    if steps_per_epoch == 0:
        raise PipelineError(f"train.batch_size {cfg.batch_size} exceeds the {loader.rows_per_epoch} training rows of dataset '{spec.dataset}'")
    total_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = int(cfg.warmup_frac * total_steps)

    # Model, optimiser and the state a checkpoint carries
    model = make_dictionary(spec, store, norm)
    if cfg.init == "data":
        x0, y0 = sample_rows(loader, spec.model.d_sae, cfg.seed)
        model.init_from_data(x0, y0)
    opt = torch.optim.Adam([model.W_enc, model.b_enc, model.W_dec, model.b_dec], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    rows_since_fired = torch.zeros(spec.model.d_sae, dtype=torch.long)
    curves = CurveWriter(curves_dir, CURVES)
    step, epoch, skip = 0, 0, 0
    state = TrainState(checkpoint_dir, spec_hash(spec, TRAIN_SECTIONS)) if checkpoint_dir and cfg.checkpoint_every else None
    if state is not None:
        resumed = state.load(model, opt, rows_since_fired, curves)
        if resumed is not None:
            step, epoch, skip = resumed
            log(f"train {spec.id}: resuming from the checkpoint at step {step}")
    topk = spec.model.activation == "topk"
    if topk and cfg.step == "fast" and cfg.l1_coeff == 0:
        from .fast_step import FastTopKStep

        fast = FastTopKStep(model, opt, cfg)

        def step_fn(x, y, lr):
            return fast(x, y, rows_since_fired, lr)
    else:
        def step_fn(x, y, lr):
            return train_step(model, opt, x, y, rows_since_fired, cfg, topk, lr)
    started, steps_at_start = time.perf_counter(), step
    last = {}

    with progress_bar(total_steps, desc=f"train {spec.id}", unit="step") as bar:
        bar.update(step)
        while step < total_steps:
            for batch_index, (x, y) in enumerate(loader.epoch(epoch)):
                if batch_index < skip:  # already trained on before the interruption
                    continue
                if step >= total_steps:
                    break
                lr = cfg.lr * lr_factor(step, total_steps, warmup, cfg.decay)
                metrics = step_fn(x, y, lr)
                if not math.isfinite(metrics["loss"]):
                    kept = f"; the checkpoint of step {read_json(state.folder / state.META)['step']} is kept" if state and (state.folder / state.META).exists() else ""
                    raise PipelineError(f"train {spec.id}: loss became {metrics['loss']} at step {step}; lower train.lr (now {cfg.lr}){kept}")
                if step % cfg.log_every == 0 or step == total_steps - 1:
                    last = {**metrics, "lr": lr}
                    curves.add(step, last)
                    bar.set_postfix(fvu=f"{last['fvu']:.4f}", l0=f"{last['l0']:.1f}", dead=f"{last['dead_fraction']:.3f}")
                step += 1
                bar.update(1)
                if state is not None and step % cfg.checkpoint_every == 0 and step < total_steps:
                    state.save(model, opt, rows_since_fired, step, epoch, batch_index + 1, curves)
            epoch, skip = epoch + 1, 0

    # Outputs: curves, the dictionary with its config, the training summary
    seconds = time.perf_counter() - started
    curves.flush()
    meta = output_meta(spec, cfg.seed, TRAIN_SECTIONS)
    model.save(out_dir, meta, extra_cfg={"dataset": spec.dataset, "steps": total_steps})
    rows_seen = total_steps * cfg.batch_size
    rate = (step - steps_at_start) * cfg.batch_size / max(seconds, 1e-9)
    # Timings vary run to run: kept beside the dictionary, not in it, so the cached output is
    # byte-identical for the same spec and seed.
    write_json(out_dir.parent / "train_log.json", {"seconds": seconds, "rows_per_second": rate, "resumed_at_step": steps_at_start})
    summary = {"steps": total_steps, "rows_seen": rows_seen, "final": last, "meta": meta}
    write_json(metrics_path, summary)
    if state is not None:
        state.clear()
    log(f"trained {spec.id}: {total_steps} steps, {rate:,.0f} rows/s, last batch FVU {last.get('fvu', float('nan')):.4f}")
    return summary


def train_step(model: Dictionary, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               rows_since_fired: torch.Tensor, cfg, topk: bool, lr: float) -> dict[str, float]:
    """One optimisation step; updates ``rows_since_fired`` in place; returns the step's metrics."""
    for group in opt.param_groups:
        group["lr"] = lr

    # Forward: encoder (optionally bf16), sparse code, decoder
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        pre = model.pre_acts(x)  # [B, d_sae]
    pre = pre.to(model.W_dec.dtype)  # back from bf16 (fp32 master weights)
    if topk:
        values, indices = model.sparse_code(pre)  # [B, k] each
        y_hat = model.decode_sparse(values, indices)  # [B, d_out]
        fired = torch.zeros_like(rows_since_fired, dtype=torch.bool)
        fired[indices[values > 0]] = True
        l1 = values.sum(-1).mean()
        l0 = float((values > 0).sum(-1).float().mean())
    else:
        z = torch.relu(pre)
        y_hat = model.decode(z)
        fired = (z > 0).any(0)
        l1 = (z * model.W_dec.norm(dim=1)).sum(-1).mean()
        l0 = float((z > 0).sum(-1).float().mean())

    # Loss: reconstruction + sparsity + AuxK on latents silent for too long
    rows_since_fired += x.shape[0]
    rows_since_fired[fired] = 0
    dead = rows_since_fired >= cfg.dead_after_rows
    mse = ((y_hat - y) ** 2).sum(-1).mean()
    aux = aux_k_loss(model, pre, y - y_hat, dead, cfg.aux_k) if topk and cfg.aux_k else pre.new_zeros(())
    loss = mse + cfg.l1_coeff * l1 + cfg.aux_coeff * aux
    if not torch.isfinite(loss):
        return {"loss": float(loss.detach())}

    # Backward and update, keeping decoder rows at unit norm
    opt.zero_grad(set_to_none=True)
    loss.backward()
    model.remove_parallel_grad()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    model.normalize_decoder()
    return {"loss": float(loss.detach()), "mse": float(mse.detach()), "aux_loss": float(aux.detach()),
            "fvu": fvu_batch(y, y_hat.detach()), "l0": l0, "dead_fraction": float(dead.double().mean())}
