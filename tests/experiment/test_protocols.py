"""Protocols and the data-access audit: clean differs from original only in data access; under the default protocol
no real image of an old class reaches a data-free method (counted per path in metrics.json); the released clamp;
class statistics refreshed from impressions."""

import json
from pathlib import Path

import pytest
import torch

import main
from dataloaders.image_set import ImageSet
from experiment import config
from experiment.config import ConfigError, load_config
from methods.ccsi import CCSI
from methods.class_statistics import ClassMemory
from runtime.data_access import PATHS, DataAccess
from tiny import ROOT, TWO_TASKS, random_images, tiny_teacher, write_digits

# The keys through which a protocol decides which real data reach the method or choose its model.
DATA_ACCESS_KEYS = {"idc_source", "select_on", "lr_monitor"}
RELEASED = {
    "idc_source": "test",
    "select_on": "test",
    "lr_monitor": "test",
    "scheduler": "plateau_original",
    "cn_momentum": 1.0,
    "class_stats": "running",
    "class_stats_update": "frozen",
    "syn_cosine_factor": 0.2,
    "syn_clamp": "original",
    "lamda_new_classes": "nb_cl",
}


def test_clean_equals_original_except_the_keys_of_data_access():
    original, clean = config.PRESETS["protocol"]["original"], config.PRESETS["protocol"]["clean"]
    assert set(original) == set(clean) == set(RELEASED)
    assert {k for k in original if original[k].value != clean[k].value} == DATA_ACCESS_KEYS
    assert {k: s.value for k, s in original.items()} == RELEASED
    assert {k: clean[k].value for k in DATA_ACCESS_KEYS} == {
        "idc_source": "train",
        "select_on": "last",
        "lr_monitor": "val_new",
    }


IMPROVED = {"class_stats": "per_class", "class_stats_update": "refresh"}
HEAD_REFIT = {"ccsi_head_refit_epochs": 20, "ccsi_prototypes": True, "ccsi_prototype_drift": True}  # CCSI's options


def test_improved_equals_clean_except_its_measured_switches():
    clean = {k: s.value for k, s in config.preset_settings("protocol", "clean").items()}
    improved = {k: s.value for k, s in config.preset_settings("protocol", "improved").items()}
    assert set(clean) == set(RELEASED) and set(improved) == set(RELEASED) | set(HEAD_REFIT)
    assert {k: v for k, v in improved.items() if clean.get(k) != v} == {**IMPROVED, **HEAD_REFIT}
    cfg = load_config([ROOT / "configs/digits/ccsi.yaml"], {"protocol": "improved"})
    assert (cfg.class_stats, cfg.class_stats_update, cfg.idc_source) == (*IMPROVED.values(), "train")
    assert all(getattr(cfg, k) == v for k, v in HEAD_REFIT.items())
    assert load_config([ROOT / "configs/digits/ccsi.yaml"], {"protocol": "clean"}).ccsi_head_refit_epochs == 0
    mine = load_config([ROOT / "configs/digits/ccsi.yaml"], {"protocol": "improved", "select_on": "val_new"})
    assert mine.select_on == "val_new", "a key set explicitly wins over the preset it inherits from clean too"
    assert load_config(overrides={"method": "deepinversion", "protocol": "improved"}).class_stats == "running"


def test_a_preset_base_is_inherited_under_the_presets_own_name(monkeypatch):
    monkeypatch.setattr(config, "PRESETS", {"protocol": {"a": {}, "b": {}}})
    monkeypatch.setattr(config, "PRESET_BASES", {})
    config.register_preset("protocol", "a", {"lr": 0.5, "epochs": 3})
    config.register_preset("protocol", "b", {"epochs": 7})
    config.register_preset_base("protocol", "b", "a")
    b = config.preset_settings("protocol", "b")
    assert {k: (s.value, s.owner) for k, s in b.items()} == {"lr": (0.5, "protocol=b"), "epochs": (7, "protocol=b")}
    assert config.preset_settings("protocol", "a")["epochs"].value == 3


