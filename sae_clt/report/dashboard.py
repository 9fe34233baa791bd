"""The offline feature dashboard: reports/<id>/features/ from the analysis outputs.

Reads runs/experiments/<id>/analysis/{stats.safetensors, examples.json} and metrics/<id>/analysis.json
and writes a static site that opens from ``file://`` with no network: ``index.html``, ``app.js``,
``style.css`` (copied from ``sae_clt/report/dashboard/``) and the data as JavaScript files that hand
their payload to ``SAE.load(...)``, because browsers refuse ``fetch()`` of local JSON:

- ``data/index.js``: the table of all latents, one array per column, loaded with the page;
- ``data/chunk_NNN.js``: everything a feature page needs (histogram, examples, decoder dims,
  neighbours, co-firing partners, output tokens, ablation effects) for a block of ``CHUNK``
  consecutive features, loaded by injecting a ``<script>`` tag when one of them is opened;
- ``data/inst_NNN.js``: the subject instances the examples show (text windows, TSP cities and
  tours, tensor inputs), ``BUCKET`` instances a file, each stored once however many examples use it.

How the size stays bounded (≤ 25 MB for 3,072 latents with the defaults: top 20 + 10 quantile
examples, windows of ±8): arrays instead of dicts per row or example; every float rounded to
4 significant digits (3 for coordinates); an example's window activations stored as a flat list of
(position offset, activation in thousandths of the feature's max) integer pairs, nonzero ones only;
instances shared between examples and features; nothing but the table loaded up front. A feature
costs about 5 KB when every position of every window fires (the worst case), so 3,072 latents with
2,000 distinct 64-token text windows measure 16.6 MB (tests/test_dashboard.py checks < 25 MB); the
tiny TSP pipeline's 64 latents take 0.12 MB.

The output is a function of the inputs alone (no timestamps, fixed ordering), so rebuilding gives
byte-identical files. Corpus text is written as JSON strings and inserted by app.js as text nodes,
never parsed as HTML.
"""

from __future__ import annotations

import json
import math
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..io import atomic_write_text, read_json
from .headline import headline_effect

CHUNK = 64  # features per chunk file
BUCKET = 64  # instances per instance file
DATA_FILES = ("dashboard/index.html", "dashboard/app.js", "dashboard/style.css")  # the static assets (DVC dependencies)
STATS_KEYS = ("frequency", "magnitude", "max_activation", "score", "in_band", "hist_counts", "neighbours",
              "neighbour_cosine", "decoder_dims", "decoder_values", "cofire_features", "cofire_counts")


def _r(value: float, digits: int = 4) -> float | int | None:
    """``value`` rounded to ``digits`` significant digits, as an int when it is one (shorter JSON)."""
    value = float(value)
    if not math.isfinite(value):
        return None
    rounded = float(f"{value:.{digits}g}")
    return int(rounded) if rounded.is_integer() and abs(rounded) < 1e15 else rounded


