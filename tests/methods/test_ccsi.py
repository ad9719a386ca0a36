"""CCSI end to end: data-free by construction, the paper's configs on fake MedMNIST files, sweep chaining."""

import contextlib
import json
import math
import subprocess
import sys

import pytest
import torch

from experiment.checkpoint import load_checkpoint, task_checkpoint_path
from experiment.config import ConfigError, load_config, parse_overrides
from incremental_train_and_eval import run
from methods.base import extract_features
from methods.ccsi import CCSI, local_logits, refit_head
from tiny import ROOT, method_at_task_2, write_digits, write_fake_medmnist
from tuning import sweep

TINY_SYNTHESIS = {"nb_generation": 1, "syn_batch_size": 8, "syn_iterations": 3, "syn_warmup": 1, "progress": False}


@pytest.mark.e2e
def test_ccsi_never_sees_real_images_of_old_classes(make_cfg, monkeypatch, tmp_path):
    """Every real image the method is handed or trains on belongs to the current task's classes."""
    seen_real, seen_synthetic, handed = [], [], []
    original_before, original_step = CCSI.before_task, CCSI.training_step

    def before_task(self, ctx):
        handed.append((ctx.task, set(ctx.train.y.tolist()), set(ctx.new_classes)))
        original_before(self, ctx)

    def training_step(self, batch):
        seen_real.append((self.n_seen, set(batch.y[~batch.synthetic].tolist())))
        seen_synthetic.append((self.n_old, set(batch.y[batch.synthetic].tolist())))
        return original_step(self, batch)

    monkeypatch.setattr(CCSI, "before_task", before_task)
    monkeypatch.setattr(CCSI, "training_step", training_step)
    data = write_digits(tmp_path / "digits.npz", 10, 300)  # 300 training images: every path, less training
    run(make_cfg(method="ccsi", nb_cl_fg=4, nb_cl=3, epochs=1, idc_source="train", dataset="npz", data_path=data,
                 **TINY_SYNTHESIS))  # fmt: skip
    assert [t for t, _, _ in handed] == [1, 2, 3]
    for _, labels, new in handed:
        assert labels == new, "ctx.train holds only the new classes"
    sizes = {4: (0, 4), 7: (4, 7), 10: (7, 10)}
    for n_seen, labels in seen_real:
        first_new = sizes[n_seen][0]
        assert all(y >= first_new for y in labels), "a real image of an old class reached training"
    assert any(labels for _, labels in seen_synthetic[1:]), "old classes come back as synthetic images"
    for n_old, labels in seen_synthetic:
        assert all(y < n_old for y in labels)


@pytest.mark.e2e
def test_ccsi_checkpoint_holds_no_real_images(make_cfg, tmp_path):
    run(make_cfg(method="ccsi", nb_cl_fg=4, nb_cl=3, epochs=1, idc_source="train", task=1, **TINY_SYNTHESIS))
    state = load_checkpoint(task_checkpoint_path(tmp_path / "run", 1))["method"]
    memory = state["memory"]
    assert memory["mean_images"].shape == (4, 1, 32, 32), "one mean image per class, nothing else"
    assert set(state) == {"net", "head_layout", "n_seen", "memory", "prototypes"}
    assert set(memory) == {"labels", "mean_images", "layer_means", "layer_vars"}
    assert all(m.shape[0] == 4 for m in memory["layer_means"] + memory["layer_vars"]), "per-class moments only"
    prototypes = state["prototypes"]  # protocol improved: one feature mean and one spread per class
    assert prototypes["means"].shape == (4, 256) and prototypes["radius"].shape == (4,)


OPTIONS = {"ccsi_local_ce": True, "ccsi_head_refit_epochs": 2, "ccsi_prototypes": True, "ccsi_prototype_drift": True}


@pytest.mark.e2e
def test_ccsi_per_task_chain_equals_the_uninterrupted_run(make_cfg, tmp_path):
    """Tasks run one at a time, each continuing the previous checkpoint (a resume after a kill: test_faults.py),
    with CCSI's options on: the prototypes of task 1 come back from its checkpoint for task 2's head refit (the
    paper's settings chain in tests/methods/test_methods.py)."""
    data = write_digits(tmp_path / "digits.npz", 10, 400)  # 400 training images: a third of digits, a third the time
    common = {"method": "ccsi", "nb_cl_fg": 4, "nb_cl": 6, "epochs": 1, "idc_source": "val", **TINY_SYNTHESIS}
    common.update(OPTIONS, batch_size=64, dataset="npz", data_path=data)  # two tasks: the second continues the first
    full = run(make_cfg(output_dir=str(tmp_path / "full"), **common))
    step = tmp_path / "steps"
    run(make_cfg(output_dir=str(step), task=1, **common))
    for t in (2,):
        prev = str(task_checkpoint_path(step, t - 1))
        run(make_cfg(output_dir=str(step), task=t, saved_model_address=prev, **common))
    assert json.loads((step / "metrics.json").read_text())["accuracy_matrix"] == full["accuracy_matrix"]
    assert (tmp_path / "full" / "impressions_task_2.png").is_file()


