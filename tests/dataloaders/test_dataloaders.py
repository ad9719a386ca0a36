"""Data set loaders on small files written here in each set's real on-disk format, and their errors."""

import csv
import hashlib
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import dataloaders
from dataloaders import digits, medmnist_data, registry, torchvision_data
from experiment import config, provenance
from experiment.config import ConfigError
from experiment.errors import DataError
from tiny import ROOT, default_cfg


def one_line_error(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


# ----- registry ----------------------------------------------------------------------------------


def test_registry_matches_dataset_choices():
    choices = config.OPTIONS["dataset"].choices
    assert set(choices) == set(dataloaders.DATASETS)
    assert {"digits", "npz", "gtsrb", "cifar100", "bloodmnist", "pathmnist", "organamnist"} <= set(choices)
    assert "chestmnist" not in choices  # multi-label
    assert not any(c.endswith("3d") for c in choices)


def test_registry_rejects_duplicate_and_unknown_names():
    with pytest.raises(ValueError, match="twice"):
        dataloaders.register_dataset("digits")(lambda cfg: None)
    cfg = config.Config({**default_cfg().to_dict(), "dataset": "nope"})  # bypasses the choices check
    with pytest.raises(ConfigError, match=r"known: .*bloodmnist.*digits"):
        dataloaders.load_dataset(cfg)


# ----- digits ------------------------------------------------------------------------------------


def test_digits_shapes_split_and_stratification():
    data = dataloaders.load_dataset(default_cfg(dataset="digits"))
    assert data.num_classes == 10 and data.class_names == [str(c) for c in range(10)]
    assert (data.channels, data.image_size) == (1, 32)
    sizes = [len(data.train), len(data.val), len(data.test)]
    assert sum(sizes) == 1797
    assert abs(sizes[0] / 1797 - 0.6) < 0.01 and abs(sizes[1] / 1797 - 0.1) < 0.01
    for s in (data.train, data.val, data.test):
        assert s.x.dtype == torch.uint8 and s.x.shape[1:] == (1, 32, 32)
        assert int(s.x.max()) == 255 and int(s.x.min()) == 0
    all_y = torch.cat([data.train.y, data.val.y, data.test.y])
    for part, frac in ((data.train, 0.6), (data.val, 0.1), (data.test, 0.3)):
        per_class = torch.bincount(part.y, minlength=10).float() / torch.bincount(all_y, minlength=10).float()
        assert torch.all((per_class - frac).abs() < 0.01), per_class


def test_digits_split_is_fixed_and_independent_of_seed():
    a = dataloaders.load_dataset(default_cfg(dataset="digits", seed=0))
    b = dataloaders.load_dataset(default_cfg(dataset="digits", seed=9))
    assert torch.equal(a.test.x, b.test.x) and torch.equal(a.train.y, b.train.y)


def test_digits_scaling_and_resize():
    from sklearn.datasets import load_digits

    x, y = digits.digits_images()  # read from scikit-learn's file without importing scikit-learn
    assert x.shape == (1797, 1, 32, 32) and y[:3].tolist() == [0, 1, 2]
    reference = load_digits()
    assert torch.equal(y, torch.as_tensor(reference.target)), "the labels scikit-learn gives"
    size = digits.SIZE
    scaled = torch.as_tensor(reference.images, dtype=torch.float32)[:, None] * (255.0 / 16.0)
    resized = torch.nn.functional.interpolate(scaled, size=(size, size), mode="bilinear", align_corners=False)
    assert torch.equal(x, resized.round().clamp(0, 255).to(torch.uint8)), "the images scikit-learn gives, resized"
    src = torch.as_tensor(reference.images[0], dtype=torch.float64) * 255 / 16  # (8, 8) in 0..255
    # bilinear x4, half-pixel centres: output i samples input (i + 0.5) / 4 - 0.5
    assert int(x[0, 0, 1, 1]) == round(float(src[0, 0]))  # -0.125 is clamped to pixel 0
    rows, cols = (0.125, 0.875), (0.875, 0.125)  # output row 13 -> 2.875, output col 14 -> 3.125
    expected = sum(rows[i] * cols[j] * src[2 + i, 3 + j] for i in range(2) for j in range(2))
    assert abs(int(x[0, 0, 13, 14]) - float(expected)) <= 0.5


# ----- npz (MedMNIST format) ---------------------------------------------------------------------


def write_npz(path, n=(12, 4, 6), hw=(28, 28), channels=None, classes=3, label_shape="n1", **replace):
    """A MedMNIST-format file: every class present in every split, labels (N, 1) or (N,)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        shape = (count, *hw) if channels is None else (count, *hw, channels)
        arrays[f"{split}_images"] = rng.integers(1, 256, shape, dtype=np.uint8)
        labels = np.arange(count) % classes
        arrays[f"{split}_labels"] = labels[:, None] if label_shape == "n1" else labels
    arrays.update(replace)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return arrays


def test_npz_grey_28_is_padded_to_32(tmp_path):
    arrays = write_npz(tmp_path / "d.npz")
    data = dataloaders.load_dataset(default_cfg(dataset="npz", data_path=str(tmp_path / "d.npz")))
    assert data.train.x.shape == (12, 1, 32, 32) and data.train.x.dtype == torch.uint8
    assert torch.equal(data.train.x[:, 0, 2:30, 2:30], torch.from_numpy(arrays["train_images"]))
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert int(data.train.x[:, :, border].abs().sum()) == 0  # zero padding (images themselves are >= 1)
    assert data.train.y.tolist() == [0, 1, 2] * 4 and data.train.y.dtype == torch.int64
    assert data.num_classes == 3 and data.class_names == ["0", "1", "2"]
    assert len(data.val) == 4 and len(data.test) == 6


def test_npz_rgb_64_keeps_size_and_channel_layout(tmp_path):
    arrays = write_npz(tmp_path / "d.npz", hw=(64, 64), channels=3, classes=4, label_shape="n")
    data = dataloaders.load_dataset(default_cfg(dataset="npz", data_path=str(tmp_path / "d.npz")))
    assert data.test.x.shape == (6, 3, 64, 64)
    img = arrays["test_images"]
    assert int(data.test.x[2, 1, 5, 7]) == int(img[2, 5, 7, 1])
    assert torch.equal(data.test.x, torch.from_numpy(img).permute(0, 3, 1, 2))
    assert data.num_classes == 4


@pytest.mark.parametrize(
    ("replace", "match"),
    [
        ({"train_images": np.zeros((12, 28, 28), np.float32)}, "dtype float32; expected uint8"),
        ({"train_labels": np.zeros((12, 14), np.int64)}, "multi-label"),
        ({"val_labels": None}, "lacks key.*val_labels"),
        ({"test_labels": np.zeros((5, 1), np.int64)}, "5 labels but there are 6 images"),
        ({"val_labels": np.full((4, 1), -1)}, "negative label"),
        ({"train_labels": np.zeros((12, 1), np.float32)}, "integer class labels"),
        ({"test_images": np.zeros((6, 30, 30), np.uint8)}, "different image shapes"),
        ({"train_images": np.zeros((12, 28, 28, 28), np.uint8)}, "3D volumes"),
    ],
)
def test_npz_rejects_malformed_files(tmp_path, replace, match):
    write_npz(tmp_path / "d.npz", **replace)
    with pytest.raises(DataError, match=match) as info:
        dataloaders.load_dataset(default_cfg(dataset="npz", data_path=str(tmp_path / "d.npz")))
    one_line_error(info)


def test_npz_missing_file_path_and_empty_class(tmp_path):
    missing = tmp_path / "nothere.npz"
    with pytest.raises(DataError, match=r"nothere\.npz not found") as info:
        dataloaders.load_dataset(default_cfg(dataset="npz", data_path=str(missing)))
    one_line_error(info)
    with pytest.raises(DataError, match="data_path"):
        dataloaders.load_dataset(default_cfg(dataset="npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"junk\.npz is a text file .* expected a MedMNIST-format \.npz"):
        dataloaders.load_dataset(default_cfg(dataset="npz", data_path=str(tmp_path / "junk.npz")))
    # class 1 only in test: C = 3 but class 1 has no training images
    write_npz(tmp_path / "d.npz", train_labels=np.array([0, 2] * 6))
    with pytest.raises(DataError, match=r"class\(es\) 1 have no image in the train split"):
        dataloaders.load_dataset(default_cfg(dataset="npz", data_path=str(tmp_path / "d.npz")))


# ----- MedMNIST ----------------------------------------------------------------------------------


def test_medmnist_reads_file_under_data_root(tmp_path):
    write_npz(tmp_path / "bloodmnist.npz", n=(16, 8, 8), channels=3, classes=8)
    data = dataloaders.load_dataset(default_cfg(dataset="bloodmnist", data_root=str(tmp_path)))
    assert data.name == "bloodmnist" and data.num_classes == 8
    assert data.class_names[0] == "basophil" and data.class_names[7] == "platelet" and len(data.class_names) == 8
    assert data.train.x.shape == (16, 3, 32, 32)
    write_npz(tmp_path / "bloodmnist_64.npz", n=(8, 8, 8), hw=(64, 64), channels=3, classes=8)
    data = dataloaders.load_dataset(default_cfg(dataset="bloodmnist", data_root=str(tmp_path), medmnist_size=64))
    assert data.train.x.shape == (8, 3, 64, 64)


def test_medmnist_labels_beyond_info_classes_are_rejected(tmp_path):
    write_npz(tmp_path / "breastmnist.npz", classes=3)  # BreastMNIST has 2 classes
    with pytest.raises(DataError, match=r"train split has 4 image\(s\) with label\(s\) 2, outside the classes 0..1"):
        dataloaders.load_dataset(default_cfg(dataset="breastmnist", data_root=str(tmp_path)))


def test_medmnist_missing_file_without_download(tmp_path):
    root = tmp_path / "data"
    with pytest.raises(DataError) as info:
        dataloaders.load_dataset(default_cfg(dataset="bloodmnist", data_root=str(root)))
    msg = one_line_error(info)
    assert msg == (
        f"bloodmnist: file {root}/bloodmnist.npz not found; set download: true (or --download=true) "
        f"or fetch https://zenodo.org/records/10519652/files/bloodmnist.npz?download=1 into {root}/"
    )
    url_128 = re.escape("https://zenodo.org/records/10519652/files/pathmnist_128.npz?download=1")
    with pytest.raises(DataError, match=f"pathmnist_128.npz not found; .* fetch {url_128} into"):
        dataloaders.load_dataset(default_cfg(dataset="pathmnist", data_root=str(root), medmnist_size=128))
    assert not root.exists()


def test_medmnist_names_class_names_and_urls_match_medmnist_info():
    """The tables that spare every run the medmnist import are medmnist's own (checked where it is installed)."""
    medmnist = pytest.importorskip("medmnist")
    from medmnist.dataset import MedMNIST2D

    single_label_2d = [
        flag
        for flag, info in medmnist.INFO.items()
        if issubclass(getattr(medmnist, info["python_class"]), MedMNIST2D) and "multi-label" not in info["task"]
    ]
    assert list(medmnist_data.FLAGS) == single_label_2d
    for flag in medmnist_data.FLAGS:
        labels = medmnist.INFO[flag]["label"]
        assert medmnist_data.CLASS_NAMES[flag] == tuple(labels[str(c)] for c in range(len(labels))), flag
        for size in (28, 64, 128, 224):
            url = medmnist.INFO[flag]["url" if size == 28 else f"url_{size}"]
            assert medmnist_data.URL.format(file=medmnist_data.file_name(flag, size)) == url, (flag, size)


@pytest.mark.e2e
def test_medmnist_is_imported_only_to_download(tmp_path, monkeypatch):
    code = "import sys, dataloaders; print('medmnist' in sys.modules, 'bloodmnist' in dataloaders.DATASETS)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["False", "True"], result.stderr  # registered, not imported

    monkeypatch.setitem(sys.modules, "medmnist", None)  # as on a machine without it
    write_npz(tmp_path / "octmnist.npz", n=(8, 4, 4), classes=4)
    assert dataloaders.load_dataset(default_cfg(dataset="octmnist", data_root=str(tmp_path))).num_classes == 4
    with pytest.raises(DataError) as info:
        dataloaders.load_dataset(default_cfg(dataset="pathmnist", data_root=str(tmp_path), download=True))
    assert one_line_error(info).startswith("pathmnist: downloading needs the medmnist package, which cannot be")
    assert "`pip install medmnist`, or fetch https://zenodo.org/records/10519652/files/pathmnist.npz?download=1 " in (
        str(info.value)
    )
    assert not (tmp_path / "pathmnist.npz").exists()


def test_medmnist_download_goes_through_medmnist(tmp_path, monkeypatch):
    INFO = pytest.importorskip("medmnist").INFO
    calls = []

    def fake_download_url(url, root, filename, md5):
        calls.append((url, filename, md5))
        write_npz(f"{root}/{filename}", n=(8, 4, 4), classes=4)

    monkeypatch.setattr("torchvision.datasets.utils.download_url", fake_download_url)
    root = tmp_path / "data"
    data = dataloaders.load_dataset(default_cfg(dataset="octmnist", data_root=str(root), download=True))
    assert calls == [(INFO["octmnist"]["url"], "octmnist.npz", INFO["octmnist"]["MD5"])]
    assert data.num_classes == 4 and data.train.x.shape == (8, 1, 32, 32)

    def failing_download_url(url, root, filename, md5):
        raise OSError("network unreachable")

    monkeypatch.setattr("torchvision.datasets.utils.download_url", failing_download_url)
    with pytest.raises(DataError, match=r"download of .*dermamnist_64\.npz.* failed") as info:
        medmnist_data.load_medmnist(default_cfg(data_root=str(root), download=True, medmnist_size=64), "dermamnist")
    one_line_error(info)


# ----- identity for the provenance ---------------------------------------------------------------


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_each_data_set_names_the_file_it_read_for_the_provenance(tmp_path):
    write_npz(tmp_path / "bloodmnist_64.npz", n=(8, 8, 8), hw=(64, 64), channels=3, classes=8)
    write_npz(tmp_path / "mine.npz")
    blood = default_cfg(dataset="bloodmnist", data_root=str(tmp_path), medmnist_size=64)
    assert provenance.data_source(blood) == {
        "dataset": "bloodmnist",
        "data_path": str((tmp_path / "bloodmnist_64.npz").resolve()),
        "data_sha256": sha256(tmp_path / "bloodmnist_64.npz"),
    }
    mine = default_cfg(dataset="npz", data_path=str(tmp_path / "mine.npz"))
    assert provenance.data_source(mine)["data_sha256"] == sha256(tmp_path / "mine.npz")
    assert provenance.data_source(default_cfg(dataset="bloodmnist", data_root=str(tmp_path))) == {
        "dataset": "bloodmnist"  # the 28 px file is not there
    }
    assert provenance.data_source(default_cfg(dataset="digits")) == {"dataset": "digits"}  # no file of its own


def test_a_data_set_registered_with_several_files_records_each(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "DATASETS", {})
    monkeypatch.setattr(provenance, "DATA_FILES", {})
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"a")
    b.write_bytes(b"bb")
    registry.register_dataset("pair", files=lambda cfg: [a, tmp_path / "absent", b])(lambda cfg: None)
    assert "pair" in registry.DATASETS and set(provenance.DATA_FILES) == {"pair"}
    cfg = config.Config({**default_cfg().to_dict(), "dataset": "pair"})  # bypasses the choices check
    assert provenance.data_source(cfg) == {
        "dataset": "pair",
        "data_path": [str(a.resolve()), str(b.resolve())],
        "data_sha256": [sha256(a), sha256(b)],
    }


