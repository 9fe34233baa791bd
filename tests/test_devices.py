"""train.device: its resolution, its refusal where the machine cannot honour it, and training on
every available device to the CPU's weights (CUDA cases skip on a machine without a GPU)."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import TINY_SAE, TINY_TC, write_project
from typer.testing import CliRunner

from sae_clt.cli import app
from sae_clt.devices import resolve_device
from sae_clt.errors import SpecError
from sae_clt.io import read_json
from sae_clt.stages.table import run_stage

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
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
        run_stage("train", root / f"specs/{eid}_ref.yaml")
    return root


def test_auto_and_cpu_resolve_to_the_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", "train.device") == torch.device("cpu")
    assert resolve_device("cpu", "train.device") == torch.device("cpu")


@pytest.mark.parametrize("setting", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_is_refused_without_a_gpu_naming_the_field(monkeypatch, setting):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SpecError, match="train.device") as err:
        resolve_device(setting, "train.device")
    assert err.value.exit_code == 2


def test_a_gpu_index_out_of_range_is_refused(monkeypatch):
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


def test_the_device_is_left_out_of_the_spec_hash(collected):
    from sae_clt.spec.models import load_spec, spec_hash

    cpu = load_spec(collected / "specs/tiny_sae_ref.yaml")
    auto = cpu.model_copy(update={"train": cpu.train.model_copy(update={"device": "auto"})})
    assert spec_hash(cpu) == spec_hash(auto) and spec_hash(cpu, ["train"]) == spec_hash(auto, ["train"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: train.device cuda is honoured")
def test_train_device_cuda_is_refused_at_the_train_stage_with_exit_code_2(collected, monkeypatch):
    monkeypatch.chdir(collected)
    (collected / "specs/tiny_sae_gpu.yaml").write_text(_with_device(TINY_SAE, "tiny_sae", "tiny_sae_gpu", "cuda"))
    result = CliRunner().invoke(app, ["stage", "train", "specs/tiny_sae_gpu.yaml"])
    assert result.exit_code == 2, result.output
    assert "train.device" in result.output
    assert not (collected / "runs/experiments/tiny_sae_gpu/dictionary").exists()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eid", sorted(EXPERIMENTS))
def test_training_on_each_device_gives_the_cpu_weights(collected, eid, device):
    from safetensors.torch import load_file

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
    assert summary["device"] == str(resolve_device(device, "train.device"))
    ref_summary = read_json(collected / f"metrics/{eid}_ref/train.json")
    assert ref_summary["device"] == "cpu"
    assert summary["precision"] == "fp32"
    shutil.rmtree(collected / f"runs/experiments/{new_id}")