def _js(kind: str, number: int, payload: Any) -> str:
    """A data file: one call handing ``payload`` to the page. ``<`` is escaped so no corpus text can
    close a script element, and U+2028/2029 so older engines parse the string literal."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    text = text.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return f'SAE.load("{kind}",{number},{text});\n'


def load_stats(path: Path) -> dict[str, list]:
    """The arrays of stats.safetensors the dashboard uses, as Python lists."""
    from safetensors.torch import load_file

    if not path.exists():
        raise DataError(f"{path} is missing: run the analyze stage first")
    tensors = load_file(path)
    missing = [k for k in STATS_KEYS if k not in tensors]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)} (see docs/formats.md for the analysis files)")
    stats = {k: tensors[k].tolist() for k in STATS_KEYS}
    n = len(stats["frequency"])
    for key in ("magnitude", "max_activation", "score", "in_band", "hist_counts"):
        if len(stats[key]) != n:
            raise DataError(f"{path}: {key} has {len(stats[key])} rows, frequency has {n}")
    return stats


def _band_of(stats: dict, low: float, i: int) -> int:
    """0 below the band, 1 in it, 2 above it (the stats' in_band decides membership)."""
    if stats["in_band"][i]:
        return 1
    return 0 if stats["frequency"][i] < low else 2


def _search_text(examples: list, instances: dict, kind: str) -> str:
    """The firing tokens of a feature's top examples (text subjects), for the table's search."""
    if kind != "text":
        return ""
    seen: list[str] = []
    for ex in examples:
        if ex[0] != "top":
            continue
        view = instances.get(str(ex[2]), {})
        tokens, start = view.get("tokens", []), view.get("start", 0)
        at = ex[3] - start
        if 0 <= at < len(tokens) and tokens[at] not in seen:
            seen.append(tokens[at])
    return "\n".join(seen[:20])


def effect_column(ablations: list[dict], n: int) -> tuple[str | None, list]:
    """The table's ablation column: the headline effect's name (one for every row) and its value
    per latent (None where the latent was not ablated)."""
    headline = next((name for a in ablations if (name := headline_effect(a.get("effects", {})))), None)
    effect = [None] * n
    for a in ablations:
        value = a.get("effects", {}).get(headline)
        if isinstance(value, (int, float)) and 0 <= a["feature"] < n:
            effect[a["feature"]] = _r(value)
    return headline, effect


def _index_payload(eid: str, stats: dict, examples: dict, metrics: dict) -> dict:
    n = len(stats["frequency"])
    band = metrics.get("band", {})
    low = float(band.get("low", 0.0))
    headline, effect = effect_column(metrics.get("ablations") or [], n)
    features, instances, kind = examples["features"], examples["instances"], examples["subject_kind"]
    return {
        "experiment": eid, "kind": kind, "latents": n, "chunk": CHUNK, "bucket": BUCKET,
        "window": examples.get("window"), "rows": metrics.get("rows"), "alive_fraction": metrics.get("alive_fraction"),
        "band": {"low": band.get("low"), "high": band.get("high"), "count": band.get("count")},
        "effect_name": headline,
        "interventions": metrics.get("interventions") or [],
        "score": [_r(v) for v in stats["score"]], "frequency": [_r(v) for v in stats["frequency"]],
        "magnitude": [_r(v) for v in stats["magnitude"]], "max": [_r(v) for v in stats["max_activation"]],
        "band_of": [_band_of(stats, low, i) for i in range(n)], "effect": effect,
        "text": [_search_text(features[i], instances, kind) for i in range(n)],
    }


def _cofire_partners(stats: dict, top: int = 10) -> dict[int, list]:
    """For each feature of the co-firing set: its partners by shared firing rows,
    as [partner, rows both fire, fraction of this feature's firing rows]."""
    feats, counts = stats["cofire_features"], stats["cofire_counts"]
    partners = {}
    for a, f in enumerate(feats):
        own = counts[a][a]
        pairs = sorted(((counts[a][b], g) for b, g in enumerate(feats) if b != a and counts[a][b] > 0),
                       key=lambda t: (-t[0], t[1]))[:top]
        partners[f] = [[g, c, _r(c / own if own else 0.0, 3)] for c, g in pairs]
    return partners


def _example(ex: list, inst_index: dict[str, int], peak: float) -> list:
    """[quantile (-1 = top), row, instance index, position, activation, [offset, thousandths, ...]]."""
    kind, row, inst, pos, act, window = ex
    band = -1 if kind == "top" else int(str(kind).lstrip("q"))
    flat: list[int] = []
    for p, a in window:
        if a:
            flat += [int(p) - int(pos), round(1000 * float(a) / peak) if peak > 0 else 0]
    return [band, int(row), inst_index[str(inst)], int(pos), _r(act), flat]


def _ablation_by_feature(metrics: dict) -> dict[int, dict]:
    return {a["feature"]: a.get("effects", {}) for a in metrics.get("ablations") or []}


def _feature_payload(f: int, stats: dict, examples: dict, inst_index: dict, extra: dict) -> dict:
    peak = float(stats["max_activation"][f]) or 1.0
    logit = examples.get("logit_effects")
    return {
        "hist": stats["hist_counts"][f],
        "ex": [_example(ex, inst_index, peak) for ex in examples["features"][f]],
        "dec": [[d, _r(v)] for d, v in zip(stats["decoder_dims"][f], stats["decoder_values"][f]) if d >= 0],
        "nb": [[g, _r(c, 3)] for g, c in zip(stats["neighbours"][f], stats["neighbour_cosine"][f]) if g >= 0],
        "co": extra["cofire"].get(f),
        "logit": _logit_payload(logit[f]) if logit else None,
        "ablation": extra["ablations"].get(f),
    }


def _logit_payload(entry: dict | None) -> dict | None:
    if not entry:
        return None
    return {side: [[str(t), _r(v)] for t, v in entry.get(side, [])] for side in ("promoted", "suppressed")}


def _instance_payload(view: dict, kind: str) -> dict:
    """The instance view with its floats rounded (coordinates to 3 digits)."""
    out = dict(view)
    if kind == "tsp" and "coords" in view:
        out["coords"] = [[_r(x, 3), _r(y, 3)] for x, y in view["coords"]]
    if kind == "tensor" and "values" in view:
        out["values"] = [_r(v) for v in view["values"]]
    return out


def _sort_key(instance_id: str) -> tuple:
    return (0, int(instance_id), "") if instance_id.lstrip("-").isdigit() else (1, 0, instance_id)


def _validate_examples(examples: dict, n: int, path: Path) -> None:
    for key in ("subject_kind", "instances", "features"):
        if key not in examples:
            raise DataError(f"{path} lacks the key {key!r} (see docs/formats.md for the analysis files)")
    if len(examples["features"]) != n:
        raise DataError(f"{path} lists examples for {len(examples['features'])} features, stats.safetensors has {n}")
    unknown = {str(ex[2]) for exs in examples["features"] for ex in exs} - set(examples["instances"])
    if unknown:
        raise DataError(f"{path}: examples refer to instances with no view: {sorted(unknown)[:5]}")


def _write_data(data_dir: Path, index: dict, stats: dict, examples: dict, metrics: dict) -> list[Path]:
    kind, n = examples["subject_kind"], index["latents"]
    order = sorted(examples["instances"], key=_sort_key)
    inst_index = {iid: i for i, iid in enumerate(order)}
    written = [data_dir / "index.js"]
    atomic_write_text(written[0], _js("index", 0, index))
    extra = {"cofire": _cofire_partners(stats), "ablations": _ablation_by_feature(metrics)}
    for c in range(0, n, CHUNK):
        payload = [_feature_payload(f, stats, examples, inst_index, extra) for f in range(c, min(c + CHUNK, n))]
        written.append(data_dir / f"chunk_{c // CHUNK:03d}.js")
        atomic_write_text(written[-1], _js("chunk", c // CHUNK, payload))
    for b in range(0, len(order), BUCKET):
        payload = [[iid, _instance_payload(examples["instances"][iid], kind)] for iid in order[b:b + BUCKET]]
        written.append(data_dir / f"inst_{b // BUCKET:03d}.js")
        atomic_write_text(written[-1], _js("inst", b // BUCKET, payload))
    return written


SHOWN_AS = {"text": "tokens in context shaded by the feature's activation",
            "tsp": "TSP instances (the policy's tour, every city coloured by the activation, the firing city ringed)",
            "tensor": "the input's values"}


def analysis_present(analysis_dir: Path, metrics_path: Path) -> bool:
    """Whether the analyze stage's outputs that the dashboard reads exist."""
    return all(p.exists() for p in (analysis_dir / "stats.safetensors", analysis_dir / "examples.json", metrics_path))


def build_dashboard(eid: str, analysis_dir: Path, metrics_path: Path, out_dir: Path) -> dict:
    """Write the dashboard of experiment ``eid`` into ``out_dir`` (replacing an earlier one).
    Returns what the report says of it: files written, latents, in_band, band, effect, shown_as.
    Raises DataError when an analysis file is missing or malformed."""
    stats = load_stats(analysis_dir / "stats.safetensors")
    examples_path = analysis_dir / "examples.json"
    if not examples_path.exists():
        raise DataError(f"{examples_path} is missing: run the analyze stage first")
    if not metrics_path.exists():
        raise DataError(f"{metrics_path} is missing: run the analyze stage first")
    examples, metrics = read_json(examples_path), read_json(metrics_path)
    _validate_examples(examples, len(stats["frequency"]), examples_path)
    index = _index_payload(eid, stats, examples, metrics)
    if out_dir.exists():
        shutil.rmtree(out_dir)  # no stale chunk files from a wider dictionary
    (out_dir / "data").mkdir(parents=True)
    written = []
    assets = resources.files("sae_clt.report") / "dashboard"
    for name in DATA_FILES:
        written.append(out_dir / Path(name).name)
        atomic_write_text(written[-1], (assets / Path(name).name).read_text(encoding="utf-8"))
    written += _write_data(out_dir / "data", index, stats, examples, metrics)
    band = index["band"]
    return {"files": written, "latents": index["latents"], "in_band": index["band_of"].count(1),
            "band": f"[{_pct(band['low'])}, {_pct(band['high'])}]" if band["low"] is not None else "",
            "effect": index["effect_name"], "shown_as": SHOWN_AS.get(index["kind"], "the subject's inputs")}


def _pct(value: float) -> str:
    return f"{100 * float(value):.3g} %"


def dashboard_size(out_dir: Path) -> int:
    """Total bytes of the dashboard's files."""
    return sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
