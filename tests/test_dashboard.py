"""The offline feature dashboard (reports/<id>/features/), checked in a real headless Chromium:
it loads from file:// with no errors, lists every latent, filters and sorts through URL parameters,
shows a feature's examples drawn in the subject's terms, and renders corpus text as text."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from sae_clt.errors import DataError
from sae_clt.report.dashboard import build_dashboard, dashboard_size

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_browser = pytest.mark.skipif(CHROMIUM is None and os.environ.get("CI") != "true",
                                   reason="no Chromium on this machine (CI=true makes this a failure)")
XSS = "<script>alert(1)</script>"
IMG = '<img src=x onerror="document.title=\'pwned\'">'


# ---------- a synthetic analysis folder, written per the analysis format ----------

def _stats(F: int, R: int, gen: torch.Generator, bins: int = 8, n_top: int = 4, cofire: int = 6) -> dict:
    freq = torch.rand(F, generator=gen) * 0.5
    freq[: max(F // 10, 1)] = 0.0  # some dead latents
    mag = torch.rand(F, generator=gen) * 3 * (freq > 0)
    in_band = ((freq >= 0.01) & (freq <= 0.30)).to(torch.uint8)
    hist = torch.randint(0, 50, (F, bins), generator=gen, dtype=torch.int32) * (freq > 0).int()[:, None]
    nb = torch.stack([torch.randperm(F, generator=gen)[:3] for _ in range(F)])
    top = torch.argsort(mag * freq.sqrt(), descending=True)[:cofire]
    counts = torch.randint(0, 30, (cofire, cofire), generator=gen)
    counts = counts + counts.T
    counts.fill_diagonal_(60)
    return {
        "frequency": freq, "magnitude": mag, "max_activation": mag * 1.5, "score": mag * freq.sqrt(), "in_band": in_band,
        "hist_counts": hist, "top_rows": torch.randint(0, R, (F, n_top), generator=gen),
        "top_values": torch.rand(F, n_top, generator=gen), "quantile_rows": torch.full((F, 2), -1),
        "quantile_values": torch.zeros(F, 2), "cofire_features": top, "cofire_counts": counts.long(),
        "neighbours": nb, "neighbour_cosine": torch.rand(F, 3, generator=gen),
        "decoder_dims": torch.randint(0, 16, (F, 4), generator=gen), "decoder_values": torch.randn(F, 4, generator=gen),
        "row_instance": torch.arange(R) // 10, "row_position": torch.arange(R) % 10,
    }


def _view(kind: str, inst: int, gen: torch.Generator, n_cities: int = 10) -> dict:
    if kind == "text":
        tokens = [f" tok{inst}_{p}" for p in range(24)]
        if inst == 0:
            tokens[5], tokens[6] = XSS, IMG
        return {"tokens": tokens}
    if kind == "tsp":
        return {"coords": torch.rand(n_cities, 2, generator=gen).tolist(), "tour": torch.randperm(n_cities, generator=gen).tolist()}
    return {"values": torch.randn(12, generator=gen).tolist(), "shape": [12]}


def write_synthetic_analysis(folder: Path, kind: str, F: int = 40, n_inst: int = 12, n_examples: int = 6,
                             seed: int = 0, ablate: int = 5) -> tuple[Path, Path]:
    """stats.safetensors, examples.json and analysis.json of a made-up dictionary; every latent that
    fires gets examples (instance 0 position 5 first, for text the `<script>` token)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    stats = _stats(F, n_inst * 10, gen)
    (folder / "analysis").mkdir(parents=True)
    save_file(stats, str(folder / "analysis" / "stats.safetensors"))
    span = 24 if kind == "text" else 10
    features = []
    for f in range(F):
        exs = []
        if stats["frequency"][f] > 0:
            for j in range(n_examples):
                inst, pos = (0, 5) if j == 0 else (int(torch.randint(0, n_inst, (1,), generator=gen)), int(torch.randint(0, span, (1,), generator=gen)))
                window = [[p, round(float(torch.rand(1, generator=gen)), 3)] for p in range(max(0, pos - 3), min(span, pos + 4)) if p != pos]
                exs.append(["top" if j < n_examples // 2 else f"q{j}", inst * 10 + pos % 10, str(inst), pos,
                            float(stats["max_activation"][f]) * (1 - j / 10), window])
        features.append(exs)
    used = sorted({ex[2] for exs in features for ex in exs}, key=int)
    examples = {"subject_kind": kind, "window": 8, "instances": {i: _view(kind, int(i), gen) for i in used}, "features": features}
    if kind == "text":
        examples["logit_effects"] = [{"promoted": [[XSS, 1.5], [" the", 0.5]], "suppressed": [[" a", -1.0]]} for _ in range(F)]
    (folder / "analysis" / "examples.json").write_text(json.dumps(examples))
    order = torch.argsort(stats["score"], descending=True).tolist()
    metrics = {"rows": n_inst * 10, "latents": F, "alive_fraction": float((stats["frequency"] > 0).float().mean()),
               "band": {"low": 0.01, "high": 0.30, "count": int(stats["in_band"].sum())},
               "ablations": [{"feature": f, "score": float(stats["score"][f]),
                              "effects": {"mean_tour_length_change_pct": 0.5 * k, "decisions_changed": 0.01 * k,
                                          "top_tokens_moved": [[XSS, 0.1]]}} for k, f in enumerate(order[:ablate])],
               "interventions": [{"name": "boost", "mode": "edit", "keep_error": True,
                                  "edits": [{"feature": order[0], "op": "scale", "value": 2.0, "low": None}],
                                  "effects": {"mean_tour_length_change_pct": 1.25}}]}
    metrics_path = folder / "analysis.json"
    metrics_path.write_text(json.dumps(metrics))
    return folder / "analysis", metrics_path