def test_protocol_presets_and_explicit_keys():
    original = load_config(overrides={"protocol": "original"})
    assert (original.idc_source, original.select_on, original.scheduler) == ("test", "test", "plateau_original")
    assert original.cn_momentum == 1.0 and original.class_stats == "running"
    clean = load_config(overrides={"protocol": "clean"})
    assert (clean.idc_source, clean.select_on, clean.lr_monitor) == ("train", "last", "val_new")
    default = load_config()
    assert (default.protocol, default.idc_source, default.class_stats, default.class_stats_update) == (
        "improved",
        "train",
        "per_class",
        "refresh",
    )
    mixed = load_config(overrides=parse_overrides(["--protocol=original", "--select_on=val"]))
    assert mixed.select_on == "val" and mixed.idc_source == "test"


@pytest.mark.e2e
def test_clean_protocol_never_hands_test_images(make_cfg, monkeypatch):
    contexts = []
    original_before = CCSI.before_task

    def before_task(self, ctx):
        contexts.append(ctx.test)
        original_before(self, ctx)

    monkeypatch.setattr(CCSI, "before_task", before_task)
    run(make_cfg(method="ccsi", protocol="clean", nb_cl_fg=6, nb_cl=4, epochs=1, **TINY_SYNTHESIS))
    assert contexts == [None, None]


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("dataset", "n_classes", "channels", "n_tasks"),
    [("bloodmnist", 8, 3, 4), ("pathmnist", 9, 3, 4), ("organamnist", 11, 1, 4), ("tissuemnist", 8, 1, 4)],
)
def test_medmnist_ccsi_configs_run_end_to_end(tmp_path, dataset, n_classes, channels, n_tasks):
    write_fake_medmnist(tmp_path / f"{dataset}.npz", n_classes, channels)
    cfg = load_config(
        [ROOT / "configs" / dataset / "ccsi.yaml"],
        {
            "data_root": str(tmp_path),
            "download": False,
            "device": "cpu",
            "output_dir": str(tmp_path / "run"),
            "epochs": 1,
            "nb_generation": 1,
            "syn_batch_size": 4,
            "syn_iterations": 2,
            "syn_warmup": 1,
            "progress": False,
        },
    )
    summary = run(cfg)
    assert summary["protocol"] == "improved" and len(summary["task_sizes"]) == n_tasks
    seen = [[j for j, a in enumerate(row) if a is not None] for row in summary["accuracy_matrix"]]
    assert seen == [list(range(i + 1)) for i in range(n_tasks)]  # after task i: accuracies of tasks 1..i
    tasks = json.loads((tmp_path / "run" / "metrics.json").read_text())["tasks"]
    assert all(sum(t["data_access"].values()) == 0 for t in tasks)  # data-free on every path, every task


@pytest.mark.e2e
def test_sweep_files_chain_task_1_to_2_on_digits(tmp_path):
    out = tmp_path / "run"
    common = {
        "dataset": "digits",
        "method": "ccsi",
        "nb_cl_fg": 2,
        "nb_cl": 2,
        "epochs": 1,
        "device": "cpu",
        "output_dir": str(out),
        "idc_source": "train",
        **TINY_SYNTHESIS,
    }
    for task in (1, 2):
        params = {**common, "task": task}
        if task == 2:
            params["saved_model_address"] = str(task_checkpoint_path(out, 1))
        sweep_file = tmp_path / f"sweep_task_{task}.yaml"
        sweep_file.write_text(
            json.dumps(
                {
                    "program": "main.py",
                    "method": "grid",
                    "metric": {"name": "final/last_val_accuracy", "goal": "maximize"},
                    "command": ["${env}", sys.executable, "${program}", "${args}"],
                    "parameters": {k: {"value": v} for k, v in params.items()},
                }
            )
        )
        commands = [
            sweep.build_command(sweep.read_sweep(sweep_file), p)
            for p in sweep.grid_points(sweep.read_sweep(sweep_file)["parameters"])
        ]
        assert len(commands) == 1 and commands[0][:3] == ["/usr/bin/env", sys.executable, "main.py"]
        done = subprocess.run(commands[0], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["accuracy_matrix"]) == 2 and metrics["accuracy_matrix"][1][0] is not None
    assert load_checkpoint(task_checkpoint_path(out, 2))["task"] == 2


