"""A sweep's summary: one row per variant from its evaluate metrics (metrics/<id>/eval.json),
the FVU–L0 frontier, written to reports/sweeps/<sweep>/ as sweep.json, sweep.md and
frontier.svg.

Deterministic like the reports (no timings, no dates, a fixed SVG hash salt): the same metrics
give byte-identical files, so a sweep's summary diffs across commits.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import DataError
from ..io import atomic_write_text, read_json, write_json
from ..report.render import svg_text
from ..spec.project import Paths
from .grid import Variant

COLUMNS = ("fvu", "l0", "dead_fraction", "dense_fraction", "fvu_vs_linear_pct")


def _row(paths: Paths, variant: Variant) -> dict:
    path = paths.eval_metrics(variant.id)
    if not path.exists():
        raise DataError(f"{path} is missing: the variant '{variant.id}' has not been evaluated (saeclt run {variant.path})")
    metrics = read_json(path)
    rec, sparsity = metrics["reconstruction"], metrics["sparsity"]
    row = {"id": variant.id, "values": variant.values, "fvu": rec["fvu"], "l0": sparsity["l0"],
           "dead_fraction": sparsity["dead_fraction"], "dense_fraction": sparsity["dense_fraction"],
           "fvu_vs_linear_pct": metrics.get("fvu_vs_linear_pct")}
    causal = metrics.get("causal") or {}
    if causal:  # the subject's task with the reconstruction spliced in (the first metric evaluate reports)
        name = next(iter(causal))
        row["causal"] = {"metric": name, "pct_change_vs_clean": causal[name]["pct_change_vs_clean"]["dictionary"],
                         "linear_pct_change_vs_clean": causal[name]["pct_change_vs_clean"].get("linear_baseline")}
    return row


def frontier(rows: list[dict]) -> list[str]:
    """Ids of the rows no other row beats on both L0 and FVU (at most as many active latents and
    at most the FVU, one of them strictly), by increasing L0."""
    def beaten(r):
        return any(o["l0"] <= r["l0"] and o["fvu"] <= r["fvu"] and (o["l0"] < r["l0"] or o["fvu"] < r["fvu"]) for o in rows)

    return [r["id"] for r in sorted(rows, key=lambda r: (r["l0"], r["fvu"])) if not beaten(r)]


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _markdown(name: str, command: str, grid: dict, rows: list[dict], best: list[str]) -> str:
    keys = list(grid)
    causal = next((r["causal"]["metric"] for r in rows if "causal" in r), None)
    head = ["variant", *keys, "FVU", "L0", "dead", "dense", "FVU vs linear baseline %"] + ([f"{causal} change %"] if causal else []) + ["frontier"]
    lines = [f"# Sweep `{name}`", "", f"`{command}`", "",
             f"{len(rows)} variants; the frontier holds those no other variant beats on both L0 and FVU. "
             "Metrics are the evaluate stage's, on the held-out rows (metrics/<variant>/eval.json).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["id"], *(_fmt(r["values"][k]) for k in keys), _fmt(r["fvu"]), _fmt(r["l0"], 3),
                 f"{100 * r['dead_fraction']:.1f} %", f"{100 * r['dense_fraction']:.1f} %", _fmt(r["fvu_vs_linear_pct"], 3)]
        if causal:
            cells.append(_fmt(r["causal"]["pct_change_vs_clean"], 3) if "causal" in r else "n/a")
        cells.append("yes" if r["id"] in best else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![FVU against L0](frontier.svg)", ""]
    return "\n".join(lines)


def _plot(rows: list[dict], best: list[str], grid: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "saeclt", "svg.fonttype": "none", "font.size": 9})
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r["l0"] for r in rows], [r["fvu"] for r in rows], s=18, color="#888", zorder=2)
    on = [r for r in sorted(rows, key=lambda r: r["l0"]) if r["id"] in best]
    ax.plot([r["l0"] for r in on], [r["fvu"] for r in on], "-o", ms=4, lw=1.2, color="#1f77b4", zorder=3, label="frontier")
    for r in rows:
        label = ", ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v, 3)}" for k, v in r["values"].items())
        ax.annotate(label, (r["l0"], r["fvu"]), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xlabel("L0 (active latents per row, held-out)")
    ax.set_ylabel("FVU (held-out)")
    if all(r["fvu"] > 0 for r in rows) and max(r["fvu"] for r in rows) > 3 * min(r["fvu"] for r in rows):
        ax.set_yscale("log")
    ax.set_title(f"{len(rows)} variants of {', '.join(grid)}")
    ax.legend(loc="upper right")
    fig.tight_layout()
    return svg_text(fig)


def write_summary(paths: Paths, name: str, command: str, grid: dict, found: list[Variant]) -> tuple[Path, dict]:
    """reports/sweeps/<name>/{sweep.json, sweep.md, frontier.svg} from the variants' metrics.
    Returns the folder and sweep.json's content."""
    rows = [_row(paths, v) for v in found]
    best = frontier(rows)
    out = paths.root / "reports" / "sweeps" / name
    out.mkdir(parents=True, exist_ok=True)
    doc = {"sweep": name, "command": command, "grid": grid, "variants": rows, "frontier": best}
    write_json(out / "sweep.json", doc)
    atomic_write_text(out / "frontier.svg", _plot(rows, best, grid))
    atomic_write_text(out / "sweep.md", _markdown(name, command, grid, rows, best))
    return out, doc


def table(data: dict) -> str:
    """sweep.json's content as a plain text table (what `saeclt sweep` prints at the end)."""
    keys = list(data["grid"])
    head = ["variant", *(k.rsplit(".", 1)[-1] for k in keys), "FVU", "L0", "dead %", ""]
    body = [[r["id"], *(_fmt(r["values"][k]) for k in keys), _fmt(r["fvu"]), _fmt(r["l0"], 3),
             f"{100 * r['dead_fraction']:.1f}", "frontier" if r["id"] in data["frontier"] else ""] for r in data["variants"]]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *body])
