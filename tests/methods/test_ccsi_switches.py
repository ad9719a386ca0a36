"""CCSI switches of issue 15: each changes one thing, and its default keeps today's behaviour."""

import pytest
import torch

from dataloaders.batches import BatchShard
from dataloaders.image_set import ImageSet
from experiment.config import load_config
from methods import losses
from methods.ccsi import class_weights
from tiny import ROOT, SMALL, synth, tiny_memory, tiny_teacher
from tiny import default_cfg as make_cfg

REAL = torch.tensor([2, 2, 2, 3])  # new classes 2 (3 images) and 3 (1 image)
SYNTHETIC = ImageSet(torch.zeros(4, 1, 2, 2), torch.tensor([0, 1, 1, 1]))  # old classes 0 (1) and 1 (3)


def weights(mode: str, synthetic: ImageSet | None = SYNTHETIC) -> torch.Tensor | None:
    return class_weights(REAL, synthetic, 4, load_config(overrides={"class_weights": mode, "rs_ratio": 0.75}))


def test_class_weights_counts_is_ccsis_n_max_over_n_c_on_both_sets():
    assert weights("counts").tolist() == [3.0, 1.0, 1.0, 3.0]  # counts 1, 3, 3, 1
    assert weights("counts", None).tolist() == [0.0, 0.0, 1.0, 3.0]  # task 1: no impression, old classes unused
    assert load_config().class_weights == "counts"


def test_class_weights_sampled_weighs_by_the_drawn_share_and_none_is_plain_ce():
    # drawn shares with rs_ratio 0.75: 0.75 * (1/4, 3/4) for classes 0, 1 and 0.25 * (3/4, 1/4) for 2, 3
    # = 3/16, 9/16, 3/16, 1/16 -> n_max / n_c = 3, 1, 3, 9
    assert torch.allclose(weights("sampled"), torch.tensor([3.0, 1.0, 3.0, 9.0]))
    assert weights("sampled", None).tolist() == weights("counts", None).tolist()  # no impression: as counts
    assert weights("none") is None
    logits, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 3])
    plain = torch.nn.functional.cross_entropy(logits, y)
    assert torch.equal(losses.weighted_cross_entropy(logits, y, weights("none"), BatchShard()), plain)


def test_class_weights_rejects_an_unknown_mode():
    with pytest.raises(Exception, match="class_weights"):
        load_config(overrides={"class_weights": "balanced"})


def test_syn_keep_last_returns_the_last_iterate_where_best_keeps_an_earlier_one():
    net = tiny_teacher()
    memory = tiny_memory(net)
    common = {**SMALL, "generation_lr": 50.0, "syn_warmup": 0, "jitter": 0, "do_flip": False}  # a bad lr: loss rises
    best = synth(net, memory, 3, make_cfg(**common), seed=3)
    last = synth(net, memory, 3, make_cfg(**common, syn_keep="last"), seed=3)
    assert (best.best_iteration < 20).any() and load_config().syn_keep == "best"
    assert last.best_iteration.tolist() == [20, 20]
    assert torch.equal(last.best_loss, last.last_loss) and torch.equal(last.last_loss, best.last_loss)
    assert not torch.equal(last.images.x, best.images.x)


def test_digits_demo_config_carries_its_fixes_and_the_original_protocol_is_unchanged():
    demo = load_config([ROOT / "configs" / "digits" / "ccsi.yaml"])
    assert (demo.do_flip, demo.class_stats, demo.class_stats_update, demo.class_weights) == (
        False,
        "per_class",
        "refresh",
        "sampled",
    )
    assert (demo.cn_momentum, demo.scheduler, demo.protocol, demo.select_on) == (0.1, "none", "improved", "last")
    original = load_config(overrides={"protocol": "original"})
    assert (original.do_flip, original.class_stats, original.class_weights) == (True, "running", "counts")
    assert (original.syn_keep, original.cn_momentum, original.scheduler) == ("best", 1.0, "plateau_original")