# ----- CIFAR-100 ---------------------------------------------------------------------------------


def write_cifar100(root, per_class=(4, 1)):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    out = {}
    for name, k in zip(("train", "test"), per_class):
        labels = [c for c in range(100) for _ in range(k)]
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        entry = {
            b"filenames": [b"x.png"] * len(labels),
            b"fine_labels": labels,
            b"coarse_labels": labels,
            b"data": data,
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
        out[name] = (data, labels)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"class{c}".encode() for c in range(100)]}, f)
    return out


@pytest.fixture
def trust_fake_cifar(monkeypatch):
    """Accept the fake files below as if they had torchvision's checksums (what the real ones are checked against)."""
    table = {}
    monkeypatch.setattr(torchvision_data, "CIFAR100_MD5", table)

    def trust(root):
        for name in ("train", "test", "meta"):
            table[name] = hashlib.md5((root / "cifar-100-python" / name).read_bytes()).hexdigest()

    return trust


def test_a_cifar_file_with_another_checksum_is_refused_before_it_is_unpickled(tmp_path, monkeypatch):
    write_cifar100(tmp_path, per_class=(1, 1))
    ran = tmp_path / "ran"
    payload = b"cos\nsystem\n(V" + f"touch {ran}".encode() + b"\ntR."  # a pickle that runs a shell command
    (tmp_path / "cifar-100-python" / "meta").write_bytes(payload)
    with pytest.raises(DataError) as info:
        dataloaders.load_dataset(default_cfg(dataset="cifar100", data_root=str(tmp_path)))
    one_line_error(info)
    meta = tmp_path / "cifar-100-python" / "meta"
    assert str(info.value) == (
        f"cifar100: {meta} is not torchvision's CIFAR-100 file (md5 {hashlib.md5(payload).hexdigest()}, expected "
        "7973b15100ade9c7d40fb424638fde48); it would be unpickled, which can run code: delete it and download again "
        "(--download=true)"
    )
    assert not ran.exists()  # never unpickled


