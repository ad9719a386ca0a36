"""R-DFCIL's loss factors by hand (the method runs end to end in test_methods.py and on shards in
tests/runtime/test_distributed.py)."""

import math

import pytest

from methods.rdfcil import loss_factors


def test_loss_factors_follow_alpha_and_beta():
    # n_old 8, n_new 2: alpha = log2(2) = 1, beta = sqrt(4) = 2 -> CE (1 + 1) / 2 = 1, KD 1 * 2 = 2
    assert loss_factors(8, 2) == pytest.approx((1.0, 2.0))
    # n_old 2, n_new 6: alpha = log2(4) = 2, beta = sqrt(1/3)
    assert loss_factors(2, 6) == pytest.approx((1.5 * math.sqrt(3), 2 / math.sqrt(3)))
    with pytest.raises(ValueError, match="n_old >= 1"):
        loss_factors(0, 2)