def test_data_access_counts_old_class_rows_per_path():
    access = DataAccess(n_old=3)
    access.record("train_batches", torch.tensor([0, 2, 3, 5, 1]), real=torch.tensor([True, False, True, True, True]))
    access.record("idc", torch.tensor([4, 4]))
    access.record("idc", torch.tensor([0, 9]))
    expected = dict.fromkeys(PATHS, 0) | {"train_batches": 2, "idc": 1, "total": 3}
    assert access.counts() == expected
    with pytest.raises(ValueError, match="unknown data-access path 'gradients'"):
        access.record("gradients", torch.tensor([0]))


# ----- the audit on digits ----------------------------------------------------------------------------------------


def audit(method: str, tmp_path: Path, *overrides: str) -> dict[str, int]:
    """Task 2's data-access counts of a tiny digits run (task 1: classes 0-7, task 2: 8-9)."""
    out = tmp_path / method
    args = ["--config", str(ROOT / f"configs/digits/{method}.yaml"), *TWO_TASKS, f"--output_dir={out}", *overrides]
    assert main.main(args) == 0
    tasks = json.loads((out / "metrics.json").read_text())["tasks"]
    assert tasks[0]["data_access"]["total"] == 0, "task 1 has no old class"
    return tasks[1]["data_access"]


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["ccsi", "lwf", "deepinversion", "ewc", "finetune"])
def test_data_free_methods_see_no_old_class_image_under_the_default_protocol(method, tmp_path):
    assert audit(method, tmp_path) == dict.fromkeys([*PATHS, "total"], 0)


@pytest.mark.e2e
@pytest.mark.parametrize("protocol", ["clean", "improved"])
def test_ccsi_sees_no_old_class_image_under_either_data_free_protocol(protocol, tmp_path):
    assert audit("ccsi", tmp_path, f"--protocol={protocol}") == dict.fromkeys([*PATHS, "total"], 0)


# Generator inversion and the head refit at tiny sizes (the digits configs train the generator for 40 steps).
TINY_GENERATOR = ["--gen_iterations=2", "--gen_batch_size=8", "--gen_width=8", "--gen_z_dim=16", "--rdfcil_ft_epochs=1"]


@pytest.mark.e2e
@pytest.mark.parametrize("protocol", ["clean", "improved"])
@pytest.mark.parametrize("method", ["abd", "rdfcil", "pass"])
def test_new_data_free_methods_see_no_old_class_image_under_either_protocol(method, protocol, tmp_path):
    data = write_digits(tmp_path / "digits.npz", 10, 300)  # 300 training images: PASS trains on 4 rotations of each
    counts = audit(method, tmp_path, f"--protocol={protocol}", *TINY_GENERATOR, "--dataset=npz", f"--data_path={data}")
    assert counts == dict.fromkeys([*PATHS, "total"], 0)


@pytest.mark.e2e
def test_the_audit_counts_the_released_protocol_and_rehearsal(tmp_path):
    original = audit("ccsi", tmp_path, "--protocol=original")
    old_test = 433  # digits' test split holds 433 images of classes 0-7
    assert original["context"] == old_test, "the old classes' test images are handed over for IdC"
    assert original["selection"] == old_test, "one epoch: one evaluation on test for selection and the lr"
    assert 0 < original["idc"] <= 627, "at most one IdC row per training row: 213 real / (1 - 0.66) in the epoch"
    assert original["train_batches"] == original["statistics"] == original["memory"] == 0
    icarl = audit("icarl", tmp_path)
    assert icarl["train_batches"] == 8 * 7, "one pass over the memory's 60 // 8 = 7 exemplars of each old class"
    assert icarl["memory"] == 8 * 6, "after task 2: 60 // 10 = 6 exemplars of each old class"
    assert icarl["context"] == icarl["idc"] == icarl["selection"] == 0


