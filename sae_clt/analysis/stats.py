"""One pass over the analysed rows, then every per-latent statistic exactly from sparse codes.

The pass encodes each batch and keeps only the nonzero activations as (row, feature, value)
entries, in row order (rows x L0 entries: a TopK dictionary has at most k per row). After the
pass everything is vectorised over those entries: frequency, magnitude, max, the magnitude x
sqrt(frequency) score, the frequency band, histograms, top and quantile rows, co-firing counts.
The decoder statistics (neighbours by cosine, largest target dims) read the decoder in raw
activation space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import DataError
from ..progress import progress_bar
from ..stages.inputs import available_memory

# Peak bytes per kept entry: row, feature (int32) and value (float32) while collecting, plus the
# int64 orderings and gathered copies made afterwards.
BYTES_PER_ENTRY = 48
ROW_CHUNK = 16_384  # rows per co-firing block (float32 counts stay exact)
FEATURE_CHUNK = 1_024  # decoder rows per neighbour block


@dataclass
class SparseCodes:
    """The nonzero activations of the analysed rows, in row order (then feature order)."""

    rows: torch.Tensor  # int64 [nnz]
    features: torch.Tensor  # int64 [nnz]
    values: torch.Tensor  # float32 [nnz], all > 0
    row_instance: torch.Tensor  # int64 [R]
    row_position: torch.Tensor  # int64 [R]
    n_features: int

    @property
    def n_rows(self) -> int:
        return int(self.row_instance.numel())


def memory_budget() -> int:
    """Bytes the sparse codes may use: half the memory available now (8 GiB where unknown)."""

    available = available_memory()
    return (available if available is not None else 16 << 30) // 2


def _too_many(entries: int, rows: int, budget: int, where: str) -> DataError:
    return DataError(f"{where}: the analysis would keep about {entries:,} nonzero activations of {rows:,} rows "
                     f"(~{entries * BYTES_PER_ENTRY / 2**30:.1f} GiB, more than the {budget / 2**30:.1f} GiB it may use); "
                     "set analyze.rows in the spec to analyse fewer validation rows")


@torch.no_grad()
def collect_codes(model, loader, max_rows: int | None, desc: str, where: str = "analyze",
                  budget: int | None = None) -> SparseCodes:
    """Encode the loader's rows (the first ``max_rows`` of them when set) once, keeping the nonzero
    activations. Refuses (naming analyze.rows) when they would not fit in ``budget`` bytes."""
    total = loader.rows_per_epoch if max_rows is None else min(max_rows, loader.rows_per_epoch)
    budget = memory_budget() if budget is None else budget
    if model.cfg.act.exact_k and total * model.cfg.k * BYTES_PER_ENTRY > budget:  # known before reading a row
        raise _too_many(total * model.cfg.k, total, budget, where)
    rows, features, values, instances, positions = [], [], [], [], []
    seen = kept = 0
    with progress_bar(math.ceil(total / loader.batch_size), desc=desc, unit="batch") as bar:
        for x, _, instance_id, position in loader.epoch(0, with_provenance=True):
            if seen >= total:
                break
            take = min(x.shape[0], total - seen)
            z = model.encode(x[:take].to(model.W_enc.device))  # on the dictionary's device; what is kept comes back
            fires = z > 0
            where_nz = fires.nonzero().cpu()  # row-major: rows ascending, then features
            kept += where_nz.shape[0]
            if kept * BYTES_PER_ENTRY > budget:
                raise _too_many(kept * total // (seen + take), total, budget, where)
            rows.append((where_nz[:, 0] + seen).int())
            features.append(where_nz[:, 1].int())
            values.append(z[fires].cpu())
            instances.append(instance_id[:take].long())
            positions.append(position[:take].long())
            seen += take
            bar.update(1)
    if seen == 0:
        raise DataError(f"{where}: the validation split has no rows to analyse")
    def cat(parts, dtype):
        return torch.cat(parts).to(dtype)

    return SparseCodes(cat(rows, torch.long), cat(features, torch.long), cat(values, torch.float32),
                       cat(instances, torch.long), cat(positions, torch.long), model.cfg.d_sae)


def basic_stats(codes: SparseCodes, band: tuple[float, float]) -> dict[str, torch.Tensor]:
    """frequency, magnitude (mean over firing rows, 0 if never), max, score, in_band, and the
    firing counts."""
    n = codes.n_features
    counts = torch.bincount(codes.features, minlength=n)
    sums = torch.bincount(codes.features, weights=codes.values.double(), minlength=n)
    frequency = counts.double() / codes.n_rows
    magnitude = torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums))
    peak = torch.zeros(n).scatter_reduce(0, codes.features, codes.values, "amax", include_self=True)
    score = magnitude * frequency.sqrt()
    frequency, magnitude, score = frequency.float(), magnitude.float(), score.float()
    in_band = (frequency >= band[0]) & (frequency <= band[1])
    return {"frequency": frequency, "magnitude": magnitude, "max_activation": peak, "score": score,
            "in_band": in_band.to(torch.uint8), "counts": counts}


def feature_order(codes: SparseCodes) -> torch.Tensor:
    """Entry indices grouped by feature (ascending), each group by value descending, equal values
    lower row first (the entries start in row order and both sorts are stable)."""
    by_value = torch.sort(-codes.values, stable=True).indices
    by_feature = torch.sort(codes.features[by_value], stable=True).indices
    return by_value[by_feature]


def _group_starts(counts: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts, 0) - counts


def top_rows(codes: SparseCodes, order: torch.Tensor, counts: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each feature's ``n`` highest activations, descending: rows [F, n] (-1 padding), values (0 padding)."""
    j = torch.arange(n)
    valid = j[None, :] < counts[:, None]
    idx = torch.where(valid, _group_starts(counts)[:, None] + j[None, :], 0)
    return _gather(codes, order, idx, valid)


