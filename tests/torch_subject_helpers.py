"""A small user-written torch model, as a researcher would bring one: a module file in the
project, a factory, weights saved with torch.save(state_dict), inputs in a safetensors file."""

from __future__ import annotations

from pathlib import Path

MODEL_SOURCE = '''
import time

import torch
from torch import nn


class TokenMLP(nn.Module):
    """Embeds [batch, positions, d_in] inputs, then a residual MLP block."""

    def __init__(self, d_in, d_model, d_hidden, delay=0.0):
        super().__init__()
        self.embed = nn.Linear(d_in, d_model)
        self.up = nn.Linear(d_model, d_hidden)
        self.act = nn.GELU()
        self.down = nn.Linear(d_hidden, d_model)
        self.head = nn.Linear(d_model, 3)
        self.delay = delay

    def forward(self, x):
        if self.delay:
            time.sleep(self.delay)  # lets tests kill a collection part-way
        h = self.embed(x)
        h = h + self.down(self.act(self.up(h)))
        return self.head(h)


def make_token_mlp(d_in=6, d_model=16, d_hidden=32, delay=0.0):
    return TokenMLP(d_in, d_model, d_hidden, delay)
'''

SUBJECT_SPEC = """\
id: mlp
kind: torch
factory: usermodels.token_mlp:make_token_mlp
kwargs: {{d_in: 6, d_model: 16, d_hidden: 32, delay: {delay}}}
weights: weights/token_mlp.pt
evaluate: {{n_inputs: 64}}
"""

DATASET_SPEC = """\
id: mlp_acts
subject: mlp
collect:
  n_instances: {n}
  seed: 1
  hook_points: [{points}]
  instances_per_shard: 40
  batch_size: 20
  tensors: {{file: data/inputs.safetensors, keys: [x]}}
normalize: {{val_fraction: 0.2}}
"""

TRANSCODER_SPEC = """\
id: mlp_tc
dataset: mlp_acts
source: "up:input"
target: down
model: {architecture: transcoder, d_sae: 64, activation: topk, k: 4}
train: {batch_size: 256, epochs: 3, lr: 3.0e-3, log_every: 2, dead_after_rows: 2000}
evaluate: {batch_size: 500}
export: {}
"""


def write_torch_project(root: Path, n_instances: int = 300, delay: float = 0.0,
                        points: str = '"up:input", down') -> None:
    import torch
    from safetensors.torch import save_file

    (root / "usermodels").mkdir(exist_ok=True)
    (root / "usermodels" / "__init__.py").write_text("")
    (root / "usermodels" / "token_mlp.py").write_text(MODEL_SOURCE)
    import importlib.util

    spec = importlib.util.spec_from_file_location("_token_mlp_for_weights", root / "usermodels" / "token_mlp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    model = module.make_token_mlp()
    (root / "weights").mkdir(exist_ok=True)
    torch.save(model.state_dict(), root / "weights" / "token_mlp.pt")
    (root / "data").mkdir(exist_ok=True)
    x = torch.randn(n_instances + 100, 8, 6, generator=torch.Generator().manual_seed(3))
    save_file({"x": x}, str(root / "data" / "inputs.safetensors"))
    (root / "specs" / "subjects").mkdir(parents=True, exist_ok=True)
    (root / "specs" / "datasets").mkdir(parents=True, exist_ok=True)
    (root / "specs" / "subjects" / "mlp.yaml").write_text(SUBJECT_SPEC.format(delay=delay))
    (root / "specs" / "datasets" / "mlp_acts.yaml").write_text(DATASET_SPEC.format(n=n_instances, points=points))
    (root / "specs" / "mlp_tc.yaml").write_text(TRANSCODER_SPEC)
