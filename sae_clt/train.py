"""Stage `train`: fit a dictionary on the training split of a dataset.

Recipe (defaults in spec.TrainSection): Adam with a linear warm-up and a linear decay to zero,
encoder initialised as the decoder transpose, unit-norm decoder rows (gradient along each row
removed, rows renormalised after each step), loss = MSE (summed over dims, mean over rows)
+ l1_coeff · Σ|z|·‖W_dec‖ + aux_coeff · AuxK (topk: dead latents model the residual).
Curves go to one TSV per metric (columns step, <name>), which `dvc plots` renders.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from .activations import activation
from .dictionary import Dictionary, DictionaryConfig
from .errors import PipelineError
from .io import atomic_write_text, read_json, save_safetensors, write_json
from .metrics import fvu_batch
from .normalize import Normalization, PairLoader
from .progress import progress_bar
from .provenance import output_meta
from .spec import ExperimentSpec, spec_hash
from .stages.table import stage
from .store import ActivationStore
from .tracking import WandbRun

TRAIN_SECTIONS = list(stage("train").sections)  # what the dictionary depends on
CURVES = ("loss", "mse", "aux_loss", "fvu", "l0", "dead_fraction", "lr")
FIRING = "firing_frequency"  # per-latent firing frequency in a step's batch (a tensor, for the usage histogram)
# Usage histogram bins: silent, then firing frequencies in decades.
USAGE_BINS = ("silent", "below_1e-4", "1e-4_to_1e-3", "1e-3_to_1e-2", "1e-2_to_1e-1", "above_1e-1")


def make_dictionary(spec: ExperimentSpec, store: ActivationStore, norm: Normalization) -> Dictionary:
    m = spec.model
    cfg = DictionaryConfig(
        architecture=m.architecture,
        d_in=store.hook_dims[spec.source_key],
        d_out=store.hook_dims[spec.target_key],
        d_sae=m.d_sae * spec.n_layers,  # clt: d_sae features per layer
        activation=m.activation,
        k=m.k,
        source=spec.source_key,
        target=spec.target_key,
        relu_ceiling=m.relu_ceiling,
        jumprelu_bandwidth=m.jumprelu_bandwidth,
        tied=m.tied_decoder,
        n_layers=spec.n_layers,
    )
    if m.architecture == "clt" and len({store.hook_dims[h] for h in [*spec.source, *spec.target]}) != 1:
        dims = {h: store.hook_dims[h] for h in [*spec.source, *spec.target]}
        raise PipelineError(f"experiment {spec.id}: a clt needs equally wide source and target layers; got {dims}")
    if cfg.tied and cfg.d_in != cfg.d_out:
        raise PipelineError(f"experiment {spec.id}: model.tied_decoder needs equal source and target sizes; "
                            f"{spec.source_key} has {cfg.d_in}, {spec.target_key} has {cfg.d_out}")
    model = Dictionary(cfg, seed=spec.train.seed)
    model.cfg.act.configure(model, m)
    src, tgt = spec.source_key, spec.target_key
    model.set_normalization(norm.mean[src], norm.scale[src], norm.mean[tgt], norm.scale[tgt])
    return model


def sample_rows(loader: PairLoader, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` distinct training rows (x, y) drawn from the start of a seeded epoch."""
    xs, ys, got = [], [], 0
    for x, y in loader.epoch(10_000 + seed, echo=False):  # echoed rows would repeat
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


def _skip_dynamo_import() -> None:
    """torch.optim.Optimizer's add_param_group, state_dict, load_state_dict and zero_grad are
    wrapped to keep torch.compile from tracing them, and the wrapper imports torch._dynamo on its
    first call: 1-3 s on a 2-core CPU, a fifth of a short training run, for a compiler saeclt
    never uses. Each wrapper caches its disabled form on the wrapped function; giving it the
    function itself skips the import. (Where torch lays this out differently nothing changes.)"""
    if "torch._dynamo" in sys.modules:
        return
    for method in ("add_param_group", "state_dict", "load_state_dict", "zero_grad"):
        inner = getattr(getattr(torch.optim.Optimizer, method, None), "__wrapped__", None)
        if inner is not None and getattr(inner, "__dynamo_disable", None) is None:
            setattr(inner, "__dynamo_disable", inner)


