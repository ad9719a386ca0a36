"""BatchLoader: shuffling, real/synthetic mixing, epoch length, on-batch crop and flip, dtype and range."""

import pytest
import torch

from dataloaders.batches import Batch, BatchLoader, RowDraws, augment_batch, random_crop, random_flip
from dataloaders.image_set import ImageSet
from runtime import distributed


def real_set(n: int, size: int = 4) -> ImageSet:
    """Image i is filled with value i % 256 (uint8) and labelled i, so a batch tells which rows it drew."""
    x = (torch.arange(n) % 256).to(torch.uint8)[:, None, None, None].expand(n, 1, size, size).contiguous()
    return ImageSet(x, torch.arange(n))


def test_shuffled_epoch_covers_every_index_once():
    loader = BatchLoader(real_set(50), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    assert len(loader) == len(batches) == 7
    assert [len(b) for b in batches] == [8] * 6 + [2]
    y = torch.cat([b.y for b in batches])
    assert sorted(y.tolist()) == list(range(50))
    assert y.tolist() != list(range(50))  # shuffled
    x = torch.cat([b.x for b in batches])
    assert torch.equal(x[:, 0, 0, 0], y.float() / 255)  # images travel with their labels
    assert not any(b.synthetic.any() for b in batches)


def test_unshuffled_epoch_is_in_order():
    y = torch.cat([b.y for b in BatchLoader(real_set(10), batch_size=3, shuffle=False)])
    assert y.tolist() == list(range(10))


def test_batches_are_float_in_unit_range():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8)[:, None, None, None].expand(3, 3, 2, 2)
    batch = next(iter(BatchLoader(ImageSet(x, torch.zeros(3)), batch_size=3, shuffle=False)))
    assert batch.x.dtype == torch.float32 and batch.y.dtype == torch.int64
    assert torch.allclose(batch.x[:, 0, 0, 0], torch.tensor([0.0, 0.2, 1.0]), atol=1e-7)
    assert batch.x[2, 2, 1, 1] == 1.0 and batch.x[0, 1, 0, 1] == 0.0
    assert batch.synthetic.dtype == torch.bool


