"""Shared fixtures: a tiny saeclt project (small subject, small dataset) built in a temp dir."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# Specs that say `device: auto` (the tiny projects' own, most of the suite) run on the CPU on every
# machine, so the reference figures are the CPU's; the device-parametrised tests name their device.
os.environ["SAECLT_DEVICE"] = "cpu"

# Device-agnostic tests take a `device` parameter from this list: the CPU always; CUDA where torch
# sees a GPU (skipped, and shown as skipped, elsewhere). On a GPU machine `pytest -k cuda` runs them.
_HAS_CUDA = torch.cuda.is_available()
DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not _HAS_CUDA, reason="torch sees no GPU here"))]

TINY_SUBJECT = """\
id: tiny
kind: tsp
n_nodes: 10
seed: 0
policy: {d_model: 16, n_layers: 2, n_heads: 2, d_ff: 32}
train: {n_teacher_instances: 200, teacher_starts: 1, batch_size: 32, steps: 20, lr: 1.0e-3, warmup_steps: 5}
evaluate: {n_instances: 50, seed: 123}
"""

TINY_DATASET = """\
id: tiny_acts
subject: tiny
collect:
  n_instances: 300
  seed: 1
  hook_points: [encoder.layers.0, encoder.layers.1, "encoder.layers.1:input"]
  instances_per_shard: 64
  batch_size: 50
normalize: {val_fraction: 0.2}
"""

TINY_SAE = """\
id: tiny_sae
dataset: tiny_acts
source: encoder.layers.1
target: encoder.layers.1
model: {architecture: sae, d_sae: 64, activation: topk, k: 4}
train: {batch_size: 256, epochs: 2, lr: 3.0e-3, log_every: 2, dead_after_rows: 1000, echo: 1, warmup_frac: 0.6, init: data}
evaluate: {batch_size: 500}
export: {top_k: 3}
"""

TINY_TC = """\
id: tiny_tc
dataset: tiny_acts
source: encoder.layers.0
target: encoder.layers.1
model: {architecture: transcoder, d_sae: 64, activation: relu}
train: {batch_size: 256, epochs: 2, lr: 3.0e-3, l1_coeff: 1.0e-3, log_every: 2, echo: 1, warmup_frac: 0.6}
evaluate: {batch_size: 500}
export: {}
"""


def write_project(root: Path) -> Path:
    (root / "specs" / "subjects").mkdir(parents=True)
    (root / "specs" / "datasets").mkdir(parents=True)
    (root / "specs" / "subjects" / "tiny.yaml").write_text(TINY_SUBJECT)
    (root / "specs" / "datasets" / "tiny_acts.yaml").write_text(TINY_DATASET)
    (root / "specs" / "tiny_sae.yaml").write_text(TINY_SAE)
    (root / "specs" / "tiny_tc.yaml").write_text(TINY_TC)
    return root


@pytest.fixture
def tiny_project(tmp_path, monkeypatch) -> Path:
    root = write_project(tmp_path / "proj")
    monkeypatch.chdir(root)
    return root


@pytest.fixture(scope="session")
def built_project(tmp_path_factory) -> Path:
    """A tiny project with every stage run once (shared by read-only tests)."""
    from sae_clt.stages.table import run_stage

    root = write_project(tmp_path_factory.mktemp("built") / "proj")
    run_stage("subject", root / "specs/subjects/tiny.yaml")
    run_stage("collect", root / "specs/datasets/tiny_acts.yaml")
    run_stage("normalize", root / "specs/datasets/tiny_acts.yaml")
    for eid in ("tiny_sae", "tiny_tc"):
        for stage in ("train", "evaluate", "analyze", "report", "export"):
            run_stage(stage, root / f"specs/{eid}.yaml")
    return root


@pytest.fixture
def dvc_project(tiny_project) -> Path:
    """The tiny project as a git + DVC repository with saeclt's dvc.yaml. dvc.yaml names the
    package's source files as dependencies, so the project gets a copy of them."""
    import subprocess
    import sys

    root = tiny_project
    shutil.copytree(REPO / "sae_clt", root / "sae_clt", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True, env=dict(os.environ, DVC_NO_ANALYTICS="1"))
    return root
