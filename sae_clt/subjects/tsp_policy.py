"""The built-in subject: an attention-model policy for the travelling-salesman problem.

Shape (after Kool et al.'s attention model): a linear embedding of the city coordinates, a stack
of post-norm self-attention blocks (BatchNorm over cities by default, as in that paper; its
layers relate to each other far less linearly than LayerNorm's, which makes transcoders between
them a meaningful test) (``encoder.layers.{i}``; each block's output is the residual
stream after that block), and a pointer decoder that builds the tour one city at a time from a
context of (graph mean, first city, last city). The tour always starts at city 0, so greedy
decoding is deterministic and teacher forcing has only the two tour directions to consider.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PolicyConfig:
    """The policy's shape: the spec's ``policy`` section (spec.TSPPolicyArch, where the defaults live)."""

    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    norm: str  # "layer" (LayerNorm) | "batch" (BatchNorm over all cities, as in Kool et al.)
    logit_clip: float = 10.0  # not a spec field: fixed for every policy

    def to_dict(self) -> dict:
        return asdict(self)


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over every city of every instance: [B, N, d] -> [B, N, d]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).view_as(x)


def make_norm(cfg: PolicyConfig) -> nn.Module:
    return TokenBatchNorm(cfg.d_model) if cfg.norm == "batch" else nn.LayerNorm(cfg.d_model)


class EncoderLayer(nn.Module):
    """Self-attention block: x = Norm(x + MHA(x)); x = Norm(x + FF(x))."""

    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.attn = nn.MultiheadAttention(cfg.d_model, cfg.n_heads, batch_first=True)
        self.norm_attn = make_norm(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.ReLU(), nn.Linear(cfg.d_ff, cfg.d_model))
        self.norm_mlp = make_norm(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm_attn(x + self.attn(x, x, x, need_weights=False)[0])
        return self.norm_mlp(x + self.mlp(x))


class Encoder(nn.Module):
    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.embed = nn.Linear(2, cfg.d_model)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layers))

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        h = self.embed(coords)  # [B, N, d]
        for layer in self.layers:
            h = layer(h)
        return h


class PointerDecoder(nn.Module):
    """Scores the next city from node embeddings and a (graph, first, last) context."""

    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.logit_clip = cfg.logit_clip
        self.project_context = nn.Linear(3 * d, d, bias=False)
        self.project_nodes = nn.Linear(d, 3 * d, bias=False)  # glimpse keys, values, logit keys
        self.project_glimpse = nn.Linear(d, d, bias=False)

    def precompute(self, nodes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        keys, values, logit_keys = self.project_nodes(nodes).chunk(3, dim=-1)
        return nodes.mean(dim=1), self._heads(keys), self._heads(values), logit_keys

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape  # -> [B, H, N, d/H]
        return x.view(b, n, self.n_heads, d // self.n_heads).transpose(1, 2)

    def logits(self, cache, first: torch.Tensor, last: torch.Tensor, visited: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of the next city for T decoding steps at once.

        first, last: [B, T, d] embeddings; visited: [B, T, N] bool. Returns [B, T, N].
        """
        graph, keys, values, logit_keys = cache
        context = torch.cat([graph.unsqueeze(1).expand_as(first), first, last], dim=-1)
        query = self._heads(self.project_context(context))  # [B, H, T, dh]
        scores = query @ keys.transpose(-1, -2) / math.sqrt(query.shape[-1])  # [B, H, T, N]
        scores = scores.masked_fill(visited.unsqueeze(1), float("-inf"))
        glimpse = (scores.softmax(dim=-1) @ values).transpose(1, 2).flatten(2)  # [B, T, d]
        glimpse = self.project_glimpse(glimpse)
        raw = glimpse @ logit_keys.transpose(-1, -2) / math.sqrt(glimpse.shape[-1])  # [B, T, N]
        raw = self.logit_clip * torch.tanh(raw)
        return raw.masked_fill(visited, float("-inf")).log_softmax(dim=-1)


class TSPPolicy(nn.Module):
    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = PointerDecoder(cfg)

    def tour_log_likelihood(self, nodes: torch.Tensor, tours: torch.Tensor) -> torch.Tensor:
        """Teacher-forced log-likelihood of tours (all starting at city 0) given node embeddings: [B]."""
        cache = self.decoder.precompute(nodes)
        b, n, d = nodes.shape
        prev = tours[:, :-1]  # city visited at step t-1, for t = 1..N-1
        last = nodes.gather(1, prev.unsqueeze(-1).expand(-1, -1, d))  # [B, N-1, d]
        first = nodes[:, :1].expand(-1, n - 1, -1)
        # visited[b, t, c]: city c is among tours[b, :t+1]
        order = torch.empty_like(tours)
        order.scatter_(1, tours, torch.arange(n, device=tours.device).expand(b, -1))  # position of each city in the tour
        visited = order.unsqueeze(1) <= torch.arange(n - 1, device=tours.device).view(1, -1, 1)
        logp = self.decoder.logits(cache, first, last, visited)  # [B, N-1, N]
        return logp.gather(2, tours[:, 1:].unsqueeze(-1)).squeeze(-1).sum(dim=1)

    @torch.no_grad()
    def greedy_tours(self, coords: torch.Tensor) -> torch.Tensor:
        """Greedy decoding from city 0: [B, N, 2] -> tours [B, N]."""
        nodes = self.encoder(coords)
        cache = self.decoder.precompute(nodes)
        b, n, _ = nodes.shape
        rows = torch.arange(b, device=coords.device)
        current = torch.zeros(b, dtype=torch.long, device=coords.device)
        visited = torch.zeros(b, n, dtype=torch.bool, device=coords.device)
        visited[:, 0] = True
        first = nodes[:, :1]
        tours = [current]
        for _ in range(n - 1):
            last = nodes[rows, current].unsqueeze(1)
            logp = self.decoder.logits(cache, first, last, visited.unsqueeze(1)).squeeze(1)
            current = logp.argmax(dim=-1)
            visited[rows, current] = True
            tours.append(current)
        return torch.stack(tours, dim=1)


def imitation_loss(policy: TSPPolicy, coords: torch.Tensor, tours: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the teacher's cycle, taken in whichever direction is likelier."""
    reverse = torch.cat([tours[:, :1], tours[:, 1:].flip(1)], dim=1)
    nodes = policy.encoder(coords)  # encoded once, decoded in both directions
    both = policy.tour_log_likelihood(torch.cat([nodes, nodes]), torch.cat([tours, reverse]))
    forward_ll, reverse_ll = both.chunk(2)
    return -torch.logsumexp(torch.stack([forward_ll, reverse_ll]), dim=0).mean()


__all__ = ["PolicyConfig", "TSPPolicy", "imitation_loss"]
