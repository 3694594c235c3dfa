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
    # asking for more rank than exists pads with zeros and stays exact
    a8, b8 = fac.to_lora(rank=8, scaling=1.0)
    assert a8.shape == (8, 6) and b8.shape == (9, 8)
    torch.testing.assert_close(b8 @ a8, dense_sum(terms), atol=1e-4, rtol=1e-4)


def test_fresh_factors_are_seeded_and_zero_product() -> None:
    a1, b1 = fresh_lora_factors(6, 4, 2, torch.Generator().manual_seed(3))
    a2, _ = fresh_lora_factors(6, 4, 2, torch.Generator().manual_seed(3))
    a3, _ = fresh_lora_factors(6, 4, 2, torch.Generator().manual_seed(4))
    torch.testing.assert_close(a1, a2)
    assert not torch.equal(a1, a3)
    assert torch.count_nonzero(b1) == 0
    bound = math.sqrt(1 / 4)  # kaiming-uniform(a=sqrt(5)) bound = 1/sqrt(fan_in)
    assert a1.abs().max() <= bound and a1.abs().max() > 0.3 * bound
