"""The linear LoRA toy: how close does gradient descent on the factors B, A get to the best rank-r update?

A frozen layer ``W0`` and a teacher ``W* = W0 + Delta`` (``Delta`` of full rank with a decaying spectrum).
The student is ``W0 + (alpha / r) B A`` with LoRA's initialisation (A random, B = 0), trained by full-batch
gradient descent (Adam) on the regression loss ``mean ||x W*^T - x W^T||^2`` over whitened inputs
(``X^T X = n I``), where that loss equals ``||W* - W||_F^2 / d_out`` exactly. The best any rank-r update can do
is the SVD truncation bound (Eckart-Young): ``min ||Delta - M||_F^2 over rank(M) <= r = sum_{i>r} sigma_i^2``.

The same LoRA layer, as a module with dropout, merge and unmerge:
:class:`lora_lab.lora_scratch.LoraLinear` (checked against peft's layer by tests/test_lora_scratch.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from lora_train.plots import finish_plot, pyplot


@dataclass
class ToyResult:
    """One rank's outcome: the learned squared Frobenius error next to the SVD bound."""

    r: int
    bound: float
    learned: float
    steps: int

    @property
    def ratio(self) -> float:
        """learned / bound (inf when the bound is 0 but the error is not)."""
        if self.bound == 0:
            return 1.0 if self.learned == 0 else math.inf
        return self.learned / self.bound


def make_problem(d_out: int, d_in: int, decay: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W0, W*, sigma)``: random frozen weights and a teacher whose difference has singular values ``decay**i``."""
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) / math.sqrt(d_in)
    k = min(d_out, d_in)
    u, _ = torch.linalg.qr(torch.randn(d_out, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d_in, k, generator=g, dtype=torch.float64))
    sigma = decay ** torch.arange(k, dtype=torch.float64)
    return w0, w0 + u @ torch.diag(sigma) @ v.T, sigma


def whitened_inputs(n: int, d_in: int, seed: int) -> torch.Tensor:
    """``n`` inputs with ``X^T X = n I`` exactly (so the regression loss is the Frobenius error)."""
    if n < d_in:
        raise ValueError(f"need n >= d_in whitened inputs, got n = {n} < d_in = {d_in}")
    g = torch.Generator().manual_seed(seed + 1)
    q, _ = torch.linalg.qr(torch.randn(n, d_in, generator=g, dtype=torch.float64))
    return q * math.sqrt(n)


def svd_bound(sigma: torch.Tensor, r: int) -> float:
    """Eckart-Young: the smallest squared Frobenius error of a rank-``r`` approximation."""
    return float((sigma[r:] ** 2).sum())


def train_factors(
    w0: torch.Tensor, w_star: torch.Tensor, x: torch.Tensor, r: int, alpha: float, steps: int, lr: float, seed: int
) -> torch.Tensor:
    """Fit LoRA factors by full-batch Adam with cosine decay; return the learned update ``(alpha / r) B A``."""
    g = torch.Generator().manual_seed(seed + 2)
    d_out, d_in = w0.shape
    a = (torch.rand(r, d_in, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(
        d_in
    )  # kaiming-uniform-like, as in peft
    a.requires_grad_(True)
    b = torch.zeros(d_out, r, dtype=torch.float64, requires_grad=True)  # B = 0: training starts at W0
    scale = alpha / r
    y = x @ w_star.T
    optimizer = torch.optim.Adam([a, b], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    for _ in range(steps):
        pred = x @ (w0 + scale * b @ a).T
        loss = ((pred - y) ** 2).sum(dim=1).mean()  # = ||W* - W||_F^2 because X^T X = n I
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return (scale * b @ a).detach()


def run_toy(
    ranks: Sequence[int] = (1, 2, 4, 8, 16, 32),
    d_out: int = 64,
    d_in: int = 64,
    decay: float = 0.9,
    n: int = 256,
    steps: int = 3000,
    lr: float = 0.02,
    alpha_per_rank: float = 1.0,
    seed: int = 0,
) -> list[ToyResult]:
    """Train the factors for every rank and compare the learned error with the SVD bound."""
    if any(not 0 < r <= min(d_out, d_in) for r in ranks):
        raise ValueError(f"ranks must be in [1, min(d_out, d_in) = {min(d_out, d_in)}], got {list(ranks)}")
    w0, w_star, sigma = make_problem(d_out, d_in, decay, seed)
    x = whitened_inputs(n, d_in, seed)
    results = []
    for r in ranks:
        delta = train_factors(w0, w_star, x, r, alpha_per_rank * r, steps, lr, seed)
        learned = float(((w_star - w0 - delta) ** 2).sum())
        results.append(ToyResult(r, svd_bound(sigma, r), learned, steps))
    return results


def plot_toy(results: Sequence[ToyResult], path) -> None:
    """Learned error and SVD bound against rank (log y), saved as a PNG."""
    plt = pyplot()
    ranks = [res.r for res in results]
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=100)
    ax.plot(ranks, [res.bound for res in results], "o-", label=r"SVD bound $\sum_{i>r}\sigma_i^2$")
    ax.plot(ranks, [res.learned for res in results], "x--", label=r"learned $\|W^*-W_0-\frac{\alpha}{r}BA\|_F^2$")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ranks, [str(r) for r in ranks])
    finish_plot(
        fig,
        ax,
        "LoRA rank r",
        "squared Frobenius error",
        "Linear toy: gradient descent on B, A vs the best rank-r update",
        path,
        fontsize=9,
    )
