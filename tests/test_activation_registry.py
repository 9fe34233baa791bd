"""A new activation is one registered class: from this file alone it is accepted by the spec,
trained, evaluated, saved and reloaded, with no other module touched."""

from __future__ import annotations

import shutil

import torch

from sae_clt.dictionaries.activations import ACTIVATIONS, Activation, register
from sae_clt.dictionaries.dictionary import Dictionary
from sae_clt.spec.project import Paths
from sae_clt.stages.table import run_stage


@register
class ShiftedSoftThreshold(Activation):
    """A toy: soft thresholding at a fixed 0.05, z = ReLU(pre - 0.05)."""

    name = "toy_soft_threshold"
    description = "ReLU(pre - 0.05), with the L1 penalty"
    threshold_firing = True

    def activate(self, model, pre, training=False):
        return (pre - 0.05).relu()


def test_a_toy_activation_registered_here_trains_evaluates_saves_and_reloads(built_project, tmp_path, monkeypatch):
    root = tmp_path / "proj"
    shutil.copytree(built_project, root)
    monkeypatch.chdir(root)
    spec = root / "specs" / "tiny_sae.yaml"
    spec.write_text(spec.read_text().replace("activation: topk, k: 4", "activation: toy_soft_threshold")
                    .replace("lr: 3.0e-3,", "lr: 3.0e-3, l1_coeff: 1.0e-3,"))
    for stage in ("train", "evaluate"):
        run_stage(stage, spec)
    paths = Paths(root)
    model = Dictionary.load(paths.dictionary_dir("tiny_sae"))
    assert model.cfg.activation == "toy_soft_threshold" and model.cfg.act is ACTIVATIONS["toy_soft_threshold"]
    pre = torch.linspace(-1, 1, 41)[None, :].expand(2, -1)
    assert torch.equal(model.activate(pre), (pre - 0.05).relu())
    import json

    metrics = json.loads(paths.eval_metrics("tiny_sae").read_text())
    assert metrics["model"]["activation"] == "toy_soft_threshold"
    assert 0 < metrics["reconstruction"]["fvu"] < 1 and metrics["sparsity"]["l0"] > 0
