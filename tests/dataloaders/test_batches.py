"""BatchLoader: shuffling, real/synthetic mixing, epoch length, on-batch crop and flip, dtype and range."""

import pytest
import torch

from dataloaders.batches import BatchLoader, augment_batch, random_crop, random_flip
from dataloaders.image_set import ImageSet


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
