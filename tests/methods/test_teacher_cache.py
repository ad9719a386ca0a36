"""TeacherCache: the teacher's outputs of unchanged training images, computed once, equal per-batch forwards."""

import pytest
import torch

import models
from bench.protocol_timing import write_fake_bloodmnist
from dataloaders.batches import Batch, BatchLoader
from dataloaders.image_set import ImageSet
from experiment.checkpoint import load_checkpoint, task_checkpoint_path
from incremental_train_and_eval import run
from methods.teacher_cache import TeacherCache, teacher_outputs


def teacher_and_sources(make_cfg):
    torch.manual_seed(0)
    net = models.build_net(make_cfg(), 1, 32)
    net.expand_head(3)
    net.train()
    with torch.no_grad():
        net(torch.rand(16, 1, 32, 32))  # running statistics that are not the initial ones
    real = ImageSet(torch.randint(0, 256, (23, 1, 32, 32), dtype=torch.uint8), torch.arange(23) % 3)
    synthetic = ImageSet(torch.rand(9, 1, 32, 32), torch.arange(9) % 2)
    return net.copy_frozen(), real, synthetic


def test_lookups_equal_the_teachers_forward_bit_for_bit_and_the_table_is_built_once(make_cfg):
    teacher, real, synthetic = teacher_and_sources(make_cfg)
    calls = []
    teacher.register_forward_hook(lambda _m, inputs, _o: calls.append(len(inputs[0])))
    cache = TeacherCache(teacher, "features", real, synthetic, batch_size=10)
    loader = BatchLoader(real, 7, generator=torch.Generator().manual_seed(0), synthetic=synthetic, synthetic_ratio=0.5)
    batches = list(loader)
    assert [len(b) for b in batches] == [7] * 6 + [4] and any(b.synthetic.any() for b in batches)
    for batch in batches:
        cached = cache.lookup(batch)
        calls_before = len(calls)
        assert torch.equal(cached, teacher(batch.x)["features"])
        assert len(calls) == calls_before + 1
    assert calls[:4] == [10, 10, 3, 9]  # the table: real in chunks of 10, then the synthetic rows, once


def test_no_lookup_for_augmented_or_one_row_batches(make_cfg):
    teacher, real, synthetic = teacher_and_sources(make_cfg)
    cache = TeacherCache(teacher, "features", real, synthetic, batch_size=10)
    augmented = next(iter(BatchLoader(real, 4, augment="flip", generator=torch.Generator().manual_seed(0))))
    assert augmented.index is None and cache.lookup(augmented) is None
    one = Batch(real.x[:1].float() / 255, real.y[:1], torch.zeros(1, dtype=torch.bool), index=torch.tensor([0]))
    assert cache.lookup(one) is None and cache.table is None


def test_a_one_image_chunk_is_computed_as_in_a_larger_batch(make_cfg):
    teacher, real, _ = teacher_and_sources(make_cfg)
    three = ImageSet(real.x[:3], real.y[:3])
    with torch.no_grad():
        expected = teacher(three.x.float() / 255)["features"]
    assert torch.equal(teacher_outputs(teacher, three, "features", batch_size=2), expected)  # chunks of 2 and 1


@pytest.mark.e2e
def test_ccsi_run_with_the_cache_equals_the_run_without(make_cfg, tmp_path, monkeypatch):
    data = write_fake_bloodmnist(tmp_path / "blood.npz", n_train=96)  # 8 tinted classes, 12 training images each
    common = {"dataset": "npz", "data_path": str(data), "method": "ccsi", "nb_cl_fg": 4, "nb_cl": 4, "epochs": 2}
    common.update(idc_source="val", nb_generation=1, syn_batch_size=8, syn_iterations=2, syn_warmup=1)
    lookups = []
    original = TeacherCache.lookup
    monkeypatch.setattr(TeacherCache, "lookup", lambda self, b: lookups.append(original(self, b)) or lookups[-1])
    cached = run(make_cfg(output_dir=str(tmp_path / "cached"), **common))
    assert lookups and all(found is not None for found in lookups)
    monkeypatch.setattr(TeacherCache, "lookup", lambda self, b: None)  # every step runs the teacher, as before
    plain = run(make_cfg(output_dir=str(tmp_path / "plain"), **common))
    assert cached["accuracy_matrix"] == plain["accuracy_matrix"]
    nets = [load_checkpoint(task_checkpoint_path(tmp_path / n, 2))["method"]["net"] for n in ("cached", "plain")]
    assert all(torch.equal(nets[0][k], nets[1][k]) for k in nets[0])  # the trained weights, bit for bit
