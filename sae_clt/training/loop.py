"""Stage `train`'s work: fit a dictionary on the training split of a dataset.

Recipe (defaults in spec.TrainSection): Adam with a linear warm-up and a linear decay to zero,
unit-norm decoder rows (gradient along each row removed, rows renormalised after each step),
loss = MSE (summed over dims, mean over rows) + the activation's sparsity penalty + aux_coeff ·
AuxK (top-k kinds: dead latents model the residual). ``train`` reads top to bottom: set up the
batches, the dictionary, the optimiser and the stepper; resume a checkpoint; loop over the
batches; write the outputs.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.loader import PairLoader
from ..data.normalize import Normalization
from ..data.staging import to_device
from ..data.store import ActivationStore
from ..devices import configure_determinism, resolve_device
from ..errors import PipelineError
from ..io import read_json, write_json
from ..progress import progress_bar
from ..provenance import output_meta
from ..spec.models import ExperimentSpec
from .checkpoint import TRAIN_SECTIONS, TrainState, checkpoint_fingerprint
from .curves import CURVES, FIRING, CurveWriter
from .distributed import World
from .init import initialise, make_dictionary, resample_dead
from .optim import make_optimizer
from .precision import resolve_precision
from .schedules import lr_factor
from .step import make_stepper
from .tracking import WandbRun


@dataclass
class Position:
    """Where training stands: the next step, and the epoch and batch within it it reads next."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    last: dict = field(default_factory=dict)  # the metrics last logged
    waited: float = 0.0  # seconds the step waited for its batch (the loader not keeping up)
    gpu_busy: list = field(default_factory=list)  # GPU utilisation (%) sampled at logged steps


def train(spec: ExperimentSpec, store: ActivationStore, norm: Normalization, out_dir: Path, curves_dir: Path,
          metrics_path: Path, log=print, checkpoint_dir: Path | None = None) -> dict:
    device = resolve_device(spec.train.device, "train.device")
    cfg = spec.train.model_copy(update={"precision": resolve_precision(spec.train.precision, device.type)})
    configure_determinism(cfg.deterministic, device)
    torch.manual_seed(cfg.seed)
    world = World.from_env(device)  # torchrun: each rank reads its own shards, gradients are averaged
    loader, total_steps = _batches(spec, store, norm, cfg, world)

    # The dictionary (made and initialised on the CPU, then moved), its optimiser and the
    # dead-latent clock (rows since each latent last fired), all on the device
    model = make_dictionary(spec, store, norm)
    initialise(model, spec, loader)
    model.to(device)
    world.broadcast_params(model)  # initialisation sampled rank-local rows: rank 0's wins
    opt = make_optimizer(model, cfg)
    clock = torch.zeros(model.cfg.d_sae, dtype=torch.long, device=device)
    curves = CurveWriter(curves_dir, CURVES)

    # A checkpoint of the same inputs resumes (weights, optimiser, clock, curves, the stepper's state)
    state = TrainState(checkpoint_dir, checkpoint_fingerprint(spec, store, norm)) if checkpoint_dir and cfg.checkpoint_every else None
    if world.active and state is not None:
        state.fingerprint += f":world{world.size}"  # a checkpoint resumes only with the same number of processes
    at, saved = Position(), {}
    resumed = state.load(model, opt, clock, curves) if state is not None else None
    if resumed is not None:
        at.step, at.epoch, at.batch = resumed
        saved = dict(getattr(state, "extra", {}))
        log(f"train {spec.id}: resuming from the checkpoint at step {at.step}")
    stepper = make_stepper(spec, model, opt, cfg, clock, total_steps, world if world.active else None)
    stepper.restore(saved)
    tracker = WandbRun.start(spec, cfg, out_dir.parent, log) if cfg.wandb and world.is_main else None

    started, steps_at_start = time.perf_counter(), at.step
    _loop(spec, cfg, loader, model, opt, stepper, clock, curves, state, tracker, world, at, total_steps, log)
    seconds = time.perf_counter() - started

    # Finishing touches on every rank: schedule-free averages, the decoder refit, the activation's own
    if hasattr(opt, "eval"):  # schedule-free: the averaged weights are the model
        opt.eval()
        if cfg.unit_norm_decoder:
            model.normalize_decoder()
    stepper.finish()
    calibration = model.cfg.act.after_training(model, lambda: [x.to(device) for _, (x, _) in zip(range(8), loader.epoch(0))])
    if calibration:
        world.broadcast_params(model)
    if not world.is_main:
        world.close()
        return {"steps": total_steps, "rank": world.rank}
    rate = (at.step - steps_at_start) * cfg.batch_size / max(seconds, 1e-9)
    run_log = {"seconds": seconds, "rows_per_second": rate, "rows_read_per_second": rate / cfg.echo,
               "resumed_at_step": steps_at_start, "waited_for_batches_seconds": at.waited}
    if at.gpu_busy:
        run_log["gpu_utilisation_percent"] = sum(at.gpu_busy) / len(at.gpu_busy)
    summary = _write_outputs(spec, cfg, model, curves, out_dir, metrics_path, total_steps, at.last, calibration,
                             run_log, tracker, device)
    if state is not None:
        state.clear()
    log(f"trained {spec.id}: {total_steps} steps, {rate:,.0f} rows/s, last batch FVU {at.last.get('fvu', float('nan')):.4f}")
    world.close()
    return summary


