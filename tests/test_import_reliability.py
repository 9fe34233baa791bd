"""import-acts and `files` subjects under bad input: all or nothing, clear refusals, nothing deleted."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from sae_clt.cli import app
from sae_clt.errors import SpecError
from sae_clt.stages.table import run_stage


def _acts(root, name="a.npy", rows=200, dim=8):
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.random.default_rng(0).normal(size=(rows, dim)).astype(np.float32))
    return path


def _spec_files(root):
    return sorted(p.relative_to(root).as_posix() for p in (root / "specs").rglob("*") if p.is_file())


@pytest.mark.parametrize("args, option", [
    (["--id", "ok_id", "--experiment", "e" * 240], "--experiment"),
    (["--id", "d" * 240], "--id"),
    (["--id", "ok_id", "--experiment", "bad id"], "--experiment"),
    (["--id", "ok_id\n"], "--id"),
    (["--id", "ok_id", "--rows-per-instance", "0"], "--rows-per-instance"),
    (["--id", "ok_id", "--rows-per-instance", "-3"], "--rows-per-instance"),
    (["--id", "ok_id", "--val-fraction", "0"], "--val-fraction"),
    (["--id", "ok_id", "--val-fraction", "nan"], "--val-fraction"),
    (["--id", "ok_id", "--rows-per-instance", "10", "--val-fraction", "0.99"], "--val-fraction"),
])
def test_import_refuses_bad_options_writing_nothing(tiny_project, args, option):
    _acts(tiny_project)
    before = _spec_files(tiny_project)
    result = CliRunner().invoke(app, ["import-acts", "a.npy", *args])
    assert result.exit_code == 2, result.output
    assert option in result.output and "Traceback" not in result.output
    assert "e" * 100 not in result.output  # a long value is quoted shortened
    assert _spec_files(tiny_project) == before


def test_import_after_a_refused_long_experiment_id_succeeds_on_retry(tiny_project):
    _acts(tiny_project)
    runner = CliRunner()
    assert runner.invoke(app, ["import-acts", "a.npy", "--id", "acts", "--experiment", "e" * 240]).exit_code == 2
    result = runner.invoke(app, ["import-acts", "a.npy", "--id", "acts", "--experiment", "acts_sae"])
    assert result.exit_code == 0, result.output
    assert (tiny_project / "specs/acts_sae.yaml").exists()


def test_import_accepts_the_longest_id_it_allows(tiny_project):
    from sae_clt.spec.models import SPEC_ID_MAX_LENGTH as ID_MAX_LENGTH
    from sae_clt.spec.models import load_spec

    _acts(tiny_project)
    long_id = "x" * ID_MAX_LENGTH
    result = CliRunner().invoke(app, ["import-acts", "a.npy", "--id", long_id, "--experiment", long_id])
    assert result.exit_code == 0, result.output
    assert load_spec(tiny_project / f"specs/{long_id}.yaml").id == long_id


def test_import_failing_part_way_removes_only_what_it_wrote(tiny_project, monkeypatch):
    from sae_clt import io
    from sae_clt.data import importing

    _acts(tiny_project)
    (tiny_project / "specs/subjects/acts.yaml").write_text("# the user's own\n")
    real = io.atomic_write_text

    def fail_on_experiment(path, text):
        if path.name == "acts_sae.yaml":
            raise OSError(28, "No space left on device", str(path))
        real(path, text)

    monkeypatch.setattr(importing, "atomic_write_text", fail_on_experiment)
    before = _spec_files(tiny_project)
    result = CliRunner().invoke(app, ["import-acts", "a.npy", "--id", "acts", "--experiment", "acts_sae", "--force"])
    assert result.exit_code == 3, result.output
    assert _spec_files(tiny_project) == before
    assert (tiny_project / "specs/subjects/acts.yaml").read_text() == "# the user's own\n"  # overwritten, then given back


def test_import_does_not_overwrite_one_existing_spec_and_writes_none(tiny_project):
    _acts(tiny_project)
    (tiny_project / "specs/acts_sae.yaml").write_text("# mine\n")
    before = _spec_files(tiny_project)
    result = CliRunner().invoke(app, ["import-acts", "a.npy", "--id", "acts", "--experiment", "acts_sae"])
    assert result.exit_code == 3 and "acts_sae.yaml: already exists" in result.output
    assert _spec_files(tiny_project) == before


@pytest.mark.parametrize("rows, per, batch", [(200, 1, 4), (3000, 10, 64), (200_000, 1, 4096)])
def test_imported_experiment_batch_fits_the_training_rows(tiny_project, rows, per, batch):
    from sae_clt.data.importing import import_activations

    _acts(tiny_project, rows=rows, dim=4)
    import_activations([tiny_project / "a.npy"], "acts", tiny_project, rows_per_instance=per, experiment_id="acts_sae")
    train = yaml.safe_load((tiny_project / "specs/acts_sae.yaml").read_text())["train"]
    assert train["batch_size"] == batch
    n_instances = rows // per
    train_rows = (n_instances - round(n_instances * 0.1)) * per
    assert train_rows // train["batch_size"] >= 32 or train["batch_size"] == 1


def test_small_import_trains_with_its_generated_spec(tiny_project):
    """Fewer rows than 4096: the generated experiment trains as written."""
    _acts(tiny_project, rows=600, dim=8)
    result = CliRunner().invoke(app, ["import-acts", "a.npy", "--id", "small", "--experiment", "small_sae"])
    assert result.exit_code == 0, result.output
    run_stage("subject", tiny_project / "specs/subjects/small.yaml")
    run_stage("collect", tiny_project / "specs/datasets/small.yaml")
    run_stage("normalize", tiny_project / "specs/datasets/small.yaml")
    run_stage("train", tiny_project / "specs/small_sae.yaml")
    assert json.loads((tiny_project / "metrics/small_sae/train.json").read_text())


def test_import_refuses_files_inside_the_project_outputs(tiny_project):
    acts = _acts(tiny_project, "runs/datasets/acts/store/acts.npy")
    result = CliRunner().invoke(app, ["import-acts", str(acts), "--id", "acts"])
    assert result.exit_code == 2, result.output
    assert "acts.npy" in result.output and "runs/" in result.output
    assert not (tiny_project / "specs/datasets/acts.yaml").exists()


def test_import_refuses_files_inside_the_store_under_activations_root(tiny_project, tmp_path, monkeypatch):
    monkeypatch.setenv("ACTIVATIONS_ROOT", str(tmp_path / "bigdisk"))
    acts = _acts(tmp_path / "bigdisk", "acts/a.npy")
    result = CliRunner().invoke(app, ["import-acts", str(acts), "--id", "acts"])
    assert result.exit_code == 2, result.output
    assert "$ACTIVATIONS_ROOT/acts" in result.output
    assert acts.exists()


def test_files_subject_inside_its_own_store_is_refused_before_collect_deletes_it(tiny_project, tmp_path, monkeypatch):
    """A hand-written files subject naming a file in the store its dataset collects into."""
    from sae_clt.data.importing import import_activations

    _acts(tiny_project)
    import_activations([tiny_project / "a.npy"], "acts", tiny_project)
    monkeypatch.setenv("ACTIVATIONS_ROOT", str(tmp_path / "bigdisk"))
    inside = _acts(tmp_path / "bigdisk", "acts/a.npy")
    spec = tiny_project / "specs/subjects/acts.yaml"
    spec.write_text(spec.read_text().replace("- a.npy", f"- {inside}"))
    with pytest.raises(SpecError, match=r"specs/subjects/acts.yaml: files\[0\]: .*a.npy lies inside \$ACTIVATIONS_ROOT/acts"):
        run_stage("collect", tiny_project / "specs/datasets/acts.yaml")
    assert inside.exists()


def test_files_subject_linked_into_runs_is_refused(tiny_project):
    from sae_clt.data.importing import import_activations

    _acts(tiny_project)
    import_activations([tiny_project / "a.npy"], "acts", tiny_project)
    stored = _acts(tiny_project, "runs/experiments/x/a.npy")
    (tiny_project / "linked.npy").symlink_to(stored)
    spec = tiny_project / "specs/subjects/acts.yaml"
    spec.write_text(spec.read_text().replace("- a.npy", "- linked.npy"))
    result = CliRunner().invoke(app, ["stage", "subject", str(spec)])
    assert result.exit_code == 2, result.output
    assert "linked.npy lies inside runs/" in result.output


class _Scorer(torch.nn.Module):
    """A model whose hook points give a [batch] score, a dict and a keywords-only input."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.score = _Sum()
        self.named = _Named()
        self.kw = torch.nn.Identity()

    def forward(self, x):
        self.named(x)
        self.kw(input=x)
        return self.score(self.proj(x))


class _Sum(torch.nn.Module):
    def forward(self, x):
        return x.sum(-1)


class _Named(torch.nn.Module):
    def forward(self, x):
        return {"h": x}


@pytest.mark.parametrize("point, message", [
    ("score", r"hook point 'score': activation of shape \[3\], expected \[batch, ..., d\]"),
    ("named", "hook point 'named': the module returned dict, not a tensor"),
    ("kw:input", "hook point 'kw:input': the module was called with no positional argument"),
])
def test_hook_points_without_rows_are_named_as_data_errors(point, message):
    from sae_clt.data.hooks import module_hook_points, recording
    from sae_clt.errors import DataError

    model = _Scorer()
    with pytest.raises(DataError, match=message):
        with recording(model, [point], module_hook_points(model)):
            model(torch.randn(3, 4))


def test_import_of_a_folder_is_a_data_error_naming_it(tiny_project):
    (tiny_project / "acts.npy").mkdir()
    result = CliRunner().invoke(app, ["import-acts", "acts.npy", "--id", "acts"])
    assert result.exit_code == 3, result.output
    assert "acts.npy: not a file" in result.output