def quantile_rows(codes: SparseCodes, order: torch.Tensor, counts: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One row per band: each feature's nonzero activations sorted ascending and split into ``q``
    equal-count bands (band i: ascending ranks [i c / q, (i + 1) c / q)); the band's middle element
    (the lower of two). Rows [F, q], -1 where a band is empty (fewer than q firing rows)."""
    c = counts[:, None]
    i = torch.arange(q)[None, :]
    lo, hi = i * c // q, (i + 1) * c // q
    valid = hi > lo
    ascending_rank = lo + (hi - lo - 1).clamp_min(0) // 2
    idx = torch.where(valid, _group_starts(counts)[:, None] + (c - 1 - ascending_rank), 0)  # groups are descending
    return _gather(codes, order, idx, valid)


def _gather(codes: SparseCodes, order: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if order.numel() == 0:
        return torch.full(idx.shape, -1, dtype=torch.long), torch.zeros(idx.shape)
    entry = order[idx]
    rows = torch.where(valid, codes.rows[entry], -1)
    values = torch.where(valid, codes.values[entry], 0.0)
    return rows, values


def histograms(codes: SparseCodes, peak: torch.Tensor, bins: int) -> torch.Tensor:
    """int32 [F, bins]: linear bins on (0, max] per feature (bin b holds (b/bins, (b+1)/bins] x max)."""
    scaled = codes.values.double() / peak[codes.features].double() * bins
    b = (torch.ceil(scaled).long() - 1).clamp(0, bins - 1)
    flat = torch.bincount(codes.features * bins + b, minlength=codes.n_features * bins)
    return flat.reshape(codes.n_features, bins).int()


def cofiring(codes: SparseCodes, score: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``m`` features with the highest score (ties: lower index first) and int64 [m, m] counts of
    the rows where both fire (diagonal: the rows where each fires)."""
    m = min(m, codes.n_features)
    chosen = torch.sort(-score, stable=True).indices[:m]
    slot = torch.full((codes.n_features,), -1, dtype=torch.long)
    slot[chosen] = torch.arange(m)
    s = slot[codes.features]
    keep = s >= 0
    rows, s = codes.rows[keep], s[keep]  # still in row order
    counts = torch.zeros(m, m, dtype=torch.long)
    for start in range(0, codes.n_rows, ROW_CHUNK):
        lo, hi = torch.searchsorted(rows, torch.tensor([start, start + ROW_CHUNK])).tolist()
        if hi == lo:
            continue
        block = torch.zeros(min(ROW_CHUNK, codes.n_rows - start), m)
        block[rows[lo:hi] - start, s[lo:hi]] = 1.0
        counts += (block.t() @ block).round().long()
    return chosen, counts


def decoder_neighbours(decoder: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each decoder row's ``k`` nearest other rows by cosine, highest first: indices int64 [F, k],
    cosines float32 [F, k]. A zero row (a latent training removed) has no direction: it is no
    one's neighbour and its own neighbours are -1 (cosine 0)."""
    n = decoder.shape[0]
    k = min(k, n - 1)
    norms = decoder.float().norm(dim=1, keepdim=True)
    unit = decoder.float() / norms.clamp_min(1e-12)
    zero = norms[:, 0] == 0
    idx, cos = torch.zeros(n, k, dtype=torch.long), torch.zeros(n, k)
    for start in range(0, n, FEATURE_CHUNK):
        stop = min(start + FEATURE_CHUNK, n)
        sims = unit[start:stop] @ unit.t()
        sims[:, zero] = -math.inf
        sims[torch.arange(stop - start), torch.arange(start, stop)] = -math.inf  # not its own neighbour
        best = sims.topk(k, dim=1)
        idx[start:stop], cos[start:stop] = best.indices, best.values
    none = zero[:, None] | torch.isinf(cos)
    return idx.masked_fill(none, -1), cos.masked_fill(none, 0.0)


def decoder_top_dims(decoder: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each decoder row's ``d`` largest-magnitude target dims: indices int64 [F, d], signed weights."""
    d = min(d, decoder.shape[1])
    idx = decoder.abs().topk(d, dim=1).indices
    return idx, decoder.gather(1, idx).float()


def raw_decoder(model) -> torch.Tensor:
    """Decoder rows [F, d_out] in raw activation space: saeclt keeps W_dec in the target's
    normalised space, x_norm = (x - mean) / scale, so a direction maps to raw space times scale
    (a clt's rows are its per-layer decoders side by side)."""
    return (model.W_dec.detach().double() * model.target_scale.double()[None, :]).float().cpu()


def feature_stats(codes: SparseCodes, decoder: torch.Tensor, cfg) -> dict[str, torch.Tensor]:
    """Every tensor of stats.safetensors (docs/formats.md) from the codes and the raw decoder;
    ``cfg`` is the spec's analyze section."""
    out = basic_stats(codes, tuple(cfg.band))
    counts = out.pop("counts")
    order = feature_order(codes)
    out["hist_counts"] = histograms(codes, out["max_activation"], cfg.bins)
    out["top_rows"], out["top_values"] = top_rows(codes, order, counts, cfg.top_n)
    out["quantile_rows"], out["quantile_values"] = quantile_rows(codes, order, counts, cfg.quantiles)
    out["cofire_features"], out["cofire_counts"] = cofiring(codes, out["score"], cfg.cofire_top)
    out["neighbours"], out["neighbour_cosine"] = decoder_neighbours(decoder, cfg.neighbours)
    out["decoder_dims"], out["decoder_values"] = decoder_top_dims(decoder, cfg.decoder_dims)
    out["row_instance"], out["row_position"] = codes.row_instance, codes.row_position
    return out
