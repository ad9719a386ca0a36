"""iCaRL, rehearsal+KD, LUCIR, WA and GDumb: their pieces by hand, then each end to end on digits with resume."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dataloaders.batches import Batch
from dataloaders.image_set import ImageSet
from experiment.checkpoint import load_checkpoint, task_checkpoint_path
from experiment.config import ConfigError
from incremental_train_and_eval import run
from methods.base import TaskContext
from methods.gdumb import GDumb
from methods.icarl import ICaRL, class_means, nme_logits
from methods.lucir import LUCIR
from methods.rehearsal_kd import RehearsalKD
from methods.wa import WA, align_weights, clip_weights
from models.layers.cosine_linear import IncrementalHead
from models.network import IncrementalNet


class TinyBackbone(nn.Sequential):
    out_dim = 5

    def __init__(self):
        super().__init__(nn.Flatten(), nn.Linear(16, 5))


def tiny_net(head="linear"):
    torch.manual_seed(0)
    return IncrementalNet(TinyBackbone(), head)


def ctx_for(cfg, task, n_old, n_new, n_per_class=4):
    labels = torch.arange(n_old, n_old + n_new).repeat_interleave(n_per_class)
    x = torch.randint(0, 256, (len(labels), 1, 4, 4), generator=torch.Generator().manual_seed(task), dtype=torch.uint8)
    train = ImageSet(x, labels)
    return TaskContext(
        task=task,
        new_classes=list(range(n_old, n_old + n_new)),
        n_old=n_old,
        train=train,
        val=train,
        test=None,
        device=torch.device("cpu"),
        output_dir=None,
        generator=torch.Generator().manual_seed(task),
    )


# ----- WA ----------------------------------------------------------------------------------------------------------


def test_wa_gamma_is_the_ratio_of_mean_row_norms():
    head = IncrementalHead(2, "linear")
    head.expand(2)
    head.expand(2)
    with torch.no_grad():
        head.fc.fc1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 3.0]]))  # norms 1, 3: mean 2
        head.fc.fc2.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, -4.0]]))  # norms 5, 4: mean 4.5
        head.fc.fc2.bias.copy_(torch.tensor([0.5, -0.5]))
    gamma = align_weights(head, n_old=2)
    assert gamma == pytest.approx(2 / 4.5)
    assert torch.allclose(head.fc.fc2.weight, torch.tensor([[3.0, 4.0], [0.0, -4.0]]) * (2 / 4.5))
    assert torch.equal(head.fc.fc1.weight, torch.tensor([[1.0, 0.0], [0.0, 3.0]]))
    assert torch.equal(head.fc.fc2.bias, torch.tensor([0.5, -0.5]))  # biases untouched
    clip_weights(head)
    assert float(head.all_weights().detach().min()) == 0.0 and float(head.fc.fc2.bias.detach().min()) == -0.5
    with pytest.raises(ValueError, match="laid out"):
        align_weights(head, n_old=3)


def test_methods_refuse_heads_and_selections_they_cannot_use(make_cfg):
    with pytest.raises(ConfigError, match=r"wa.*head: linear"):
        WA(make_cfg(head="cosine"), tiny_net("cosine"), torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"lucir.*head: cosine"):
        LUCIR(make_cfg(head="linear"), tiny_net("linear"), torch.device("cpu"))
    with pytest.raises(ConfigError, match="memory_selection: random"):
        GDumb(make_cfg(memory_selection="herding"), tiny_net(), torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"memory_size=3.*4 classes"):  # before any training
        ICaRL.check(make_cfg(method="icarl", memory_size=3), [4])


# ----- iCaRL -------------------------------------------------------------------------------------------------------


def test_nme_classifies_by_the_nearest_normalised_class_mean():
    features = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.1, 0.0], [0.0, 3.0, 0.0], [0.0, 1.0, 0.1], [0.0, 0.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    means = class_means(features, labels, 3)
    assert torch.allclose(means.norm(dim=1), torch.ones(3))
    expected0 = F.normalize(F.normalize(features[:2], dim=1).mean(0), dim=0)
    assert torch.allclose(means[0], expected0)
    queries = torch.tensor([[5.0, 0.2, 0.0], [0.1, 0.0, 9.0], [0.3, 2.0, 0.0]])
    logits = nme_logits(queries, means)
    assert logits.argmax(1).tolist() == [0, 2, 1]
    q = F.normalize(queries, dim=1)
    assert torch.allclose(logits, -torch.cdist(q, means).pow(2), atol=1e-5)
    assert nme_logits(means, means).argmax(1).tolist() == [0, 1, 2]  # each class mean is classified as its class
    with pytest.raises(ValueError, match="no exemplar of classes \\[3\\]"):
        class_means(features, labels, 4)


def _second_task(method, n_old=2, n_new=2):
    """Put a method in the state of task 2 without training: teacher snapshot, grown head."""
    method.net.expand_head(n_old)
    method.begin_task(ctx_for(method.cfg, 2, n_old, n_new), method.cfg)
    return method


def test_icarl_bce_targets_are_the_teachers_sigmoids_on_old_classes(make_cfg):
    method = _second_task(ICaRL(make_cfg(icarl_loss="bce"), tiny_net(), torch.device("cpu")))
    x = torch.rand(6, 1, 4, 4)
    y = torch.tensor([0, 1, 2, 3, 2, 0])
    terms = method.training_step(Batch(x, y, torch.zeros(6, dtype=torch.bool)))
    logits, old = method.net(x)["logits"], method.teacher(x)["logits"]
    targets = torch.cat([torch.sigmoid(old), F.one_hot(y, 4)[:, 2:].float()], dim=1)  # old columns: teacher, always
    expected = -(targets * F.logsigmoid(logits) + (1 - targets) * F.logsigmoid(-logits)).mean()
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_rehearsal_kd_mixes_ce_and_kd_by_the_share_of_old_classes(make_cfg):
    method = _second_task(RehearsalKD(make_cfg(kd_temperature=2.0), tiny_net(), torch.device("cpu")), 3, 1)
    x, y = torch.rand(5, 1, 4, 4), torch.tensor([0, 1, 2, 3, 3])
    terms = method.training_step(Batch(x, y, torch.zeros(5, dtype=torch.bool)))
    logits, old = method.net(x)["logits"], method.teacher(x)["logits"]
    ce = F.cross_entropy(logits, y)
    kd = -(F.softmax(old / 2, 1) * F.log_softmax(logits[:, :3] / 2, 1)).sum(1).mean()
    assert terms["loss"].item() == pytest.approx((0.25 * ce + 0.75 * kd).item(), rel=1e-5)


def test_lucir_imprints_freezes_and_adapts_lambda(make_cfg):
    cfg = make_cfg(head="cosine", lamda=5.0, K=2, dist=0.5, lamda_new_classes="actual")
    method = LUCIR(cfg, tiny_net("cosine"), torch.device("cpu"))
    method.begin_task(ctx_for(method.cfg, 1, 0, 4), method.cfg)
    old_rows = method.net.head.all_weights().detach().clone()
    ctx = ctx_for(method.cfg, 2, 4, 1)
    method.begin_task(ctx, method.cfg)
    assert method.lamda_t == pytest.approx(5.0 * math.sqrt(4 / 1)) and method.k == 1  # K clamped to n_new
    assert not method.net.head.fc.fc1.weight.requires_grad and method.net.head.fc.fc2.weight.requires_grad
    assert torch.equal(method.net.head.all_weights()[:4], old_rows)
    with torch.no_grad():
        feats = F.normalize(method.net.features(ctx.train.x.float() / 255), dim=1)
    imprinted = F.normalize(feats.mean(0), dim=0) * old_rows.norm(dim=1).mean()
    assert torch.allclose(method.net.head.all_weights()[4], imprinted, atol=1e-5)


def test_adaptive_lambda_can_use_the_configured_classes_per_task(make_cfg):
    """The released code divides by nb_cl, not by the classes the (smaller last) task adds."""
    cfg = make_cfg(head="cosine", lamda=5.0, K=1, nb_cl=2, lamda_new_classes="nb_cl")
    method = LUCIR(cfg, tiny_net("cosine"), torch.device("cpu"))
    method.begin_task(ctx_for(method.cfg, 1, 0, 4), method.cfg)
    method.begin_task(ctx_for(method.cfg, 2, 4, 1), method.cfg)  # the task adds 1 class, nb_cl says 2
    assert method.lamda_t == pytest.approx(5.0 * math.sqrt(4 / 2))
    assert make_cfg(protocol="original").lamda_new_classes == "nb_cl"
    assert make_cfg().lamda_new_classes == "nb_cl"  # clean keeps the released dynamics (issue 13)
    batch = Batch(torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 4, 4]), torch.zeros(4, dtype=torch.bool))
    terms = method.training_step(batch)
    assert set(terms) == {"loss", "ce", "distill", "margin"} and terms["loss"].requires_grad


def test_gdumb_retrains_from_the_initial_weights_on_the_memory_only(make_cfg):
    cfg = make_cfg(memory_selection="random", memory_size=6, batch_size=4)
    method = GDumb(cfg, tiny_net(), torch.device("cpu"))
    initial = {k: v.clone() for k, v in method.net.backbone.state_dict().items()}
    method.begin_task(ctx_for(cfg, 1, 0, 2), cfg)
    with torch.no_grad():
        for p in method.net.parameters():
            p.add_(1.0)  # pretend task 1 trained the net
    ctx = ctx_for(cfg, 2, 2, 2)
    method.begin_task(ctx, method.cfg)
    assert all(torch.equal(v, initial[k]) for k, v in method.net.backbone.state_dict().items())
    assert method.net.head_layout() == [4]
    labels = torch.cat([b.y for b in method.train_batches(ctx, 0)])
    assert sorted(labels.tolist()) == [0, 1, 2, 3]  # one pass over the memory: 6 // 4 = 1 exemplar per class


# ----- end to end on digits ------------------------------------------------------------------------------------------

METHOD_KEYS = {
    "icarl": {"head": "linear", "memory_size": 60},
    "rehearsal_kd": {"head": "linear", "memory_size": 60},
    "lucir": {"head": "cosine", "memory_per_class": 6, "K": 2, "dist": 0.5},
    "wa": {"head": "linear", "memory_size": 60},
    "gdumb": {"head": "linear", "memory_size": 200, "memory_selection": "random"},
}


@pytest.mark.e2e
@pytest.mark.parametrize("method", sorted(METHOD_KEYS))
def test_two_tasks_on_digits_and_resume_from_the_first_checkpoint(make_cfg, tmp_path, method):
    keys = {"method": method, "epochs": 1, "batch_size": 64, "nb_cl_fg": 8, "nb_cl": 2, **METHOD_KEYS[method]}
    full = run(make_cfg(output_dir=str(tmp_path / "full"), **keys))
    matrix = full["accuracy_matrix"]
    assert len(matrix) == 2 and len(matrix[1]) == 2
    values = [v for row in matrix for v in row if v is not None]
    assert len(values) == 3 and all(0.0 <= v <= 100.0 for v in values)
    assert 0.0 <= full["last_accuracy"] <= 100.0 and math.isfinite(full["average_incremental_accuracy"])
    state = load_checkpoint(task_checkpoint_path(tmp_path / "full", 2))["method"]
    assert len(state["memory"]["y"]) <= (60 if method != "gdumb" else 200)
    if method == "wa":  # clipped after every step, so the selected and aligned head is non-negative
        head = [v for k, v in state["net"].items() if k.startswith("head.") and k.endswith("weight")]
        assert head and all(w.min() >= 0 for w in head)
    # task 2 alone, continuing from the uninterrupted run's task-1 checkpoint, gives the same results
    first = str(task_checkpoint_path(tmp_path / "full", 1))
    run(make_cfg(output_dir=str(tmp_path / "step"), task=2, saved_model_address=first, **keys))
    resumed = json.loads((tmp_path / "step" / "metrics.json").read_text())
    assert resumed["accuracy_matrix"] == matrix
