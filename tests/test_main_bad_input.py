"""Bad input, one test per class of problem: one line on stderr and exit code 2 (no traceback), or a correct result.

Problems that can be seen before training are refused before the run folder is created, so each such test also
checks that nothing was written.
"""

import errno
import math
import os

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

import dataloaders
import main
import models
from experiment import checkpoint, config, key_reference
from experiment.checkpoint import load_checkpoint, save_atomic, task_checkpoint_path
from experiment.config import load_config
from experiment.errors import OutputError
from experiment.run_folder import resolve_output_dir
from reporting import metrics, plots
from tiny import ROOT


def one_error_line(args: list[str], capsys) -> str:
    """Run main.main(args); assert exit code 2 and a single 'error: ' line without a traceback; return it."""
    code = main.main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    return lines[0]


def write_npz(path, n=(12, 6, 6), hw=(28, 28), classes=3, **replace) -> None:
    """A MedMNIST-format file whose splits hold every class (labels cycle 0..classes-1); ``replace`` swaps arrays."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, *hw), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(count) % classes)[:, None]
    arrays.update(replace)
    np.savez(path, **arrays)


def npz_args(tmp_path, *extra: str) -> list[str]:
    return [
        "--dataset=npz",
        f"--data_path={tmp_path / 'd.npz'}",
        "--device=cpu",
        "--epochs=1",
        "--nb_cl_fg=2",
        "--nb_cl=1",
        "--progress=false",
        f"--output_dir={tmp_path / 'run'}",
        *extra,
    ]


# ----- configuration files -----------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("content", "phrases"),
    [
        ("lr: 0.1\n".encode("utf-16"), ["is not UTF-8 text (byte 0xff on line 1)", "save it as UTF-8"]),
        (b"epochs: 3\nlr: caf\xe9\n", ["is not UTF-8 text (byte 0xe9 on line 2)"]),
        (b"", ["is empty", "leave it out of --config"]),
        (b"# only a comment\n", ["is empty"]),
        (b"- lr\n- 0.1\n", ["must hold a mapping of key: value lines, not a list"]),
        (b"defaults: 3\n", ["'defaults' must be a file name or a list of file names", "got 3"]),
        (b"defaults: {a: 1}\n", ["'defaults' must be a file name", "got {'a': 1}"]),
        (b"defaults: [base.yaml, 3]\n", ["'defaults' must be a file name", "got ['base.yaml', 3]"]),
        (b"defaults: ''\n", ["'defaults' must be a file name", "got ''"]),
        (b"defaults: nope.yaml\n", ["config file not found:", "nope.yaml (named by 'defaults' in"]),
        (b"lr: 0.1\nepochs: 2\nlr: 0.2\n", ["key 'lr' is given twice (lines 1 and 3); keep one"]),
        (b"per_task:\n  2: {lr: 0.1}\n  2: {lr: 0.2}\n", ["key '2' is given twice (lines 2 and 3)"]),
        (b"per_task:\n  2: {lr: 0.1, lr: 0.2}\n", ["key 'lr' is given twice (lines 2 and 2)"]),
        (b"1: 3\n", ["unknown configuration key '1'"]),
    ],
)
def test_config_file_that_is_not_a_usable_yaml_mapping(tmp_path, capsys, content, phrases):
    path = tmp_path / "run.yaml"
    path.write_bytes(content)
    line = one_error_line(["--config", str(path)], capsys)
    assert str(path) in line and all(p in line for p in phrases), line


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--config="], "--config needs a file name, got an empty one: --config configs/digits/ccsi.yaml"),
        (
            ["--output_dir=runs/{x}"],
            "key 'output_dir': unknown placeholder {x} in 'runs/{x}'; use a key name, {config_hash} or {task}",
        ),
        (["--output_dir=runs/{dataset.x}"], "key 'output_dir': unknown placeholder {dataset.x} in"),
        (["--output_dir=runs/{"], "key 'output_dir': Single '{' encountered in format string in 'runs/{'; write {{ }}"),
        (["--output_dir=runs/{class_order[a]}"], "key 'output_dir': unknown placeholder {class_order[a]}"),
    ],
)
def test_command_line_value_that_cannot_be_used(args, expected, capsys):
    assert one_error_line(args, capsys).startswith(f"error: {expected}")


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("per_task:\n  2: &base {lr: 0.5, epochs: 3}\n  3:\n    <<: *base\n    lr: 0.25\n")
    cfg = config.load_config([path])
    assert cfg.per_task == {2: {"lr": 0.5, "epochs": 3}, 3: {"lr": 0.25, "epochs": 3}}


@pytest.mark.e2e
def test_per_task_entries_for_tasks_the_run_does_not_have_are_a_note(tmp_path, capsys, caplog):
    """A config written for more tasks (the MedMNIST ccsi.yaml on one's own data with another split) still runs:
    the entries beyond the last task are named in one console note."""
    write_npz(tmp_path / "d.npz")  # 3 classes: tasks of 2 and 1 classes
    (tmp_path / "run.yaml").write_text("per_task:\n  2: {lr: 0.01}\n  4: {lr: 0.01}\n  9: {epochs: 1}\n")
    with caplog.at_level("WARNING"):
        assert main.main(["--config", str(tmp_path / "run.yaml"), *npz_args(tmp_path)]) == 0
    notes = [r.getMessage() for r in caplog.records if "per_task" in r.getMessage()]
    assert notes == ["note: per_task entries for task(s) 4, 9 are not used: this run has 2 tasks (nb_cl_fg, nb_cl)"]
    assert (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--lr=0"], "key 'lr': must be > 0.0, got 0.0"),
        (["--lr=inf"], "key 'lr': must be a finite number, got inf"),
        (["--lr=-inf"], "key 'lr': must be a finite number, got -inf"),
        (["--lr=nan"], "key 'lr': must be a finite number, got nan"),
        (["--lr=1e400"], "key 'lr': must be a finite number, got inf"),
        (["--weight_decay=inf"], "key 'weight_decay': must be a finite number, got inf"),
        (["--lr_gamma=0"], "key 'lr_gamma': must be > 0.0, got 0.0"),
        (["--cn_momentum=0"], "key 'cn_momentum': must be > 0.0, got 0.0"),
        (["--ro=0"], "key 'ro': must be > 0.0, got 0.0"),
        (["--ewc_fisher_max=0"], "key 'ewc_fisher_max': must be > 0.0, got 0.0"),
    ],
)
def test_values_that_make_no_sense_are_refused(args, expected, capsys):
    assert one_error_line(args, capsys) == f"error: {expected}"


def test_every_float_key_refuses_non_finite_values(tmp_path):
    floats = [opt for opt in config.OPTIONS.values() if opt.kind == "float"]
    assert len(floats) > 20
    for opt in floats:
        for value in (math.inf, -math.inf, math.nan, "inf", "-inf", "nan"):
            with pytest.raises(config.ConfigError, match=f"key '{opt.name}': must be a finite number"):
                config.coerce(opt, value)
    (tmp_path / "run.yaml").write_text("lr: .inf\n")
    with pytest.raises(config.ConfigError, match="key 'lr': must be a finite number, got inf"):
        config.load_config([tmp_path / "run.yaml"])


def test_exclusive_minimum_accepts_values_just_above_it():
    opt = config.Option("rate", "float", 0.1, "a rate", min=0.0, max=1.0, min_exclusive=True)
    assert config.coerce(opt, 1e-30) == 1e-30 and config.coerce(opt, 1.0) == 1.0
    with pytest.raises(config.ConfigError, match="must be > 0.0, got -1e-30"):
        config.coerce(opt, -1e-30)
    with pytest.raises(ValueError, match="min_exclusive needs a min"):
        config.Option("x", "float", 0.1, "x", min_exclusive=True)
    assert "| `lr` | float | `0.1` | (0.0, ] |" in key_reference.reference_table()


# ----- data --------------------------------------------------------------------------------------


def _npy_bytes(tmp_path) -> bytes:
    np.save(tmp_path / "a.npy", np.zeros(4))
    return (tmp_path / "a.npy").read_bytes()


def _object_npz_bytes(tmp_path) -> bytes:
    write_npz(tmp_path / "o.npz", train_images=np.array([{"a": 1}] * 12, dtype=object))
    return (tmp_path / "o.npz").read_bytes()


def _truncated_npz_bytes(tmp_path) -> bytes:
    write_npz(tmp_path / "full.npz")
    return (tmp_path / "full.npz").read_bytes()[:300]


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("make", "phrase"),
    [
        (lambda tmp: b"", "is empty (0 bytes)"),
        (_npy_bytes, "holds a single array saved with np.save (.npy), not a .npz archive"),
        (lambda tmp: b"train_images,train_labels\n1,2\n", "is a text file (it starts with 'train_images,train_label'"),
        (lambda tmp: bytes(range(200, 256)) * 4, "is not a .npz archive (it starts with bytes c8 c9 ca cb"),
        (lambda tmp: b"\x80\x04\x95" + bytes(20), "is a Python pickle, not a .npz archive"),
        (_object_npz_bytes, "holds arrays of Python objects; expected uint8 images and integer labels"),
        (_truncated_npz_bytes, "is a damaged or truncated .npz (File is not a zip file)"),
    ],
)
def test_npz_file_that_is_not_a_medmnist_npz(tmp_path, capsys, make, phrase):
    (tmp_path / "d.npz").write_bytes(make(tmp_path))
    line = one_error_line(npz_args(tmp_path), capsys)
    assert line.startswith(f"error: npz: {tmp_path / 'd.npz'}") and phrase in line, line
    if "objects" not in phrase:
        assert line.endswith(
            "expected a MedMNIST-format .npz (a zip of {train,val,test}_images and _labels arrays, from np.savez)"
        )


@pytest.mark.e2e
@pytest.mark.parametrize(("hw", "shown"), [((8, 8), "8x8"), ((12, 12), "12x12"), ((40, 12), "40x12")])
def test_images_smaller_than_the_pooling_window(tmp_path, capsys, hw, shown):
    write_npz(tmp_path / "d.npz", hw=hw)
    line = one_error_line(npz_args(tmp_path), capsys)
    assert line == (
        "error: key 'backbone': ccsi_resnet needs images of at least 13x13 px (its 7x7 pooling window), but the "
        f"images are {shown}; use --backbone=resnet32 (global pooling, any size) or larger images"
    )
    assert not (tmp_path / "run").exists()


def test_images_just_large_enough_and_non_square_images_build_a_working_net():
    cfg = config.load_config(overrides={"dataset": "digits"})
    for size, shape in ((13, (13, 13)), ((13, 40), (13, 40))):
        net = models.build_net(cfg, 1, size)
        net.eval()
        assert net.backbone(torch.rand(2, 1, *shape)).shape == (2, net.feature_dim)
    assert models.build_net(cfg, 1, (13, 40)).feature_dim == 64 * 1 * 2  # (7, 20) maps, 7x7/7 pooling -> (1, 2)
    net = models.build_net(cfg.replace(backbone="resnet32"), 1, 8)
    assert net.backbone(torch.rand(2, 1, 8, 8)).shape == (2, 64)


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("n", "extra", "phrases"),
    [
        ((12, 6, 0), [], ["the test split is empty", "needs test images of every class"]),
        (
            (12, 0, 6),
            ["--select_on=val", "--scheduler=step"],
            ["the val split is empty, but select_on=val picks the epoch of each task on it; use --select_on=last or"],
        ),
        (
            (12, 0, 6),
            [],  # protocol clean: select_on last, scheduler plateau_original on the new classes' val accuracy
            [
                "the val split is empty, but scheduler=plateau_original steps on its accuracy; use --scheduler=none "
                "(or step, cosine) or give the data set val images"
            ],
        ),
        (
            (12, 0, 6),
            ["--select_on=val", "--scheduler=plateau"],
            [
                "the val split is empty, but select_on=val picks the epoch of each task on it and scheduler=plateau "
                "steps on its accuracy; use --select_on=last --scheduler=none (or step, cosine) or give the data set "
                "val images"
            ],
        ),
        (
            (12, 0, 6),
            ["--select_on=last", "--scheduler=plateau"],
            ["the val split is empty, but scheduler=plateau steps on its accuracy", "use --scheduler=none"],
        ),
    ],
)
def test_split_the_run_needs_is_empty(tmp_path, capsys, n, extra, phrases):
    write_npz(tmp_path / "d.npz", n=n)
    line = one_error_line(npz_args(tmp_path, *extra), capsys)
    assert line.startswith("error: npz: ") and all(p in line for p in phrases), line
    assert not (tmp_path / "run").exists()


def test_val_without_the_first_tasks_classes_is_refused_and_an_empty_val_is_fine_without_selection(tmp_path):
    write_npz(tmp_path / "d.npz", val_labels=np.full((6, 1), 2))
    cfg = config.load_config(overrides={"dataset": "npz", "data_path": str(tmp_path / "d.npz"), "select_on": "val"})
    data, scenario = dataloaders.prepare(cfg)
    with pytest.raises(dataloaders.DataError, match="the val split holds no image of task 1's classes 0, 1"):
        dataloaders.check_run_splits(cfg, data, scenario)
    write_npz(tmp_path / "d.npz", n=(12, 0, 6))
    cfg = cfg.replace(select_on="last", scheduler="cosine")
    data, scenario = dataloaders.prepare(cfg)
    dataloaders.check_run_splits(cfg, data, scenario)  # nothing reads val


@pytest.mark.e2e
def test_class_absent_from_the_test_split(tmp_path, capsys):
    write_npz(tmp_path / "d.npz", test_labels=np.array([[0], [1], [0], [1], [0], [1]]))
    line = one_error_line(npz_args(tmp_path), capsys)
    assert line == (
        "error: npz: class(es) 2 have no image in the test split; every class 0..2 needs test images (its accuracy "
        "is measured after each task): add images of those classes or relabel the data without them"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("split", "labels", "shown"),
    [
        ("test", [0, 1, 2, 250, 0, 1], "1 image(s) with label(s) 250,"),
        ("val", [0, 1, 2, 7, 9, 9], "3 image(s) with label(s) 7, 9,"),
        ("test", [0, 1, 2, *range(100, 400)], "300 image(s) with label(s) 100, 101, 102, 103, 104 and 295 more,"),
    ],
)
def test_val_or_test_label_outside_the_training_classes(tmp_path, capsys, split, labels, shown):
    n = len(labels)
    write_npz(
        tmp_path / "d.npz",
        **{f"{split}_labels": np.array(labels)[:, None], f"{split}_images": np.zeros((n, 28, 28), np.uint8)},
    )
    line = one_error_line(npz_args(tmp_path), capsys)
    assert line == (
        f"error: npz: the {split} split has {shown} outside the training classes 0..2; remove those images or add "
        "training images of them"
    )


# ----- output folder -----------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", "key 'output_dir' is empty; name the run folder, e.g. --output_dir=runs/my_run"),
        ("  ", "key 'output_dir' is empty; name the run folder, e.g. --output_dir=runs/my_run"),
        ("{tmp}/f", "key 'output_dir': {tmp}/f is a file, not a folder; choose another --output_dir"),
        ("{tmp}/f/run", "key 'output_dir': {tmp}/f/run lies under the file {tmp}/f; choose another --output_dir"),
        ("$NO_SUCH_VARIABLE_X/run", "key 'output_dir': environment variable $NO_SUCH_VARIABLE_X is not set"),
    ],
)
def test_output_dir_that_names_no_usable_folder(tmp_path, capsys, monkeypatch, raw, expected):
    monkeypatch.delenv("NO_SUCH_VARIABLE_X", raising=False)
    (tmp_path / "f").write_text("a file")
    line = one_error_line([f"--output_dir={raw.format(tmp=tmp_path)}", "--device=cpu"], capsys)
    assert line.startswith("error: " + expected.format(tmp=tmp_path)), line


@pytest.mark.e2e
def test_output_dir_that_is_not_writable(tmp_path, capsys, monkeypatch):
    """os.access is patched: it reports no write permission here whoever runs the tests (root included)."""
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    line = one_error_line([f"--output_dir={tmp_path / 'a' / 'run'}", "--device=cpu"], capsys)
    assert line == (
        f"error: key 'output_dir': cannot write into {tmp_path / 'a' / 'run'}: its existing parent {tmp_path} is not "
        "writable; choose another --output_dir or fix the permissions"
    )


@pytest.mark.e2e
@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders; see the patched test above")
def test_output_dir_in_a_read_only_folder(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        line = one_error_line([f"--output_dir={folder / 'run'}", "--device=cpu"], capsys)
    finally:
        folder.chmod(0o700)
    assert f"its existing parent {folder} is not writable" in line


@pytest.mark.e2e
def test_output_dir_expands_the_home_folder_and_environment_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RUNS_X", str(tmp_path / "runs"))
    assert resolve_output_dir(load_config(overrides={"output_dir": "~/x"}), None)[0] == tmp_path / "home" / "x"
    assert resolve_output_dir(load_config(overrides={"output_dir": "$RUNS_X/a"}), None)[0] == tmp_path / "runs" / "a"
    write_npz(tmp_path / "d.npz")
    args = npz_args(tmp_path, "--epochs=0", "--output_dir=~/run")
    assert main.main(args) == 0
    assert (tmp_path / "home" / "run" / "task_2.pt").is_file() and not (tmp_path / "~").exists()


def test_data_paths_expand_the_home_folder_and_refuse_unset_variables(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NO_SUCH_VARIABLE_X", raising=False)
    write_npz(tmp_path / "d.npz")
    cfg = config.load_config(overrides={"dataset": "npz", "data_path": "~/d.npz"})
    assert len(dataloaders.load_dataset(cfg).train) == 12
    with pytest.raises(config.ConfigError, match=r"key 'data_root': environment variable \$NO_SUCH_VARIABLE_X is not"):
        dataloaders.load_dataset(cfg.replace(dataset="bloodmnist", data_root="$NO_SUCH_VARIABLE_X/data"))


# ----- running out of disk space (or permission) while writing -----------------------------------


def _fail(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


WRITE_ERRORS = [
    (errno.ENOSPC, "no space left on the device"),
    (errno.EDQUOT, "disk quota exceeded"),
    (errno.EROFS, "read-only file system"),
    (errno.EACCES, "permission denied"),
]


@pytest.mark.parametrize(("code", "reason"), WRITE_ERRORS)
@pytest.mark.parametrize("target", ["checkpoint", "checkpoint_rename", "metrics", "plot", "config"])
def test_failed_write_is_one_line_and_keeps_the_earlier_file(tmp_path, monkeypatch, code, reason, target):
    old = tmp_path / {"checkpoint": "task_1.pt", "checkpoint_rename": "task_1.pt", "metrics": "metrics.json",
                      "plot": "p.png", "config": "config.yaml"}[target]  # fmt: skip
    old.write_bytes(b"earlier contents")
    run_metrics = metrics.RunMetrics()
    run_metrics.add(1, metrics.evaluate_predictions(torch.tensor([0, 1]), torch.tensor([0, 0]), [2]))
    write = {
        "checkpoint": lambda: save_atomic({"a": torch.zeros(3)}, old),
        "checkpoint_rename": lambda: save_atomic({"a": torch.zeros(3)}, old),
        "metrics": lambda: run_metrics.write(tmp_path),
        "plot": lambda: plots._save(Figure(), old),
        "config": lambda: config.load_config().save(old),
    }[target]
    patch = {
        "checkpoint": (torch, "save"),
        "checkpoint_rename": (os, "replace"),
        "metrics": (os, "replace"),
        "plot": (Figure, "savefig"),
        "config": (os, "replace"),
    }[target]
    monkeypatch.setattr(*patch, _fail(code))
    with pytest.raises(OutputError) as info:
        write()
    message = str(info.value)
    assert message == (
        f"cannot write {old}: {reason}; the files written before it are intact: free space or fix the permissions, "
        "then rerun with --resume=true (or choose another --output_dir)"
    )
    assert old.read_bytes() == b"earlier contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == [old.name]  # no temporary file left behind


@pytest.mark.e2e
def test_disk_full_during_a_run_keeps_the_finished_tasks(tmp_path, capsys, monkeypatch):
    write_npz(tmp_path / "d.npz")
    save = torch.save
    calls = []

    def save_then_fill_the_disk(obj, f, *args, **kwargs):
        calls.append(obj["task"])
        if len(calls) == 2:
            f.write(b"partial bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
        save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save_then_fill_the_disk)
    line = one_error_line(npz_args(tmp_path, "--epochs=0"), capsys)
    out = tmp_path / "run"
    assert line == (
        f"error: cannot write {out / 'task_2.pt'}: no space left on the device; the files written before it are "
        "intact: free space or fix the permissions, then rerun with --resume=true (or choose another --output_dir)"
    )
    assert calls == [1, 2] and load_checkpoint(task_checkpoint_path(out, 1))["task"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "history.csv", "task_1.pt"]
    monkeypatch.setattr(checkpoint.torch, "save", save)
    assert main.main(npz_args(tmp_path, "--epochs=0", "--resume=true")) == 0  # space freed: the run continues
    assert load_checkpoint(task_checkpoint_path(out, 2))["task"] == 2


# ----- checkpoints ---------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "is empty (0 bytes)"),
        (bytes(range(200, 256)) * 4, "is not a checkpoint written by this framework (a torch.save zip archive) (it "),
        (b"model weights\n", "is a text file (it starts with 'model weights\\n'), not a checkpoint"),
        (b"\x80\x04K\x01.", "is a Python pickle, not a checkpoint"),
        (
            b"PK\x03\x04 truncated zip",
            "is corrupt or unreadable (truncated: an interrupted copy or write); copy it again",
        ),
    ],
)
def test_a_file_that_is_not_a_checkpoint_is_named_for_what_it_is(tmp_path, capsys, content, expected):
    bad = tmp_path / "task_1.pt"
    bad.write_bytes(content)
    line = one_error_line(
        ["--device=cpu", f"--output_dir={tmp_path / 'r'}", "--task=2", f"--saved_model_address={bad}"], capsys
    )
    assert line.startswith(f"error: checkpoint {bad} {expected}"), line


# ----- diverging training ---------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("head", ["cosine", "linear"])
def test_a_diverging_run_stops_with_one_line_whatever_the_head(tmp_path, capsys, head):
    """lr 1e6: the cosine head's bounded logits never give a NaN loss, but the weights explode (measured on digits:
    |w| = 5.6e6 after the first epoch); the run stops after such an epoch and names the weight."""
    write_npz(tmp_path / "d.npz")
    line = one_error_line(npz_args(tmp_path, f"--head={head}", "--lr=1e6", "--epochs=3"), capsys)
    assert line.startswith("error: task 1 epoch ") and "training diverged: weight '" in line, line
    assert ("(> divergence_limit 100000)" in line or "is nan" in line or "is inf" in line) and "lower lr" in line
    assert not (tmp_path / "run" / "task_1.pt").exists()


@pytest.mark.e2e
def test_divergence_limit_zero_only_stops_non_finite_weights(tmp_path):
    write_npz(tmp_path / "d.npz")
    assert main.main(npz_args(tmp_path, "--head=cosine", "--lr=1e6", "--divergence_limit=0")) == 0


# ----- names the file system cannot hold, placeholders that cannot be filled, the demo's scratch folders ----------

LONG = "n" * 300  # one name of 300 bytes: more than the 255 a file system allows (ENAMETOOLONG)
TOO_LONG = f"the name '{'n' * 20}...{'n' * 12}' in it is 300 bytes long, more than the file system allows (255)"


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--output_dir={tmp}/" + LONG + "/run"], f"key 'output_dir': {TOO_LONG}; choose a shorter name"),
        (["--data_path={tmp}/" + LONG + "/d.npz"], f"key 'data_path': {TOO_LONG}; choose a shorter name"),
        (["--task=2", "--saved_model_address={tmp}/" + LONG], f"key 'saved_model_address': {TOO_LONG}; choose a "),
        (["--task=2", "--saved_model_address=best:{tmp}/" + LONG], f"key 'saved_model_address': {TOO_LONG}; choose"),
        (["--config", "{tmp}/" + LONG + "/c.yaml"], f"--config: {TOO_LONG}; choose a shorter name"),
    ],
)
def test_a_name_longer_than_the_file_system_allows_is_one_line(tmp_path, capsys, args, expected):
    write_npz(tmp_path / "d.npz")
    base = [a for a in npz_args(tmp_path) if not a.startswith("--output_dir") and not a.startswith("--data_path")]
    data = [] if any(a.startswith("--data_path") for a in args) else [f"--data_path={tmp_path / 'd.npz'}"]
    out = [] if any(a.startswith("--output_dir") for a in args) else [f"--output_dir={tmp_path / 'run'}"]
    line = one_error_line([*base, *data, *out, *(a.format(tmp=tmp_path) for a in args)], capsys)
    assert line.startswith("error: " + expected), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz"]  # nothing written


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("template", "shown"),
    [("{dataset:d}", "{dataset:d}"), ("{seed!z}", "{seed!z}"), ("{seed:>99999999999}", "{seed:>99999999999}")],
)
def test_output_dir_placeholders_with_a_format_spec_are_refused_before_anything_is_written(
    tmp_path, capsys, monkeypatch, template, shown
):
    monkeypatch.chdir(tmp_path)
    line = one_error_line([f"--output_dir=runs/{template}", "--device=cpu"], capsys)
    field = shown[1:].split(":")[0].split("!")[0]
    assert (
        line == f"error: key 'output_dir': placeholder {shown} has a format spec or conversion; write plain {{{field}}}"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.e2e
def test_demo_checks_its_arguments_before_deleting_and_never_deletes_outside_the_named_folder(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    earlier = tmp_path / "runs/demo/finetune/notes.txt"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("an earlier demo run")
    line = one_error_line(["demo", "--lr=-1", f"--output_dir={tmp_path / 'elsewhere'}"], capsys)
    assert "lr" in line and earlier.read_text() == "an earlier demo run"
    line = one_error_line(["demo", "--lr=-1"], capsys)  # the scratch folders too: nothing deleted before the check
    assert "lr" in line and earlier.read_text() == "an earlier demo run"
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.e2e
def test_a_medmnist_config_runs_on_ones_own_data_with_another_split(tmp_path, caplog):
    """The MedMNIST ccsi.yaml names per_task values for tasks 1-4; with --nb_cl_fg=5 --nb_cl=5 on a 10-class file
    the run has 2 tasks: the entries of tasks 3 and 4 are a console note, not an error."""
    write_npz(tmp_path / "d.npz", n=(40, 20, 20), classes=10)
    tiny = ["--epochs=1", "--device=cpu", "--progress=false", "--nb_generation=1", "--syn_batch_size=4"]
    tiny += ["--syn_iterations=2", "--syn_warmup=1", f"--output_dir={tmp_path / 'run'}", "--threads=1"]
    args = ["--config", str(ROOT / "configs/bloodmnist/ccsi.yaml"), "--dataset=npz", f"--data_path={tmp_path}/d.npz"]
    with caplog.at_level("WARNING"):
        assert main.main([*args, "--nb_cl_fg=5", "--nb_cl=5", *tiny]) == 0
    notes = [r.getMessage() for r in caplog.records if "per_task" in r.getMessage()]
    assert notes == ["note: per_task entries for task(s) 3, 4 are not used: this run has 2 tasks (nb_cl_fg, nb_cl)"]
