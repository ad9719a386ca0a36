"""Class-impression synthesis: loss terms by hand, class statistics, memory, vectorised == loop, a digits teacher."""

import math

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch._dynamo.utils import counters

import continual_class_specific_impression as ccsi
import models
import synthesis_losses as sl
from dataloaders.image_set import ImageSet
from experiment import config
from methods.base import TaskContext
from methods.ccsi import replay_impressions
from methods.class_statistics import ClassMemory, class_mean_images, class_statistics
from reporting.plots import plot_impressions
from tiny import SMALL, random_images, synth, tiny_memory, tiny_teacher
from tiny import default_cfg as make_cfg

# ----- loss terms by hand ------------------------------------------------------------------


def test_moment_loss_is_zero_at_the_targets_and_has_a_gradient_elsewhere():
    a = torch.randn(2 * 3, 4, 5, 5, requires_grad=True)  # 2 groups of 3 samples, 4 channels
    mean, var = sl.group_moments(a, 2)
    first = a[:3].detach().transpose(0, 1).reshape(4, -1)  # group 0: (ch, samples * pixels)
    assert torch.allclose(mean[0], first.mean(1), atol=1e-6)
    assert torch.allclose(var[0], first.var(1, unbiased=False), atol=1e-5)

    at_target = sl.moment_loss(mean, var, mean.detach(), var.detach())
    assert torch.allclose(at_target, torch.zeros(2), atol=1e-7)
    (grad,) = torch.autograd.grad(at_target.sum(), a)
    assert torch.isfinite(grad).all()

    mean, var = sl.group_moments(a, 2)
    shifted = sl.moment_loss(mean, var, mean.detach() + 1.0, var.detach() + 2.0)  # ||2||_2 + ||1||_2 over 4 channels
    assert torch.allclose(shifted, torch.full((2,), 2 * 2.0 + 2 * 1.0), atol=1e-5)
    (grad,) = torch.autograd.grad(shifted[1], a)
    assert grad[3:].abs().sum() > 0 and grad[:3].abs().sum() == 0  # group 1's loss only moves group 1


def test_fused_group_moments_have_the_same_values_and_the_exact_gradient():
    a = torch.randn(2 * 3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    mean, var = sl.group_moments(a, 2, fused=True)
    plain_mean, plain_var = sl.group_moments(a, 2)
    assert torch.allclose(mean, plain_mean, rtol=1e-12, atol=1e-14)  # one pass (E[a^2] - mean^2) vs two
    assert torch.allclose(var, plain_var, rtol=1e-12, atol=1e-14)
    by_hand = a.detach().reshape(2, 3, 4, 25).transpose(1, 2).reshape(2, 4, 75)  # (G, ch, B * HW)
    assert torch.allclose(var, by_hand.var(dim=2, unbiased=False), rtol=1e-12)
    assert torch.autograd.gradcheck(lambda t: sl.group_moments(t, 2, fused=True), (a,))
    gm, gv = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    (fused,) = torch.autograd.grad((mean * gm + var * gv).sum(), a)
    (plain,) = torch.autograd.grad((plain_mean * gm + plain_var * gv).sum(), a)
    assert torch.allclose(fused, plain, rtol=1e-12, atol=1e-14)


def test_total_variation_and_l2_match_a_hand_computation():
    img = torch.tensor([[0.0, 1.0], [2.0, 4.0]])
    x = img.reshape(1, 1, 1, 2, 2)  # (G, B, C, H, W)
    # horizontal (0-1, 2-4), vertical (0-2, 1-4), anti-diagonal x[1,0]-x[0,1] = 1, diagonal x[0,0]-x[1,1] = -4
    expected = math.sqrt(1 + 4) + math.sqrt(4 + 9) + 1.0 + 4.0
    assert sl.total_variation(x).item() == pytest.approx(expected, rel=1e-6)
    # the norm is over the whole group: two copies of the image in one group scale it by sqrt(2)
    pair = torch.stack([img, img]).reshape(1, 2, 1, 2, 2)
    assert sl.total_variation(pair).item() == pytest.approx(math.sqrt(2) * expected, rel=1e-6)
    three = torch.arange(9.0).reshape(
        1, 1, 1, 3, 3
    )  # h diffs all -1, v all -3, anti-diag +2, diag -4 (6, 6, 4, 4 of them)
    assert sl.total_variation(three).item() == pytest.approx(math.sqrt(6) + 3 * math.sqrt(6) + 2 * 2 + 4 * 2, rel=1e-6)
    # l2: mean over a group's images of each image's norm
    two = torch.stack([img, 2 * img]).reshape(1, 2, 1, 2, 2)
    assert sl.image_l2(two).item() == pytest.approx(1.5 * math.sqrt(0 + 1 + 4 + 16), rel=1e-6)


def test_jitter_flip_equals_torch_roll_then_flip_per_group():
    x = torch.randn(3, 2, 2, 5, 4)
    shifts = torch.tensor([[1, -2], [0, 0], [-3, 3]])
    flips = torch.tensor([True, False, True])
    out = sl.jitter_flip(x, shifts, flips)
    for g in range(3):
        ref = torch.roll(x[g], shifts=(int(shifts[g, 0]), int(shifts[g, 1])), dims=(2, 3))
        ref = ref.flip(-1) if flips[g] else ref
        assert torch.equal(out[g], ref)


def test_mixture_target_matches_a_hand_computation():
    class_mean = torch.tensor([[0.0], [2.0]], dtype=torch.float64)  # (K=2, ch=1)
    class_var = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])  # group 0: p = (3/4, 1/4); group 1: p = (0, 1)
    freq = sl.label_frequencies(labels, groups=2, num_classes=2)
    assert torch.allclose(freq, torch.tensor([[0.75, 0.25], [0.0, 1.0]], dtype=torch.float64))
    mean, var = sl.mixture_moments(freq, class_mean, class_var)
    # group 0: mu = 0.5; E[x^2] = 0.75 * (1 + 0) + 0.25 * (3 + 4) = 2.5; var = 2.5 - 0.25 = 2.25
    assert mean[:, 0].tolist() == pytest.approx([0.5, 2.0])
    assert var[:, 0].tolist() == pytest.approx([2.25, 3.0])


