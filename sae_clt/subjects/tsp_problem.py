"""Euclidean TSP instances and classical heuristics, batched in torch.

Everything works on a batch of instances ``coords`` [B, N, 2] in the unit square and tours
[B, N] (a permutation of node indices, the return to the start implied). The heuristics are the
reference points the policy's metrics are reported against (random, nearest neighbour,
nearest neighbour + 2-opt) and the imitation teacher.
"""

from __future__ import annotations

import torch


def random_instances(n_instances: int, n_nodes: int, seed: int) -> torch.Tensor:
    """Uniform random cities in the unit square, reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n_instances, n_nodes, 2, generator=gen)


def tour_length(coords: torch.Tensor, tours: torch.Tensor) -> torch.Tensor:
    """Closed-tour length of each instance: [B, N, 2], [B, N] -> [B]."""
    ordered = coords.gather(1, tours.unsqueeze(-1).expand(-1, -1, 2))
    steps = ordered - ordered.roll(-1, dims=1)
    return steps.norm(dim=-1).sum(dim=1)


def random_tours(n_instances: int, n_nodes: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.argsort(torch.rand(n_instances, n_nodes, generator=gen), dim=1)


def nearest_neighbour_tours(coords: torch.Tensor, start: torch.Tensor | int = 0) -> torch.Tensor:
    """Greedy nearest-neighbour tours from ``start`` (an index or one per instance)."""
    batch, n_nodes, _ = coords.shape
    dist = torch.cdist(coords, coords)  # [B, N, N]
    rows = torch.arange(batch)
    if torch.is_tensor(start):
        current = start.expand(batch).clone()
    else:
        current = torch.full((batch,), int(start), dtype=torch.long)
    visited = torch.zeros(batch, n_nodes, dtype=torch.bool)
    tours = torch.empty(batch, n_nodes, dtype=torch.long)
    for step in range(n_nodes):
        tours[:, step] = current
        visited[rows, current] = True
        if step == n_nodes - 1:
            break
        d = dist[rows, current].masked_fill(visited, float("inf"))
        current = d.argmin(dim=1)
    return tours


def two_opt(coords: torch.Tensor, tours: torch.Tensor, max_iters: int = 1000) -> torch.Tensor:
    """Best-improvement 2-opt on every instance at once, until no move improves any tour.

    A move (i, j) with i < j reverses tour[i+1 .. j]; its gain is computed for all pairs in one
    vectorised pass, and each instance applies its best improving move per iteration.
    """
    tours = tours.clone()
    batch, n_nodes = tours.shape
    idx = torch.arange(n_nodes)
    i_idx, j_idx = torch.triu_indices(n_nodes, n_nodes, offset=2)
    keep = ~((i_idx == 0) & (j_idx == n_nodes - 1))  # that pair touches the same edge twice
    i_idx, j_idx = i_idx[keep], j_idx[keep]
    rows = torch.arange(batch)
    active = torch.ones(batch, dtype=torch.bool)
    for _ in range(max_iters):
        sub = rows[active]
        if sub.numel() == 0:
            break
        pts = coords[sub].gather(1, tours[sub].unsqueeze(-1).expand(-1, -1, 2))  # [b, N, 2]
        nxt = pts.roll(-1, dims=1)
        a, b = pts[:, i_idx], nxt[:, i_idx]
        c, d = pts[:, j_idx], nxt[:, j_idx]
        gain = (a - b).norm(dim=-1) + (c - d).norm(dim=-1) - (a - c).norm(dim=-1) - (b - d).norm(dim=-1)
        best_gain, best = gain.max(dim=1)
        improving = best_gain > 1e-9
        if not improving.any():
            break
        move_rows = sub[improving]
        bi, bj = i_idx[best[improving]], j_idx[best[improving]]
        # Reverse positions bi+1..bj: position p maps to bi+1+bj-p inside the segment.
        pos = idx.expand(move_rows.numel(), -1)
        lo, hi = (bi + 1).unsqueeze(1), bj.unsqueeze(1)
        inside = (pos >= lo) & (pos <= hi)
        src = torch.where(inside, lo + hi - pos, pos)
        tours[move_rows] = tours[move_rows].gather(1, src)
        active[sub[~improving]] = False
    return tours


def best_nn_two_opt_tours(coords: torch.Tensor, n_starts: int = 4) -> torch.Tensor:
    """The shortest of nearest-neighbour + 2-opt tours from ``n_starts`` evenly spaced starts."""
    batch, n_nodes, _ = coords.shape
    best_tours, best_len = None, None
    for s in range(n_starts):
        start = (s * n_nodes) // n_starts
        tours = two_opt(coords, nearest_neighbour_tours(coords, start))
        length = tour_length(coords, tours)
        if best_tours is None:
            best_tours, best_len = tours, length
        else:
            better = length < best_len
            best_tours = torch.where(better.unsqueeze(1), tours, best_tours)
            best_len = torch.minimum(length, best_len)
    return best_tours


def rotate_to_start(tours: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Roll each tour so that it begins at node ``start`` (same cycle, same direction)."""
    offset = (tours == start).long().argmax(dim=1)
    n_nodes = tours.shape[1]
    pos = (torch.arange(n_nodes).unsqueeze(0) + offset.unsqueeze(1)) % n_nodes
    return tours.gather(1, pos)