def test_cifar100_layout_and_val_carve(tmp_path, trust_fake_cifar):
    written = write_cifar100(tmp_path)
    trust_fake_cifar(tmp_path)
    data = dataloaders.load_dataset(default_cfg(dataset="cifar100", data_root=str(tmp_path), val_fraction=0.25))
    assert data.num_classes == 100 and data.class_names[7] == "class7"
    assert (len(data.train), len(data.val), len(data.test)) == (300, 100, 100)
    assert torch.bincount(data.val.y, minlength=100).tolist() == [1] * 100  # stratified
    raw, labels = written["test"]
    assert data.test.x.shape == (100, 3, 32, 32) and data.test.y.tolist() == labels
    n, c, h, w = 5, 2, 3, 17
    assert int(data.test.x[n, c, h, w]) == int(raw[n, c * 1024 + h * 32 + w])
    # train and val together are the original train images; the carve depends on the seed
    other = dataloaders.load_dataset(
        default_cfg(dataset="cifar100", data_root=str(tmp_path), val_fraction=0.25, seed=1)
    )
    assert not torch.equal(data.val.x, other.val.x)
    assert len(torch.cat([data.train.x, data.val.x]).flatten(1).unique(dim=0)) == 400


def test_cifar100_missing_and_download(tmp_path, monkeypatch, trust_fake_cifar):
    with pytest.raises(DataError, match="cifar-100-python/train not found") as info:
        dataloaders.load_dataset(default_cfg(dataset="cifar100", data_root=str(tmp_path)))
    one_line_error(info)
    calls = []

    class FakeCIFAR100:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            write_cifar100(tmp_path, per_class=(2, 1))
            trust_fake_cifar(tmp_path)

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", FakeCIFAR100)
    data = dataloaders.load_dataset(default_cfg(dataset="cifar100", data_root=str(tmp_path), download=True))
    assert calls == [(str(tmp_path), False, True)] and len(data.test) == 100


