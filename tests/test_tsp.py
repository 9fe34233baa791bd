"""The TSP problem utilities and the policy's decoding."""

from __future__ import annotations

import torch

from sae_clt.subjects.tsp_policy import PolicyConfig, TSPPolicy
from sae_clt.subjects.tsp_problem import (
    best_nn_two_opt_tours,
    nearest_neighbour_tours,
    random_instances,
    rotate_to_start,
    tour_length,
    two_opt,
)
from sae_clt.subjects.tsp_train import relabel_batch


def _is_permutation(tours: torch.Tensor) -> bool:
    return bool((tours.sort(dim=1).values == torch.arange(tours.shape[1])).all())


def test_tour_length_of_unit_square_is_four():
    square = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]])
    assert tour_length(square, torch.tensor([[0, 1, 2, 3]])).item() == 4.0
    assert abs(tour_length(square, torch.tensor([[0, 2, 1, 3]])).item() - (2 + 2 * 2**0.5)) < 1e-6


def test_two_opt_never_lengthens_and_keeps_permutations():
    coords = random_instances(64, 15, seed=3)
    nn_tours = nearest_neighbour_tours(coords)
    improved = two_opt(coords, nn_tours)
    assert _is_permutation(nn_tours) and _is_permutation(improved)
    assert bool((tour_length(coords, improved) <= tour_length(coords, nn_tours) + 1e-6).all())
    assert tour_length(coords, improved).mean() < tour_length(coords, nn_tours).mean()


def test_relabelled_teacher_tours_keep_their_length_and_start_at_zero():
    coords = random_instances(32, 12, seed=4)
    tours = best_nn_two_opt_tours(coords, 2)
    new_coords, new_tours = relabel_batch(coords, tours, torch.Generator().manual_seed(0))
    assert bool((new_tours[:, 0] == 0).all()) and _is_permutation(new_tours)
    assert torch.allclose(tour_length(new_coords, new_tours), tour_length(coords, tours), atol=1e-5)
    assert torch.equal(rotate_to_start(tours)[:, 0], torch.zeros(32, dtype=torch.long))


def test_greedy_decoding_visits_every_city_once_from_city_zero():
    policy = TSPPolicy(PolicyConfig(d_model=16, n_layers=1, n_heads=2, d_ff=16, norm="batch")).eval()
    tours = policy.greedy_tours(random_instances(8, 9, seed=5))
    assert _is_permutation(tours) and bool((tours[:, 0] == 0).all())


def test_teacher_forced_likelihood_matches_stepwise_decoding():
    torch.manual_seed(0)
    policy = TSPPolicy(PolicyConfig(d_model=16, n_layers=1, n_heads=2, d_ff=16, norm="batch")).eval()
    coords = random_instances(4, 7, seed=6)
    tours = policy.greedy_tours(coords)
    with torch.no_grad():
        nodes = policy.encoder(coords)
        parallel = policy.tour_log_likelihood(nodes, tours)
        cache = policy.decoder.precompute(nodes)
        total = torch.zeros(4)
        visited = torch.zeros(4, 7, dtype=torch.bool)
        visited[:, 0] = True
        rows = torch.arange(4)
        for t in range(1, 7):
            logp = policy.decoder.logits(cache, nodes[:, :1], nodes[rows, tours[:, t - 1]].unsqueeze(1), visited.unsqueeze(1)).squeeze(1)
            total += logp[rows, tours[:, t]]
            visited[rows, tours[:, t]] = True
    assert torch.allclose(parallel, total, atol=1e-5)
