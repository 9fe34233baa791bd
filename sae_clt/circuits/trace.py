"""Feature-to-feature edges between two dictionaries in series: an upstream dictionary that writes
the hook point a downstream one reads (a transcoder from layer 0 to layer 2, then an SAE at
layer 2; a CLT's layer-2 output, then a transcoder from layer 2 on).

With the upstream dictionary's reconstruction standing in for the activation at that point,
every downstream pre-activation splits exactly into parts, in the store's normalised space
(the two dictionaries share it: one dataset, one hook point):

    y      = z_up @ W_dec_up + b_dec_up [+ x_up @ W_skip_up] + err       (the shared activation)
    pre_j  = (y - b_dec_down·[sae]) @ W_enc_down[:, j] + b_enc_down[j]
           = Σ_i z_up[i] · V[i, j]  +  bias_j  +  err @ W_enc_down[:, j],   V = W_dec_up @ W_enc_down

``z_up[i] · V[i, j]`` is upstream feature i's contribution to downstream feature j on one row
(its activation times the virtual weight); ``err`` is what the upstream dictionary misses (the
error node), ``bias_j`` the biases and the skip path. Averaged over the held-out rows on which
feature j fires, the parts add up to j's mean pre-activation there, so each edge's share of it
is exact, not an estimate. No subject computation lies between the two dictionaries, so no
perturbation is needed to trust the edges; paths through the subject's own layers are not traced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..data.hook_groups import HookGroup
from ..data.loader import PairLoader
from ..data.normalize import Normalization
from ..data.store import ActivationStore
from ..dictionaries.dictionary import Dictionary
from ..errors import DataError, SpecError
from ..progress import progress_bar
from ..spec.models import ExperimentSpec

MAX_PAIRS = 64 << 20  # upstream x downstream latents as float64 sums (512 MiB each; ~1.5 GiB at the peak)


@dataclass
class Link:
    """Where the upstream dictionary's output meets the downstream one's input."""

    hook_point: str
    columns: slice  # the upstream decoder's columns that write it (one member of a CLT's targets)


@dataclass
class Trace:
    """Sums over the rows on which each downstream feature fires, divided by their count: each
    part of its mean pre-activation there."""

    rows: int
    fires: torch.Tensor  # [F_down] rows on which each downstream feature fires
    mean_activation: torch.Tensor  # [F_down] its mean activation over those rows
    mean_pre: torch.Tensor  # [F_down] its mean pre-activation over those rows
    from_features: torch.Tensor  # [F_up, F_down] upstream feature i's mean contribution
    from_error: torch.Tensor  # [F_down] the upstream reconstruction error's
    error_rms: torch.Tensor  # [F_down] the error's part, root mean square over those rows (its mean may cancel)
    from_bias: torch.Tensor  # [F_down] the biases' (and the upstream skip path's)
    upstream_fires: torch.Tensor  # [F_up] rows on which each upstream feature fires

    @property
    def frequency(self) -> torch.Tensor:
        return self.fires.double() / self.rows

    @property
    def score(self) -> torch.Tensor:
        """mean activation × √frequency (seed 003's ranking, as the analysis ranks features)."""
        return self.mean_activation * self.frequency.sqrt()


def link(up_spec: ExperimentSpec, down_spec: ExperimentSpec, up: Dictionary, down: Dictionary) -> Link:
    """Check that ``up`` writes what ``down`` reads; errors name both specs' fields (exit code 2)."""
    where = f"{up_spec.id} -> {down_spec.id}"
    if up_spec.id == down_spec.id:
        raise SpecError(where, [f"{where}: a dictionary traced into itself; give the one that writes the hook point, "
                                "then the one that reads it"])
    if up_spec.dataset != down_spec.dataset:
        raise SpecError(where, [f"{where}: dataset: '{up_spec.dataset}' and '{down_spec.dataset}' differ; the two dictionaries "
                                "must read the same rows (one dataset)"])
    source = HookGroup(down_spec.source)
    targets = HookGroup(up_spec.target).members
    if source.is_group:
        raise SpecError(where, [f"{where}: {down_spec.id}.source: '{source}' is several hook points; the downstream "
                                "dictionary must read one (an SAE or a transcoder)"])
    if source not in targets:
        raise SpecError(where, [f"{where}: {down_spec.id}.source '{source}' is not what {up_spec.id} writes "
                                f"({up_spec.id}.target: {', '.join(targets)}); trace a dictionary into one that reads its output"])
    width = up.cfg.d_out // len(targets)
    if width != down.cfg.d_in:
        raise DataError(f"{where}: {up_spec.id} writes {width} dims at '{source}', {down_spec.id} reads {down.cfg.d_in}")
    at = targets.index(source) * width
    columns = slice(at, at + width)
    same = (torch.allclose(up.target_scale[columns], down.source_scale) and torch.allclose(up.target_mean[columns], down.source_mean))
    if not same:
        raise DataError(f"{where}: the dictionaries were trained on different normalisations of '{source}' "
                        "(retrain one of them on the current dataset)")
    if up.cfg.d_sae * down.cfg.d_sae > MAX_PAIRS:
        raise DataError(f"{where}: {up.cfg.d_sae:,} x {down.cfg.d_sae:,} feature pairs are more than {MAX_PAIRS:,} to hold")
    return Link(str(source), columns)


@torch.no_grad()
def trace(up: Dictionary, down: Dictionary, up_spec: ExperimentSpec, down_spec: ExperimentSpec, store: ActivationStore,
          norm: Normalization, max_rows: int | None = 4096, batch_size: int = 1024) -> tuple[Link, Trace]:
    """The parts of each downstream feature's pre-activation over the first ``max_rows`` held-out
    rows (all of them when None), summed in float64."""
    at = link(up_spec, down_spec, up, down)
    up, down = up.float().eval(), down.float().eval()
    W_dec = up.W_dec[:, at.columns]
    W_enc = down.W_enc
    V = W_dec @ W_enc  # [F_up, F_down] virtual weights
    bias = (up.b_dec[at.columns] - (down.b_dec if down.cfg.apply_b_dec_to_input else 0.0)) @ W_enc + down.b_enc
    f_up, f_down = up.cfg.d_sae, down.cfg.d_sae
    f64 = dict(dtype=torch.float64)
    co = torch.zeros(f_up, f_down, **f64)  # Σ over rows of z_up[i] · [j fires]
    fires, act_sum, pre_sum = torch.zeros(f_down, **f64), torch.zeros(f_down, **f64), torch.zeros(f_down, **f64)
    err_sum, err_sq, bias_sum = torch.zeros(f_down, **f64), torch.zeros(f_down, **f64), torch.zeros(f_down, **f64)
    up_fires = torch.zeros(f_up, **f64)
    loader = PairLoader(store, norm, up_spec.source_key, at.hook_point, "val", batch_size, seed=0, shuffle=False)
    total = loader.rows_per_epoch if max_rows is None else min(max_rows, loader.rows_per_epoch)
    seen = 0
    with progress_bar(math.ceil(total / batch_size), desc=f"trace {up_spec.id} -> {down_spec.id}", unit="batch") as bar:
        for x, y in loader.epoch(0):
            if seen >= total:
                break
            take = min(x.shape[0], total - seen)
            x, y = x[:take], y[:take]
            z = up.encode(x)  # [b, F_up]
            y_hat = z @ W_dec + up.b_dec[at.columns]
            row_bias = bias
            if up.cfg.layout.skip_path:
                skip = x @ up.W_skip[:, at.columns]
                y_hat = y_hat + skip
                row_bias = bias + skip @ W_enc  # [b, F_down]
            pre = down.pre_acts(y)  # [b, F_down]
            act = down.activate(pre)
            on = (act > 0).to(torch.float32)
            co += (z.t() @ on).double()
            fires += on.sum(0).double()
            act_sum += (act * on).sum(0).double()
            pre_sum += (pre * on).sum(0).double()
            err_part = (y - y_hat) @ W_enc
            err_sum += (err_part * on).sum(0).double()
            err_sq += (err_part.square() * on).sum(0).double()
            bias_sum += (row_bias * on).sum(0).double() if row_bias.dim() == 2 else row_bias.double() * on.sum(0).double()
            up_fires += (z > 0).sum(0).double()
            seen += take
            bar.update(1)
    if seen == 0:
        raise DataError(f"trace {up_spec.id} -> {down_spec.id}: the validation split has no rows")
    per_row = fires.clamp_min(1)
    return at, Trace(seen, fires.long(), act_sum / per_row, pre_sum / per_row, co * V.double() / per_row,
                     err_sum / per_row, (err_sq / per_row).sqrt(), bias_sum / per_row, up_fires.long())
