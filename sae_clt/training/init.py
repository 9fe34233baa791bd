"""A new dictionary for an experiment, initialised from the data; and resampling of dead latents."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..data.loader import PairLoader
from ..data.normalize import Normalization
from ..data.store import ActivationStore
from ..dictionaries.architectures import architecture
from ..dictionaries.dictionary import Dictionary, DictionaryConfig
from ..errors import PipelineError
from ..spec.models import ExperimentSpec


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
    if architecture(m.architecture).layered and len({store.hook_dims[h] for h in [*spec.source, *spec.target]}) != 1:
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


def initialise(model: Dictionary, spec: ExperimentSpec, loader: PairLoader) -> None:
    """Data-based initialisation where the spec asks for it: one sample of training rows serves
    the decoder bias (mean / geometric median), the latents (train.init: data) and the
    activation's own parameters (e.g. JumpReLU thresholds at the data's quantiles)."""
    cfg = spec.train
    init = cfg.init if cfg.init != "auto" else model.cfg.act.default_init  # transpose: the dictionary's own start
    act_init = model.cfg.act.wants_data_init(spec.model)
    if not (init == "data" or cfg.b_dec_init != "zeros" or act_init):
        return
    x0, y0 = sample_rows(loader, model.cfg.d_sae, cfg.seed)
    if init == "data" or cfg.b_dec_init != "zeros":
        with torch.no_grad():
            if cfg.b_dec_init == "mean":
                model.b_dec.copy_(y0.mean(0))
            elif cfg.b_dec_init == "geometric_median":
                model.b_dec.copy_(geometric_median(y0))
        if init == "data":
            model.init_from_data(x0, y0)
    if act_init:  # after any data init: it sees the initial encoder's outputs
        model.cfg.act.init_from_data(model, x0, spec.model)


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
    pre = model.pre_acts(x)
    y_hat = model.decode(model.activate(pre, training=True), x)
    err = ((y - y_hat) ** 2).sum(-1).double()
    gen = torch.Generator().manual_seed(seed)
    weights = err**2 / (err**2).sum().clamp_min(1e-30)
    # Distinct rows: latents aimed at the same row would fire together and overshoot it.
    distinct = idx.numel() <= int((weights > 0).sum())
    # (drawn on the CPU, where the generator is, whatever the device)
    rows = torch.multinomial(weights.cpu(), idx.numel(), replacement=not distinct, generator=gen).to(x.device)
    x_in = x[rows] - model.b_dec if model.cfg.apply_b_dec_to_input else x[rows]
    residual = y[rows] - y_hat[rows]
    # Scaled so the new latent's activation on its row is that row's residual norm (alone, it would
    # remove the residual exactly there); for top-k kinds at most the k-th largest live
    # pre-activation of that row, so that it takes the last slot there rather than outshining the
    # live latents on rows it does not fit (uncapped, from a transposed-decoder start, resampling
    # took FVU from 0.8 to 8.9 on the spot).
    target = residual.norm(dim=1)
    live = ~dead
    if model.cfg.act.uses_k and int(live.sum()) >= model.cfg.k:
        kth = pre[rows][:, live].topk(model.cfg.k, dim=1).values[:, -1]
        target = torch.where(kth > 0, torch.minimum(target, kth), target)
    scale = target / x_in.norm(dim=1).clamp_min(1e-8) ** 2
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
    if model.cfg.layout.layered:
        model.W_dec[idx] = F.normalize(model.W_dec[idx], dim=1)
    rows_since_fired[idx] = 0  # a fresh latent gets the full window to fire
    return int(idx.numel())
