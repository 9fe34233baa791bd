"""Sparse dictionaries: an SAE (reads and writes one hook point) or a transcoder (reads one,
writes another; sizes may differ), with TopK or ReLU (+ L1) sparsity.

    pre  = (x - b_dec·[sae]) @ W_enc + b_enc        [B, d_sae]
    z    = TopK(ReLU(pre))  or  ReLU(pre)            [B, d_sae]
    ŷ    = z @ W_dec + b_dec                         [B, d_out]

W_dec rows are kept at unit norm. Weights live in the normalised space of the activation
store; the normalisation (mean, scale per hook) is saved beside them so a saved dictionary maps
raw activations to raw activations on its own (``predict_raw``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .errors import DataError
from .io import read_json, save_safetensors, write_json

WEIGHTS = "dictionary.safetensors"
CONFIG = "cfg.json"


@dataclass(frozen=True)
class DictionaryConfig:
    architecture: str  # "sae" | "transcoder"
    d_in: int
    d_out: int
    d_sae: int
    activation: str  # "topk" | "relu"
    k: int
    source: str
    target: str

    @property
    def apply_b_dec_to_input(self) -> bool:
        return self.architecture == "sae"


class Dictionary(nn.Module):
    def __init__(self, cfg: DictionaryConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed)
        w_dec = torch.randn(cfg.d_sae, cfg.d_out, generator=gen)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        if cfg.d_in == cfg.d_out:  # encoder starts as the decoder's transpose
            w_enc = w_dec.t().clone()
        else:
            w_enc = torch.randn(cfg.d_in, cfg.d_sae, generator=gen) / cfg.d_in**0.5
        self.W_enc = nn.Parameter(w_enc.contiguous())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = nn.Parameter(w_dec)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out))
        for name, dim in (("source_mean", cfg.d_in), ("target_mean", cfg.d_out)):
            self.register_buffer(name, torch.zeros(dim))
        for name, dim in (("source_scale", cfg.d_in), ("target_scale", cfg.d_out)):
            self.register_buffer(name, torch.ones(dim))

    # ------------------------------------------------------------------ forward pieces

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def sparse_code(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) of the active latents, [B, k] each; topk only."""
        values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return F.relu(values), indices

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latent activations [B, d_sae]."""
        pre = self.pre_acts(x)
        if self.cfg.activation == "relu":
            return F.relu(pre)
        values, indices = self.sparse_code(pre)
        return torch.zeros_like(pre).scatter_(-1, indices, values)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_dec

    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Decoder as a weighted gather of the k active rows (no [B, d_sae] intermediate)."""
        return F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum") + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return self.decode(z), z

    @torch.no_grad()
    def predict_raw(self, x_raw: torch.Tensor) -> torch.Tensor:
        """Raw source activations -> raw target reconstruction (normalisation applied and undone)."""
        x = (x_raw.float() - self.source_mean) / self.source_scale
        y, _ = self(x)
        return y * self.target_scale + self.target_mean

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Data initialisation: latent i starts as the pair (x_i, y_i) of a sampled row: its
        encoder column is x_i's direction and its decoder row y_i's. Every latent then fires
        somewhere on the data from the first step, even on a low-dimensional manifold."""
        x_dir = F.normalize(x, dim=1)
        y_dir = F.normalize(y - self.b_dec, dim=1)
        # Scaled so the k active latents together start near the target's norm, not k times it.
        self.W_enc.copy_(x_dir.t() / self.cfg.k)
        self.W_dec.copy_(y_dir)

    # ------------------------------------------------------------------ decoder constraint

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the gradient component along each decoder row (it only changes the norm)."""
        if self.W_dec.grad is not None:
            w = self.W_dec
            self.W_dec.grad -= (self.W_dec.grad * w).sum(dim=1, keepdim=True) * w

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    # ------------------------------------------------------------------ persistence

    def set_normalization(self, src_mean, src_scale, tgt_mean, tgt_scale) -> None:
        for name, value in zip(("source_mean", "source_scale", "target_mean", "target_scale"), (src_mean, src_scale, tgt_mean, tgt_scale)):
            getattr(self, name).copy_(value)

    def save(self, folder: Path, meta: dict, extra_cfg: dict | None = None) -> None:
        folder = Path(folder)
        tensors = {k: v.detach().float() for k, v in self.state_dict().items()}
        save_safetensors(folder / WEIGHTS, tensors, metadata={"spec_hash": meta.get("spec_hash", "")})
        write_json(folder / CONFIG, {**asdict(self.cfg), "apply_b_dec_to_input": self.cfg.apply_b_dec_to_input,
                                     "space": "normalized; *_mean / *_scale map to raw activations", **(extra_cfg or {}), "meta": meta})

    @classmethod
    def load(cls, folder: Path) -> "Dictionary":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / CONFIG).exists() or not (folder / WEIGHTS).exists():
            raise DataError(f"{folder}: no saved dictionary ({CONFIG} and {WEIGHTS} expected; run the train stage)")
        cfg_json = read_json(folder / CONFIG)
        fields = DictionaryConfig.__dataclass_fields__
        model = cls(DictionaryConfig(**{k: cfg_json[k] for k in fields}))
        model.load_state_dict(load_file(folder / WEIGHTS))
        return model.eval()