@pytest.mark.e2e
def test_sweep_dry_run_prints_one_command_per_grid_point(tmp_path, capsys):
    sweep_file = tmp_path / "grid.yaml"
    sweep_file.write_text(
        "program: main.py\nmethod: grid\nparameters:\n  lr: {values: [0.1, 0.01]}\n  seed: {value: 3}\n"
    )
    assert sweep.main([str(sweep_file), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].endswith("grid.yaml: 2 run(s) (grid)")
    assert lines[1].startswith(f"[1/2] /usr/bin/env {sys.executable} main.py") and lines[1].endswith(
        "--lr=0.1 --seed=3"
    )
    assert lines[2].endswith("--lr=0.01 --seed=3")


FORBIDDEN = [
    (torch.Tensor, "__bool__"),
    (torch.Tensor, "__int__"),
    (torch.Tensor, "__float__"),
    (torch.Tensor, "item"),
    (torch.Tensor, "tolist"),
    (torch.Tensor, "nonzero"),
    (torch, "nonzero"),
]


@contextlib.contextmanager
def host_syncs_raise():
    """``Tensor.item``, ``Tensor.tolist`` and ``nonzero`` (each a host sync on a GPU) raise while inside."""
    saved = [(owner, name, getattr(owner, name)) for owner, name in FORBIDDEN]

    def forbid(name):
        def raising(*args, **kwargs):
            raise AssertionError(f"{name} called inside a training step")

        return raising

    for owner, name, _ in saved:
        setattr(owner, name, forbid(name))
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


class NoSyncBatches:
    """The method's batches, each ``next`` run with host syncs forbidden (``iter``, the epoch's preparation, not)."""

    def __init__(self, batches, count):
        self.batches, self.count = batches, count

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        it = iter(self.batches)
        while True:
            with host_syncs_raise():
                batch = next(it, None)
            if batch is None:
                return
            self.count["batches"] += 1
            yield batch


@pytest.mark.parametrize("augment", ["none", "crop_flip"])
def test_ccsi_step_of_task_2_makes_no_host_sync(make_cfg, monkeypatch, augment):
    """Task 2 (real and synthetic rows mixed, IdC, distillation, margin): neither the loader's ``next`` nor the
    training step calls ``item``, ``tolist`` or ``nonzero``; the epoch's draws are made when it starts."""
    original_batches, original_step = CCSI.train_batches, CCSI.training_step
    count = {"batches": 0, "steps": 0, "idc": 0}

    def train_batches(self, ctx, epoch):
        batches = original_batches(self, ctx, epoch)
        return NoSyncBatches(batches, count) if ctx.task == 2 else batches

    def training_step(self, batch):
        if self.n_old == 0:
            return original_step(self, batch)
        count["steps"] += 1
        count["idc"] += self.idc_draws is not None
        with host_syncs_raise():
            terms = original_step(self, batch)
        assert {"ce", "distill", "margin", "idc"} <= set(terms)
        return terms

    monkeypatch.setattr(CCSI, "train_batches", train_batches)
    monkeypatch.setattr(CCSI, "training_step", training_step)
    run(make_cfg(method="ccsi", nb_cl_fg=6, nb_cl=4, epochs=1, idc_source="val", augment=augment, **TINY_SYNTHESIS))
    assert count["batches"] == count["steps"] == count["idc"] > 1  # every step of task 2 ran under the check
    with pytest.raises(AssertionError, match="nonzero called"), host_syncs_raise():  # the check itself bites
        torch.tensor([0, 1]).nonzero()


def test_the_graphs_path_run_eagerly_equals_the_default_within_float_rounding(tmp_path, monkeypatch):
    """compile: graphs on a CPU (every batch with ``valid``, masked losses, float64 tensor lrs, the synthesis Adam
    on a tensor lr, before_step outside the step; run eagerly) against compile: false over two CCSI tasks whose
    epochs have no ragged batch (30 real images per task in batches of 10; task 2 mixes 30 impressions in at
    rs_ratio 0.5: 60 rows). Same accuracies; weights equal up to float rounding (measured: bit for bit)."""
    data = write_digits(tmp_path / "digits4.npz", 4, 60)
    seen = {"false": [], "graphs": []}
    original = CCSI.before_step

    def before_step(self, batch):
        seen[self.cfg.compile].append(None if batch.valid is None else bool(batch.valid.all()))
        return original(self, batch)

    monkeypatch.setattr(CCSI, "before_step", before_step)
    nets, accuracies = {}, {}
    for mode in seen:
        out = tmp_path / mode
        values = dict(dataset="npz", data_path=data, device="cpu", method="ccsi", nb_cl_fg=2, nb_cl=2, epochs=2)
        values.update(batch_size=10, rs_ratio=0.5, idc_source="train", output_dir=str(out), compile=mode)
        run(load_config(overrides={**values, **TINY_SYNTHESIS}))
        nets[mode] = load_checkpoint(task_checkpoint_path(out, 2))["method"]["net"]
        accuracies[mode] = json.loads((out / "metrics.json").read_text())["accuracy_matrix"]
    assert seen["false"] == [None] * 18 and seen["graphs"] == [True] * 18  # 2 x 3 + 2 x 6 steps, none padded
    assert accuracies["false"] == accuracies["graphs"]
    diff = max((nets["false"][k].float() - nets["graphs"][k].float()).abs().max().item() for k in nets["false"])
    assert diff < 1e-5


def test_local_logits_give_each_row_a_ce_over_its_own_side_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]], requires_grad=True)
    synthetic = torch.tensor([False, True])  # row 0 real (new class 3), row 1 an impression (old class 0)
    local = local_logits(logits, synthetic, n_old=2)
    nll = torch.nn.functional.cross_entropy(local, torch.tensor([3, 0]), reduction="none")
    expected = [math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(1.0))]  # softmax over columns 2-3, then 0-1
    assert torch.allclose(nll, torch.tensor(expected))
    (grad,) = torch.autograd.grad(nll.sum(), logits)
    assert torch.equal(grad[0, :2], torch.zeros(2)) and torch.equal(grad[1, 2:], torch.zeros(2))
    assert (grad[0, 2:].abs() > 0).all() and (grad[1, :2].abs() > 0).all()