# ----- GTSRB -------------------------------------------------------------------------------------


def colour(c: int) -> tuple[int, int, int]:
    return (c * 5, 255 - c * 5, (c * 37) % 256)


ALL_OTHER_GTSRB = tuple(c for c in range(43) if c not in (0, 5, 42))


def write_gtsrb(root, per_class=2, test_classes=(0, 5, 42, 5, *ALL_OTHER_GTSRB)):
    """torchvision's layout: GTSRB/Training/<5-digit class>/*.ppm + GT csv; Final_Test/Images + GT-final_test.csv."""
    base = root / "gtsrb"
    for c in range(43):
        folder = base / "GTSRB" / "Training" / f"{c:05d}"
        folder.mkdir(parents=True)
        rows = []
        for i in range(per_class):
            name = f"00000_{i:05d}.ppm"
            Image.new("RGB", (10 + i, 12), colour(c)).save(folder / name)
            rows.append([name, 10 + i, 12, 1, 1, 9, 11, c])
        with open(folder / f"GT-{c:05d}.csv", "w", newline="") as f:
            writer = csv.writer(f, delimiter=";")
            writer.writerow(["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"])
            writer.writerows(rows)
    images = base / "GTSRB" / "Final_Test" / "Images"
    images.mkdir(parents=True)
    with open(base / "GT-final_test.csv", "w", newline="") as f:
        writer = csv.writer(f, delimiter=";")
        writer.writerow(["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"])
        for i, c in enumerate(test_classes):
            Image.new("RGB", (40, 36), colour(c)).save(images / f"{i:05d}.ppm")
            writer.writerow([f"{i:05d}.ppm", 40, 36, 5, 5, 35, 31, c])


