"""Examples of each feature as compact lists (docs/formats.md, "Feature analysis"):

    [kind, row, instance_id, position, activation, [[position, activation], ...]]

kind "top" or "q<i>" (quantile band i); the last list holds the same feature's nonzero
activations on the other analysed rows of the same instance within +-window positions (all of
the instance's rows when window is None), found for all examples at once.
"""

from __future__ import annotations

import torch

from .stats import SparseCodes

EXAMPLE_CHUNK = 8_192  # examples whose contexts are expanded at once (bounds the memory)


def sig(value: float, digits: int = 4) -> float:
    """``value`` rounded to ``digits`` significant digits (the shortest float that prints so)."""
    return float(f"{value:.{digits}g}")


def example_table(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every example as flat arrays, feature by feature: its top rows (descending), then its
    quantile rows (ascending bands). kind: -1 for top, i for quantile band i."""
    top, qrows = stats["top_rows"], stats["quantile_rows"]
    n, q = top.shape[1], qrows.shape[1]
    rows = torch.cat([top, qrows], dim=1)
    values = torch.cat([stats["top_values"], stats["quantile_values"]], dim=1)
    kinds = torch.cat([torch.full((n,), -1), torch.arange(q)]).expand_as(rows)
    features = torch.arange(rows.shape[0])[:, None].expand_as(rows)
    keep = rows >= 0
    return {"feature": features[keep], "row": rows[keep], "kind": kinds[keep], "value": values[keep]}


def contexts(codes: SparseCodes, table: dict[str, torch.Tensor], window: int | None) -> tuple[torch.Tensor, ...]:
    """For every example e, the entries of its context: (example index, position, value), sorted by
    example then position. The entries are sorted by the key (feature, instance, position), so each
    example's context is one run of it, found by two binary searches."""
    inst = codes.row_instance[codes.rows]
    pos = codes.row_position[codes.rows]
    n_inst = int(codes.row_instance.max()) + 1 if codes.n_rows else 1
    span = int(codes.row_position.max()) + 1 if codes.n_rows else 1
    reach = span if window is None else window
    key = (codes.features * n_inst + inst) * span + pos
    sorted_key, order = torch.sort(key)  # keys are unique: one entry per (feature, row)
    ex_row = table["row"]
    ex_pos = codes.row_position[ex_row]
    ex_base = (table["feature"] * n_inst + codes.row_instance[ex_row]) * span
    found_e, found_p, found_v = [], [], []
    for start in range(0, ex_row.numel(), EXAMPLE_CHUNK):
        sl = slice(start, start + EXAMPLE_CHUNK)
        lo = torch.searchsorted(sorted_key, ex_base[sl] + (ex_pos[sl] - reach).clamp_min(0))
        hi = torch.searchsorted(sorted_key, ex_base[sl] + (ex_pos[sl] + reach).clamp_max(span - 1), right=True)
        lengths = hi - lo
        e = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
        offset = torch.arange(e.numel()) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
        entry = order[lo[e] + offset]
        keep = codes.rows[entry] != ex_row[sl][e]  # the example's own row is not its context
        found_e.append(e[keep] + start)
        found_p.append(pos[entry[keep]])
        found_v.append(codes.values[entry[keep]])
    if not found_e:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return torch.cat(found_e), torch.cat(found_p), torch.cat(found_v)


def feature_examples(codes: SparseCodes, stats: dict[str, torch.Tensor], window: int | None) -> tuple[list[list], list[int]]:
    """(examples per feature, index = feature id; the instance ids they refer to, ascending)."""
    table = example_table(stats)
    ctx_e, ctx_p, ctx_v = contexts(codes, table, window)
    per_example = torch.bincount(ctx_e, minlength=table["row"].numel()).tolist()
    ctx_p, ctx_v = ctx_p.tolist(), ctx_v.tolist()
    features: list[list] = [[] for _ in range(codes.n_features)]
    instances = codes.row_instance[table["row"]].tolist()
    positions = codes.row_position[table["row"]].tolist()
    at = 0
    for i, (f, row, kind, value) in enumerate(zip(table["feature"].tolist(), table["row"].tolist(),
                                                  table["kind"].tolist(), table["value"].tolist())):
        n = per_example[i]
        around = [[ctx_p[j], sig(ctx_v[j])] for j in range(at, at + n)]
        at += n
        features[f].append(["top" if kind < 0 else f"q{kind}", row, instances[i], positions[i], sig(value), around])
    return features, sorted(set(instances))
