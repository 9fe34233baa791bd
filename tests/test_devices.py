"""Devices: train.device and collect.device resolved or refused, and every stage on every
available device (the CPU always, CUDA where torch sees a GPU, skipped elsewhere) giving the CPU's
results: training to the CPU's weights, collection to the CPU's store, evaluation, analysis and
interventions to the CPU's metrics; each output recording where it was made (meta.device)."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from conftest import DEVICES, TINY_DATASET, TINY_SAE, TINY_TC, write_project
from safetensors.torch import load_file
from typer.testing import CliRunner

from sae_clt.cli import app
from sae_clt.data.staging import to_device
from sae_clt.data.store import ActivationStore
from sae_clt.devices import resolve_device
from sae_clt.errors import SpecError
from sae_clt.interventions.steer import steer
from sae_clt.io import read_json
from sae_clt.spec.project import Paths
from sae_clt.stages.table import run_stage

EXPERIMENTS = {"tiny_sae": TINY_SAE, "tiny_tc": TINY_TC}  # the fast TopK step and the autograd step


def _with_device(text: str, eid: str, new_id: str, device: str) -> str:
    """An experiment spec with its id changed and train.device (and fp32: bf16 would not match the
    CPU's weights to 1e-4) set."""
    return text.replace(f"id: {eid}", f"id: {new_id}").replace("train: {", f"train: {{device: {device}, precision: fp32, ")


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """The tiny project with its activations collected and normalised, and the CPU references trained."""
    root = write_project(tmp_path_factory.mktemp("devices") / "proj")
    run_stage("subject", root / "specs/subjects/tiny.yaml")
    run_stage("collect", root / "specs/datasets/tiny_acts.yaml")
    run_stage("normalize", root / "specs/datasets/tiny_acts.yaml")
    for eid, text in EXPERIMENTS.items():
        (root / f"specs/{eid}_ref.yaml").write_text(_with_device(text, eid, f"{eid}_ref", "cpu"))
        for stage in ("train", "evaluate", "analyze"):
            run_stage(stage, root / f"specs/{eid}_ref.yaml")
    return root


def test_auto_and_cpu_resolve_to_the_cpu_without_a_gpu(monkeypatch):
    monkeypatch.delenv("SAECLT_DEVICE")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", "train.device") == torch.device("cpu")
    assert resolve_device("cpu", "train.device") == torch.device("cpu")


def test_saeclt_device_says_what_auto_means_on_this_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("SAECLT_DEVICE", "cpu")
    assert resolve_device("auto", "train.device") == torch.device("cpu")
    assert resolve_device("cuda:1", "train.device") == torch.device("cuda", 1)  # a named device is not overridden
    monkeypatch.setenv("SAECLT_DEVICE", "cuda:5")
    with pytest.raises(SpecError, match=r"train.device \(auto, from \$SAECLT_DEVICE\).*GPU 5"):
        resolve_device("auto", "train.device")


@pytest.mark.parametrize("setting", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_is_refused_without_a_gpu_naming_the_field(monkeypatch, setting):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SpecError, match="train.device") as err:
        resolve_device(setting, "train.device")
    assert err.value.exit_code == 2


def test_a_gpu_index_out_of_range_is_refused(monkeypatch):
    monkeypatch.delenv("SAECLT_DEVICE")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1", "train.device") == torch.device("cuda", 1)
    with pytest.raises(SpecError, match=r"train.device.*GPU 2 .*has 2"):
        resolve_device("cuda:2", "train.device")
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun: cuda is this process's own GPU
    assert resolve_device("cuda", "train.device") == torch.device("cuda", 1)
    assert resolve_device("auto", "train.device") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "5")
    with pytest.raises(SpecError, match="LOCAL_RANK 5"):
        resolve_device("cuda", "train.device")