def test_gtsrb_layout_resize_and_val(tmp_path):
    write_gtsrb(tmp_path)
    data = dataloaders.load_dataset(default_cfg(dataset="gtsrb", data_root=str(tmp_path), val_fraction=0.5))
    assert data.num_classes == 43 and len(data.class_names) == 43
    assert (len(data.train), len(data.val), len(data.test)) == (43, 43, 44)
    assert data.train.x.shape == (43, 3, 32, 32) and data.test.x.dtype == torch.uint8
    assert torch.bincount(data.train.y, minlength=43).tolist() == [1] * 43
    assert data.test.y.tolist() == [0, 5, 42, 5, *ALL_OTHER_GTSRB]
    # flat-coloured images stay flat after the bilinear resize, so each pixel is its class colour
    for s in (data.train, data.test):
        expected = torch.tensor([colour(c) for c in s.y.tolist()], dtype=torch.uint8)  # (N, 3)
        assert torch.equal(s.x, expected[:, :, None, None].expand(-1, -1, 32, 32))


def test_gtsrb_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="gtsrb/GTSRB/Training not found") as info:
        dataloaders.load_dataset(default_cfg(dataset="gtsrb", data_root=str(tmp_path)))
    one_line_error(info)

    def failing(*args, **kwargs):
        raise RuntimeError("File not found or corrupted.")

    monkeypatch.setattr(torchvision.datasets, "GTSRB", failing)
    with pytest.raises(DataError, match=r"download into .* failed") as info:
        dataloaders.load_dataset(default_cfg(dataset="gtsrb", data_root=str(tmp_path), download=True))
    one_line_error(info)
    write_gtsrb(tmp_path, per_class=1, test_classes=(3, 43))
    with pytest.raises(DataError, match="ClassId 43 outside 0..42"):
        dataloaders.load_dataset(default_cfg(dataset="gtsrb", data_root=str(tmp_path)))


