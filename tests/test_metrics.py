"""Metric definitions checked against hand computations."""

from __future__ import annotations

import pytest
import torch

from sae_clt.evaluation.metrics import ReconstructionMeter, SparsityMeter, decoder_redundancy


def test_fvu_of_predicting_the_mean_is_exactly_one():
    y = torch.randn(100, 5) * torch.tensor([1.0, 2, 3, 4, 5]) + 7
    meter = ReconstructionMeter(5)
    meter.update(y, y.mean(0).expand_as(y))
    assert meter.summary()["fvu"] == pytest.approx(1.0, abs=1e-12)


def test_fvu_matches_hand_computation_and_is_batch_invariant():
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(64, 3, generator=gen)
    y_hat = y + 0.3 * torch.randn(64, 3, generator=gen)
    yd, hd = y.double(), y_hat.double()
    expected = float(((yd - hd) ** 2).sum() / ((yd - yd.mean(0)) ** 2).sum())
    one, many = ReconstructionMeter(3), ReconstructionMeter(3)
    one.update(y, y_hat)
    for a, b in zip(y.split(7), y_hat.split(7)):
        many.update(a, b)
    assert one.summary()["fvu"] == pytest.approx(expected, rel=1e-9)
    assert many.summary()["fvu"] == pytest.approx(expected, rel=1e-9)


def test_r2_per_dim_and_cosine():
    y = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]])
    y_hat = torch.tensor([[1.0, 1.0], [3.0, 1.0], [5.0, 1.0]])
    meter = ReconstructionMeter(2)
    meter.update(y, y_hat)
    r2 = meter.r2_per_dim()
    assert r2[0].item() == pytest.approx(1.0)
    # dim 1: SSE = 1 + 1 + 9 = 11; SST about mean 2 = 4 + 0 + 4 = 8
    assert r2[1].item() == pytest.approx(1 - 11 / 8)
    cos = torch.nn.functional.cosine_similarity(y, y_hat, dim=1).mean().item()
    assert meter.summary()["cosine"] == pytest.approx(cos)


def test_l0_density_dead_and_dense():
    z = torch.tensor([[1.0, 0, 0, 2], [0.5, 0, 0, 0], [3.0, 0, 1, 0], [1.0, 0, 0, 0]])
    meter = SparsityMeter(4)
    meter.update(z)
    s = meter.summary(dense_threshold=0.3)
    assert s["l0"] == pytest.approx(6 / 4)
    assert s["dead_fraction"] == pytest.approx(1 / 4)  # latent 1 never fires
    assert s["dense_fraction"] == pytest.approx(1 / 4)  # latent 0 fires on 100 % of rows
    assert meter.density().tolist() == [1.0, 0.0, 0.25, 0.25]


def test_decoder_redundancy_counts_near_duplicate_directions():
    w = torch.tensor([[1.0, 0, 0], [0.99, 0.05, 0], [0, 1.0, 0], [0, 0, 1.0]])
    assert decoder_redundancy(w, 0.9) == pytest.approx(0.5)


def test_layered_linear_baseline_predicts_each_target_layer_from_its_own_and_earlier_sources_only():
    from sae_clt.evaluation.evaluate import apply_linear, fit_linear_baseline

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 6, generator=gen)  # two source layers of 3
    a, b, c = (torch.randn(3, 3, generator=gen) for _ in range(3))
    y = torch.cat([x[:, :3] @ a, x[:, :3] @ b + x[:, 3:] @ c], dim=1)  # target 0 from source 0; target 1 from both

    class Rows:
        def epoch(self, _):
            yield x, y

    w = fit_linear_baseline(Rows(), layers=2)
    assert torch.equal(w[3:6, :3], torch.zeros(3, 3))  # source layer 1 never feeds target layer 0
    torch.testing.assert_close(apply_linear(w, x), y, rtol=1e-3, atol=1e-3)
