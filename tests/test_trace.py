"""`saeclt trace`: feature-to-feature edges between two dictionaries in series (here the tiny
project's transcoder layer 0 -> 1, then its SAE at layer 1)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from sae_clt.circuits.trace import trace
from sae_clt.data.loader import PairLoader
from sae_clt.dictionaries.dictionary import Dictionary
from sae_clt.errors import SpecError
from sae_clt.stages.inputs import experiment_inputs


def _pair(root, up="tiny_tc", down="tiny_sae"):
    up_resolved, store, norm = experiment_inputs(root / f"specs/{up}.yaml")
    down_resolved, _, _ = experiment_inputs(root / f"specs/{down}.yaml")
    load = lambda r: Dictionary.load(r.paths.dictionary_dir(r.experiment.id))  # noqa: E731
    return load(up_resolved), load(down_resolved), up_resolved.experiment, down_resolved.experiment, store, norm


@pytest.fixture(scope="module")
def traced(built_project):
    up, down, up_spec, down_spec, store, norm = _pair(built_project)
    at, result = trace(up, down, up_spec, down_spec, store, norm, max_rows=None)
    return up, down, up_spec, store, norm, at, result


def test_the_parts_add_up_to_each_downstream_pre_activation(traced):
    *_, result = traced
    fires = result.fires > 0
    assert fires.sum() > 10
    parts = result.from_features.sum(0) + result.from_error + result.from_bias
    torch.testing.assert_close(parts[fires], result.mean_pre[fires], rtol=1e-4, atol=1e-5)
    assert (result.error_rms[fires] >= result.from_error[fires].abs() - 1e-9).all()  # a mean is at most the rms
    assert (result.error_rms[fires] > 0).all()  # the upstream dictionary misses something on every feature's rows


def test_removing_an_upstream_feature_moves_a_downstream_pre_activation_by_its_edge(traced):
    """The edge against a perturbation computed through the dictionaries' own decode and encode:
    upstream feature i zeroed in the reconstruction (the error kept) lowers downstream feature
    j's pre-activation, on the rows where j fires, by the edge's contribution."""
    up, down, up_spec, store, norm, at, result = traced
    j = int(torch.argmax(result.score))
    i = int(torch.argmax(result.from_features[:, j].abs()))
    loader = PairLoader(store, norm, up_spec.source_key, at.hook_point, "val", 4096, seed=0, shuffle=False)
    changes = []
    with torch.no_grad():
        for x, y in loader.epoch(0):
            z = up.encode(x)
            y_hat = up.decode(z, x)[:, at.columns]
            ablated = z.clone()
            ablated[:, i] = 0
            patched = y - y_hat + up.decode(ablated, x)[:, at.columns]
            fires = down.encode(y)[:, j] > 0
            changes.append((down.pre_acts(y)[:, j] - down.pre_acts(patched)[:, j])[fires].double())
    change = torch.cat(changes)
    assert change.numel() == result.fires[j]
    assert abs(float(result.from_features[i, j])) > 1e-3
    assert float(change.mean()) == pytest.approx(float(result.from_features[i, j]), rel=1e-4, abs=1e-6)


def test_dictionaries_that_do_not_connect_are_refused_naming_the_fields(built_project):
    up, down, up_spec, down_spec, store, norm = _pair(built_project, "tiny_sae", "tiny_tc")
    with pytest.raises(SpecError) as exc:
        trace(up, down, up_spec, down_spec, store, norm)
    assert "tiny_tc.source 'encoder.layers.0' is not what tiny_sae writes (tiny_sae.target: encoder.layers.1)" in str(exc.value)
    with pytest.raises(SpecError, match="traced into itself"):
        trace(down, down, down_spec, down_spec, store, norm)


def test_cli_writes_the_table_graph_and_picture_reproducibly(built_project, tmp_path):
    root = tmp_path / "proj"
    shutil.copytree(built_project, root)
    run = lambda *a: subprocess.run([sys.executable, "-m", "sae_clt", "trace", *a], cwd=root, capture_output=True, text=True)  # noqa: E731
    proc = run("specs/tiny_tc.yaml", "specs/tiny_sae.yaml", "--features", "5", "--inputs", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = root / "reports/traces/tiny_tc--tiny_sae"
    doc = json.loads((out / "trace.json").read_text())
    assert doc["hook_point"] == "encoder.layers.1" and len(doc["features"]) == 5
    assert all(len(f["inputs"]) <= 3 for f in doc["features"])
    ids = {n["id"] for n in doc["nodes"]}
    assert all(link["source"] in ids and link["target"] in ids for link in doc["links"])
    assert f"| {doc['features'][0]['feature']} |" in proc.stdout  # the table, printed
    assert (out / "trace.svg").read_text().startswith("<svg") and "trace.svg" in (out / "trace.md").read_text()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert run("specs/tiny_tc.yaml", "specs/tiny_sae.yaml", "--features", "5", "--inputs", "3").returncode == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    wrong = run("specs/tiny_sae.yaml", "specs/tiny_tc.yaml")
    assert wrong.returncode == 2 and "is not what tiny_sae writes" in wrong.stderr and "Traceback" not in wrong.stderr
    shutil.rmtree(root / "runs/experiments/tiny_sae/dictionary")
    untrained = run("specs/tiny_tc.yaml", "specs/tiny_sae.yaml")
    assert untrained.returncode == 3 and "saeclt run specs/tiny_sae.yaml" in untrained.stderr
