"""ABD's class balance of the CE terms (the method runs end to end in test_methods.py and on shards in
tests/runtime/test_distributed.py)."""

import torch

from methods.abd import class_balance


def test_class_balance_weights_old_rows_by_the_old_share():
    # 3 old classes of 4: old rows 3/4, new rows 1/4 (ABD's code: rnt = last_valid_out_dim / valid_out_dim)
    assert torch.allclose(class_balance(torch.tensor([0, 2, 3]), 3, 4), torch.tensor([0.75, 0.75, 0.25]))
    assert torch.allclose(class_balance(torch.tensor([0, 1]), 0, 2), torch.ones(2)), "task 1: plain CE"