# ---------- the browser ----------

class _Rows(HTMLParser):
    """Feature rows of the dumped table: [(feature, hidden)] in document order, plus every text node."""

    def __init__(self):
        super().__init__()
        self.rows, self.text, self.elements = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.elements.append((tag, a))
        if tag == "tr" and "data-f" in a:
            self.rows.append((int(a["data-f"]), "hidden" in a))

    def handle_data(self, data):
        self.text.append(data)


def dump(page: Path, query: str = "") -> tuple[str, _Rows, str]:
    """Chromium's DOM of ``page`` after its scripts ran (3 s of virtual time), the parsed rows and stderr."""
    if CHROMIUM is None:
        pytest.fail("CI=true but no Chromium on this machine: .ci/run installs it")
    url = page.resolve().as_uri() + query
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=3000", "--dump-dom", url],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    parsed = _Rows()
    parsed.feed(proc.stdout)
    return proc.stdout, parsed, proc.stderr


def console_lines(stderr: str) -> list[str]:
    """The page's console messages. Chromium logs every level as INFO:CONSOLE; app.js logs nothing,
    so any message (an uncaught error, a resource that failed to load) is a failure."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def assert_clean(dom: str, stderr: str) -> None:
    assert "data-errors" not in dom, re.search(r'data-errors="[^"]*"', dom).group(0)
    assert 'data-ready="1"' in dom, "the page never finished rendering"
    assert not console_lines(stderr), console_lines(stderr)


def _visible(rows: _Rows) -> list[int]:
    return [f for f, hidden in rows.rows if not hidden]


# ---------- the dashboard of the tiny TSP pipeline ----------

@pytest.fixture(scope="module")
def tiny_dashboard(built_project) -> Path:
    from sae_clt.spec.project import Paths

    folder = Paths(built_project).dashboard_dir("tiny_sae")
    assert (folder / "index.html").exists(), "the report stage did not build the dashboard"
    return folder


def test_report_links_the_dashboard(built_project, tiny_dashboard):
    from sae_clt.spec.project import Paths

    report = Paths(built_project).report_dir("tiny_sae")
    assert "(features/index.html)" in (report / "report.md").read_text()
    assert 'href="features/index.html"' in (report / "report.html").read_text()
    size = dashboard_size(tiny_dashboard)
    assert size < 2_000_000, size


def test_dashboard_is_offline_and_reproducible(built_project, tiny_dashboard):
    from sae_clt.stages.table import run_stage

    before = {p.relative_to(tiny_dashboard): p.read_bytes() for p in sorted(tiny_dashboard.rglob("*")) if p.is_file()}
    for path, data in before.items():
        assert b"http://" not in data and b"https://" not in data, f"{path} names a network resource"
    run_stage("report", built_project / "specs" / "tiny_sae.yaml")
    after = {p.relative_to(tiny_dashboard): p.read_bytes() for p in sorted(tiny_dashboard.rglob("*")) if p.is_file()}
    assert after == before


@needs_browser
def test_tiny_dashboard_table_and_band_filter(built_project, tiny_dashboard):
    from safetensors.torch import load_file

    from sae_clt.spec.project import Paths

    stats = load_file(Paths(built_project).analysis_dir("tiny_sae") / "stats.safetensors")
    F = stats["frequency"].numel()
    dom, rows, err = dump(tiny_dashboard / "index.html")
    assert_clean(dom, err)
    assert sorted(f for f, _ in rows.rows) == list(range(F)) and len(_visible(rows)) == F
    visible = _visible(rows)  # sorted by score, highest first
    scores = stats["score"][visible].tolist()
    assert scores == sorted(scores, reverse=True)
    dom, rows, err = dump(tiny_dashboard / "index.html", "?band=in&sort=freq#dir=asc")  # the hash adds to the query
    assert_clean(dom, err)
    expected = {f for f in range(F) if stats["in_band"][f]}
    assert set(_visible(rows)) == expected
    freqs = stats["frequency"][_visible(rows)].tolist()
    assert freqs == sorted(freqs)
    low = 0.01  # the spec's default band
    dom, rows, err = dump(tiny_dashboard / "index.html", "#band=below")
    assert set(_visible(rows)) == {f for f in range(F) if not stats["in_band"][f] and stats["frequency"][f] < low}


@needs_browser
def test_tiny_dashboard_feature_page_draws_tsp_instances(built_project, tiny_dashboard):
    from safetensors.torch import load_file

    from sae_clt.spec.project import Paths

    stats = load_file(Paths(built_project).analysis_dir("tiny_sae") / "stats.safetensors")
    f = int(torch.argmax(stats["score"]))
    dom, rows, err = dump(tiny_dashboard / "index.html", f"#feature={f}")
    assert_clean(dom, err)
    assert 'data-view="feature"' in dom and f"Feature {f}" in dom
    tsp = [a for tag, a in rows.elements if tag == "svg" and a.get("class") == "tsp"]
    firing = [a for tag, a in rows.elements if tag == "circle" and a.get("class") == "city firing"]
    assert tsp and len(firing) == len(tsp)  # one highlighted city per drawn instance
    assert any(tag == "polyline" and a.get("class") == "tour" for tag, a in rows.elements)
    assert any(tag == "svg" and a.get("class") == "hist" for tag, a in rows.elements)
    nb = int(stats["neighbours"][f, 0])  # the nearest decoder neighbour is linked
    assert any(tag == "a" and a.get("href", "").endswith(f"feature={nb}") for tag, a in rows.elements)


# ---------- synthetic analyses: text escaping, the size bound, errors ----------

@needs_browser
def test_script_tokens_render_as_text(tmp_path):
    analysis, metrics = write_synthetic_analysis(tmp_path, "text")
    out = tmp_path / "features"
    build_dashboard("synthetic", analysis, metrics, out)
    stats_f = json.loads((analysis / "examples.json").read_text())["features"]
    f = next(i for i, exs in enumerate(stats_f) if exs)
    # A page identical to index.html but for a trap set first: any alert() would mark the document.
    trap = '<script>window.alert = function () { document.documentElement.setAttribute("data-alert", "ran"); };</script>\n'
    (out / "trapped.html").write_text((out / "index.html").read_text().replace('<script src="app.js"', trap + '<script src="app.js"'))
    dom, parsed, err = dump(out / "trapped.html", f"?feature={f}")
    assert_clean(dom, err)
    assert 'data-alert="ran"' not in dom
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    assert XSS in "".join(parsed.text) and IMG in "".join(parsed.text)
    # Only the page's own two scripts and the loaded data scripts exist; the corpus made no element.
    scripts = [a.get("src", "") for tag, a in parsed.elements if tag == "script"]
    assert scripts.count("") == 1 and all(s.startswith(("app.js", "data/")) for s in scripts if s), scripts
    assert not any(tag == "img" for tag, _ in parsed.elements)
    assert "<title>pwned" not in dom
    own = re.findall(r'<span class="tok own"[^>]*>([^<]*)</span>', dom)
    assert own and own[0] == "&lt;script&gt;alert(1)&lt;/script&gt;"


@needs_browser
def test_synthetic_tensor_dashboard_search_filters_and_effects(tmp_path):
    analysis, metrics = write_synthetic_analysis(tmp_path, "tensor", F=30)
    out = tmp_path / "features"
    build_dashboard("synthetic", analysis, metrics, out)
    dom, rows, err = dump(out / "index.html", "?q=7")
    assert_clean(dom, err)
    assert _visible(rows) == [7]
    dom, rows, err = dump(out / "index.html", "?sort=effect&dir=desc&fmin=0.05&smin=0.1")
    assert_clean(dom, err)
    m = json.loads(metrics.read_text())
    from safetensors.torch import load_file

    stats = load_file(analysis / "stats.safetensors")
    expected = {f for f in range(30) if stats["frequency"][f] >= 0.05 and stats["score"][f] >= 0.1}
    assert set(_visible(rows)) == expected
    ablated = m["ablations"][1]["feature"]
    dom, rows, err = dump(out / "index.html", f"#feature={ablated}")
    assert_clean(dom, err)
    assert "decisions_changed" in dom and "Ablation effect" in dom
    assert any(tag == "span" and a.get("class") == "val" for tag, a in rows.elements)


@needs_browser
def test_the_error_checks_see_a_missing_data_file(tmp_path):
    analysis, metrics = write_synthetic_analysis(tmp_path, "tsp", F=10)
    out = tmp_path / "features"
    build_dashboard("synthetic", analysis, metrics, out)
    (out / "data" / "chunk_000.js").unlink()
    dom, _, err = dump(out / "index.html", "#feature=3")
    assert "could not load data/chunk_000.js" in dom and 'data-ready="1"' not in dom
    dom, _, err = dump(out / "index.html", "#feature=300")  # no such feature: said on the page, no error
    assert "There is no feature 300" in dom and "data-errors" not in dom
    build_dashboard("synthetic", analysis, metrics, out)
    (out / "data" / "inst_000.js").write_text("SAE.load(\"inst\", 0, undefinedName);\n")  # a script that throws
    dom, _, err = dump(out / "index.html", "#feature=3")
    assert "data-errors=" in dom and 'data-ready="1"' not in dom  # file:// masks the message as "Script error."
    assert any("Uncaught ReferenceError" in line for line in console_lines(err))


DRIVER = """
window.addEventListener("load", function () {
  var root = document.documentElement, log = [];
  function visible() { return Array.from(document.querySelectorAll("#latents-body tr:not([hidden])")).map(function (r) { return r.dataset.f; }); }
  setTimeout(function () {
    document.querySelector('th[data-key="freq"]').click();
    setTimeout(function () {
      log.push("freq:" + location.hash + ":" + visible().slice(0, 3).join(","));
      document.querySelector('th[data-key="freq"]').click();
      setTimeout(function () {
        log.push("flip:" + location.hash);
        var q = document.getElementById("f-q"); q.value = "tok3_"; q.dispatchEvent(new Event("input"));
        setTimeout(function () {
          log.push("search:" + location.hash + ":" + visible().length);
          document.querySelector("#latents-body tr:not([hidden]) td.num").click();
          setTimeout(function () { log.push("open:" + location.hash); root.setAttribute("data-driven", log.join(" | ")); }, 300);
        }, 400);
      }, 100);
    }, 100);
  }, 100);
});
"""


@needs_browser
def test_clicks_and_typing_drive_the_table(tmp_path):
    analysis, metrics = write_synthetic_analysis(tmp_path, "text", F=40)
    out = tmp_path / "features"
    build_dashboard("synthetic", analysis, metrics, out)
    (out / "driver.js").write_text(DRIVER)
    page = (out / "index.html").read_text().replace("</body>", '<script src="driver.js"></script>\n</body>')
    (out / "driven.html").write_text(page)
    dom, _, err = dump(out / "driven.html")
    assert not console_lines(err) and "data-errors" not in dom
    log = re.search(r'data-driven="([^"]*)"', dom).group(1).split(" | ")
    from safetensors.torch import load_file

    freq = load_file(analysis / "stats.safetensors")["frequency"]
    top3 = torch.argsort(freq, descending=True, stable=True)[:3].tolist()
    assert log[0] == "freq:#sort=freq:" + ",".join(map(str, top3))  # a header click sorts, highest first
    assert log[1] == "flip:#sort=freq&amp;dir=asc"  # a second click flips the order
    examples = json.loads((analysis / "examples.json").read_text())["features"]
    hits = sum(any(ex[0] == "top" and ex[2] == "3" for ex in exs) for exs in examples)
    assert log[2] == f"search:#sort=freq&amp;dir=asc&amp;q=tok3_:{hits}"  # search by the text of top tokens
    assert re.fullmatch(r"open:#sort=freq&amp;dir=asc&amp;q=tok3_&amp;feature=\d+", log[3])  # a row opens its page


def test_size_bound_for_3072_latents(tmp_path):
    """The defaults (top 20 + 10 quantiles, ±8 windows) on 3,072 text latents, every window position
    firing and 2,000 distinct 64-token instances: under 25 MB."""
    from safetensors.torch import save_file

    F, gen = 3072, torch.Generator().manual_seed(1)
    stats = _stats(F, 20_000, gen, bins=32, n_top=20, cofire=64)
    stats["decoder_dims"] = torch.randint(0, 384, (F, 8), generator=gen)
    stats["decoder_values"] = torch.randn(F, 8, generator=gen)
    stats["neighbours"], stats["neighbour_cosine"] = torch.randint(0, F, (F, 8), generator=gen), torch.rand(F, 8, generator=gen)
    (tmp_path / "analysis").mkdir()
    save_file(stats, str(tmp_path / "analysis" / "stats.safetensors"))
    insts = torch.randint(0, 2000, (F, 30), generator=gen).tolist()
    pos = torch.randint(0, 64, (F, 30), generator=gen).tolist()
    acts = [round(0.1234 + k / 7, 4) for k in range(30)]
    features = [[["top" if j < 20 else f"q{j - 20}", 31 * i + j, str(insts[f][j]), pos[f][j], acts[j],
                  [[p, acts[(p + j) % 30]] for p in range(max(0, pos[f][j] - 8), min(64, pos[f][j] + 9)) if p != pos[f][j]]]
                 for j in range(30)] for i, f in enumerate(range(F))]
    used = sorted({ex[2] for exs in features for ex in exs}, key=int)
    instances = {i: {"tokens": [f" word{(int(i) * 64 + p) % 5000}" for p in range(64)]} for i in used}
    logit = [{"promoted": [[f" up{k}", 1.234] for k in range(10)], "suppressed": [[f" down{k}", -1.234] for k in range(10)]}] * F
    (tmp_path / "analysis" / "examples.json").write_text(json.dumps(
        {"subject_kind": "text", "window": 8, "instances": instances, "features": features, "logit_effects": logit}))
    (tmp_path / "analysis.json").write_text(json.dumps({"rows": 20_000, "latents": F, "band": {"low": 0.01, "high": 0.3, "count": 1}}))
    build_dashboard("big", tmp_path / "analysis", tmp_path / "analysis.json", tmp_path / "features")
    size = dashboard_size(tmp_path / "features")
    assert size < 25_000_000, f"{size / 1e6:.1f} MB"


def test_missing_or_malformed_analysis_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="run the analyze stage"):
        build_dashboard("x", tmp_path / "analysis", tmp_path / "analysis.json", tmp_path / "features")
    analysis, metrics = write_synthetic_analysis(tmp_path, "tsp", F=10)
    examples = json.loads((analysis / "examples.json").read_text())
    examples["features"] = examples["features"][:5]
    (analysis / "examples.json").write_text(json.dumps(examples))
    with pytest.raises(DataError, match="examples for 5 features"):
        build_dashboard("x", analysis, metrics, tmp_path / "features")


def test_synthetic_dashboard_rebuilds_byte_identical(tmp_path):
    analysis, metrics = write_synthetic_analysis(tmp_path, "tsp", F=150)
    a, b = tmp_path / "a", tmp_path / "b"
    build_dashboard("s", analysis, metrics, a)
    build_dashboard("s", analysis, metrics, b)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert {"data/chunk_000.js", "data/chunk_002.js", "data/inst_000.js", "index.html"} <= {str(p) for p in files}
    assert all((a / p).read_bytes() == (b / p).read_bytes() for p in files)


TSP_EFFECTS = {"mean_tour_length": 4.0, "mean_tour_length_clean": 3.9, "mean_tour_length_change_pct": 2.5, "decisions_changed": 0.3}
LM_EFFECTS = {"cross_entropy": 3.2, "cross_entropy_clean": 3.0, "cross_entropy_change": 0.2, "kl_clean_edited": 0.4,
              "top1_agreement": 0.9, "top_tokens_moved": [["a", 0.01]]}


@pytest.mark.parametrize("effects, name, size", [
    (TSP_EFFECTS, "mean_tour_length_change_pct", 2.5),
    (LM_EFFECTS, "cross_entropy_change", 0.2),
    ({"pooled_cosine": 0.75}, "pooled_cosine", 0.25),
    ({"output_cosine": 0.8, "output_cosine_clean": 1.0, "output_cosine_change": -0.2}, "output_cosine_change", 0.2),
    ({"some_metric": -3.0, "flag": True}, "some_metric", 3.0),
    ({"top_tokens_moved": []}, None, 0.0),
])
def test_dashboard_column_and_report_ranking_read_the_same_effect(effects, name, size):
    from sae_clt.report.dashboard import effect_column
    from sae_clt.report.headline import effect_size, headline_effect
    from sae_clt.report.render import interventions_context

    assert headline_effect(effects) == name
    assert effect_size(effects) == pytest.approx(size)
    ablations = [{"feature": f, "score": 1.0, "effects": effects} for f in range(2)]
    column, values = effect_column(ablations, 3)
    assert column == name
    assert values[2] is None and (values[0] is None) == (name is None)
    if name is not None:  # the report ranks ablations by the size of the same effect, largest first
        weaker = {k: (v / 2 if k == name else v) for k, v in effects.items()}
        if name == "pooled_cosine":
            weaker[name] = 1 - size / 2
        ranked = interventions_context({"ablations": [{"feature": 0, "score": 1.0, "effects": weaker},
                                                      {"feature": 1, "score": 1.0, "effects": effects}]})
        assert [a["feature"] for a in ranked["ablations"]] == [1, 0]