def test_learning_rate_warms_up_then_follows_the_cosine():
    lr = [sl.learning_rate(i, 110, 0.05, 10, 0.5) for i in range(110)]
    assert lr[0] == pytest.approx(0.005) and lr[9] == pytest.approx(0.05)
    assert lr[10] == pytest.approx(0.05) and lr[60] == pytest.approx(0.025)
    assert sl.learning_rate(10, 110, 0.05, 10, 0.2) == pytest.approx(0.02)  # the released CCSI factor


# ----- what is kept per class ----------------------------------------------------------------


def test_class_statistics_and_mean_images_equal_a_direct_computation():
    net = tiny_teacher()
    images = ImageSet(random_images(23, 3).x, torch.tensor([2, 0, 0, 1, 2] * 4 + [0, 0, 2]))  # unequal counts
    stats = class_statistics(net, images, batch_size=4, device="cpu")
    labels, means = class_mean_images(images)
    assert labels.tolist() == [0, 1, 2] and len(stats) == 2

    x = images.x.float() / 255
    inputs = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, i, k=k: inputs.__setitem__(k, i[0]))
        for k, m in enumerate([net.bn1, net.bn2])
    ]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    for c in range(3):
        assert torch.allclose(means[c], x[images.y == c].mean(0), atol=1e-6)
        for k, (lab, mean, var) in enumerate(stats):
            a = inputs[k][images.y == c].transpose(0, 1).flatten(1)  # (ch, samples * pixels)
            assert lab.tolist() == [0, 1, 2]
            assert torch.allclose(mean[c].float(), a.mean(1), atol=1e-5)
            assert torch.allclose(var[c].float(), a.var(1, unbiased=False), atol=1e-5)
    assert not net.training


def test_class_memory_merges_tasks_and_round_trips(tmp_path):
    net = tiny_teacher()
    memory = ClassMemory()
    first = random_images(12, 2)
    memory.add_task(net, first, batch_size=5, device="cpu")
    second = ImageSet(random_images(10, 2, seed=1).x, torch.tensor([4, 3] * 5))
    memory.add_task(net, second, batch_size=5, device="cpu")
    assert memory.labels.tolist() == [0, 1, 3, 4] and memory.num_layers == 2
    assert torch.allclose(memory.mean_images[2], second.x[second.y == 3].float().mean(0) / 255, atol=1e-6)
    assert memory.rows(torch.tensor([4, 0])).tolist() == [3, 0]
    with pytest.raises(ValueError, match=r"no entry for classes \[2\]"):
        memory.rows(torch.tensor([2]))

    torch.save(memory.state_dict(), tmp_path / "memory.pt")
    restored = ClassMemory()
    restored.load_state_dict(torch.load(tmp_path / "memory.pt"))
    assert torch.equal(restored.labels, memory.labels) and torch.equal(restored.mean_images, memory.mean_images)
    assert all(torch.equal(a, b) for a, b in zip(restored.layer_vars, memory.layer_vars))
    assert restored.to("cpu") is restored


