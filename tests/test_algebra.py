"""LoRA algebra: factored SVD against the dense oracle, truncation, stacking, fresh factors."""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.adapters import LowRankTerm, dense_sum, dense_svd, factored_svd, fresh_lora_factors, stack_terms


def _terms(m: int, n: int, ranks: list[int], gen: torch.Generator) -> list[LowRankTerm]:
    return [
        LowRankTerm(b=torch.randn(m, r, generator=gen), a=torch.randn(r, n, generator=gen), coeff=0.3 + 0.2 * i)
        for i, r in enumerate(ranks)
    ]


@pytest.mark.parametrize(("m", "n", "ranks"), [(40, 24, [2, 3, 4]), (24, 40, [4, 4]), (8, 6, [4, 4, 4])])
def test_factored_svd_matches_dense(m: int, n: int, ranks: list[int], gen: torch.Generator) -> None:
    terms = _terms(m, n, ranks, gen)
    dense = dense_sum(terms)
    fac = factored_svd(terms)
    ref = dense_svd(dense)
    k = min(sum(ranks), m, n)
    torch.testing.assert_close(fac.s[:k], ref.s[:k], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fac.dense(), dense, rtol=1e-4, atol=1e-4)
    # every truncation agrees with the dense truncation (Eckart-Young optimum)
    for r in range(1, k):
        torch.testing.assert_close(fac.dense(r), ref.dense(r), rtol=1e-3, atol=1e-3)
        resid = torch.linalg.matrix_norm(dense - fac.dense(r))
        assert math.isclose(resid.item(), ref.s[r:].square().sum().sqrt().item(), rel_tol=1e-3)


def test_stack_is_exact_sum(gen: torch.Generator) -> None:
    terms = _terms(7, 5, [2, 3], gen)
    b, a = stack_terms(terms)
    assert b.shape == (7, 5) and a.shape == (5, 5)
    expected = sum(t.coeff * t.b @ t.a for t in terms)
    torch.testing.assert_close(b @ a, expected)


def test_to_lora_puts_singular_values_in_b(gen: torch.Generator) -> None:
    terms = _terms(9, 6, [3, 3], gen)
    fac = factored_svd(terms)
    a, b = fac.to_lora(rank=4, scaling=2.0)
    torch.testing.assert_close(a @ a.T, torch.eye(4), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(2.0 * b @ a, dense_svd(dense_sum(terms)).dense(4), atol=1e-4, rtol=1e-4)
    # asking for more rank than exists (6 directions in a 6-wide module) stays exact, and no row of A is zero
    a8, b8 = fac.to_lora(rank=8, scaling=1.0)
    assert a8.shape == (8, 6) and b8.shape == (9, 8)
    torch.testing.assert_close(b8 @ a8, dense_sum(terms), atol=1e-4, rtol=1e-4)
    assert bool((a8.norm(dim=1) > 0.99).all())


def test_rank_beyond_singular_directions_keeps_every_slot_trainable(gen: torch.Generator) -> None:
    """Few clients of small rank: 2 directions exist, rank 5 is asked for in a 12x20 module. The 3 extra rows of A
    are orthonormal to the others (B's columns there are zero), so B's gradient there is not zero: they train."""
    terms = _terms(12, 20, [1, 1], gen)
    fac = factored_svd(terms)
    assert fac.s.shape[0] == 2
    a, b = fac.to_lora(rank=5, scaling=0.5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a @ a.T, torch.eye(5), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(0.5 * b @ a, dense_sum(terms), atol=1e-4, rtol=1e-4)
    assert torch.count_nonzero(b[:, 2:]) == 0
    # one gradient step of a loss on the LoRA output: every rank slot of B gets a gradient
    a_p, b_p = a.clone().requires_grad_(), b.clone().requires_grad_()
    x = torch.randn(16, 20, generator=gen)
    ((x @ a_p.T @ b_p.T) - torch.randn(16, 12, generator=gen)).pow(2).sum().backward()
    assert bool((b_p.grad.norm(dim=0) > 0).all())


def test_fresh_factors_are_seeded_and_zero_product() -> None:
    a1, b1 = fresh_lora_factors(6, 4, 2, torch.Generator().manual_seed(3))
    a2, _ = fresh_lora_factors(6, 4, 2, torch.Generator().manual_seed(3))
    a3, _ = fresh_lora_factors(6, 4, 2, torch.Generator().manual_seed(4))
    torch.testing.assert_close(a1, a2)
    assert not torch.equal(a1, a3)
    assert torch.count_nonzero(b1) == 0
    bound = math.sqrt(1 / 4)  # kaiming-uniform(a=sqrt(5)) bound = 1/sqrt(fan_in)
    assert a1.abs().max() <= bound and a1.abs().max() > 0.3 * bound


def test_kaiming_init_matches_peft_on_a_non_square_module() -> None:
    """A (r, in) = (8, 300) factor: uniform on [-1/sqrt(in), 1/sqrt(in)] exactly like peft's lora_A, whose bound uses
    fan_in = in (300), not out or r: a bound from the wrong dimension is off by 6x or more."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear

    a, _ = fresh_lora_factors(50, 300, 8, torch.Generator().manual_seed(0))
    bound = 1 / math.sqrt(300)
    assert a.abs().max() <= bound and a.abs().max() > 0.99 * bound
    assert abs(float(a.std()) - bound / math.sqrt(3)) < 0.05 * bound  # uniform: std = bound/sqrt(3)
    torch.manual_seed(0)
    layer = LoraLinear(torch.nn.Linear(300, 50), "default", LoraConfig(r=8, lora_alpha=16), r=8, lora_alpha=16)
    peft_a = layer.lora_A["default"].weight.detach()
    assert peft_a.abs().max() <= bound and peft_a.abs().max() > 0.99 * bound


def test_gaussian_init_draws_std_one_over_r() -> None:
    a, b = fresh_lora_factors(40, 400, 4, torch.Generator().manual_seed(1), init="gaussian")
    assert abs(float(a.std()) - 1 / 4) < 0.01 and torch.count_nonzero(b) == 0
    default, _ = fresh_lora_factors(40, 400, 4, torch.Generator().manual_seed(1))
    assert float(default.abs().max()) <= 1 / math.sqrt(400) < float(a.abs().max())