def make_optimizer(model: Dictionary, cfg) -> torch.optim.Optimizer:
    """adam: fused Adam (the schedule's learning rate is set each step); signum_schedule_free:
    sign descent wrapped in schedule-free averaging (EleutherAI sparsify's default recipe),
    evaluated and saved at the averaged weights."""
    _skip_dynamo_import()
    params = list(model.parameters())
    if cfg.optimizer == "adam":
        thresholds = [p for name, p in model.named_parameters() if name == "log_threshold"]
        if thresholds and cfg.jumprelu_threshold_lr_scale != 1.0:  # jumprelu: its thresholds on their own rate
            others = [p for name, p in model.named_parameters() if name != "log_threshold"]
            params = [{"params": others}, {"params": thresholds, "lr_scale": cfg.jumprelu_threshold_lr_scale}]
        return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    try:
        from schedulefree import ScheduleFreeWrapper
    except ImportError:
        raise PipelineError("train.optimizer signum_schedule_free needs the schedulefree package (pip install schedulefree)") from None

    class SignDescent(torch.optim.Optimizer):
        """Steepest descent in the max norm: every weight moves by lr along its gradient's sign."""

        def __init__(self, params, lr):
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad.sign(), alpha=-group["lr"])

    opt = ScheduleFreeWrapper(SignDescent(params, cfg.lr), momentum=cfg.beta1)
    opt.train()
    return opt


def uses_fast_step(spec: ExperimentSpec) -> bool:
    """The fast step covers TopK and BatchTopK SAEs and transcoders without L1 or Matryoshka terms."""
    m, t = spec.model, spec.train
    return (t.step == "fast" and activation(m.activation).fast_step and m.architecture in ("sae", "transcoder")
            and t.l1_coeff == 0 and not m.matryoshka_prefixes and not m.tied_decoder and t.unit_norm_decoder
            and t.decoder_l1_coeff == 0 and t.decoder_l2_coeff == 0 and t.group_lasso_coeff == 0)


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """0 → 1 linearly over ``warmup`` steps, then a half cosine from 1 down to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class UsageKL:
    """Usage regularisation: the mean over latents of KL(target ‖ p_i) between Bernoulli firing
    rates. p_i mixes the running (hard) firing frequency with this batch's soft one,
    mean_b σ((pre_bi - θ_i) / T), so the gradient reaches silent latents through their
    pre-activations (θ = 0 for relu kinds, the learned threshold for jumprelu)."""

    def __init__(self, d_sae: int, target: float, decay: float, temperature: float):
        self.frequency = torch.full((d_sae,), target, dtype=torch.float64)  # starts at the target: no early push
        self.target, self.decay, self.temperature = target, decay, temperature

    def loss(self, model: Dictionary, pre: torch.Tensor) -> torch.Tensor:
        theta = model.cfg.act.firing_threshold(model)
        soft = torch.sigmoid((pre - theta) / self.temperature).mean(0)
        p = (self.decay * self.frequency.to(soft.dtype) + (1 - self.decay) * soft).clamp(1e-6, 1 - 1e-6)
        t = self.target
        return (t * torch.log(t / p) + (1 - t) * torch.log((1 - t) / (1 - p))).mean()

    def update(self, fired_fraction: torch.Tensor) -> None:
        self.frequency.mul_(self.decay).add_(fired_fraction.double(), alpha=1 - self.decay)


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
            self.rows.setdefault(name, [f"step\t{name}"]).append(f"{step}\t{value:.6g}")

    def add_usage(self, step: int, frequency: torch.Tensor) -> None:
        """One row of the usage histogram (how many latents fire at each order of frequency)."""
        bins = torch.bucketize(frequency.double(), torch.tensor([1e-4, 1e-3, 1e-2, 1e-1], dtype=torch.float64), right=True) + 1
        bins[frequency == 0] = 0
        counts = torch.bincount(bins, minlength=len(USAGE_BINS)).tolist()
        rows = self.rows.setdefault("usage_histogram", ["step\t" + "\t".join(USAGE_BINS)])
        rows.append(f"{step}\t" + "\t".join(str(c) for c in counts))

    def flush(self) -> None:
        for name, lines in self.rows.items():
            atomic_write_text(self.folder / f"{name}.tsv", "\n".join(lines) + "\n")


def checkpoint_fingerprint(spec: ExperimentSpec, store: ActivationStore, norm: Normalization) -> str:
    """What a checkpoint was trained under, all of which must be unchanged to resume it: the
    experiment's training sections, the store (its manifest: shards and their checksums, the
    dataset spec's subject and collect sections), the normalisation and split (the normalize
    section's result) and the code."""
    import hashlib

    from .provenance import code_digest

    store_digest = hashlib.sha256(json.dumps(store.manifest, sort_keys=True).encode()).hexdigest()[:16]
    return f"{spec_hash(spec, TRAIN_SECTIONS)}:store-{store_digest}:norm-{norm.digest[:16]}:code-{code_digest()}"