# ----- synthesis on a tiny teacher ----------------------------------------------------------------


def test_vectorised_synthesis_equals_the_per_batch_loop():
    net = tiny_teacher()
    memory = tiny_memory(net)
    cfg = make_cfg(**{**SMALL, "nb_generation": 3, "syn_iterations": 30})
    vec = synth(net, memory, 3, cfg, seed=5)
    loop = synth(net, memory, 3, cfg, seed=5, group_chunk=1)
    chunked = synth(net, memory, 3, cfg, seed=5, group_chunk=2)
    assert torch.equal(vec.images.y, loop.images.y)
    # float32 reductions over different batch shapes differ in the last bits; after 30 Adam steps: < 1e-4
    assert torch.allclose(vec.images.x, loop.images.x, atol=1e-4)
    assert torch.allclose(vec.images.x, chunked.images.x, atol=1e-4)
    assert torch.allclose(vec.best_loss, loop.best_loss, rtol=1e-4)
    shard = synth(net, memory, 3, cfg, seed=5, groups=[2])
    assert torch.allclose(shard.images.x, vec.images.x[16:24], atol=1e-4)  # batch 2 alone, e.g. on another rank
    assert (vec.images.x - vec.images.x[:1]).abs().max() > 0.01  # the images are not all the same


def test_one_pass_moments_of_float32_activations_stay_within_float_rounding_of_two_passes():
    # activations with a mean 4x their spread: E[a^2] - mean^2 loses about 2 digits of float32's 7 here
    a = (torch.randn(4 * 40, 16, 14, 14, dtype=torch.float64) * 0.5 + 2.0).float()
    exact_mean, exact_var = sl.group_moments(a.double(), 4)
    mean, var = sl.group_moments(a, 4, fused=True)
    assert torch.allclose(mean.double(), exact_mean, rtol=1e-6)
    assert torch.allclose(var.double(), exact_var, rtol=2e-5)


def test_fused_moments_synthesis_stays_within_float_rounding_of_the_plain_one():
    """The default (syn_fused_moments: true) against the released code's two-pass autograd moments."""
    net = tiny_teacher()
    memory = tiny_memory(net)
    cfg = make_cfg(**{**SMALL, "syn_iterations": 30})
    assert cfg.syn_fused_moments  # the default
    plain = synth(net, memory, 3, cfg.replace(syn_fused_moments=False), seed=5)
    fused = synth(net, memory, 3, cfg, seed=5)
    assert torch.allclose(fused.best_loss, plain.best_loss, rtol=1e-4)
    assert torch.allclose(fused.images.x, plain.images.x, atol=1e-3)


def test_synthesis_is_deterministic_and_seed_dependent():
    net = tiny_teacher()
    memory = tiny_memory(net)
    cfg = make_cfg(**SMALL)
    a = synth(net, memory, 3, cfg, seed=1)
    b = synth(net, memory, 3, cfg, seed=1)
    c = synth(net, memory, 3, cfg, seed=2)
    assert torch.equal(a.images.x, b.images.x) and torch.equal(a.images.y, b.images.y)
    assert not torch.equal(a.images.x, c.images.x)


def test_zero_iterations_return_the_initial_images_drawn_from_each_batch_generator():
    net = tiny_teacher()
    memory = tiny_memory(net)
    cfg = make_cfg(**{**SMALL, "syn_iterations": 0})
    result = synth(net, memory, 3, cfg, seed=7)
    for g in range(2):
        gen = torch.Generator().manual_seed(ccsi.group_seed(7, g))
        labels = torch.randint(0, 3, (8,), generator=gen)
        noise = torch.randn((8, 1, 8, 8), generator=gen)
        expected = (memory.mean_images[labels] + 0.1 * noise).clamp(0, 1)
        assert torch.equal(result.images.y[8 * g : 8 * (g + 1)], labels)
        assert torch.allclose(result.images.x[8 * g : 8 * (g + 1)], expected, atol=1e-7)
    assert result.best_iteration.tolist() == [0, 0]

    cyclic = synth(net, memory, 3, cfg.replace(random_label=False), seed=7)
    assert cyclic.images.y.tolist() == ([0, 1, 2] * 3)[:8] * 2


