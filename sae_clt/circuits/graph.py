"""A trace written out: reports/traces/<up>--<down>/trace.json (nodes and links), trace.md (a table
per downstream feature) and trace.svg (the strongest edges drawn).

Deterministic like the reports: the same dictionaries and rows give byte-identical files.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..io import atomic_write_text, write_json
from ..report.render import svg_text
from .trace import Link, Trace


def _r(value: float, digits: int = 4) -> float:
    return float(f"{float(value):.{digits}g}")


def downstream_features(trace: Trace, n: int) -> list[int]:
    """The ``n`` highest-scoring downstream features that fire on the traced rows."""
    order = torch.sort(-trace.score, stable=True).indices.tolist()
    return [j for j in order if trace.fires[j] > 0][:n]


def document(up_id: str, down_id: str, at: Link, trace: Trace, n_features: int, n_inputs: int) -> dict:
    """trace.json: per shown downstream feature its parts and its strongest upstream inputs; and the
    same as a graph of nodes (upstream features, downstream features, one error node each) and links."""
    features, nodes, links = [], {}, []
    for j in downstream_features(trace, n_features):
        column = trace.from_features[:, j]
        order = torch.sort(-column.abs(), stable=True).indices[:n_inputs].tolist()
        pre = float(trace.mean_pre[j])
        inputs = [{"feature": i, "contribution": _r(column[i]), "share": _r(column[i] / pre) if pre else None,
                   "upstream_frequency": _r(trace.upstream_fires[i] / trace.rows)} for i in order if column[i] != 0]
        features.append({
            "feature": j, "frequency": _r(trace.frequency[j]), "mean_activation": _r(trace.mean_activation[j]),
            "mean_pre_activation": _r(pre), "from_upstream": _r(column.sum()), "from_error": _r(trace.from_error[j]),
            "error_rms": _r(trace.error_rms[j]),
            "from_bias": _r(trace.from_bias[j]), "inputs": inputs})
        down_node = f"{down_id}/{j}"
        nodes[down_node] = {"id": down_node, "dictionary": down_id, "feature": j, "kind": "feature"}
        for e in inputs:
            up_node = f"{up_id}/{e['feature']}"
            nodes.setdefault(up_node, {"id": up_node, "dictionary": up_id, "feature": e["feature"], "kind": "feature"})
            links.append({"source": up_node, "target": down_node, "weight": e["contribution"]})
        error_node = f"{up_id}/error->{j}"
        nodes[error_node] = {"id": error_node, "dictionary": up_id, "feature": None, "kind": "error"}
        links.append({"source": error_node, "target": down_node, "weight": _r(trace.from_error[j])})
    return {"upstream": up_id, "downstream": down_id, "hook_point": at.hook_point, "rows": trace.rows,
            "space": "normalised (the dataset's per-dim mean and scale at the hook point)",
            "features": features, "nodes": list(nodes.values()), "links": links}


def table(doc: dict) -> str:
    """The per-feature table (markdown; also what `saeclt trace` prints)."""
    up, down = doc["upstream"], doc["downstream"]
    lines = [f"| `{down}` feature | fires | pre-activation | strongest `{up}` inputs | all `{up}` features | error (rms) | bias |",
             "|---|---|---|---|---|---|---|"]
    for f in doc["features"]:
        inputs = ", ".join(f"{e['feature']} {e['contribution']:+.3g}" + (f" ({100 * e['share']:.0f} %)" if e["share"] is not None else "")
                           for e in f["inputs"]) or "-"
        lines.append(f"| {f['feature']} | {100 * f['frequency']:.1f} % | {f['mean_pre_activation']:.3g} | {inputs} | "
                     f"{f['from_upstream']:+.3g} | {f['from_error']:+.3g} ({f['error_rms']:.3g}) | {f['from_bias']:+.3g} |")
    return "\n".join(lines)


def markdown(doc: dict) -> str:
    up, down = doc["upstream"], doc["downstream"]
    return "\n".join([
        f"# `{up}` → `{down}` at `{doc['hook_point']}`", "",
        f"Each row: a feature of `{down}` (by score, on {doc['rows']:,} held-out rows), its mean pre-activation on "
        f"the rows where it fires, and the parts that make it up exactly: features of `{up}` (activation × "
        f"virtual weight; share of the pre-activation in brackets), `{up}`'s reconstruction error (its mean, and in brackets its root mean square: the mean of a noise-like error cancels), biases.", "",
        table(doc), "", "![the strongest edges](trace.svg)", ""])


def picture(doc: dict, n_edges: int = 4) -> str:
    """Upstream features on the left, downstream ones on the right, each downstream feature's
    ``n_edges`` strongest inputs drawn (blue raises it, red lowers it; width ∝ |contribution|)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "saeclt", "svg.fonttype": "none", "font.size": 8})
    edges = [(e["feature"], f["feature"], e["contribution"]) for f in doc["features"] for e in f["inputs"][:n_edges]]
    right = [f["feature"] for f in doc["features"]]
    strength: dict[int, float] = {}
    for i, _, w in edges:
        strength[i] = strength.get(i, 0.0) + abs(w)
    # each upstream feature beside the weighted mean height of the features it feeds (fewer crossings)
    pull: dict[int, float] = {}
    for i, j, w in edges:
        pull[i] = pull.get(i, 0.0) + abs(w) * right.index(j)
    left = sorted(strength, key=lambda i: (pull[i] / strength[i] if strength[i] else 0.0, i))
    height = max(len(left), len(right), 2)
    fig, ax = plt.subplots(figsize=(6.5, 0.9 + 0.22 * height))
    y_left = {i: 1 - (n + 0.5) / len(left) for n, i in enumerate(left)}
    y_right = {j: 1 - (n + 0.5) / len(right) for n, j in enumerate(right)}
    top = max((abs(w) for *_, w in edges), default=1.0) or 1.0
    for i, j, w in edges:
        ax.plot([0, 1], [y_left[i], y_right[j]], color="#1f77b4" if w > 0 else "#d62728", lw=0.3 + 3.0 * abs(w) / top,
                alpha=0.75, solid_capstyle="round")
    ax.scatter([0] * len(left), list(y_left.values()), s=14, color="#444", zorder=3)
    ax.scatter([1] * len(right), list(y_right.values()), s=14, color="#444", zorder=3)
    for i, y in y_left.items():
        ax.annotate(str(i), (0, y), xytext=(-6, 0), textcoords="offset points", ha="right", va="center")
    for j, y in y_right.items():
        ax.annotate(str(j), (1, y), xytext=(6, 0), textcoords="offset points", ha="left", va="center")
    ax.set_xlim(-0.25, 1.25)
    ax.set_ylim(0, 1)
    ax.axis("off")
    ax.set_title(f"{doc['upstream']} features  →  {doc['downstream']} features (at {doc['hook_point']})")
    fig.tight_layout()
    return svg_text(fig)


def write_trace(out: Path, doc: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "trace.json", doc)
    atomic_write_text(out / "trace.svg", picture(doc))
    atomic_write_text(out / "trace.md", markdown(doc))
