"""Bring your own activations: files recorded elsewhere become a dataset every later stage runs on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from sae_clt.cli import app
from sae_clt.stages.table import run_stage


def sparse_activations(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Rows built from a few of 4d random directions (what an SAE should recover)."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(4 * d, d, generator=g)
    codes = torch.rand(n, 4 * d, generator=g) * (torch.rand(n, 4 * d, generator=g) < 3 / (4 * d))
    return codes @ atoms + 0.01 * torch.randn(n, d, generator=g)


def test_imported_safetensors_train_evaluate_report_export(tiny_project):
    acts = sparse_activations(3000, 24)
    save_file({"resid": acts, "mlp_out": acts[:, :12] * 2}, str(tiny_project / "acts.safetensors"))
    result = CliRunner().invoke(app, ["import-acts", "acts.safetensors", "--id", "ext", "--experiment", "ext_sae",
                                      "--rows-per-instance", "10"])
    assert result.exit_code == 0, result.output
    assert "resid: 3,000 rows x 24" in result.output
    spec = tiny_project / "specs/ext_sae.yaml"
    assert "batch_size: 64" in spec.read_text()  # sized to the 2,700 training rows
    spec.write_text(spec.read_text().replace("seed: 0", "seed: 0\n  epochs: 3"))
    run_stage("subject", tiny_project / "specs/subjects/ext.yaml")
    run_stage("collect", tiny_project / "specs/datasets/ext.yaml")
    manifest = json.loads((tiny_project / "runs/datasets/ext/store/manifest.json").read_text())
    assert manifest["n_rows"] == 3000 and manifest["n_instances"] == 300
    assert manifest["hook_points"] == {"resid": 24, "mlp_out": 12}
    run_stage("normalize", tiny_project / "specs/datasets/ext.yaml")
    for stage in ("train", "evaluate", "analyze", "report", "export"):
        run_stage(stage, spec)
    metrics = json.loads((tiny_project / "metrics/ext_sae/eval.json").read_text())
    assert "causal" not in metrics and "imported" in metrics["causal_skipped"]
    assert metrics["reconstruction"]["fvu"] < metrics["linear_baseline"]["fvu"]
    assert (tiny_project / "reports/ext_sae/report.md").exists()
    assert (tiny_project / "runs/experiments/ext_sae/export/edges.json").exists()
    # every latent still analysed and shown; nothing to intervene on, and the report says why
    analysis = json.loads((tiny_project / "metrics/ext_sae/analysis.json").read_text())
    assert analysis["latents"] > 0 and analysis["ablations"] == [] and "imported" in analysis["interventions_skipped"]
    assert (tiny_project / "reports/ext_sae/features/index.html").exists()
    assert "imported: there is no model to intervene on" in (tiny_project / "reports/ext_sae/report.md").read_text()


def test_imported_rows_are_copied_exactly(tiny_project):
    """Every imported row lands in the store once, unchanged (float32 in, float32 out)."""
    from sae_clt.data.importing import import_activations
    from sae_clt.data.store import ActivationStore

    acts = np.random.default_rng(0).normal(size=(500, 7)).astype(np.float32)
    np.save(tiny_project / "layer3.npy", acts)
    import_activations([tiny_project / "layer3.npy"], "npy_acts", tiny_project)
    run_stage("subject", tiny_project / "specs/subjects/npy_acts.yaml")
    run_stage("collect", tiny_project / "specs/datasets/npy_acts.yaml")
    store = ActivationStore.open(tiny_project / "runs/datasets/npy_acts/store")
    rows = torch.zeros(500, 7)
    seen = torch.zeros(500, dtype=torch.long)
    for i in range(store.n_shards):
        shard = store.read_shard(i, ["layer3", "instance_id"])
        rows[shard["instance_id"]] = shard["layer3"]
        seen[shard["instance_id"]] += 1
    assert (seen == 1).all()
    assert torch.equal(rows, torch.from_numpy(acts))


@pytest.mark.parametrize("make, message", [
    (lambda d: np.save(d / "a.npy", np.zeros((10, 4, 2), dtype=np.float32)), "shape [10, 4, 2], expected [rows, dim]"),
    (lambda d: np.save(d / "a.npy", np.zeros((100, 4), dtype=np.int64)), "expected floating-point"),
    (lambda d: (d / "a.npy").write_bytes(b"\x93NUMPY garbage"), "not a plain numeric .npy"),
])
def test_import_rejects_bad_files_naming_them(tiny_project, make, message):
    make(tiny_project)
    result = CliRunner().invoke(app, ["import-acts", "a.npy", "--id", "bad"])
    assert result.exit_code != 0
    assert "a.npy" in result.output and message in result.output
    assert not (tiny_project / "specs/datasets/bad.yaml").exists()


def test_import_rejects_misaligned_files(tiny_project):
    np.save(tiny_project / "a.npy", np.zeros((100, 4), dtype=np.float32))
    np.save(tiny_project / "b.npy", np.zeros((90, 4), dtype=np.float32))
    result = CliRunner().invoke(app, ["import-acts", "a.npy", "b.npy", "--id", "bad"])
    assert result.exit_code != 0 and "aligned" in result.output and "'a': 100" in result.output


def test_import_does_not_overwrite_specs_without_force(tiny_project):
    np.save(tiny_project / "a.npy", np.ones((100, 4), dtype=np.float32))
    runner = CliRunner()
    assert runner.invoke(app, ["import-acts", "a.npy", "--id", "tiny_acts"]).exit_code != 0
    assert "tiny_acts.yaml: already exists" in runner.invoke(app, ["import-acts", "a.npy", "--id", "tiny_acts"]).output


def test_store_under_activations_root_is_read_through_the_local_pointer(tiny_project, tmp_path, monkeypatch):
    from sae_clt.data.importing import import_activations
    from sae_clt.data.store import ActivationStore

    np.save(tiny_project / "layer.npy", np.random.default_rng(1).normal(size=(400, 6)).astype(np.float32))
    import_activations([tiny_project / "layer.npy"], "big", tiny_project)
    monkeypatch.setenv("ACTIVATIONS_ROOT", str(tmp_path / "bigdisk"))
    run_stage("subject", tiny_project / "specs/subjects/big.yaml")
    run_stage("collect", tiny_project / "specs/datasets/big.yaml")
    assert list((tmp_path / "bigdisk/big").glob("shard_*.safetensors"))
    assert not list((tiny_project / "runs/datasets/big/store").glob("shard_*"))
    monkeypatch.delenv("ACTIVATIONS_ROOT")
    store = ActivationStore.open(tiny_project / "runs/datasets/big/store")  # follows the pointer
    assert store.manifest["n_rows"] == 400
    store.verify()