def test_best_iterate_is_kept_and_images_stay_in_range():
    net = tiny_teacher()
    memory = tiny_memory(net)
    cfg = make_cfg(**{**SMALL, "generation_lr": 50.0, "syn_warmup": 0, "jitter": 0, "do_flip": False})
    result = synth(net, memory, 3, cfg, seed=3)
    assert result.images.x.min() >= 0 and result.images.x.max() <= 1
    assert (result.best_loss <= result.last_loss).all()
    assert (result.best_loss < result.last_loss).any()  # a huge lr makes things worse: an earlier iterate is kept
    assert (result.best_iteration < cfg.syn_iterations).any()
    # the kept images are the ones their loss was measured on (no augmentation here, so it is recomputable)
    layers = ccsi.bn_layers(net)
    targets = ccsi.class_mixture_targets(layers, result.images.y, 2, memory.layer_means, memory.layer_vars)
    with sl.capture_bn_inputs(layers) as store, torch.no_grad():
        x5 = result.images.x.reshape(2, 8, 1, 8, 8)
        terms = sl.impression_loss(net, layers, store, x5, result.images.y, targets, ccsi.loss_weights(cfg))
    assert torch.allclose(terms[:, -1], result.best_loss, rtol=1e-5)


def test_plain_bn_teacher_returning_a_tensor_and_running_targets():
    net = tiny_teacher(cn=False, as_dict=False)
    memory = tiny_memory(net)
    for stats in ("running", "per_class"):
        result = synth(net, memory, 3, make_cfg(**SMALL, class_stats=stats), 0)
        assert result.images.x.shape == (16, 1, 8, 8)
        assert result.loss_terms["total"] < 1e9


def test_bad_inputs_raise_clear_errors():
    net = tiny_teacher()
    memory = tiny_memory(net, classes=2)
    cfg = make_cfg(**SMALL)
    with pytest.raises(ValueError, match=r"no entry for classes \[2\]"):
        synth(net, memory, 3, cfg, 0)
    with pytest.raises(ValueError, match="n_classes"):
        synth(net, memory, 0, cfg, 0)
    other = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ValueError, match="statistics of 2 layers, the teacher has 1"):
        synth(other.eval(), memory, 2, cfg, 0)
    with pytest.raises(config.ConfigError, match="syn_init"):
        make_cfg(syn_init="zeros")
    empty = synth(net, memory, 2, cfg.replace(nb_generation=0), 0)
    assert len(empty.images) == 0


def test_impressions_grid_and_log(tmp_path):
    net = tiny_teacher()
    memory = tiny_memory(net)
    logged = []

    class Recorder:
        def log_scalars(self, scalars, step=None):
            logged.append((scalars, step))

        def log_image(self, name, path):
            logged.append(({name: path}, None))

    ctx = TaskContext(
        task=2,
        new_classes=[3],
        n_old=3,
        train=random_images(4, 1),
        val=random_images(4, 1),
        test=None,
        device=torch.device("cpu"),
        output_dir=tmp_path,
        generator=torch.Generator().manual_seed(0),
        log=Recorder(),
    )
    images = replay_impressions(net, ctx, make_cfg(**SMALL, progress=False), (1, 8, 8), memory)
    assert len(images) == 16 and set(images.y.tolist()) <= {0, 1, 2}
    synthesis_terms = logged[0][0]
    assert set(synthesis_terms) >= {"synthesis/ce", "synthesis/bn", "synthesis/tv", "synthesis/l2", "synthesis/total"}
    with torch.no_grad():  # the teacher's accuracy on the impressions it made, computed here independently
        expected = 100.0 * (net(images.x.float())["logits"].argmax(1) == images.y).float().mean().item()
    assert logged[1][0]["task2/impressions_teacher_accuracy"] == pytest.approx(expected, abs=1e-4)
    assert (tmp_path / "impressions_task_2.png").is_file()
    assert (tmp_path / "impressions_task_2.pdf").is_file()
    png, pdf = plot_impressions(tmp_path / "grid" / "impressions.png", images.x, images.y, None, per_class=4)
    assert png.is_file() and pdf.is_file()  # without mean images (DeepInversion, syn_init noise): no mean column


# ----- a digits teacher built with models.build_net ------------------------------------------------


