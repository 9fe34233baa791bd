"""Hostile specs: validate runs no code a spec names, YAML tricks and huge values end in short,
clear spec errors (exit 2) naming file and line, and out-of-range numbers are refused up front."""

from __future__ import annotations

import json
import sys
import time

import pytest
from torch_subject_helpers import write_torch_project
from typer.testing import CliRunner

from sae_clt.cli import app
from sae_clt.errors import SpecError
from sae_clt.spec import validation
from sae_clt.spec.models import load_spec, read_yaml
from sae_clt.spec.validation import find_module_file, validate_files

EVIL_SUBJECT = """\
id: evil
kind: torch
factory: evilpkg.models:make
python_path: [lib]
"""


def _spec_error(path) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return str(info.value)


def _cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


@pytest.fixture
def torch_project(tmp_path, monkeypatch):
    root = tmp_path / "proj"
    root.mkdir()
    write_torch_project(root)
    monkeypatch.chdir(root)
    monkeypatch.setattr(validation, "_HOOK_POINTS", {})
    for name in [m for m in sys.modules if m.split(".")[0] in ("usermodels", "evilpkg")]:
        monkeypatch.delitem(sys.modules, name)
    return root


def _write_evil_subject(root):
    """A subject whose module writes a marker file when imported, and a dataset using it."""
    (root / "lib" / "evilpkg").mkdir(parents=True)
    (root / "lib" / "evilpkg" / "__init__.py").write_text(f"open({str(root / 'IMPORTED')!r}, 'w').close()\n")
    (root / "lib" / "evilpkg" / "models.py").write_text(f"open({str(root / 'RAN')!r}, 'w').close()\n"
                                                         "def make():\n    import torch\n    return torch.nn.Linear(2, 2)\n")
    (root / "specs" / "subjects" / "evil.yaml").write_text(EVIL_SUBJECT)
    dataset = (root / "specs" / "datasets" / "mlp_acts.yaml").read_text()
    path = root / "specs" / "datasets" / "evil_acts.yaml"
    path.write_text(dataset.replace("id: mlp_acts", "id: evil_acts").replace("subject: mlp", "subject: evil"))
    return path


# --------------------------------------------------------------------------- 6: validate runs nothing


def test_validate_imports_no_module_a_torch_subject_names(torch_project):
    path = _write_evil_subject(torch_project)
    notes: list[str] = []
    assert validate_files([path], import_subjects=False, notes=notes) == []
    assert not (torch_project / "IMPORTED").exists() and not (torch_project / "RAN").exists()
    assert "evilpkg" not in sys.modules and str(torch_project / "lib") not in sys.path
    assert len(notes) == 1 and "collect.hook_points not checked" in notes[0] and "--import-subjects" in notes[0]


def test_validate_command_runs_no_shell_command_from_a_factory(torch_project):
    marker = torch_project / "PWNED"
    (torch_project / "specs" / "subjects" / "mlp.yaml").write_text(
        f"id: mlp\nkind: torch\nfactory: subprocess:getoutput\nkwargs: {{cmd: 'touch {marker}'}}\n")
    code, output = _cli("validate", "specs/datasets/mlp_acts.yaml")
    assert code == 0 and not marker.exists()
    assert "note:" in output and "'subprocess'" in output and "saeclt validate --import-subjects" in output
    assert "Traceback" not in output


def test_validate_import_subjects_flag_checks_hook_points_and_caches_them(torch_project):
    path = torch_project / "specs" / "datasets" / "mlp_acts.yaml"
    path.write_text(path.read_text().replace('"up:input", down', '"up:input", dwn'))
    code, output = _cli("validate", "--import-subjects", str(path))
    assert code == 2 and "no hook point 'dwn' (did you mean 'down'?)" in output
    assert (torch_project / "runs" / ".cache" / "hook_points" / "mlp.json").exists()
    # Later runs without the flag answer from the cache, without importing the module.
    validation._HOOK_POINTS.clear()
    for name in [m for m in sys.modules if m.startswith("usermodels")]:
        del sys.modules[name]
    notes: list[str] = []
    problems = validate_files([path], import_subjects=False, notes=notes)
    assert notes == [] and len(problems) == 1 and "no hook point 'dwn'" in problems[0]
    assert "usermodels.token_mlp" not in sys.modules