def test_mixing_ratio_and_epoch_length():
    real = real_set(3000)
    syn = ImageSet(torch.full((20, 1, 4, 4), 0.5), torch.full((20,), -1))  # float synthetic images, label -1
    loader = BatchLoader(real, 256, synthetic=syn, synthetic_ratio=0.66, generator=torch.Generator().manual_seed(1))
    assert loader.num_samples == round(3000 / 0.34) == 8824
    assert len(loader) == -(-8824 // 256)
    batches = list(loader)
    mask = torch.cat([b.synthetic for b in batches])
    y = torch.cat([b.y for b in batches])
    x = torch.cat([b.x for b in batches])
    assert len(y) == 8824
    assert abs(mask.float().mean().item() - 0.66) < 0.02
    assert torch.equal(mask, y == -1)  # the mask marks exactly the synthetic rows
    assert torch.all(x[mask] == 0.5)
    assert torch.equal(x[~mask][:, 0, 0, 0], (y[~mask] % 256).float() / 255)


def test_empty_synthetic_set_is_a_plain_pass():
    loader = BatchLoader(
        real_set(10), 4, synthetic=ImageSet(torch.zeros(0, 1, 4, 4), torch.zeros(0)), synthetic_ratio=0.5
    )
    assert loader.num_samples == 10
    assert sorted(torch.cat([b.y for b in loader]).tolist()) == list(range(10))


def test_loader_argument_errors():
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(real_set(4), 0)
    with pytest.raises(ValueError, match="synthetic_ratio"):
        BatchLoader(real_set(4), 2, synthetic=real_set(2), synthetic_ratio=1.0)
    with pytest.raises(ValueError, match="augment"):
        BatchLoader(real_set(4), 2, augment="rotate")
    with pytest.raises(ValueError, match="augment"):
        augment_batch(torch.zeros(1, 1, 2, 2), "rotate")


def test_crop_matches_hand_computed_shifts():
    img = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)  # [[1,2,3],[4,5,6],[7,8,9]]
    x = img.expand(200, 1, 3, 3)
    out = random_crop(x, 1, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    g = torch.Generator().manual_seed(0)  # replay the offsets the crop drew
    oy = torch.randint(0, 3, (200,), generator=g)
    ox = torch.randint(0, 3, (200,), generator=g)
    hand = {
        (0, 0): [[0, 0, 0], [0, 1, 2], [0, 4, 5]],  # shifted down-right, zeros come in top-left
        (1, 1): [[1, 2, 3], [4, 5, 6], [7, 8, 9]],  # centre: unchanged
        (2, 2): [[5, 6, 0], [8, 9, 0], [0, 0, 0]],
        (0, 2): [[0, 0, 0], [2, 3, 0], [5, 6, 0]],
    }
    for (dy, dx), expected in hand.items():
        rows = (oy == dy) & (ox == dx)
        assert rows.any()
        assert torch.equal(out[rows], torch.tensor(expected, dtype=torch.float32).expand(int(rows.sum()), 1, 3, 3))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(20):
        assert torch.equal(out[i], padded[i, :, oy[i] : oy[i] + 3, ox[i] : ox[i] + 3])
    assert random_crop(x, 0) is x


def test_flip_mirrors_about_half_the_images():
    x = torch.arange(6.0).reshape(1, 2, 1, 3).expand(400, 2, 1, 3)
    out = random_flip(x, torch.Generator().manual_seed(3))
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert torch.all(flipped ^ kept)  # each image is either mirrored or untouched
    assert torch.equal(out[flipped][0, 1, 0], torch.tensor([5.0, 4.0, 3.0]))
    expected = torch.rand(400, generator=torch.Generator().manual_seed(3)) < 0.5
    assert torch.equal(flipped, expected)
    assert 150 < int(flipped.sum()) < 250


def test_crop_flip_augmentation_in_loader_keeps_shape_and_range():
    loader = BatchLoader(real_set(16, size=8), 16, augment="crop_flip", generator=torch.Generator().manual_seed(0))
    batch = next(iter(loader))
    assert batch.x.shape == (16, 1, 8, 8)
    assert float(batch.x.min()) >= 0.0 and float(batch.x.max()) <= 1.0
    # padding 4 on an 8-px image: every image keeps at least a quarter of its pixels, the rest are zeros
    for img, label in zip(batch.x, batch.y):
        value = torch.tensor(int(label) % 256, dtype=torch.uint8).float() / 255
        assert torch.all((img == 0) | (img == value))
        assert int((img == value).sum()) >= 16 or value == 0


def mixed_loader(seed: int, **kwargs) -> BatchLoader:
    """A 30 real + 7 synthetic mixed loader (60 rows), batches of 8 (the last 4 rows), crop_flip, ``seed``."""
    syn = ImageSet(torch.rand(7, 1, 8, 8, generator=torch.Generator().manual_seed(9)), torch.full((7,), -1))
    g = torch.Generator().manual_seed(seed)
    return BatchLoader(
        real_set(30, 8), 8, augment="crop_flip", generator=g, synthetic=syn, synthetic_ratio=0.5, **kwargs
    )


def test_epoch_draws_and_row_draws_equal_per_batch_draws_in_the_same_order():
    """Drawn when the epoch starts, the augmentation and a step's per-row draws are those a per-batch loader and
    ``Batch.draw_rows`` after each batch make, row for row, and the generator ends in the same state."""
    per_batch = mixed_loader(4)
    expected = []
    for batch in per_batch:
        expected.append((batch, batch.draw_rows(11, per_batch.generator)))  # the step's draw after the batch's
    draws = RowDraws(11)
    epoch = mixed_loader(4, row_draws=draws)
    it = iter(epoch)
    after_start = epoch.generator.get_state()  # every draw of the epoch made by iter()
    got = [(batch, batch.draws) for batch in it]
    assert len(got) == len(expected) == 8 and [len(b) for b, _ in got] == [8] * 7 + [4]
    for (b, rows), (e, e_rows) in zip(got, expected):
        assert torch.equal(b.x, e.x) and torch.equal(b.y, e.y) and torch.equal(b.synthetic, e.synthetic)
        assert torch.equal(rows, e_rows)
    assert torch.equal(after_start, per_batch.generator.get_state())
    with pytest.raises(RuntimeError, match="asks past"):
        draws.next(1)
    plain = list(mixed_loader(5, epoch_draws=True))  # augmentation only, no step draws
    assert all(torch.equal(b.x, e.x) and torch.equal(b.y, e.y) for b, e in zip(plain, mixed_loader(5), strict=True))


def test_padding_repeats_the_last_batchs_rows_flags_them_and_leaves_the_draws_alone():
    """pad=True: every batch has batch_size rows and ``valid``; the ragged last batch (4 of 8 rows) repeats its rows
    in order; the real rows, their draws and the generator's state are those of the unpadded epoch."""
    plain, draws = list(mixed_loader(4, row_draws=RowDraws(11))), RowDraws(11)
    loader = mixed_loader(4, row_draws=draws, pad=True)
    padded = list(loader)
    assert [len(b) for b in plain] == [8] * 7 + [4] and [len(b) for b in padded] == [8] * 8
    assert all(b.valid.tolist() == [True] * 8 for b in padded[:7])
    assert padded[-1].valid.tolist() == [True] * 4 + [False] * 4
    rep = [0, 1, 2, 3, 0, 1, 2, 3]
    last, want = padded[-1], plain[-1]
    for name in ("x", "y", "synthetic", "draws"):
        assert torch.equal(getattr(last, name), getattr(want, name)[rep])
    for b, e in zip(padded[:7], plain[:7]):
        assert torch.equal(b.x, e.x) and torch.equal(b.draws, e.draws) and torch.equal(b.y, e.y)
    unaugmented = list(BatchLoader(real_set(10, 4), 4, generator=torch.Generator().manual_seed(0), pad=True))
    assert unaugmented[-1].index.tolist() == [unaugmented[-1].index[i].item() for i in (0, 1, 0, 1)]
    assert unaugmented[-1].valid.tolist() == [True, True, False, False]


def test_mixed_batches_place_each_source_row_where_it_was_drawn():
    real, syn = real_set(30, 4), ImageSet(torch.rand(7, 1, 4, 4), 100 + torch.arange(7))
    loader = BatchLoader(real, 8, generator=torch.Generator().manual_seed(2), synthetic=syn, synthetic_ratio=0.5)
    g = torch.Generator().manual_seed(2)  # replay the epoch's draws (_draw)
    is_syn = torch.rand(loader.num_samples, generator=g) < 0.5
    real_idx = torch.randint(0, 30, (loader.num_samples,), generator=g)
    syn_idx = torch.randint(0, 7, (loader.num_samples,), generator=g)
    batches = list(loader)
    x, y = torch.cat([b.x for b in batches]), torch.cat([b.y for b in batches])
    index = torch.cat([b.index for b in batches])
    assert torch.equal(torch.cat([b.synthetic for b in batches]), is_syn) and 0 < int(is_syn.sum()) < len(is_syn)
    assert torch.equal(index, torch.where(is_syn, syn_idx, real_idx))
    assert torch.equal(y, torch.where(is_syn, syn.y[syn_idx], real_idx))
    assert torch.equal(x[is_syn], syn.x[syn_idx[is_syn]])
    assert torch.equal(x[~is_syn], real.x[real_idx[~is_syn]].float() / 255)


def test_row_draws_of_shards_are_their_rows_of_the_global_draws_and_small_batches_draw_none(monkeypatch):
    draws = RowDraws(50, min_rows=2)
    g = torch.Generator().manual_seed(3)
    drawn = [draws.draw(n, g) for n in (6, 6, 1)]
    assert drawn[2] is None  # a one-row batch is skipped by two ranks: nothing drawn for it
    draws.start([d for d in drawn if d is not None])
    whole = torch.randint(0, 50, (6,), generator=torch.Generator().manual_seed(3))
    x, y, syn = torch.zeros(6, 1, 2, 2), torch.zeros(6), torch.zeros(6, dtype=torch.bool)
    first, second = (Batch(x, y, syn, draws=draws.next(6)) for _ in range(2))
    assert draws.next(1) is None  # the one-row batch
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    assert torch.equal(distributed.shard_batch(first).draws, whole[:3])  # rank 0's rows of the first global batch
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert torch.equal(distributed.shard_batch(second).draws, drawn[1][3:])  # rank 1's rows of the second
    with pytest.raises(RuntimeError, match="RowDraws.next before"):
        RowDraws(5).next(3)
    with pytest.raises(ValueError, match="high"):
        RowDraws(0)
