"""precision.py: fp32 changes nothing, bf16/fp16 autocast with float32 outputs and loss scaling, compile in place."""

import contextlib
import json

import pytest
import torch

import continual_class_specific_impression as ccsi
import incremental_train_and_eval as engine
import models
from bench.synthesis_speed import build_teacher
from experiment import config
from experiment.config import ConfigError
from methods.ccsi import synthesize_classes
from runtime import precision
from tiny import write_digits

CPU = torch.device("cpu")


def tiny_net(make_cfg, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    net = models.build_net(make_cfg(**overrides), 1, 32)
    net.expand_head(3)
    return net


def test_fp32_wraps_nothing(make_cfg):
    cfg = make_cfg()
    net = tiny_net(make_cfg)
    assert isinstance(precision.autocast(cfg, CPU), contextlib.nullcontext)
    assert precision.grad_scaler(cfg, CPU) is None
    assert precision.prepare_model(net, cfg, CPU) is net
    assert not net._forward_hooks and net._compiled_call_impl is None
    assert precision.compile_function(ccsi.synthesize, cfg, CPU) is ccsi.synthesize


def test_bf16_runs_convolutions_in_bf16_and_returns_float32(make_cfg):
    cfg = make_cfg(precision="bf16")
    net = precision.prepare_model(tiny_net(make_cfg), cfg, CPU)
    seen = []
    net.backbone.conv1.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    x = torch.rand(4, 1, 32, 32)
    with precision.autocast(cfg, CPU):
        out = net(x)
    assert seen == [torch.bfloat16]
    assert {v.dtype for v in out.values()} == {torch.float32}
    teacher = net.copy_frozen()  # a deep copy keeps the float32-output hook
    with precision.autocast(cfg, CPU):
        assert teacher(x)["logits"].dtype == torch.float32


def test_fp16_scaler_scales_the_loss_and_skips_a_step_with_infinite_gradients(make_cfg):
    cfg = make_cfg(precision="fp16")
    scaler = precision.grad_scaler(cfg, CPU)
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.get_scale() == 65536.0
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = torch.optim.SGD([w], lr=0.5)
    precision.scale_loss((w * torch.tensor([1.0, 3.0])).sum(), scaler).backward()
    assert w.grad.tolist() == [65536.0, 3 * 65536.0]  # gradients of the scaled loss
    precision.optimizer_step(opt, scaler)
    assert w.tolist() == [0.5, 0.5]  # unscaled before the step: 1 - 0.5 * 1, 2 - 0.5 * 3
    opt.zero_grad()
    precision.scale_loss((w * torch.tensor([float("inf"), 1.0])).sum(), scaler).backward()
    precision.optimizer_step(opt, scaler)
    assert w.tolist() == [0.5, 0.5] and scaler.get_scale() == 32768.0  # step skipped, scale halved


def test_a_precision_autocast_cannot_run_is_refused_in_one_line(make_cfg, monkeypatch):
    assert not precision.autocast_supported(CPU, torch.float64)  # CPU autocast knows bf16/fp16 only
    monkeypatch.setattr(precision, "autocast_supported", lambda device, dtype: False)
    with pytest.raises(
        ConfigError, match=r"^key 'precision': fp16 autocast is not supported on cpu .*use precision fp32$"
    ):
        precision.prepare_model(tiny_net(make_cfg), make_cfg(precision="fp16"), CPU)


def test_compile_is_in_place_and_teachers_stay_eager(make_cfg, monkeypatch):
    monkeypatch.setattr(precision, "BACKEND", "eager")  # dynamo tracing without code generation: fast
    cfg = make_cfg(compile=True)
    reference, net = tiny_net(make_cfg), tiny_net(make_cfg)
    keys = list(net.state_dict())
    assert precision.prepare_model(net, cfg, CPU) is net and net._compiled_call_impl is not None
    assert list(net.state_dict()) == keys
    x = torch.rand(5, 1, 32, 32)
    for mode in (True, False):
        reference.train(mode), net.train(mode)
        assert all(torch.equal(a, b) for a, b in zip(reference(x).values(), net(x).values()))
    assert net.copy_frozen()._compiled_call_impl is None
    fn = precision.compile_function(ccsi.synthesize, cfg, CPU)
    assert fn is not ccsi.synthesize and precision.compile_function(ccsi.synthesize, cfg, CPU) is fn


def test_compiled_synthesis_step_gives_the_same_impressions(make_cfg, monkeypatch):
    monkeypatch.setattr(precision, "BACKEND", "eager")
    cfg = make_cfg(nb_generation=2, syn_batch_size=4, syn_iterations=3, syn_warmup=1)
    teacher, memory = build_teacher(cfg, 3, CPU)
    plain = synthesize_classes(teacher, 3, (3, 32, 32), cfg, 0, CPU, memory)
    compiled = synthesize_classes(teacher, 3, (3, 32, 32), cfg.replace(compile=True), 0, CPU, memory)
    assert torch.equal(plain.images.x, compiled.images.x) and torch.equal(plain.best_loss, compiled.best_loss)


def test_bf16_synthesis_keeps_float32_terms_close_to_fp32(make_cfg):
    cfg = make_cfg(nb_generation=2, syn_batch_size=4, syn_iterations=6, syn_warmup=1)
    teacher, memory = build_teacher(cfg, 3, CPU)
    fp32 = synthesize_classes(teacher, 3, (3, 32, 32), cfg, 0, CPU, memory)
    bf16 = synthesize_classes(teacher, 3, (3, 32, 32), cfg.replace(precision="bf16"), 0, CPU, memory)
    start = synthesize_classes(teacher, 3, (3, 32, 32), cfg.replace(syn_iterations=0), 0, CPU, memory)
    assert bf16.best_loss.dtype == torch.float32
    assert (fp32.best_loss < start.best_loss).all()  # six Adam steps lowered every batch's loss ...
    assert torch.allclose(bf16.best_loss, fp32.best_loss, rtol=0.05)  # ... and bf16 products follow fp32's path
    moved = (fp32.images.x - start.images.x).abs().mean()
    assert (bf16.images.x - fp32.images.x).abs().mean() < 0.5 * moved  # measured: 0.012 vs 0.072 moved


@pytest.fixture(scope="module")
def digits_01(tmp_path_factory) -> str:
    """Digits 0 and 1: 64 training, 16 val, 100 test images."""
    return write_digits(tmp_path_factory.mktemp("data") / "digits01.npz", 2, 64)


def run_task_one(data: str, folder, **overrides) -> float:
    """Accuracy of a one-epoch run on ``data`` (fp32: 96%; batches of 8, so eight steps)."""
    values = {"dataset": "npz", "data_path": data, "device": "cpu", "progress": False, "select_on": "last"}
    values.update(nb_cl_fg=2, nb_cl=2, epochs=1, batch_size=8, lr=0.05, output_dir=str(folder), **overrides)
    values.setdefault("cn_momentum", 0.1)  # averaged running statistics (the released 1.0 keeps the last batch's)
    engine.run(config.load_config(overrides=values))
    return json.loads((folder / "metrics.json").read_text())["accuracy_per_task"][0]


@pytest.fixture(scope="module")
def fp32_accuracy(tmp_path_factory, digits_01) -> float:
    return run_task_one(digits_01, tmp_path_factory.mktemp("fp32"))


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_low_precision_trains_to_the_fp32_accuracy_within_tolerance(tmp_path, digits_01, fp32_accuracy, name):
    accuracy = run_task_one(digits_01, tmp_path, precision=name)
    assert fp32_accuracy > 90 and abs(accuracy - fp32_accuracy) <= 3.0  # points (100 test images)


@pytest.mark.e2e
def test_a_compiled_run_equals_the_fp32_run(tmp_path, digits_01, fp32_accuracy, monkeypatch):
    monkeypatch.setattr(precision, "BACKEND", "eager")  # the same operations, traced by dynamo
    assert run_task_one(digits_01, tmp_path, compile=True) == fp32_accuracy


def test_compile_is_false_true_or_graphs_and_takes_the_former_bools(make_cfg, tmp_path):
    given = [False, True, "True", "off", "graphs", "false"]
    assert [make_cfg(compile=v).compile for v in given] == ["false", "true", "true", "false", "graphs", "false"]
    (tmp_path / "c.yaml").write_text("compile: true\n")  # YAML's bool, as older config files have it
    assert config.load_config([tmp_path / "c.yaml"]).compile == "true"
    with pytest.raises(ConfigError, match=r"key 'compile': expected str \(one of false, true, graphs\), got 'fast'"):
        make_cfg(compile="fast")


def test_graphs_captures_a_step_on_cuda_and_runs_it_eagerly_elsewhere(make_cfg, monkeypatch):
    def step(x):
        return x + 1

    assert precision.capture_step(step, make_cfg(compile="graphs"), CPU) is step  # inductor: the CPU runs it eagerly
    assert precision.capture_step(step, make_cfg(compile="true"), CPU) is step  # true compiles the net, not steps
    monkeypatch.setattr(precision, "BACKEND", "eager")  # what a CUDA device gets, traced on the CPU
    captured = precision.capture_step(step, make_cfg(compile="graphs"), CPU)
    assert captured is not step and torch.equal(captured(torch.ones(2)), torch.full((2,), 2.0))