def test_hook_point_cache_is_invalidated_when_the_factory_module_changes(torch_project):
    path = torch_project / "specs" / "datasets" / "mlp_acts.yaml"
    assert validate_files([path], import_subjects=True) == []
    validation._HOOK_POINTS.clear()
    module = torch_project / "usermodels" / "token_mlp.py"
    module.write_text(module.read_text().replace("self.down =", "self.down2 = self.down =", 1))
    notes: list[str] = []
    assert validate_files([path], import_subjects=False, notes=notes) == []
    assert len(notes) == 1 and "not checked" in notes[0]


def test_module_file_is_found_by_path_without_importing(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "__init__.py").write_text("raise SystemExit('imported')\n")
    (tmp_path / "a" / "b" / "__init__.py").write_text("")
    (tmp_path / "a" / "b" / "c.py").write_text("")
    assert find_module_file("a.b.c", [tmp_path]) == tmp_path / "a" / "b" / "c.py"
    assert find_module_file("a.b", [tmp_path]) == tmp_path / "a" / "b" / "__init__.py"
    assert find_module_file("a.nope", [tmp_path]) is None
    assert "a" not in sys.modules


def test_validate_refuses_hf_config_that_needs_custom_code_without_running_it(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    root = tmp_path / "proj"
    model = root / "models" / "custom"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "evil_arch", "auto_map": {
        "AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}}))
    (model / "evil.py").write_text(f"open({str(root / 'RAN')!r}, 'w').close()\n")
    (root / "specs" / "subjects").mkdir(parents=True)
    (root / "specs" / "datasets").mkdir(parents=True)
    (root / "specs" / "subjects" / "custom.yaml").write_text("id: custom\nkind: hf\npath: models/custom\n")
    path = root / "specs" / "datasets" / "custom_acts.yaml"
    path.write_text("id: custom_acts\nsubject: custom\ncollect:\n  n_instances: 10\n  hook_points: [encoder]\n  text: {}\nnormalize: {}\n")
    monkeypatch.chdir(root)
    problems = validate_files([path], import_subjects=False, check_index=False)
    assert len(problems) == 1 and "cannot build the model" in problems[0] and "no custom code" in problems[0]
    assert not (root / "RAN").exists()


# --------------------------------------------------------------------------- 7: aliases


BILLION_LAUGHS = "id: tiny_sae\n" + 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{c}: &{c} [{','.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


def test_alias_bomb_is_refused_quickly_naming_file_and_line(tiny_project):
    path = tiny_project / "specs" / "tiny_sae.yaml"
    path.write_text(BILLION_LAUGHS)
    assert len(BILLION_LAUGHS) < 700
    start = time.monotonic()
    msg = _spec_error(path)
    assert time.monotonic() - start < 5
    assert "tiny_sae.yaml:3:" in msg and "aliases" in msg and "write the values out" in msg


def test_more_than_a_hundred_aliases_are_refused(tiny_project):
    path = tiny_project / "specs" / "tiny_sae.yaml"
    path.write_text("x: &x 1\nys:\n" + "".join("  - *x\n" for _ in range(101)))
    msg = _spec_error(path)
    assert "tiny_sae.yaml:103:" in msg and "more than 100 YAML aliases" in msg


def test_recursive_alias_is_a_spec_error(tiny_project):
    path = tiny_project / "specs" / "tiny_sae.yaml"
    path.write_text("id: tiny_sae\nx: &x [1, *x]\n")
    assert "tiny_sae.yaml:2:" in _spec_error(path) and "recursive" in _spec_error(path)


def test_a_few_aliases_and_merge_keys_still_load(tiny_project):
    path = tiny_project / "specs" / "tiny_sae.yaml"
    path.write_text(path.read_text().replace("train: {batch_size: 256,", "x-base: &base {batch_size: 256}\ntrain: {<<: *base,"))
    data, _ = read_yaml(path)
    assert data["train"]["batch_size"] == 256 and data["train"]["epochs"] == 2


def test_deeply_nested_document_is_a_spec_error(tiny_project):
    path = tiny_project / "specs" / "tiny_sae.yaml"
    path.write_text("x: " + "[" * 20000 + "]" * 20000 + "\n")
    assert "nested too deeply" in _spec_error(path) or "not valid YAML" in _spec_error(path)


# --------------------------------------------------------------------------- 8: bounded messages


def test_huge_value_is_quoted_capped_in_spec_errors(tiny_project):
    path = tiny_project / "specs" / "tiny_sae.yaml"
    path.write_text(path.read_text().replace("activation: topk", "activation: " + "x" * 1_000_000))
    msg = _spec_error(path)
    assert len(msg) < 3000 and "(1000002 chars)" in msg and "model.activation" in msg


def test_huge_unknown_key_and_hook_point_are_capped(tiny_project):
    path = tiny_project / "specs" / "datasets" / "tiny_acts.yaml"
    path.write_text(path.read_text().replace("encoder.layers.0,", "encoder." + "q" * 100_000 + ","))
    problems = validate_files([path])
    assert problems and all(len(p) < 3000 for p in problems)
    path = tiny_project / "specs" / "tiny_sae.yaml"
    path.write_text(path.read_text() + "k" * 100_000 + ": 1\n")
    assert len(_spec_error(path)) < 3000


def test_cli_caps_long_message_lines_and_line_count(tiny_project):
    from sae_clt.cli import MAX_LINE, MAX_LINES, _capped

    text = _capped("error: " + "y" * 10 * MAX_LINE + "\n" + "\n".join(["z"] * (3 * MAX_LINES)))
    lines = text.splitlines()
    assert len(lines) == MAX_LINES + 1 and lines[-1].startswith("…") and all(len(line) < MAX_LINE + 40 for line in lines)
    path = tiny_project / "specs" / "tiny_sae.yaml"
    path.write_text(path.read_text().replace("activation: topk", "activation: " + "x" * 1_000_000))
    code, output = _cli("validate", str(path))
    assert code == 2 and len(output) < 5000 and "Traceback" not in output


def test_spec_file_larger_than_the_limit_is_refused(tiny_project, monkeypatch):
    from sae_clt.spec import models as spec_module

    monkeypatch.setattr(spec_module, "MAX_SPEC_BYTES", 1000)
    path = tiny_project / "specs" / "tiny_sae.yaml"
    path.write_text(path.read_text() + "#" * 2000 + "\n")
    assert "larger than 1000 bytes" in _spec_error(path)


# --------------------------------------------------------------------------- 10: duplicate keys


def test_duplicate_top_level_key_names_both_lines(tiny_project):
    path = tiny_project / "specs" / "tiny_sae.yaml"
    path.write_text(path.read_text() + "model: {architecture: transcoder, d_sae: 64}\n")
    last = len(path.read_text().splitlines())
    msg = _spec_error(path)
    assert f"tiny_sae.yaml:{last}: key 'model' appears twice (lines 5 and {last})" in msg


def test_duplicate_nested_key_names_section_and_lines(tiny_project):
    path = tiny_project / "specs" / "datasets" / "tiny_acts.yaml"
    path.write_text(path.read_text().replace("  seed: 1\n", "  seed: 1\n  batch_size: 7\n  seed: 2\n"))
    msg = _spec_error(path)
    assert "tiny_acts.yaml:7: collect: key 'seed' appears twice (lines 5 and 7)" in msg
    assert "tiny_acts.yaml:10: collect: key 'batch_size' appears twice (lines 6 and 10)" in msg


def test_validate_command_rejects_duplicate_keys_with_exit_code_2(tiny_project):
    path = tiny_project / "specs" / "tiny_sae.yaml"
    path.write_text(path.read_text().replace("k: 4}", "k: 4, k: 8}"))
    code, output = _cli("validate", str(path))
    assert code == 2 and "key 'k' appears twice" in output and "Traceback" not in output


# --------------------------------------------------------------------------- 11: number bounds


@pytest.mark.parametrize("old, new, field, allowed", [
    ("epochs: 2", "epochs: .inf", "train.epochs", "finite"),
    ("epochs: 2", "epochs: .nan", "train.epochs", "finite"),
    ("lr: 3.0e-3", "lr: -.inf", "train.lr", "finite"),
    ("epochs: 2", "epochs: 1.0e+9", "train.epochs", "<= 10000"),
    ("epochs: 2", "seed: 1.0e+23, epochs: 2", "train.seed", "from -1099511627776 to 1099511627776"),
    ("epochs: 2", "seed: 100000000000000000000000, epochs: 2", "train.seed", "from -1099511627776 to 1099511627776"),
    ("d_sae: 64", "d_sae: 1000000000", "model.d_sae", "from 1 to 16777216"),
    ("epochs: 2", "epochs: 2, resample_at: [0.5, .inf]", "train.resample_at.1", "finite"),
    ("epochs: 2", "epochs: 2, grad_clip: .inf", "train.grad_clip", "finite"),
    ("batch_size: 256", "batch_size: 100000000000", "train.batch_size", "from 1 to 16777216"),
])
def test_out_of_range_numbers_are_spec_errors_naming_field_and_range(tiny_project, old, new, field, allowed):
    path = tiny_project / "specs" / "tiny_sae.yaml"
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new, 1))
    msg = _spec_error(path)
    assert "tiny_sae.yaml:" in msg and f"{field}:" in msg and allowed in msg


def test_too_many_instances_is_a_spec_error(tiny_project):
    path = tiny_project / "specs" / "datasets" / "tiny_acts.yaml"
    path.write_text(path.read_text().replace("n_instances: 300", "n_instances: 1000000000000"))
    msg = _spec_error(path)
    assert "tiny_acts.yaml:4: collect.n_instances" in msg and "4294967296" in msg


def test_validate_command_exits_2_for_infinite_epochs(tiny_project):
    path = tiny_project / "specs" / "tiny_sae.yaml"
    path.write_text(path.read_text().replace("epochs: 2", "epochs: .inf"))
    code, output = _cli("validate", str(path))
    assert code == 2 and "train.epochs" in output and "Traceback" not in output


def test_negative_and_large_valid_seeds_stay_valid(tiny_project):
    path = tiny_project / "specs" / "tiny_sae.yaml"
    original = path.read_text()
    for seed in (-5, 0, 2**32, 2**40):
        path.write_text(original.replace("train: {", f"train: {{seed: {seed}, ", 1))
        assert load_spec(path).train.seed == seed


def test_unreadable_scalar_is_a_spec_error_naming_the_line(tiny_project):
    path = tiny_project / "specs" / "tiny_sae.yaml"
    path.write_text(path.read_text() + "when: 2020-13-45\n2020-13-46: 1\n")
    last = len(path.read_text().splitlines())
    assert f"tiny_sae.yaml:{last - 1}: not valid YAML: cannot read '2020-13-45'" in _spec_error(path)


def test_a_spec_id_longer_than_file_names_allow_is_a_spec_error(tmp_path):
    from sae_clt.errors import SpecError
    from sae_clt.spec.models import load_spec

    long_id = "x" * 230
    path = tmp_path / "specs" / "subjects" / f"{long_id}.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(f"id: {long_id}\nkind: tsp\n")
    with pytest.raises(SpecError, match="at most 200 characters"):
        load_spec(path, "subjects")