def test_where_the_work_runs_is_left_out_of_the_spec_hash(collected):
    from sae_clt.spec.models import load_spec, spec_hash

    cpu = load_spec(collected / "specs/tiny_sae_ref.yaml")
    auto = cpu.model_copy(update={"train": cpu.train.model_copy(update={"device": "auto", "deterministic": True})})
    assert spec_hash(cpu) == spec_hash(auto) and spec_hash(cpu, ["train"]) == spec_hash(auto, ["train"])
    dataset = load_spec(collected / "specs/datasets/tiny_acts.yaml")
    moved = dataset.model_copy(update={"collect": dataset.collect.model_copy(update={"device": "cuda:1"})})
    assert spec_hash(dataset) == spec_hash(moved)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: train.device cuda is honoured")
def test_train_device_cuda_is_refused_at_the_train_stage_with_exit_code_2(collected, monkeypatch):
    monkeypatch.chdir(collected)
    (collected / "specs/tiny_sae_gpu.yaml").write_text(_with_device(TINY_SAE, "tiny_sae", "tiny_sae_gpu", "cuda"))
    result = CliRunner().invoke(app, ["stage", "train", "specs/tiny_sae_gpu.yaml"])
    assert result.exit_code == 2, result.output
    assert "train.device" in result.output
    assert not (collected / "runs/experiments/tiny_sae_gpu/dictionary").exists()


def test_run_and_steer_refuse_an_absent_gpu_before_any_work_naming_file_and_line(tiny_project, monkeypatch):
    from sae_clt.interventions.steer import load_for_intervention
    from sae_clt.stages.run import run_experiment

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    spec = tiny_project / "specs/tiny_sae_gpu.yaml"
    spec.write_text(_with_device(TINY_SAE, "tiny_sae", "tiny_sae_gpu", "cuda"))
    line = next(n for n, text in enumerate(spec.read_text().splitlines(), start=1) if "device" in text)
    for call in (run_experiment, load_for_intervention):
        with pytest.raises(SpecError) as err:
            call(spec)
        assert f"{spec}:{line}: train.device: 'cuda' but torch sees no CUDA device" in str(err.value)
    dataset = tiny_project / "specs/datasets/tiny_acts.yaml"
    dataset.write_text(dataset.read_text().replace("  seed: 1\n", "  seed: 1\n  device: cuda:1\n"))
    with pytest.raises(SpecError, match=rf"{dataset}:\d+: collect.device: 'cuda:1' but torch sees no CUDA"):
        run_experiment(tiny_project / "specs/tiny_sae.yaml")
    assert not (tiny_project / "runs/subjects").exists() and not (tiny_project / "params.yaml").exists()  # nothing ran


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eid", sorted(EXPERIMENTS))
def test_training_on_each_device_gives_the_cpu_weights(collected, eid, device):
    new_id = f"{eid}_{device}"
    (collected / f"specs/{new_id}.yaml").write_text(_with_device(EXPERIMENTS[eid], eid, new_id, device))
    run_stage("train", collected / f"specs/{new_id}.yaml")
    ref = load_file(collected / f"runs/experiments/{eid}_ref/dictionary/dictionary.safetensors")
    got = load_file(collected / f"runs/experiments/{new_id}/dictionary/dictionary.safetensors")
    assert ref.keys() == got.keys()
    for name, tensor in ref.items():
        assert got[name].device.type == "cpu"  # saved from the CPU whatever the device
        rel = float((got[name] - tensor).norm() / tensor.norm().clamp_min(1e-12))
        assert rel <= 1e-4, f"{name}: relative difference {rel:.2e} on {device}"
    summary = read_json(collected / f"metrics/{new_id}/train.json")
    assert summary["meta"]["device"].startswith(str(resolve_device(device, "train.device")))
    assert read_json(collected / f"metrics/{eid}_ref/train.json")["meta"]["device"] == "cpu"
    assert summary["precision"] == "fp32"
    shutil.rmtree(collected / f"runs/experiments/{new_id}")


