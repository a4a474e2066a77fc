"""VICReg's variance and covariance terms (medssl.tasks.spread), by hand."""

import pytest
import torch

from medssl.tasks.spread import variance_covariance


def test_variance_hinge_and_covariance_by_hand():
    # dim 0 spreads (std sqrt(2) > 1: no hinge), dim 1 is constant (hinge 1 - sqrt(eps)), uncorrelated
    variance, covariance = variance_covariance(torch.tensor([[1.0, 3.0], [-1.0, 3.0]]))
    assert variance.item() == pytest.approx((0 + 1 - 1e-2) / 2)
    assert covariance.item() == pytest.approx(0.0)
    # two identical dimensions: covariance matrix [[2, 2], [2, 2]], off-diagonal squares 8, over D = 2
    variance, covariance = variance_covariance(torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))
    assert variance.item() == pytest.approx(0.0)
    assert covariance.item() == pytest.approx(4.0)


def test_a_collapsed_batch_is_penalised_and_pushed_apart():
    z = torch.full((8, 4), 0.3, requires_grad=True)
    variance, _ = variance_covariance(z + 1e-3 * torch.randn(8, 4))
    assert variance.item() > 0.9  # every dimension at (almost) zero spread
    variance.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    spread, _ = variance_covariance(2 * torch.randn(256, 4))
    assert spread.item() < variance.item() / 10


def test_refuses_a_batch_it_cannot_measure():
    with pytest.raises(ValueError, match="at least 2"):
        variance_covariance(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"\(batch, dim\)"):
        variance_covariance(torch.zeros(2, 3, 4))