@pytest.mark.e2e
def test_selection_on_all_val_classes_is_counted_and_val_new_is_not(tmp_path):
    assert audit("finetune", tmp_path, "--select_on=val")["selection"] > 0
    assert audit("finetune", tmp_path / "new", "--select_on=val_new")["total"] == 0


# ----- the released clamp -------------------------------------------------------------------------------------------


def test_released_clamp_bounds_channel_0_only_to_the_imagenet_range():
    from continual_class_specific_impression import clamp_images_

    x = torch.tensor([-3.0, -1.0, 0.5, 2.0, 3.0]).reshape(1, 1, 1, 5).repeat(1, 2, 1, 1)  # (1, 2, 1, 5)
    released = clamp_images_(x.clone(), "original")
    low, high = -0.485 / 0.229, (1 - 0.485) / 0.229  # -2.1179, 2.2489
    assert torch.allclose(released[0, 0, 0], torch.tensor([low, -1.0, 0.5, 2.0, high]))
    assert torch.equal(released[0, 1], x[0, 1]), "channel 1 is not clamped"
    assert torch.equal(clamp_images_(x.clone(), "unit")[0, :, 0], torch.tensor([[0.0, 0.0, 0.5, 1.0, 1.0]] * 2))


def test_deepinversion_requires_the_unit_clamp():
    assert load_config(overrides={"method": "deepinversion", "protocol": "original"}).syn_clamp == "unit"
    with pytest.raises(ConfigError, match="syn_clamp"):
        load_config(overrides={"method": "deepinversion", "syn_clamp": "original"})


# ----- class statistics refreshed from impressions -------------------------------------------------------------------


def test_refresh_replaces_old_class_moments_by_the_current_models_moments_on_impressions():
    learned, current = tiny_teacher(seed=0), tiny_teacher(seed=1)
    memory = ClassMemory()
    memory.add_task(learned, random_images(30, 3), batch_size=7, device="cpu")  # classes 0, 1, 2 under `learned`
    before = [m.clone() for m in memory.layer_means], [v.clone() for v in memory.layer_vars]
    mean_images = memory.mean_images.clone()
    impressions = ImageSet(torch.rand(12, 1, 8, 8), torch.tensor([0, 1] * 6))  # impressions of classes 0 and 1
    memory.refresh(current, impressions, batch_size=5, device="cpu")
    inputs = []  # the BatchNorm inputs of `current` (eval mode) on the impressions, caught here by plain hooks
    hooks = [bn.register_forward_hook(lambda _, i, o: inputs.append(i[0])) for bn in (current.bn1, current.bn2)]
    with torch.no_grad():
        current.eval()(impressions.x)
    for h in hooks:
        h.remove()
    target = []
    for a in inputs:  # per class: mean and population variance over samples x pixels, per channel
        per_class = [a[impressions.y == c].double().transpose(0, 1).flatten(1) for c in (0, 1)]  # (ch, n*h*w)
        target.append(
            (
                None,
                torch.stack([x.mean(1) for x in per_class]),
                torch.stack([x.var(1, correction=0) for x in per_class]),
            )
        )
    for (_, mean, var), m, v, m0, v0 in zip(target, memory.layer_means, memory.layer_vars, *before):
        assert torch.allclose(m[:2].double(), mean, atol=1e-6) and torch.allclose(v[:2].double(), var, atol=1e-6)
        assert not torch.allclose(m0[:2], mean), "the two models differ on the impressions"
        assert torch.equal(m[2], m0[2]) and torch.equal(v[2], v0[2]), "class 2 had no impression: unchanged"
    assert torch.equal(memory.mean_images, mean_images), "mean images are kept"


def test_refresh_needs_per_class_targets():
    cfg = load_config(overrides={"method": "ccsi", "class_stats_update": "refresh", "class_stats": "running"})
    with pytest.raises(ConfigError, match="class_stats: per_class, or class_stats_update: frozen"):
        CCSI.check(cfg, [2, 2])
    CCSI.check(cfg.replace(class_stats="per_class"), [2, 2])
