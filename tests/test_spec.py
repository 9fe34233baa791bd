"""Spec loading: bad specs fail fast, naming the file, line, field and what is allowed."""

from __future__ import annotations

import pytest

from sae_clt.errors import SpecError
from sae_clt.spec.models import load_spec
from sae_clt.spec.project import resolve_experiment
from sae_clt.spec.validation import validate_files


def _error(path) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return str(info.value)


def test_typo_in_key_names_file_line_field_and_suggestion(tiny_project):
    path = tiny_project / "specs" / "tiny_sae.yaml"
    path.write_text(path.read_text().replace("train: {batch_size", "train: {bacth_size"))
    msg = _error(path)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("train:"))
    assert f"tiny_sae.yaml:{line}: train.bacth_size: unknown key 'bacth_size'" in msg
    assert "did you mean 'batch_size'" in msg


def test_wrong_type_names_field_and_given_value(tiny_project):
    path = tiny_project / "specs" / "tiny_sae.yaml"
    path.write_text(path.read_text().replace("lr: 3.0e-3", "lr: fast"))
    msg = _error(path)
    assert "train.lr" in msg and "'fast'" in msg and "valid number" in msg


def test_bad_choice_lists_choices_and_suggests(tiny_project):
    path = tiny_project / "specs" / "tiny_sae.yaml"
    path.write_text(path.read_text().replace("activation: topk", "activation: topkk"))
    msg = _error(path)
    assert "model.activation" in msg and "allowed: topk, batchtopk, jumprelu, relu, relu_clipped" in msg and "did you mean 'topk'" in msg


def test_k_larger_than_dictionary_is_rejected(tiny_project):
    path = tiny_project / "specs" / "tiny_sae.yaml"
    path.write_text(path.read_text().replace("k: 4", "k: 100"))
    assert "k (100) must be <= d_sae (64)" in _error(path)


def test_id_must_match_file_name(tiny_project):
    path = tiny_project / "specs" / "tiny_sae.yaml"
    path.write_text(path.read_text().replace("id: tiny_sae", "id: other"))
    assert "must match the file name 'tiny_sae'" in _error(path)


def test_invalid_yaml_reports_line(tiny_project):
    path = tiny_project / "specs" / "tiny_sae.yaml"
    path.write_text("id: tiny_sae\nmodel: [unclosed\n")
    assert "tiny_sae.yaml:" in _error(path) and "not valid YAML" in _error(path)


def test_hook_point_not_collected_names_collected_points(tiny_project):
    path = tiny_project / "specs" / "tiny_sae.yaml"
    path.write_text(path.read_text().replace("encoder.layers.1\n", "encoder.layers.7\n"))
    with pytest.raises(SpecError) as info:
        resolve_experiment(path)
    assert "hook point 'encoder.layers.7' is not collected" in str(info.value)
    assert "encoder.layers.0" in str(info.value)


def test_validate_rejects_hook_point_the_subject_lacks(tiny_project):
    path = tiny_project / "specs" / "datasets" / "tiny_acts.yaml"
    path.write_text(path.read_text().replace("encoder.layers.0,", "encoder.layer.0,"))
    problems = validate_files([path])
    assert len(problems) == 1
    assert "tiny_acts.yaml:6: collect.hook_points.0" in problems[0]
    assert "did you mean 'encoder.layers.0'" in problems[0] and "available:" in problems[0]


def test_shipped_specs_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = sorted((root / "specs").rglob("*.yaml"))
    assert len(files) >= 4
    assert validate_files(files) == []


def test_missing_tracked_section_says_how_to_take_defaults(tiny_project):
    path = tiny_project / "specs" / "tiny_tc.yaml"
    path.write_text(path.read_text().replace("export: {}\n", ""))
    msg = _error(path)
    assert "export: missing" in msg and "`export: {}` takes every default" in msg


def test_hook_point_patterns_take_one_path_component():
    from sae_clt.data.hooks import expand_hook_points, matches

    available = ["encoder.layer.0", "encoder.layer.0:input", "encoder.layer.0.attention", "encoder.layer.1", "encoder.layer.1:input"]
    assert expand_hook_points(["encoder.layer.*"], available) == ["encoder.layer.0", "encoder.layer.1"]
    assert expand_hook_points(["encoder.layer.*:input", "encoder.layer.1"], available) == [
        "encoder.layer.0:input", "encoder.layer.1:input", "encoder.layer.1"]
    assert matches("encoder.layer.7", "encoder.layer.*") and not matches("encoder.layer.7.attention", "encoder.layer.*")


def test_yes_no_on_off_stay_strings_where_a_string_is_expected_and_still_read_as_booleans(tmp_path):
    """YAML 1.2 booleans only: an intervention named `off` keeps its name (YAML 1.1 would make it
    False), while a boolean field still takes on / off."""
    from sae_clt.spec.models import load_spec

    (tmp_path / "specs").mkdir()
    path = tmp_path / "specs" / "x.yaml"
    path.write_text("id: x\ndataset: d\nsource: a\ntarget: a\nmodel: {architecture: sae, d_sae: 8, activation: topk, k: 2}\n"
                    "train: {}\nexport: {}\nevaluate: {causal: off}\ninterventions:\n  - {name: off, edits: [{feature: 1, op: set, value: 0}]}\n"
                    "  - {name: yes, mode: no_change}\n")
    spec = load_spec(path)
    assert [i.name for i in spec.interventions] == ["off", "yes"]
    assert spec.evaluate.causal is False
