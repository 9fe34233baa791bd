"""TSP subjects: an instance is its cities and the policy's greedy tour. The collected instances
are regenerated exactly as ``TSPSubject.input_batches`` drew them: ``random_instances`` with the
dataset's collect.n_instances and collect.seed, instance i being the i-th."""

from __future__ import annotations

import torch

from ...subjects.tsp_problem import random_instances
from ..examples import sig

KIND = "tsp"
BATCH = 1_024  # instances decoded at once


@torch.no_grad()
def render(subject, dataset, instance_ids: list[int]) -> dict[int, dict]:
    if not instance_ids:
        return {}
    coords = random_instances(dataset.collect.n_instances, subject.spec.n_nodes, dataset.collect.seed)[torch.tensor(instance_ids)]
    tours = torch.cat([subject.model.greedy_tours(subject.on_device(chunk)).cpu() for chunk in coords.split(BATCH)])
    return {i: {"coords": [[sig(x), sig(y)] for x, y in c.double().tolist()], "tour": t}
            for i, c, t in zip(instance_ids, coords, tours.tolist())}