def _batches(spec: ExperimentSpec, store: ActivationStore, norm: Normalization, cfg, world) -> tuple[PairLoader, int]:
    """The training split's batches (this rank's shards) and the number of steps to take."""
    if cfg.batch_size % world.size:
        raise PipelineError(f"train.batch_size {cfg.batch_size} must divide evenly over {world.size} processes")
    if world.size > store.n_shards:
        raise PipelineError(f"{world.size} processes but the store of dataset '{spec.dataset}' has {store.n_shards} shards; "
                            "each process needs at least one")
    loader = PairLoader(store, norm, spec.source_key, spec.target_key, "train", cfg.batch_size // world.size, cfg.seed,
                        drop_last=True, echo=cfg.echo,
                        shards=list(range(world.rank, store.n_shards, world.size)) if world.active else None)
    steps_per_epoch = world.min_int(loader.steps_per_epoch())  # every rank takes the same number of steps
    if steps_per_epoch == 0:
        raise PipelineError(f"train.batch_size {cfg.batch_size} exceeds the {loader.rows_per_epoch} training rows of dataset '{spec.dataset}'")
    return loader, max(1, math.ceil(cfg.epochs * steps_per_epoch))


def _loop(spec, cfg, loader, model, opt, stepper, clock, curves, state, tracker, world, at: Position, total_steps: int, log) -> None:
    """The training loop: one stepper call per batch, from ``at`` to ``total_steps``; logs curves
    every ``train.log_every`` steps and saves a checkpoint every ``train.checkpoint_every``."""
    device = clock.device
    warmup = int(cfg.warmup_frac * total_steps)
    resample_steps = {int(f * total_steps) for f in cfg.resample_at}
    with progress_bar(total_steps, desc=f"train {spec.id}", unit="step") as bar:
        bar.update(at.step)
        while at.step < total_steps:
            # the batches not yet trained on (a resumed run passes over the rest before they are copied)
            batches = itertools.islice(loader.epoch(at.epoch), at.batch, None)
            for batch_index, (x, y) in enumerate(timed(to_device(batches, device), at), start=at.batch):
                if at.step >= total_steps:
                    break
                step = at.step
                lr = cfg.lr * lr_factor(step, total_steps, warmup, cfg.decay)
                if step in resample_steps:
                    n = resample_dead(model, opt, x, y, clock >= cfg.dead_after_rows, clock, cfg.seed + step)
                    world.broadcast_params(model)  # rank 0's resampled latents everywhere
                    log(f"train {spec.id}: step {step}: resampled {n} dead latents")
                metrics = stepper(x, y, lr, step)
                firing = metrics.pop(FIRING, None)
                firing = firing.cpu() if firing is not None else None
                if not math.isfinite(metrics["loss"]):
                    kept = f"; the checkpoint of step {read_json(state.folder / state.META)['step']} is kept" if state and (state.folder / state.META).exists() else ""
                    raise PipelineError(f"train {spec.id}: loss became {metrics['loss']} at step {step}; lower train.lr (now {cfg.lr}){kept}")
                if step % cfg.log_every == 0 or step == total_steps - 1:
                    at.last = {**world.mean(metrics), "lr": lr}
                    curves.add(step, at.last)
                    if firing is not None:  # this rank's batch
                        curves.add_usage(step, firing)
                    if tracker is not None:
                        tracker.log(step, at.last, firing)
                    bar.set_postfix(fvu=f"{at.last['fvu']:.4f}", l0=f"{at.last['l0']:.1f}", dead=f"{at.last['dead_fraction']:.3f}")
                    busy = gpu_utilisation(device) if device.type == "cuda" else math.nan
                    if math.isfinite(busy):
                        at.gpu_busy.append(busy)
                at.step += 1
                bar.update(1)
                if state is not None and world.is_main and at.step % cfg.checkpoint_every == 0 and at.step < total_steps:
                    state.save(model, opt, clock, at.step, at.epoch, batch_index + 1, curves, extra=stepper.state() or None)
            at.epoch, at.batch = at.epoch + 1, 0


def timed(batches, at: Position):
    """``batches``, adding the time spent waiting for each to ``at.waited``."""
    iterator = iter(batches)
    while True:
        started = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        at.waited += time.perf_counter() - started
        yield batch


def gpu_utilisation(device: torch.device) -> float:
    """The GPU's utilisation now (%, NVML's figure over its last sample period); nan where NVML is missing."""
    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # noqa: BLE001 - pynvml absent or the driver refuses: not a reason to stop training
        return math.nan


def _write_outputs(spec, cfg, model, curves, out_dir: Path, metrics_path: Path, total_steps: int, last: dict,
                   calibration: dict, run_log: dict, tracker, device: torch.device) -> dict:
    """The curves, the dictionary with its config, the training summary (rank 0). Timings vary run
    to run, so they go beside the dictionary (train_log.json), not in it: the cached output is
    byte-identical for the same spec and seed."""
    curves.flush()
    meta = output_meta(spec, cfg.seed, TRAIN_SECTIONS, device)
    model.save(out_dir, meta, extra_cfg={"dataset": spec.dataset, "steps": total_steps})
    if tracker is not None:
        run_log.update(tracker.finish(summary_metrics=last))
    write_json(out_dir.parent / "train_log.json", run_log)
    rows_seen = total_steps * cfg.batch_size
    summary = {"steps": total_steps, "precision": cfg.precision, "rows_seen": rows_seen, "rows_read": rows_seen // cfg.echo,
               "final": last, "meta": meta, **calibration}
    write_json(metrics_path, summary)
    return summary
