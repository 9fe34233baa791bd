"""Recipe pieces from the seeds, each one spec key: the math of each penalty, the schedules,
usage regularisation reviving silent latents, and Weights & Biases logging."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from sae_clt.dictionaries.dictionary import Dictionary, DictionaryConfig
from sae_clt.spec.models import ExperimentSpec, TrainSection
from sae_clt.training.losses import UsageKL
from sae_clt.training.optim import make_optimizer
from sae_clt.training.schedules import cosine_with_warmup
from sae_clt.training.step import train_step


def _model(activation="relu", d=8, n=32, seed=0):
    model = Dictionary(DictionaryConfig("sae", d, d, n, activation, 4, "a", "a"), seed=seed)
    return model


def _data(n_rows=256, d=8, seed=0):
    return torch.randn(n_rows, d, generator=torch.Generator().manual_seed(seed))


def _penalty(cfg: TrainSection, model, x):
    """The penalty train_step reports (computed before its update)."""
    opt = make_optimizer(model, cfg)
    clock = torch.zeros(model.cfg.d_sae, dtype=torch.long)
    return train_step(model, opt, x, x, clock, cfg, lr=0.0)["penalty"]


def test_tanh_penalty_is_the_saturating_sum_of_tanh_of_scaled_activations():
    model, x = _model(), _data()
    with torch.no_grad():
        z = torch.relu(model.pre_acts(x))
        norms = model.W_dec.norm(dim=1)
        expected = 0.01 * torch.tanh(3.0 * z * norms).sum(-1).mean()
        l1 = 0.01 * (z * norms).sum(-1).mean()
    tanh = _penalty(TrainSection(l1_coeff=0.01, sparsity_penalty="tanh", tanh_scale=3.0, l1_warmup_frac=0), model, x)
    assert tanh == pytest.approx(float(expected), rel=1e-5)
    assert _penalty(TrainSection(l1_coeff=0.01, l1_warmup_frac=0), _model(), x) == pytest.approx(float(l1), rel=1e-5)
    # tanh saturates: bounded by λ·d_sae per row whatever the activations' size
    assert tanh <= 0.01 * model.cfg.d_sae


def test_group_lasso_penalty_is_the_sum_of_group_norms():
    model, x = _model(), _data()
    with torch.no_grad():
        z = torch.relu(model.pre_acts(x))
        expected = 0.02 * z.reshape(len(x), 4, 8).norm(dim=-1).sum(-1).mean()
    got = _penalty(TrainSection(group_lasso_coeff=0.02, group_size=8, l1_warmup_frac=0), model, x)
    assert got == pytest.approx(float(expected), rel=1e-5)


def test_decoder_weight_penalties_add_l1_and_l2_of_the_decoder():
    model, x = _model(), _data()
    w = model.W_dec.detach()
    expected = 1e-3 * float(w.abs().sum()) + 1e-2 * float(w.square().sum())
    got = _penalty(TrainSection(decoder_l1_coeff=1e-3, decoder_l2_coeff=1e-2, unit_norm_decoder=False), model, x)
    assert got == pytest.approx(expected, rel=1e-5)


def test_cosine_schedule_warms_up_linearly_then_decays_to_zero():
    values = [cosine_with_warmup(s, 100, 10) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0)
    assert values[55] == pytest.approx(0.5, abs=0.01)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert values[-1] < 0.01


def test_usage_kl_is_zero_at_the_target_and_positive_away_from_it():
    model = _model()
    usage = UsageKL(model.cfg.d_sae, target=0.05, decay=0.0, temperature=0.1)
    pre_at_target = torch.full((1000, model.cfg.d_sae), -10.0)
    pre_at_target[:50] = 10.0  # 5 % of rows fire, sharply
    assert float(usage.loss(model, pre_at_target)) == pytest.approx(0.0, abs=1e-3)
    assert float(usage.loss(model, torch.full((1000, model.cfg.d_sae), -10.0))) > 0.01  # never fires
    assert float(usage.loss(model, torch.full((1000, model.cfg.d_sae), 10.0))) > 0.5  # always fires


def _firing_after_training(usage_coeff: float) -> torch.Tensor:
    x = _data(2048, seed=1)
    model = _model(n=32)
    with torch.no_grad():
        model.b_enc[:8] = -8.0  # these latents never fire on this data
    cfg = TrainSection(usage_kl_coeff=usage_coeff, usage_ema=0.5, usage_temperature=1.0, lr=0.05, warmup_frac=0)
    opt = make_optimizer(model, cfg)
    usage = UsageKL(model.cfg.d_sae, cfg.usage_target, cfg.usage_ema, cfg.usage_temperature) if usage_coeff else None
    clock = torch.zeros(model.cfg.d_sae, dtype=torch.long)
    for step in range(300):
        batch = x[(step * 256) % 2048:][:256]
        train_step(model, opt, batch, batch, clock, cfg, lr=cfg.lr, usage=usage, usage_scale=1.0)
    with torch.no_grad():
        return (torch.relu(model.pre_acts(x)) > 0).float().mean(0)


def test_usage_regularisation_makes_silent_latents_fire_again():
    assert (_firing_after_training(0.0)[:8] == 0).all()  # without it, ReLU gives them no gradient
    revived = _firing_after_training(5.0)[:8]
    assert (revived > 0).all(), revived


def test_usage_kl_is_refused_for_topk_with_a_clear_message():
    with pytest.raises(ValueError, match="usage_kl_coeff applies to jumprelu, relu, relu_clipped"):
        ExperimentSpec.model_validate({"id": "x", "dataset": "d", "source": "a", "target": "a",
                                       "model": {"architecture": "sae", "activation": "topk"},
                                       "train": {"usage_kl_coeff": 0.1}})


def test_group_lasso_needs_a_group_size_dividing_the_dictionary():
    with pytest.raises(ValueError, match="group_size"):
        ExperimentSpec.model_validate({"id": "x", "dataset": "d", "source": "a", "target": "a",
                                       "model": {"architecture": "sae", "activation": "relu", "d_sae": 30},
                                       "train": {"group_lasso_coeff": 0.1, "group_size": 8}})


def test_wandb_logging_runs_offline_and_records_its_run_id(built_project, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from sae_clt.spec.project import Paths
    from sae_clt.stages.table import run_stage

    root = tmp_path / "proj"
    shutil.copytree(built_project, root)
    spec = root / "specs" / "tiny_sae.yaml"
    spec.write_text(spec.read_text().replace("epochs: 2,", "epochs: 2, wandb: true, wandb_project: saeclt-test,"))
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_stage("train", spec)
    run_log = json.loads((Paths(root).dictionary_dir("tiny_sae").parent / "train_log.json").read_text())
    assert run_log["wandb_mode"] == "offline"
    run_dirs = list((Paths(root).dictionary_dir("tiny_sae").parent / "wandb").glob(f"offline-run-*-{run_log['wandb_run_id']}"))
    assert run_dirs, "the offline run folder should carry the recorded id"
    assert math.isfinite(json.loads(Paths(root).train_metrics("tiny_sae").read_text())["final"]["fvu"])


def test_jumprelu_thresholds_start_at_the_quantile_giving_l0_k():
    from sae_clt.dictionaries.activations import init_thresholds_at_quantile

    model, x = _model("jumprelu", d=16, n=64), _data(n_rows=4000, d=16) * 3.0
    init_thresholds_at_quantile(model, x[:2000], l0=8)
    with torch.no_grad():
        held_out_l0 = (model.activate(model.pre_acts(x[2000:])) > 0).sum(-1).float().mean()
    assert abs(float(held_out_l0) - 8) < 8 * 0.15  # on unseen rows of the same distribution


def test_jumprelu_thresholds_learn_at_their_own_rate():
    model = _model("jumprelu")
    opt = make_optimizer(model, TrainSection(lr=1e-3, jumprelu_threshold_lr_scale=10.0))
    clock = torch.zeros(model.cfg.d_sae, dtype=torch.long)
    train_step(model, opt, _data(), _data(), clock, TrainSection(lr=1e-3, l0_coeff=0.01), lr=1e-3)
    thresholds = [g for g in opt.param_groups if any(p is model.log_threshold for p in g["params"])]
    assert len(thresholds) == 1 and thresholds[0]["lr"] == pytest.approx(1e-2) and len(opt.param_groups) == 2
    assert all(g["lr"] == pytest.approx(1e-3) for g in opt.param_groups if g is not thresholds[0])