def _numbers(value, path=""):
    """Every number in a metrics document by its path (meta left out: it names the device)."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() if key != "meta" for k, v in _numbers(item, f"{path}.{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in _numbers(item, f"{path}[{i}]").items()}
    return {path: value} if isinstance(value, (int, float)) and not isinstance(value, bool) else {}


DERIVED = ("pct", "change", "recovered")  # differences of near-equal values: float noise is large relative to them


def _assert_close(got: dict, ref: dict, rel: float, what: str) -> None:
    """Every number of ``got`` within ``rel`` of ``ref``'s (relative; changes and percentages,
    which amplify float noise, within 1e-3 absolute)."""
    a, b = _numbers(got), _numbers(ref)
    assert a.keys() == b.keys(), what
    for key, expected in b.items():
        if expected is None or (isinstance(expected, float) and math.isnan(expected)):
            continue
        leaf = key.rsplit(".", 1)[-1]
        tol = 1e-3 if any(d in leaf for d in DERIVED) else rel * max(abs(expected), 1e-3)
        assert a[key] is not None and abs(a[key] - expected) <= tol, f"{what} {key}: {a[key]} vs {expected}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eid", sorted(EXPERIMENTS))
def test_evaluate_analyze_and_steer_on_each_device_give_the_cpu_metrics(collected, eid, device):
    """The CPU-trained dictionary evaluated, analysed and steered with train.device set: the same
    metrics as on the CPU (1e-4 relative), each file saying where it was made."""
    new_id = f"{eid}_eval_{device}"
    spec = collected / f"specs/{new_id}.yaml"
    spec.write_text(_with_device(EXPERIMENTS[eid], eid, new_id, device))
    p = Paths(collected)
    shutil.copytree(p.dictionary_dir(f"{eid}_ref"), p.dictionary_dir(new_id))
    run_stage("evaluate", spec)
    run_stage("analyze", spec)
    for name in ("eval.json", "analysis.json"):
        got, ref = read_json(collected / f"metrics/{new_id}/{name}"), read_json(collected / f"metrics/{eid}_ref/{name}")
        _assert_close(got, ref, 1e-4, f"{name} on {device}:")
        assert got["meta"]["device"].startswith(device) and ref["meta"]["device"] == "cpu"
    edits = [{"feature": 0, "op": "scale", "value": 0.0}]
    on_device = steer(spec, "edit", edits, keep_error=True)["effects"]
    on_cpu = steer(collected / f"specs/{eid}_ref.yaml", "edit", edits, keep_error=True)["effects"]
    _assert_close(on_device, on_cpu, 1e-4, f"steer on {device}:")
    shutil.rmtree(p.dictionary_dir(new_id).parent)


@pytest.mark.parametrize("device", DEVICES)
def test_collection_on_each_device_gives_the_cpu_store(collected, device):
    """collect.device: the subject runs there and its activations come back (through pinned memory
    on a GPU) as the CPU computes them, in the same order; the manifest names the device."""
    did = f"tiny_acts_{device}"
    text = TINY_DATASET.replace("id: tiny_acts", f"id: {did}").replace("  seed: 1\n", f"  seed: 1\n  device: {device}\n")
    spec = collected / f"specs/datasets/{did}.yaml"
    spec.write_text(text)
    run_stage("collect", spec)
    p = Paths(collected)
    got, ref = ActivationStore.open(p.store_dir(did)), ActivationStore.open(p.store_dir("tiny_acts"))
    assert got.n_shards == ref.n_shards and got.hook_dims == ref.hook_dims
    names = [*ref.hook_dims, "instance_id", "position"]
    for i in range(ref.n_shards):
        a, b = got.read_shard(i, names), ref.read_shard(i, names)
        assert a.keys() == b.keys()
        for name in b:
            if device == "cpu":
                assert torch.equal(a[name], b[name]), name
            else:
                torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    manifest = read_json(p.store_dir(did) / "manifest.json")
    assert manifest["meta"]["device"].startswith(device)


@pytest.mark.parametrize("device", DEVICES)
def test_batches_reach_the_device_with_their_values_and_an_sae_s_y_still_its_x(device):
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(5):
        x = torch.randn(8, 4, generator=gen)
        batches.append((x, x) if len(batches) % 2 else (x, torch.randn(8, 3, generator=gen)))
    moved = list(to_device(iter(batches), torch.device(device)))
    assert len(moved) == len(batches)
    for (x, y), (mx, my) in zip(batches, moved):
        assert mx.device.type == device and torch.equal(mx.cpu(), x) and torch.equal(my.cpu(), y)
        assert (my is mx) == (y is x)
        if device == "cpu":
            assert mx is x  # the CPU gets the loader's own tensors: no copy
