"""The linear LoRA toy: gradient descent on B, A reaches the SVD truncation bound (seconds, no assets)."""

from __future__ import annotations

import pytest
import torch

from lora_lab.toy import make_problem, plot_toy, run_toy, svd_bound, whitened_inputs


def test_bound_is_the_tail_of_the_spectrum_of_the_delta():
    w0, w_star, sigma = make_problem(12, 10, decay=0.7, seed=3)
    s = torch.linalg.svdvals(w_star - w0)
    assert torch.allclose(s, sigma, atol=1e-10)
    assert svd_bound(sigma, 3) == pytest.approx(float((s[3:] ** 2).sum()))
    assert svd_bound(sigma, 10) == 0.0


def test_whitened_inputs_make_the_loss_the_frobenius_error():
    x = whitened_inputs(40, 10, seed=0)
    assert torch.allclose(x.T @ x, 40 * torch.eye(10, dtype=x.dtype), atol=1e-9)
    with pytest.raises(ValueError, match="n >= d_in"):
        whitened_inputs(5, 10, seed=0)


def test_learned_error_reaches_the_bound_within_a_few_percent(tmp_path):
    results = run_toy(ranks=(1, 3, 6), d_out=16, d_in=16, decay=0.8, n=32, steps=1500, lr=0.03)
    for res in results:
        assert res.learned >= res.bound * (1 - 1e-9)  # no rank-r update beats Eckart-Young
        assert res.ratio < 1.03, (res.r, res.learned, res.bound)
    assert [res.bound for res in results] == sorted((res.bound for res in results), reverse=True)
    plot_toy(results, tmp_path / "toy.png")
    assert (tmp_path / "toy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_too_few_steps_stay_above_the_bound():
    """The comparison can fail: 5 small steps from B = 0 leave the error far above the bound."""
    (res,) = run_toy(ranks=(4,), d_out=16, d_in=16, decay=0.8, n=32, steps=5, lr=0.001)
    assert res.ratio > 1.5


def test_ranks_outside_the_layer_are_refused():
    with pytest.raises(ValueError, match="ranks must be in"):
        run_toy(ranks=(0, 4), d_out=8, d_in=8, steps=1)
    with pytest.raises(ValueError, match="ranks must be in"):
        run_toy(ranks=(9,), d_out=8, d_in=8, steps=1)
