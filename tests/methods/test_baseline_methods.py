"""LwF, EWC, DER and DeepInversion: their terms by hand on tiny models, then 2-task digits runs that resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dataloaders.image_set import ImageSet
from experiment.checkpoint import load_checkpoint, task_checkpoint_path
from experiment.config import ConfigError
from incremental_train_and_eval import run
from methods.base import TaskContext
from methods.deepinversion import DeepInversion
from methods.der import DERNet
from methods.ewc import EWC, canonical_parameters, ewc_penalty, fisher_diagonal
from methods.lwf import LwF
from models.network import IncrementalNet

TWO_TASKS = {"nb_cl_fg": 5, "nb_cl": 5, "epochs": 1}  # digits: tasks of 5 and 5 classes
TINY_SYNTHESIS = {"syn_iterations": 5, "nb_generation": 1, "syn_batch_size": 16, "syn_warmup": 1}
DI = {"syn_init": "noise", "class_stats": "running", **TINY_SYNTHESIS}


class TinyBackbone(nn.Module):
    """Flatten -> linear -> ReLU: features (B, out_dim) of (B, 1, 4, 4) images."""

    def __init__(self, out_dim: int = 3):
        super().__init__()
        self.out_dim = out_dim
        self.fc = nn.Linear(16, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(x.flatten(1)))


def tiny_net(seed: int = 0, head: str = "linear") -> IncrementalNet:
    torch.manual_seed(seed)
    return IncrementalNet(TinyBackbone(), head)


def tiny_images(n: int, classes: list[int], seed: int = 0) -> ImageSet:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 4, 4), generator=gen, dtype=torch.uint8)
    return ImageSet(x, torch.tensor(classes).repeat(n // len(classes) + 1)[:n])


def context(cfg, task: int, n_old: int, n_new: int, tmp_path: Path) -> TaskContext:
    new = list(range(n_old, n_old + n_new))
    return TaskContext(
        task=task,
        new_classes=new,
        n_old=n_old,
        train=tiny_images(12, new),
        val=tiny_images(4, new),
        test=None,
        device=torch.device("cpu"),
        output_dir=tmp_path,
        generator=torch.Generator().manual_seed(task),
    )


def metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


# ----- EWC -------------------------------------------------------------------------------------------------------


def test_ewc_penalty_by_hand():
    anchor = {"w": torch.tensor([1.0, 2.0]), "head.weight": torch.tensor([[0.0, 1.0]])}
    fisher = {"w": torch.tensor([0.5, 2.0]), "head.weight": torch.tensor([[3.0, 1.0]])}
    assert ewc_penalty(anchor, anchor, fisher).item() == 0.0
    # w moved by (1, -1): 0.5 * 1 + 2 * 1; the head gained a row, only the anchored first row counts: 3 * 2^2
    current = {"w": torch.tensor([2.0, 1.0]), "head.weight": torch.tensor([[2.0, 1.0], [9.0, 9.0]])}
    assert ewc_penalty(current, anchor, fisher).item() == pytest.approx(0.5 + 2.0 + 12.0)
    with pytest.raises(ValueError, match=r"head\.weight"):
        ewc_penalty({**current, "head.weight": torch.zeros(1, 3)}, anchor, fisher)


def test_canonical_parameters_join_the_head_blocks_in_class_order():
    net = tiny_net(head="cosine")
    net.expand_head(2)
    net.expand_head(1)  # blocks fc1 (2 rows) + fc2 (1 row) + shared sigma
    canon = canonical_parameters(net.named_parameters())
    assert torch.equal(canon["head.weight"], net.head.all_weights())
    assert canon["head.sigma"].dim() == 0 and "backbone.fc.weight" in canon


@pytest.mark.parametrize("estimator", ["sample", "batch"])
def test_fisher_matches_a_per_sample_loop(estimator):
    net = tiny_net()
    net.expand_head(3)
    data = tiny_images(7, [0, 1, 2])
    fisher = fisher_diagonal(net, data, "label", estimator, batch_size=4, device=torch.device("cpu"))
    x, y = data.x.float() / 255, data.y
    params = [p for _, p in net.named_parameters()]
    expected = [torch.zeros_like(p) for p in params]
    chunks = (
        [(x[i : i + 1], y[i : i + 1]) for i in range(7)] if estimator == "sample" else [(x[:4], y[:4]), (x[4:], y[4:])]
    )
    for xb, yb in chunks:
        log_p = F.log_softmax(net(xb)["logits"], dim=1).gather(1, yb.view(-1, 1)).mean()
        for e, g in zip(expected, torch.autograd.grad(log_p, params)):
            e += g.square() / len(chunks)
    for (name, _), e in zip(net.named_parameters(), expected):
        assert torch.allclose(fisher[name], e, atol=1e-7), name


def test_ewc_penalty_is_zero_at_the_anchor_and_positive_away_from_it(make_cfg, tmp_path):
    cfg = make_cfg(method="ewc", head="linear", ewc_fisher_max=None)
    method = EWC(cfg, tiny_net(), torch.device("cpu"))
    method.begin_task(context(cfg, 1, 0, 2, tmp_path), cfg)
    assert method.penalty().item() == 0.0  # no anchor yet
    method.end_task(context(cfg, 1, 0, 2, tmp_path))
    method.begin_task(context(cfg, 2, 2, 2, tmp_path), cfg)  # the head grows: new rows are free
    assert method.penalty().item() == 0.0
    with torch.no_grad():
        method.net.head.fc.fc1.weight[0, 0] += 0.5  # an old-class row
        method.net.backbone.fc.bias[1] -= 2.0
    expected = method.fisher["head.weight"][0, 0] * 0.25 + method.fisher["backbone.fc.bias"][1] * 4.0
    assert method.penalty().item() == pytest.approx(expected.item(), rel=1e-5) and expected > 0
    with torch.no_grad():
        method.net.head.fc.fc2.weight += 1.0  # a new-class row: not anchored
    assert method.penalty().item() == pytest.approx(expected.item(), rel=1e-5)
    terms = method.training_step(next(iter(method.train_batches(context(cfg, 2, 2, 2, tmp_path), 0))))
    assert terms["loss"].item() == pytest.approx((terms["ce"] + cfg.ewc_lambda / 2 * terms["ewc"]).item(), rel=1e-5)


# ----- LwF -------------------------------------------------------------------------------------------------------


def test_lwf_distillation_vanishes_only_when_the_student_matches_the_teacher(make_cfg, tmp_path):
    cfg = make_cfg(method="lwf", head="linear")
    method = LwF(cfg, tiny_net(), torch.device("cpu"))
    method.begin_task(context(cfg, 1, 0, 2, tmp_path), cfg)
    method.begin_task(context(cfg, 2, 2, 2, tmp_path), cfg)
    assert method.teacher is not None and not method.teacher.training
    assert not any(p.requires_grad for p in method.teacher.parameters())
    batch = next(iter(method.train_batches(context(cfg, 2, 2, 2, tmp_path), 0)))

    def kl_part() -> float:  # kd_loss = KL(p_t || p_s) + H(p_t): subtract the teacher's entropy
        p_t = F.softmax(method.teacher(batch.x)["logits"] / cfg.kd_temperature, dim=1)
        entropy = -(p_t * p_t.log()).sum(1).mean()
        return method.training_step(batch)["kd"].item() - entropy.item()

    assert abs(kl_part()) < 1e-6  # right after expansion the old logits are the teacher's
    with torch.no_grad():
        method.net.head.fc.fc1.weight[0] += 1.0
    assert kl_part() > 1e-3
    terms = method.training_step(batch)
    assert terms["loss"].item() == pytest.approx((terms["ce"] + cfg.lwf_lambda * terms["kd"]).item(), rel=1e-6)


# ----- DER -------------------------------------------------------------------------------------------------------


def test_der_adds_one_extractor_per_task_and_freezes_the_old_ones():
    torch.manual_seed(0)
    net = DERNet(TinyBackbone(), TinyBackbone, init_from_previous=False)
    x = torch.rand(5, 1, 4, 4)
    net.expand_head(2)
    assert len(net.extractors) == 1 and "aux_logits" not in net(x)
    net.eval()
    before = net(x)["logits"]
    net.expand_head(3)
    assert len(net.extractors) == 2 and net.feature_dim == 6 and net.head_layout() == [2, 3]
    net.train()
    assert not net.extractors[0].training and net.extractors[1].training
    out = net(x)
    assert out["logits"].shape == (5, 5) and out["aux_logits"].shape == (5, 4)
    net.eval()
    assert torch.allclose(net(x)["logits"][:, :2], before)  # old rows copied, new columns zero
    net.train()
    (out["logits"].sum() + out["aux_logits"].sum()).backward()
    assert all(p.grad is None for p in net.extractors[0].parameters())
    assert all(p.grad is not None for p in net.extractors[1].parameters())
    rebuilt = DERNet(TinyBackbone(), TinyBackbone)
    rebuilt.set_head_layout(net.head_layout())
    rebuilt.load_state_dict(net.state_dict())
    rebuilt.eval(), net.eval()
    assert torch.equal(rebuilt(x)["logits"], net(x)["logits"])


@pytest.mark.e2e
def test_der_needs_a_linear_head(make_cfg):
    with pytest.raises(ConfigError, match="head"):
        run(make_cfg(method="der", head="cosine", **TWO_TASKS))


# ----- end to end on digits: sane metrics and resume equivalence -------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("lwf", {}),
        ("ewc", {}),
        ("der", {"head": "linear", "memory_size": 100}),
        ("deepinversion", DI),
    ],
)
def test_two_tasks_run_and_resume_from_the_first_checkpoint(method, extra, make_cfg, tmp_path):
    full = run(make_cfg(method=method, output_dir=str(tmp_path / "full"), **TWO_TASKS, **extra))
    first = full["accuracy_per_task"][0]
    assert first > 50  # 5 classes (chance: 20%) after one epoch
    state = load_checkpoint(task_checkpoint_path(tmp_path / "full", 1))["method"]
    if method == "ewc":
        assert state["fisher"] and state["anchor"].keys() == state["fisher"].keys()
    if method == "der":
        assert state["head_layout"] == [5] and len(state["memory"]["y"]) == 100
        assert load_checkpoint(task_checkpoint_path(tmp_path / "full", 2))["method"]["head_layout"] == [5, 5]
    resumed = tmp_path / "resumed"
    previous = str(task_checkpoint_path(tmp_path / "full", 1))
    run(make_cfg(method=method, output_dir=str(resumed), task=2, saved_model_address=previous, **TWO_TASKS, **extra))
    assert metrics(resumed)["accuracy_matrix"] == full["accuracy_matrix"]


@pytest.mark.e2e
def test_deepinversion_never_sees_old_real_images(make_cfg, tmp_path, monkeypatch):
    seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    original_before, original_step = DeepInversion.before_task, DeepInversion.training_step

    def before_task(self, ctx):
        assert bool((ctx.train.y >= ctx.n_old).all()), "old-class real images reached the method"
        original_before(self, ctx)

    def training_step(self, batch):
        seen.append((self.n_old, batch.y.clone(), batch.synthetic.clone()))
        return original_step(self, batch)

    monkeypatch.setattr(DeepInversion, "before_task", before_task)
    monkeypatch.setattr(DeepInversion, "training_step", training_step)
    run(make_cfg(method="deepinversion", **TWO_TASKS, **DI))
    second = [(y, syn) for n_old, y, syn in seen if n_old == 5]
    assert second, "task 2 trained on some batch"
    y, syn = torch.cat([y for y, _ in second]), torch.cat([s for _, s in second])
    assert bool(syn.any()) and bool((~syn).any())
    assert torch.equal(y < 5, syn)  # old classes only ever come synthetic, synthetic rows are flagged
    assert (tmp_path / "run" / "impressions_task_2.png").is_file()
    state = load_checkpoint(task_checkpoint_path(tmp_path / "run", 2))["method"]
    assert set(state) == {"net", "head_layout", "n_seen"}  # nothing about old classes is kept


@pytest.mark.e2e
def test_deepinversion_refuses_class_statistics(make_cfg):
    with pytest.raises(ConfigError, match="syn_init: noise"):
        run(make_cfg(method="deepinversion", **TWO_TASKS, **{**DI, "syn_init": "mean"}))