# ----- prepare: labels remapped to class-order positions -----------------------------------------


def test_prepare_remaps_labels_to_class_order(tmp_path):
    write_npz(tmp_path / "d.npz", n=(12, 6, 6), classes=3)
    order = [2, 0, 1]
    cfg = default_cfg(dataset="npz", data_path=str(tmp_path / "d.npz"), class_order=order, nb_cl_fg=1, nb_cl=1)
    raw = dataloaders.load_dataset(cfg)
    data, scenario = dataloaders.prepare(cfg)
    assert scenario.class_order == order and scenario.task_sizes == [1, 1, 1]
    for split in ("train", "val", "test"):
        before, after = getattr(raw, split), getattr(data, split)
        assert torch.equal(before.x, after.x)
        for position, original in enumerate(order):
            assert torch.equal(after.y == position, before.y == original)
    # task 1 learns original class 2 under label 0
    task1 = data.train.of_classes(scenario.classes_of_task(1))
    assert torch.equal(task1.x, raw.train.of_classes([2]).x)
    assert data.class_names == raw.class_names  # original order: label p is named class_names[class_order[p]]
    with pytest.raises(ConfigError, match="nb_cl_fg"):
        dataloaders.prepare(default_cfg(dataset="npz", data_path=str(tmp_path / "d.npz"), nb_cl_fg=4))