class TrainState:
    """Everything a resumed run needs to continue exactly where a killed one stopped: weights,
    Adam moments, the dead-latent clock, the loader position and the curves so far."""

    FILE, META = "state.safetensors", "state.json"

    def __init__(self, folder: Path, fingerprint: str):
        self.folder = Path(folder)
        self.fingerprint = fingerprint  # spec hash of the training sections: a changed spec never resumes

    def save(self, model: Dictionary, opt: torch.optim.Optimizer, rows_since_fired: torch.Tensor, step: int,
             epoch: int, batch_in_epoch: int, curves: "CurveWriter", extra: dict[str, torch.Tensor] | None = None) -> None:
        tensors = {f"model.{k}": v.detach() for k, v in model.state_dict().items()}
        opt_state = opt.state_dict()["state"]
        for idx, state in opt_state.items():
            for name, value in state.items():
                tensors[f"opt.{idx}.{name}"] = value.detach().reshape(-1) if name == "step" else value.detach()
        tensors["rows_since_fired"] = rows_since_fired
        tensors.update({f"extra.{k}": v for k, v in (extra or {}).items()})
        meta = {"fingerprint": self.fingerprint, "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                "curves": curves.rows}
        # The tensors carry their own step (one atomic file): a kill between this write and the
        # JSON's must not pair the new tensors with the previous checkpoint's step (resuming would
        # then replay steps the weights already hold). The JSON, for people and for the first
        # resume check, goes last.
        save_safetensors(self.folder / self.FILE, tensors, metadata={"checkpoint": json.dumps(meta)})
        write_json(self.folder / self.META, meta)

    def load(self, model: Dictionary, opt: torch.optim.Optimizer, rows_since_fired: torch.Tensor, curves: "CurveWriter"):
        """Restore into the given objects; returns (step, epoch, batch_in_epoch) or None."""
        from safetensors.torch import load_file

        meta_path, file = self.folder / self.META, self.folder / self.FILE
        if not meta_path.exists() or not file.exists():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                own = (f.metadata() or {}).get("checkpoint")
            meta = json.loads(own) if own else read_json(meta_path)  # (checkpoints before the tensors carried it)
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
        self.extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
        curves.rows = {k: list(v) for k, v in meta["curves"].items()}
        return meta["step"], meta["epoch"], meta["batch_in_epoch"]

    def clear(self) -> None:
        for name in (self.META, self.FILE):
            (self.folder / name).unlink(missing_ok=True)


def train(spec: ExperimentSpec, store: ActivationStore, norm: Normalization, out_dir: Path, curves_dir: Path,
          metrics_path: Path, log=print, checkpoint_dir: Path | None = None) -> dict:
    from .distributed import World

    cfg = spec.train
    if cfg.precision == "auto":
        from .precision import resolve_precision

        cfg = cfg.model_copy(update={"precision": resolve_precision(cfg.precision)})
    torch.manual_seed(cfg.seed)
    world = World.from_env()  # torchrun: each rank reads its own shards, gradients are averaged
    if cfg.batch_size % world.size:
        raise PipelineError(f"train.batch_size {cfg.batch_size} must divide evenly over {world.size} processes")
    if world.size > store.n_shards:
        raise PipelineError(f"{world.size} processes but the store of dataset '{spec.dataset}' has {store.n_shards} shards; "
                            "each process needs at least one")
    loader = PairLoader(store, norm, spec.source_key, spec.target_key, "train", cfg.batch_size // world.size, cfg.seed, drop_last=True, echo=cfg.echo,
                        shards=list(range(world.rank, store.n_shards, world.size)) if world.active else None)
    steps_per_epoch = world.min_int(loader.steps_per_epoch())  # every rank takes the same number of steps
    if steps_per_epoch == 0:
        raise PipelineError(f"train.batch_size {cfg.batch_size} exceeds the {loader.rows_per_epoch} training rows of dataset '{spec.dataset}'")
    total_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = int(cfg.warmup_frac * total_steps)

    # Model, optimiser and the state a checkpoint carries
    model = make_dictionary(spec, store, norm)
    act_init = model.cfg.act.wants_data_init(spec.model)  # e.g. JumpReLU thresholds at the data's quantiles
    if cfg.init == "data" or cfg.b_dec_init != "zeros" or act_init:  # one sample serves every data-based init
        x0, y0 = sample_rows(loader, model.cfg.d_sae, cfg.seed)
    if cfg.init == "data" or cfg.b_dec_init != "zeros":
        with torch.no_grad():
            if cfg.b_dec_init == "mean":
                model.b_dec.copy_(y0.mean(0))
            elif cfg.b_dec_init == "geometric_median":
                model.b_dec.copy_(geometric_median(y0))
        if cfg.init == "data":
            model.init_from_data(x0, y0)
    if act_init:  # after any data init: it sees the initial encoder's outputs
        model.cfg.act.init_from_data(model, x0, spec.model)
    world.broadcast_params(model)  # initialisation sampled rank-local rows: rank 0's wins
    opt = make_optimizer(model, cfg)
    rows_since_fired = torch.zeros(model.cfg.d_sae, dtype=torch.long)
    curves = CurveWriter(curves_dir, CURVES)
    step, epoch, skip = 0, 0, 0
    saved_refit: dict = {}  # decoder-refit sums of a resumed run
    saved_usage = None  # the running firing frequencies of a resumed run (usage KL)
    fast = None
    state = TrainState(checkpoint_dir, checkpoint_fingerprint(spec, store, norm)) if checkpoint_dir and cfg.checkpoint_every else None
    if world.active and state is not None:
        state.fingerprint += f":world{world.size}"  # a checkpoint resumes only with the same number of processes
    if state is not None:
        resumed = state.load(model, opt, rows_since_fired, curves)
        if resumed is not None:
            step, epoch, skip = resumed
            saved_refit = dict(getattr(state, "extra", {}))
            saved_usage = saved_refit.pop("usage_frequency", None)
            log(f"train {spec.id}: resuming from the checkpoint at step {step}")
    prefixes = tuple(spec.model.matryoshka_prefixes)
    penalty_ramp = max(1, int(cfg.l1_warmup_frac * total_steps))
    usage = UsageKL(model.cfg.d_sae, cfg.usage_target, cfg.usage_ema, cfg.usage_temperature) if cfg.usage_kl_coeff else None
    if usage is not None and saved_usage is not None:
        usage.frequency.copy_(saved_usage)
    usage_warmup = int(cfg.usage_warmup_frac * total_steps)
    tracker = WandbRun.start(spec, cfg, out_dir.parent, log) if cfg.wandb and world.is_main else None
    if uses_fast_step(spec):
        from .fast_step import FastTopKStep

        fast = FastTopKStep(model, opt, cfg, world=world if world.active else None)
        refit_from = total_steps - int(cfg.decoder_refit_frac * total_steps) if cfg.decoder_refit_frac else None
        if saved_refit:  # resumed mid-accumulation: continue from the saved sums
            from .refit import DecoderRefit

            fast.refit = DecoderRefit.from_state(saved_refit)

        def step_fn(x, y, lr, step):
            if refit_from is not None and step >= refit_from and fast.refit is None:
                from .refit import DecoderRefit

                fast.refit = DecoderRefit(model.cfg.d_sae, model.cfg.d_out)
            if fast.refit is not None:  # later codes are closer to the final encoder's: weigh them more
                fast.refit_weight = float((step - refit_from + 1) ** 2)
            fast.want_metrics = step % cfg.log_every == 0 or step == total_steps - 1
            return fast(x, y, rows_since_fired, lr)
    else:
        def step_fn(x, y, lr, step):
            return train_step(model, opt, x, y, rows_since_fired, cfg, lr=lr, prefixes=prefixes,
                              penalty_scale=min(1.0, (step + 1) / penalty_ramp), world=world if world.active else None,
                              usage=usage, usage_scale=cosine_with_warmup(step, total_steps, usage_warmup))
    resample_steps = {int(f * total_steps) for f in cfg.resample_at}
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
                if step in resample_steps:
                    n = resample_dead(model, opt, x, y, rows_since_fired >= cfg.dead_after_rows, rows_since_fired, cfg.seed + step)
                    world.broadcast_params(model)  # rank 0's resampled latents everywhere
                    log(f"train {spec.id}: step {step}: resampled {n} dead latents")
                metrics = step_fn(x, y, lr, step)
                firing = metrics.pop(FIRING, None)
                if not math.isfinite(metrics["loss"]):
                    kept = f"; the checkpoint of step {read_json(state.folder / state.META)['step']} is kept" if state and (state.folder / state.META).exists() else ""
                    raise PipelineError(f"train {spec.id}: loss became {metrics['loss']} at step {step}; lower train.lr (now {cfg.lr}){kept}")
                if step % cfg.log_every == 0 or step == total_steps - 1:
                    last = {**world.mean(metrics), "lr": lr}
                    curves.add(step, last)
                    if firing is not None:  # this rank's batch
                        curves.add_usage(step, firing)
                    if tracker is not None:
                        tracker.log(step, last, firing)
                    bar.set_postfix(fvu=f"{last['fvu']:.4f}", l0=f"{last['l0']:.1f}", dead=f"{last['dead_fraction']:.3f}")
                step += 1
                bar.update(1)
                if state is not None and world.is_main and step % cfg.checkpoint_every == 0 and step < total_steps:
                    refit = fast.refit if fast is not None else None
                    extra = dict(refit.state()) if refit is not None else {}
                    if usage is not None:
                        extra["usage_frequency"] = usage.frequency
                    state.save(model, opt, rows_since_fired, step, epoch, batch_index + 1, curves, extra=extra or None)
            epoch, skip = epoch + 1, 0

    # Outputs (rank 0): curves, the dictionary with its config, the training summary
    seconds = time.perf_counter() - started
    if hasattr(opt, "eval"):  # schedule-free: the averaged weights are the model
        opt.eval()
        if cfg.unit_norm_decoder:
            model.normalize_decoder()
    refit = fast.refit if fast is not None else None
    if refit is not None:  # every rank's codes count: sum the accumulators, solve the same system everywhere
        world.sum_(refit.gram)
        world.sum_(refit.cross)
        refit.apply(model)
    calibration = model.cfg.act.after_training(model, lambda: [x for _, (x, _) in zip(range(8), loader.epoch(0))])
    if calibration:
        world.broadcast_params(model)
    if not world.is_main:
        world.close()
        return {"steps": total_steps, "rank": world.rank}
    curves.flush()
    meta = output_meta(spec, cfg.seed, TRAIN_SECTIONS)
    model.save(out_dir, meta, extra_cfg={"dataset": spec.dataset, "steps": total_steps})
    rows_seen = total_steps * cfg.batch_size
    rate = (step - steps_at_start) * cfg.batch_size / max(seconds, 1e-9)
    # Timings vary run to run: kept beside the dictionary, not in it, so the cached output is
    # byte-identical for the same spec and seed.
    run_log = {"seconds": seconds, "rows_per_second": rate, "rows_read_per_second": rate / cfg.echo, "resumed_at_step": steps_at_start}
    if tracker is not None:
        run_log.update(tracker.finish(summary_metrics=last))
    write_json(out_dir.parent / "train_log.json", run_log)
    summary = {"steps": total_steps, "precision": cfg.precision, "rows_seen": rows_seen, "rows_read": rows_seen // cfg.echo, "final": last, "meta": meta, **calibration}
    write_json(metrics_path, summary)
    if state is not None:
        state.clear()
    log(f"trained {spec.id}: {total_steps} steps, {rate:,.0f} rows/s, last batch FVU {last.get('fvu', float('nan')):.4f}")
    world.close()
    return summary


def train_step(model: Dictionary, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               rows_since_fired: torch.Tensor, cfg, topk: bool | None = None, lr: float = 1e-3,
               penalty_scale: float = 1.0, prefixes: tuple[int, ...] = (), world=None,
               usage: UsageKL | None = None, usage_scale: float = 0.0) -> dict[str, float]:
    """One optimisation step by autograd (the reference for every architecture and activation);
    updates ``rows_since_fired`` in place; returns the step's metrics. ``penalty_scale`` ramps
    the L1 / L0 / group-lasso coefficients up; ``prefixes`` are Matryoshka prefix sizes;
    ``usage`` (with its scheduled ``usage_scale``) adds the usage KL."""
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    act = model.cfg.act

    # Forward: encoder (optionally bf16), activation, decoder
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        pre = model.pre_acts(x)  # [B, d_sae]
    pre = pre.to(model.W_dec.dtype)  # back from bf16 (fp32 master weights)
    skip = x @ model.W_skip if model.cfg.architecture == "skip_transcoder" else 0
    z = None
    indices = None
    if act.exact_k and not prefixes:
        values, indices = model.sparse_code(pre)  # [B, k] each: no dense [B, d_sae] code
        y_hat = model.decode_sparse(values, indices) + skip
        counts = torch.bincount(indices[values > 0], minlength=rows_since_fired.numel())
        fired = counts > 0
        active = values
    else:
        z = model.activate(pre, training=True)
        y_hat = z @ model.W_dec + model.b_dec + skip
        counts = (z > 0).sum(0)
        fired = counts > 0
        active = z
    l0 = float((active > 0).sum(-1).float().mean())

    # Loss: reconstruction (Matryoshka: also by each prefix of the dictionary alone)
    mse = ((y_hat - y) ** 2).sum(-1).mean()
    recon = mse
    for m in prefixes:
        y_m = z[:, :m] @ model.W_dec[:m] + model.b_dec + skip
        recon = recon + ((y_m - y) ** 2).sum(-1).mean()
    recon = recon / (1 + len(prefixes))
    # Sparsity penalty: the activation's own (L1 x decoder norms by default, L0 for JumpReLU)
    coeff, sparsity = act.penalty(model, pre, active, indices, cfg)
    penalty = coeff * penalty_scale * sparsity
    if cfg.group_lasso_coeff:
        dense = z if z is not None else torch.zeros_like(pre).scatter(-1, indices, values)
        groups = dense.reshape(dense.shape[0], -1, cfg.group_size).norm(dim=-1).sum(-1).mean()
        penalty = penalty + cfg.group_lasso_coeff * penalty_scale * groups
    if cfg.decoder_l1_coeff:
        penalty = penalty + cfg.decoder_l1_coeff * model.W_dec.abs().sum()
    if cfg.decoder_l2_coeff:
        penalty = penalty + cfg.decoder_l2_coeff * model.W_dec.square().sum()
    usage_loss = pre.new_zeros(())
    if usage is not None:
        usage_loss = usage.loss(model, pre)
        penalty = penalty + cfg.usage_kl_coeff * usage_scale * usage_loss
        usage.update(counts.double() / x.shape[0])

    # AuxK on latents silent for too long (top-k kinds); firing is combined across ranks
    if world is not None:
        fired = world.any(fired)
    rows_since_fired += x.shape[0] * (world.size if world is not None else 1)
    rows_since_fired[fired] = 0
    dead = rows_since_fired >= cfg.dead_after_rows
    use_aux = act.aux_k and cfg.aux_k
    aux = aux_k_loss(model, pre, y - y_hat, dead, cfg.aux_k) if use_aux else pre.new_zeros(())
    loss = recon + penalty + cfg.aux_coeff * aux
    if not torch.isfinite(loss):
        return {"loss": float(loss.detach())}

    # Backward and update, keeping decoder rows at unit norm
    opt.zero_grad(set_to_none=True)
    loss.backward()
    model.enforce_structure(grads=True)  # clt: nothing moves outside the layer structure
    if world is not None:
        world.average_grads(model.parameters())
    if cfg.unit_norm_decoder:
        model.remove_parallel_grad()
    if cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    if cfg.unit_norm_decoder:
        model.normalize_decoder()
    metrics = {"loss": float(loss.detach()), "mse": float(mse.detach()), "aux_loss": float(aux.detach()),
               "fvu": fvu_batch(y, y_hat.detach()), "l0": l0, "dead_fraction": float(dead.double().mean()),
               "penalty": float(penalty.detach())}
    if usage is not None:
        metrics["usage_kl"] = float(usage_loss.detach())
    metrics[FIRING] = counts.double() / x.shape[0]
    return metrics


def geometric_median(points: torch.Tensor, iterations: int = 64) -> torch.Tensor:
    """Weiszfeld's algorithm in float64, started at the mean."""
    points = points.double()
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(1e-8)
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - median).norm() < 1e-7 * (1 + median.norm()):
            median = new
            break
        median = new
    return median.float()


@torch.no_grad()
def resample_dead(model: Dictionary, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, dead: torch.Tensor,
                  rows_since_fired: torch.Tensor, seed: int) -> int:
    """Re-initialise dead latents towards rows the dictionary reconstructs worst (drawn with
    probability ∝ squared error): encoder column along the row's input, scaled so the latent's
    activation there is the residual's norm; decoder row along the residual; bias zero; Adam
    moments reset. Returns how many."""
    idx = dead.nonzero().squeeze(1)
    if idx.numel() == 0:
        return 0
    y_hat = model.decode(model.activate(model.pre_acts(x), training=True), x)
    err = ((y - y_hat) ** 2).sum(-1).double()
    gen = torch.Generator().manual_seed(seed)
    weights = err**2 / (err**2).sum().clamp_min(1e-30)
    # Distinct rows: latents aimed at the same row would fire together and overshoot it.
    distinct = idx.numel() <= int((weights > 0).sum())
    rows = torch.multinomial(weights, idx.numel(), replacement=not distinct, generator=gen)
    x_in = x[rows] - model.b_dec if model.cfg.apply_b_dec_to_input else x[rows]
    residual = y[rows] - y_hat[rows]
    # Scaled so the new latent's activation on its row equals that row's residual norm: alone,
    # it would remove the residual exactly there.
    scale = residual.norm(dim=1) / x_in.norm(dim=1).clamp_min(1e-8) ** 2
    if not model.cfg.tied:  # tied: the decoder row below is the encoder column too
        model.W_enc[:, idx] = (x_in * scale[:, None]).t()
    model.b_enc[idx] = 0
    model.W_dec[idx] = F.normalize(residual, dim=1)
    reset = [(model.b_enc, idx), (model.W_dec, idx)] + ([] if model.cfg.tied else [(model.W_enc, (slice(None), idx))])
    for param, index in reset:
        state = opt.state.get(param, {})
        for name in ("exp_avg", "exp_avg_sq"):
            if name in state:
                state[name][index] = 0
    model.enforce_structure()  # clt: a resampled latent reads and writes only its layers
    if model.cfg.architecture == "clt":
        model.W_dec[idx] = F.normalize(model.W_dec[idx], dim=1)
    rows_since_fired[idx] = 0  # a fresh latent gets the full window to fire
    return int(idx.numel())
