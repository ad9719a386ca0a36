"""bench/compare_methods.py in its --quick smoke mode: the table, the per-run data-access counts, and finished runs
read back instead of retrained."""

import csv

import pytest
import torch

from bench import compare_methods


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.e2e
def test_quick_comparison_writes_the_table_with_data_access_and_skips_finished_runs(tmp_path):
    out, runs = tmp_path / "out", tmp_path / "runs"
    argv = ["--quick", "--sets", "digits", "--entries", "finetune", "abd", "--seeds", "0", "--batch_size=64"]
    argv += ["--out", str(out), "--runs", str(runs), "--threads", "1", "--device=cpu"]
    assert compare_methods.main(argv) == 0
    records = list(csv.DictReader((out / "runs.csv").open()))
    assert [(r["entry"], r["status"]) for r in records] == [("finetune", "done"), ("abd", "done")]
    assert all(r["access_total"] == "0" and 0 <= float(r["last"]) <= 100 for r in records)
    md = (out / "comparison.md").read_text()
    assert "| digits | abd | 0 |" in md and "--quick" in md and "Failed runs (0)" in md
    assert (out / "curves_digits.png").read_bytes()[:4] == b"\x89PNG"
    stamp = (runs / "digits" / "abd" / "seed0" / "metrics.json").stat().st_mtime_ns
    assert compare_methods.main(argv) == 0
    assert [r["status"] for r in csv.DictReader((out / "runs.csv").open())] == ["skipped"] * 2
    assert (runs / "digits" / "abd" / "seed0" / "metrics.json").stat().st_mtime_ns == stamp
    collect = [*argv[:4], "finetune", "abd", "lwf", *argv[6:], "--collect"]  # lwf never ran: listed, not run
    assert compare_methods.main(collect) == 0
    assert [r["status"] for r in csv.DictReader((out / "runs.csv").open())] == ["skipped", "skipped", "missing"]
    md = (out / "comparison.md").read_text()
    assert "| digits | abd | 0 |" in md and "| digits | lwf |" not in md and "digits/lwf seed 0" in md
    assert not (runs / "digits" / "lwf").exists()


@pytest.mark.e2e
def test_keys_set_per_run_are_refused(capsys):
    with pytest.raises(SystemExit) as err:
        compare_methods.main(["--quick", "--sets", "digits", "--dataset=npz"])
    assert err.value.code == 2 and "set per run here" in capsys.readouterr().err