def ccsi_at_task_2(make_cfg, **keys):
    """A CCSI method at the start of task 2 of digits 0-3 (task 1 untrained) and its first training batch."""
    cfg = make_cfg(method="ccsi", nb_cl_fg=2, nb_cl=2, batch_size=16, idc_source="train", **TINY_SYNTHESIS, **keys)
    method, ctx = method_at_task_2(cfg)
    method.on_epoch_start(ctx, 0)
    return method, ctx, method.before_step(next(iter(method.train_batches(ctx, 0))))


def test_local_ce_trains_the_network_on_each_side_and_the_head_on_all_classes(make_cfg):
    method, _, batch = ccsi_at_task_2(make_cfg, ccsi_local_ce=True)
    assert batch.synthetic.any() and (~batch.synthetic).any()
    method.train()
    terms = method.training_step(batch)
    out = method.net(batch.x)
    local = local_logits(out["logits"], batch.synthetic, 2)
    w = method.class_weights[batch.y]
    nll = torch.nn.functional.cross_entropy(local, batch.y, reduction="none")
    assert torch.allclose(terms["ce"], (w * nll).sum() / w.sum(), rtol=1e-5)  # the weighted mean, by hand
    expected = terms["ce"] + terms["head_ce"] + terms["distill"] + method.cfg.lw_mr * terms["margin"]
    assert torch.allclose(terms["loss"], expected + method.cfg.da_coef * terms["idc"])
    backbone = [p for n, p in method.net.named_parameters() if not n.startswith("head.")]
    head = [p for n, p in method.net.named_parameters() if n.startswith("head.") and p.requires_grad]
    grads = torch.autograd.grad(terms["head_ce"], backbone + head, allow_unused=True)
    assert all(g is None or not g.any() for g in grads[: len(backbone)]), "head_ce reached the backbone"
    assert any(g is not None and g.abs().sum() > 0 for g in grads[len(backbone) :])


def test_head_refit_balances_the_head_and_leaves_the_backbone(make_cfg):
    method, ctx, _ = ccsi_at_task_2(make_cfg, ccsi_head_refit_epochs=20, ccsi_head_refit_lr=0.1)
    net, synthetic = method.net, method.synthetic
    backbone = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("head.")}
    features = torch.cat([extract_features(net, s, 64) for s in (ctx.train, synthetic)])
    labels = torch.cat([ctx.train.y, synthetic.y])
    weights = torch.bincount(labels, minlength=4).max() / torch.bincount(labels, minlength=4).float()

    def balanced_ce() -> float:
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(net.head(features)["logits"], labels, weight=weights).item()

    before = balanced_ce()
    refit_head(net, ctx, synthetic, method.cfg, torch.device("cpu"))
    assert balanced_ce() < 0.9 * before
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in backbone.items()), "the refit moved the backbone"
    assert int(ctx.access.counts()["total"]) == 0


def test_prototype_drift_without_prototypes_is_refused(make_cfg):
    cfg = make_cfg(method="ccsi", ccsi_prototypes=False, ccsi_prototype_drift=True)
    with pytest.raises(ConfigError, match=r"^key 'ccsi_prototype_drift': .*set ccsi_prototypes: true$"):
        CCSI.check(cfg, [2, 2])
