"""`saeclt sweep`: a grid of variants of an experiment, each an ordinary spec run through DVC, and
their summary (the FVU–L0 frontier)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sae_clt.errors import SpecError
from sae_clt.sweeps.grid import HEADER, parse_grid, variants, write_variants
from sae_clt.sweeps.summary import frontier


def saeclt(root, *args):
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    return subprocess.run([sys.executable, "-m", "sae_clt", *args], cwd=root, env=env, capture_output=True, text=True)


def test_grid_values_are_read_as_yaml_scalars():
    grid = parse_grid(["model.k=16,32", "train.lr=1e-3, 3.0e-3", "train.unit_norm_decoder=true,false", "model.activation=topk"])
    assert grid == {"model.k": [16, 32], "train.lr": [0.001, 0.003], "train.unit_norm_decoder": [True, False],
                    "model.activation": ["topk"]}
    assert parse_grid(["evaluate.causal=True,FALSE"]) == {"evaluate.causal": [True, False]}  # YAML 1.2's spellings


@pytest.mark.parametrize("items, message", [
    (["model.k"], "expected FIELD=V1,V2"),
    (["model.k=4", "model.k=8"], "given twice"),
    (["id=a,b"], "the id is not swept"),
    (["model.k=4,,8"], "an empty value"),
    (["model.k=4,4"], "repeated"),
    ([], "give at least one"),
    (["model.k=" + ",".join(map(str, range(1, 300)))], "at most 256"),
])
def test_a_malformed_grid_is_a_spec_error_naming_the_option(items, message):
    with pytest.raises(SpecError) as exc:
        parse_grid(items)
    assert message in str(exc.value) and "--grid" in str(exc.value)


def test_each_combination_is_a_valid_spec_named_by_its_values(tiny_project):
    found = variants(tiny_project / "specs/tiny_sae.yaml", parse_grid(["model.k=2,8", "train.lr=3e-3,0.01"]))
    assert [v.id for v in found] == ["tiny_sae-k2-lr0p003", "tiny_sae-k2-lr0p01", "tiny_sae-k8-lr0p003", "tiny_sae-k8-lr0p01"]
    assert found[3].data["model"]["k"] == 8 and found[3].data["train"]["lr"] == 0.01
    assert found[3].data["train"]["batch_size"] == 256  # the base's other fields are kept
    assert list(found[0].data)[:3] == ["id", "dataset", "source"]  # in the base's order, the id first
    assert all(v.path.parent == tiny_project / "specs" for v in found)


def test_a_value_the_spec_refuses_names_the_grid_key(tiny_project):
    with pytest.raises(SpecError) as exc:
        variants(tiny_project / "specs/tiny_sae.yaml", parse_grid(["model.k=4,-1", "model.kk=3"]))
    text = str(exc.value)
    assert "--grid model.k=-1: model.k:" in text and "--grid model.kk=3: model.kk: unknown key 'kk' (did you mean 'k'?)" in text
    assert not list((tiny_project / "specs").glob("tiny_sae-*.yaml"))  # nothing written


def test_values_that_make_the_same_spec_are_refused_and_values_are_written_as_validated(tiny_project):
    base = tiny_project / "specs/tiny_sae.yaml"
    with pytest.raises(SpecError, match=r"--grid model.k=2.0: makes the same spec as model.k=2"):
        variants(base, parse_grid(["model.k=2,2.0"]))
    found = variants(base, parse_grid(["model.k=4.0", "train.lr=0.003,0.0030000001"]))
    assert [v.id for v in found] == ["tiny_sae-k4-lr0p003", "tiny_sae-k4-lr0p0030000001"]  # no rounding in ids
    assert found[0].data["model"]["k"] == 4 and isinstance(found[0].data["model"]["k"], int)


def test_a_whole_spec_problem_names_every_grid_value(tiny_project):
    with pytest.raises(SpecError, match=r"--grid source='encoder.layers.0': \(the spec as a whole\)"):
        variants(tiny_project / "specs/tiny_sae.yaml", parse_grid(["source=encoder.layers.0"]))


def test_a_hand_written_spec_under_a_variant_name_is_never_overwritten(tiny_project):
    mine = tiny_project / "specs/tiny_sae-k2.yaml"
    mine.write_text("# my own experiment\n")
    found = variants(tiny_project / "specs/tiny_sae.yaml", parse_grid(["model.k=2,8"]))
    with pytest.raises(SpecError, match="not written by `saeclt sweep`"):
        write_variants(found, tiny_project / "specs/tiny_sae.yaml", "saeclt sweep ...")
    assert mine.read_text() == "# my own experiment\n"
    assert not (tiny_project / "specs/tiny_sae-k8.yaml").exists()  # refused before anything was written


def test_frontier_keeps_the_variants_nothing_beats_on_both_l0_and_fvu():
    rows = [{"id": "a", "l0": 8, "fvu": 0.3}, {"id": "b", "l0": 16, "fvu": 0.2}, {"id": "c", "l0": 16, "fvu": 0.25},
            {"id": "d", "l0": 32, "fvu": 0.2}, {"id": "e", "l0": 64, "fvu": 0.1}]
    assert frontier(rows) == ["a", "b", "e"]


def test_cli_refuses_a_bad_grid_with_exit_code_2_and_no_traceback(tiny_project):
    proc = saeclt(tiny_project, "sweep", "specs/tiny_sae.yaml", "--grid", "model.activation=topkk")
    assert proc.returncode == 2
    assert "--grid model.activation='topkk'" in proc.stderr and "did you mean 'topk'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(subprocess.run([sys.executable, "-m", "dvc", "--version"], capture_output=True).returncode != 0,
                    reason="dvc not installed")
def test_sweep_runs_every_variant_through_dvc_and_summarises_them(dvc_project):
    root = dvc_project
    proc = saeclt(root, "sweep", "specs/tiny_sae.yaml", "--grid", "model.k=2,8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for vid in ("tiny_sae-k2", "tiny_sae-k8"):
        assert (root / f"specs/{vid}.yaml").read_text().startswith(HEADER)
        assert (root / f"reports/{vid}/report.html").exists()
        assert vid in (root / "params.yaml").read_text()  # listed: `dvc repro` reruns it, `dvc metrics diff` shows it
    out = root / "reports/sweeps/tiny_sae-k"
    summary = json.loads((out / "sweep.json").read_text())
    fvu = {r["id"]: r["fvu"] for r in summary["variants"]}
    for vid, value in fvu.items():
        assert value == json.loads((root / f"metrics/{vid}/eval.json").read_text())["reconstruction"]["fvu"]
    assert fvu["tiny_sae-k8"] < fvu["tiny_sae-k2"]  # more active latents reconstruct better
    assert summary["frontier"] == ["tiny_sae-k2", "tiny_sae-k8"]
    assert "| tiny_sae-k8 | 8 |" in (out / "sweep.md").read_text() and (out / "frontier.svg").read_text().startswith("<svg")
    assert "tiny_sae-k8" in proc.stderr  # the table printed at the end

    # Swept again: DVC has every variant up to date, the summary comes out byte-identical.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = saeclt(root, "sweep", "specs/tiny_sae.yaml", "--grid", "model.k=2,8")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Running stage" not in again.stdout + again.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