# ----- every registered data set, from files in its real on-disk format ----------------------------


MEDMNIST_RGB = ("pathmnist", "dermamnist", "bloodmnist", "retinamnist")  # (N, 28, 28, 3); the others (N, 28, 28)


def write_files_of(name: str, root, trust_fake_cifar) -> dict:
    """Files in ``name``'s real on-disk format under ``root``; returns the keys that point the loader at them."""
    if name == "digits":
        return {}  # shipped with scikit-learn
    if name == "npz":
        write_npz(root / "any.npz", classes=3)
        return {"data_path": str(root / "any.npz")}
    if name in medmnist_data.FLAGS:
        classes = len(medmnist_data.CLASS_NAMES[name])
        n = (2 * classes, classes, classes)
        write_npz(
            root / medmnist_data.file_name(name, 28), n=n, classes=classes, channels=3 if "blood" in name else None
        )
        return {"data_root": str(root)}
    if name == "cifar100":
        write_cifar100(root, per_class=(2, 1))
        trust_fake_cifar(root)  # the real files are checked against torchvision's checksums
        return {"data_root": str(root)}
    if name == "gtsrb":
        write_gtsrb(root, per_class=2)
        return {"data_root": str(root)}
    raise AssertionError(f"data set {name!r} has no writer of its on-disk format here: add one (and a loader test)")


@pytest.mark.parametrize("name", sorted(dataloaders.DATASETS))
def test_every_registered_data_set_loads_from_files_in_its_real_format(name, tmp_path, trust_fake_cifar):
    files = write_files_of(name, tmp_path, trust_fake_cifar)
    data = dataloaders.load_dataset(default_cfg(dataset=name, val_fraction=0.5, **files))
    assert data.train.x.dtype == torch.uint8 and data.train.x.ndim == 4 and data.train.x.shape[-1] >= 28
    assert len(data.class_names) == data.num_classes
    for split in (data.train, data.val, data.test):
        assert len(split) > 0 and int(split.y.min()) >= 0 and int(split.y.max()) < data.num_classes
    assert set(data.train.y.tolist()) == set(range(data.num_classes))  # every class can be learned


def test_cifar100_checksums_are_torchvisions_and_torchvision_is_imported_only_to_download():
    cifar = torchvision.datasets.CIFAR100
    published = {name: md5 for name, md5 in [*cifar.train_list, *cifar.test_list]} | {
        cifar.meta["filename"]: cifar.meta["md5"]
    }
    assert published == torchvision_data.CIFAR100_MD5
    code = (
        "import sys, dataloaders; print('torchvision' in sys.modules, 'sklearn' in sys.modules); "
        "dataloaders.digits.digits_images(); print('sklearn' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "False"]  # start-up imports neither; loading digits reads sklearn's file