@pytest.fixture(scope="module")
def digits_teacher():
    """models.build_net (CCSI ResNet with CN) trained 2 epochs on 480 images of digits 0-3, resized to 32x32."""
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.tensor(digits.target)
    keep = torch.nonzero(y < 4)[:480, 0]  # about 120 images of each of the digits 0-3
    data = ImageSet((x[keep] * 255).round().to(torch.uint8), y[keep])
    cfg = make_cfg()
    net = models.build_net(cfg, 1, 32)
    net.expand_head(4)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        for idx in torch.randperm(len(data)).split(16):
            loss = F.cross_entropy(net(data.x[idx].float() / 255)["logits"], data.y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    teacher = net.copy_frozen()
    memory = ClassMemory()
    memory.add_task(teacher, data, batch_size=256, device="cpu")
    return teacher, memory


def target_confidence(teacher, images: ImageSet) -> float:
    with torch.no_grad():
        probs = teacher(images.x)["logits"].softmax(dim=1)
    return probs.gather(1, images.y[:, None]).mean().item()


def test_synthesis_raises_the_digits_teachers_confidence(digits_teacher):
    teacher, memory = digits_teacher
    assert memory.num_layers == len(models.norm_layers(teacher)) == 9
    cfg = make_cfg(**{**SMALL, "init_noise": 0.3, "syn_iterations": 30})
    start = synth(teacher, memory, 4, cfg.replace(syn_iterations=0), 0)
    end = synth(teacher, memory, 4, cfg, 0)
    before, after = target_confidence(teacher, start.images), target_confidence(teacher, end.images)
    print(f"teacher confidence in the target class: {before:.3f} -> {after:.3f}")
    assert after > before + 0.05
    assert end.loss_terms["bn"] < start.loss_terms["bn"]
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())


def test_graphs_synthesis_adam_reads_a_float64_lr_tensor_and_gives_the_same_impressions(monkeypatch):
    """compile: graphs: the pixels' Adam holds its lr in a float64 tensor that each iteration fills with the
    schedule's value (not capturable on a CPU: torch allows it on CUDA only); on a CPU the impressions, kept
    iterations and losses equal the float lr's bit for bit (30 iterations, warm-up then cosine)."""
    net, cfg = tiny_teacher(), make_cfg(**{**SMALL, "syn_iterations": 30})
    memory = tiny_memory(net)
    filled = []
    original = ccsi.set_lr
    monkeypatch.setattr(ccsi, "set_lr", lambda opt, lr: (filled.append(opt.param_groups[0]["lr"]), original(opt, lr)))
    plain = synth(net, memory, 3, cfg, seed=5)
    graphs = synth(net, memory, 3, cfg.replace(compile="graphs"), seed=5)
    assert all(isinstance(lr, float) for lr in filled[:30])
    tensors = filled[30:]
    assert len(tensors) == 30 and all(t is tensors[0] and t.dtype == torch.float64 for t in tensors)
    assert not ccsi.pixel_adam(torch.zeros(1, requires_grad=True), cfg.replace(compile="graphs")).defaults["capturable"]
    assert torch.equal(plain.images.x, graphs.images.x) and torch.equal(plain.best_iteration, graphs.best_iteration)
    assert torch.equal(plain.best_loss, graphs.best_loss) and torch.equal(plain.last_loss, graphs.last_loss)
    assert (plain.images.x - synth(net, memory, 3, cfg.replace(syn_iterations=0), seed=5).images.x).abs().max() > 0.01


def test_a_captured_synthesis_iteration_is_traced_once_not_once_per_iteration(monkeypatch):
    """What a CUDA device compiles under compile: graphs, traced on the CPU by dynamo ("eager" backend): the
    iteration takes its shift, flip and index as tensors, so 3 or 9 iterations give the same graphs (no recompile
    per iteration, which would re-record a CUDA graph each time), and the impressions stay those of the eager run
    within float rounding (measured: 4e-7)."""
    monkeypatch.setattr(ccsi.precision, "BACKEND", "eager")
    net, cfg = tiny_teacher(), make_cfg(**{**SMALL, "compile": "graphs"})
    memory = tiny_memory(net)
    graphs = []
    for iterations in (3, 9):
        torch._dynamo.reset()
        counters.clear()
        traced = synth(net, memory, 3, cfg.replace(syn_iterations=iterations), seed=5)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] == graphs[1] > 0 and not counters["recompiles"]
    eager = synth(net, memory, 3, cfg.replace(syn_iterations=9, compile="false"), seed=5)
    assert torch.allclose(traced.images.x, eager.images.x, atol=1e-5)
    torch._dynamo.reset()
