"""Where a subject's model runs: every subject with a model starts on the CPU and is moved once by
the stage that uses it (``collect.device`` for collection, ``train.device`` for the causal check,
the analysis' ablations and ``saeclt steer``). Inputs are moved to the model's device where the
subject runs its model (``forward``, the task), so callers hand it CPU tensors."""

from __future__ import annotations

import torch

from ..devices import move


class OnDevice:
    """``to(device)`` and ``device`` for a subject whose network is ``self.model``."""

    device = torch.device("cpu")

    def to(self, device: torch.device | str):
        """Move the model to ``device``; a subject without a model (imported activations) stays
        on the CPU, where its files are read."""
        if self.model is None:
            return self
        device = torch.device(device)
        self.model.to(device)
        self.device = device
        return self

    def on_device(self, value):
        """``value`` (a tensor, or tensors in dicts, lists, tuples) on the subject's device."""
        return move(value, self.device)
