"""A user's own torch module as a subject: import path + weights file + tensor inputs."""

from __future__ import annotations

import json

import pytest
import torch
from torch_subject_helpers import write_torch_project

from sae_clt.errors import SaecltError
from sae_clt.stages.table import run_stage


def test_torch_subject_from_import_path_runs_every_stage(tmp_path, monkeypatch):
    root = tmp_path / "proj"
    root.mkdir()
    write_torch_project(root)
    monkeypatch.chdir(root)
    run_stage("subject", root / "specs/subjects/mlp.yaml")
    run_stage("collect", root / "specs/datasets/mlp_acts.yaml")
    manifest = json.loads((root / "runs/datasets/mlp_acts/store/manifest.json").read_text())
    assert manifest["n_rows"] == 300 * 8  # one row per position of every input
    assert manifest["hook_points"] == {"up:input": 16, "down": 16}
    run_stage("normalize", root / "specs/datasets/mlp_acts.yaml")
    for stage in ("train", "evaluate", "analyze", "report", "export"):
        run_stage(stage, root / "specs/mlp_tc.yaml")
    metrics = json.loads((root / "metrics/mlp_tc/eval.json").read_text())
    cos = metrics["causal"]["output_cosine"]["values"]
    assert cos["clean"] == pytest.approx(1.0)
    # Patching the MLP's output with the transcoder keeps the outputs closer than ablating it.
    assert cos["dictionary"] > cos["zero_ablation"]
    assert metrics["reconstruction"]["fvu"] < 0.5
    assert (root / "reports/mlp_tc/report.html").exists()


def test_torch_subject_unknown_hook_point_lists_module_paths(tmp_path, monkeypatch):
    from sae_clt.spec.validation import validate_files

    root = tmp_path / "proj"
    root.mkdir()
    write_torch_project(root, points='"up:input", dwn')
    monkeypatch.chdir(root)
    problems = validate_files([root / "specs/datasets/mlp_acts.yaml"])
    text = "\n".join(problems)
    assert "dwn" in text and "down" in text and "embed" in text  # near names and the available paths


def test_torch_subject_weights_that_do_not_fit_are_named(tmp_path, monkeypatch):
    root = tmp_path / "proj"
    root.mkdir()
    write_torch_project(root)
    torch.save({"embed.weight": torch.zeros(3, 3)}, root / "weights/token_mlp.pt")
    monkeypatch.chdir(root)
    with pytest.raises(SaecltError, match="token_mlp.pt.*missing"):
        run_stage("subject", root / "specs/subjects/mlp.yaml")


def test_torch_subject_checkpoint_with_code_is_refused(tmp_path, monkeypatch):
    """weights_only loading: a checkpoint that pickles an object is refused, not executed."""
    root = tmp_path / "proj"
    root.mkdir()
    write_torch_project(root)
    torch.save({"state": torch.nn.Linear(2, 2)}, root / "weights/token_mlp.pt")
    monkeypatch.chdir(root)
    with pytest.raises(SaecltError, match="weights_only=True"):
        run_stage("subject", root / "specs/subjects/mlp.yaml")


def test_torch_subject_bad_factory_names_the_module(tmp_path, monkeypatch):
    root = tmp_path / "proj"
    root.mkdir()
    write_torch_project(root)
    spec = root / "specs/subjects/mlp.yaml"
    spec.write_text(spec.read_text().replace("usermodels.token_mlp", "usermodels.nope"))
    monkeypatch.chdir(root)
    with pytest.raises(SaecltError, match="cannot import module 'usermodels.nope'"):
        run_stage("subject", spec)


def test_torch_subject_with_one_row_per_input_trains_and_evaluates(tmp_path, monkeypatch):
    """Hook points giving [batch, d] (no sequence axis) store one row per input at position 0."""
    from safetensors.torch import save_file

    from sae_clt.data.store import ActivationStore

    root = tmp_path / "proj"
    root.mkdir()
    write_torch_project(root)
    save_file({"x": torch.randn(400, 6, generator=torch.Generator().manual_seed(3))}, str(root / "data/inputs.safetensors"))
    spec = root / "specs/mlp_tc.yaml"
    spec.write_text(spec.read_text().replace("batch_size: 256, epochs: 3", "batch_size: 64, epochs: 2"))
    monkeypatch.chdir(root)
    run_stage("subject", root / "specs/subjects/mlp.yaml")
    run_stage("collect", root / "specs/datasets/mlp_acts.yaml")
    store = ActivationStore.open(root / "runs/datasets/mlp_acts/store")
    assert store.manifest["n_rows"] == 300
    shard = store.read_shard(0, ["instance_id", "position"])
    assert (shard["position"] == 0).all()
    run_stage("normalize", root / "specs/datasets/mlp_acts.yaml")
    for stage in ("train", "evaluate"):
        run_stage(stage, spec)
    metrics = json.loads((root / "metrics/mlp_tc/eval.json").read_text())
    assert metrics["causal"]["output_cosine"]["values"]["clean"] == pytest.approx(1.0)
    assert metrics["reconstruction"]["fvu"] < 0.5
