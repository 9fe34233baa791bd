"""Straight-through estimators for thresholded activations (JumpReLU and its L0 penalty,
Rajamanoharan et al. 2024): the forward pass is exact, the gradient to the threshold θ is a
rectangle-kernel estimate of width ε (``bandwidth``)."""

from __future__ import annotations

import torch


class _JumpReLU(torch.autograd.Function):
    """z = pre · H(pre - θ). Gradient to pre: H(pre - θ); to θ: the straight-through estimate
    -(θ / ε) · K((pre - θ) / ε) with a rectangle kernel K of width 1 (Rajamanoharan et al.)."""

    @staticmethod
    def forward(ctx, pre, theta, bandwidth):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        near = ((pre - theta).abs() < eps / 2).to(pre.dtype)
        g_theta = (grad * -(theta / eps) * near).sum(0)
        return grad * (pre > theta), g_theta, None


class _Step(torch.autograd.Function):
    """H(pre - θ), with the same straight-through gradient to θ (for the L0 penalty)."""

    @staticmethod
    def forward(ctx, pre, theta, bandwidth):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        near = ((pre - theta).abs() < eps / 2).to(pre.dtype)
        return None, (grad * -(1.0 / eps) * near).sum(0), None


def jumprelu(pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return _JumpReLU.apply(pre, theta, bandwidth)


def step_l0(pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Number of active latents per row, differentiable in θ (straight-through)."""
    return _Step.apply(pre, theta, bandwidth).sum(-1)
