"""Multi-process training (distributed.py, SyncedBatchNorm2d): pure helpers, collectives in 2 gloo processes,
and whole runs launched like torchrun that must agree with a single process."""

import copy
import json
import multiprocessing as mp
import os
import re
import socket
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import pytest
import torch

from dataloaders.batches import WHOLE_BATCH, Batch, BatchShard
from experiment import config
from experiment.config import ConfigError
from models.layers.synced_batch_norm import SyncedBatchNorm2d, sync_batch_norm
from runtime import distributed
from tiny import ROOT, method_at_task_2, write_digits

TIMEOUT = 240  # seconds a group of ranks may take before the test fails instead of hanging


# ----- helpers without a process group -----------------------------------------------------------
@pytest.mark.e2e
def test_launch_info_reads_torchrun_environment():
    assert distributed.launch_info({}) == distributed.LaunchInfo(0, 1, 0)
    assert distributed.launch_info({"WORLD_SIZE": "1"}) == distributed.LaunchInfo(0, 1, 0)
    env = {"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert distributed.launch_info(env) == distributed.LaunchInfo(2, 4, 0)


@pytest.mark.e2e
@pytest.mark.parametrize(
    "env, message",
    [
        ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR, MASTER_PORT is not"),
        ({"WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK is not"),
        ({"WORLD_SIZE": "2", "RANK": "5", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK=5 is outside 0..1"),
        ({"WORLD_SIZE": "two"}, "must be integers"),
        ({"WORLD_SIZE": "0"}, "must be >= 1"),
    ],
)
def test_wrong_launch_gives_one_line_with_the_torchrun_command(env, message):
    with pytest.raises(ConfigError, match=message) as err:
        distributed.launch_info(env)
    assert "torchrun --nproc_per_node" in str(err.value) and "\n" not in str(err.value)


def test_backend_is_chosen_by_device():
    assert distributed.choose_backend("auto", "cuda") == "nccl"
    assert distributed.choose_backend("auto", "cpu") == "gloo"
    assert distributed.choose_backend("gloo", "cuda") == "gloo"
    with pytest.raises(ConfigError, match="nccl' needs CUDA"):
        distributed.choose_backend("nccl", "cpu")


def test_shard_ranges_partition_in_rank_order():
    for n in (0, 1, 7, 32, 33):
        for world in (1, 2, 3, 4):
            parts = [distributed.shard_range(n, r, world) for r in range(world)]
            assert [i for p in parts for i in range(n)[p]] == list(range(n))
            assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1
    assert distributed.shard_range(7, 0, 2) == slice(0, 4) and distributed.shard_range(7, 1, 2) == slice(4, 7)


def test_per_row_draws_of_shards_equal_the_whole_batch_draws():
    whole = torch.randint(0, 50, (7,), generator=torch.Generator().manual_seed(3))
    parts = []
    for r in range(2):
        rows = distributed.shard_range(7, r, 2)
        shard = Batch(torch.zeros(7, 1, 2, 2)[rows], torch.zeros(7)[rows], torch.zeros(7)[rows], BatchShard(rows, 7))
        parts.append(shard.draw_rows(50, torch.Generator().manual_seed(3)))
    assert torch.equal(torch.cat(parts), whole)
    batch = Batch(torch.zeros(7, 1, 2, 2), torch.zeros(7), torch.zeros(7))
    assert torch.equal(batch.draw_rows(50, torch.Generator().manual_seed(3)), whole)


@pytest.mark.e2e
def test_single_process_helpers_are_no_ops():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    batch = Batch(torch.zeros(3, 1, 4, 4), torch.zeros(3), torch.zeros(3))
    assert distributed.shard_batch(batch) is batch and distributed.world_size() == 1 and distributed.is_main()
    distributed.prepare_model(net, sync_bn=True)
    assert type(net[1]) is torch.nn.BatchNorm2d  # converted only under torchrun
    assert distributed.broadcast_method_state(object()) == []
    assert distributed.all_reduce_mean({"a": 2.0}) == {"a": 2.0}


def test_state_fingerprint_sees_one_changed_value():
    state = {"net": {"w": torch.ones(3)}, "n_seen": 4, "memory": [torch.zeros(2, dtype=torch.uint8)]}
    same = copy.deepcopy(state)
    assert distributed.state_fingerprint(state) == distributed.state_fingerprint(same)
    same["net"]["w"][1] = 1.0 + 1e-7
    assert distributed.state_fingerprint(state) != distributed.state_fingerprint(same)
    assert distributed.state_fingerprint({**state, "n_seen": 5}) != distributed.state_fingerprint(state)


def test_sync_batch_norm_shares_parameters_and_is_plain_bn_alone():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Sequential(torch.nn.BatchNorm2d(4, momentum=0.3)))
    before = copy.deepcopy(net)
    weight = net[1][0].weight
    assert (
        sync_batch_norm(net, distributed.sum_over_ranks) == 1 and sync_batch_norm(net, distributed.sum_over_ranks) == 0
    )
    assert isinstance(net[1][0], SyncedBatchNorm2d) and net[1][0].weight is weight
    assert net.state_dict().keys() == before.state_dict().keys()
    x = torch.randn(5, 1, 6, 6)
    torch.testing.assert_close(net(x), before(x))  # no process group: the BatchNorm2d computation
    torch.testing.assert_close(net[1][0].running_var, before[1][0].running_var)


# ----- two gloo processes --------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, fn, args, queue):
    os.environ.update(
        {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)},
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    try:
        queue.put((rank, "ok", fn(rank, *args)))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))


def run_ranks(fn, *args, world: int = 2) -> list:
    """Run ``fn(rank, *args)`` in ``world`` spawned processes that see torchrun's variables; their results."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world):
            rank, status, value = queue.get(timeout=TIMEOUT)
            assert status == "ok", f"rank {rank} failed:\n{value}"
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]


def _sharded_step(rank):
    """One sharded step of a CN ResNet vs the same step on the whole batch in one process."""
    import incremental_train_and_eval  # noqa: F401  (declares every key in this fresh process)
    import models

    info, _ = distributed.setup("cpu", "auto")
    cfg = config.load_config(overrides={"dataset": "digits", "norm": "cn", "cn_momentum": 0.3})
    torch.manual_seed(0)
    net = models.build_net(cfg, 1, 32)
    net.expand_head(3)
    x, y = torch.rand(9, 1, 32, 32), torch.tensor([0, 1, 2] * 3)  # 9 rows: shards of 5 and 4
    reference = copy.deepcopy(net)  # plain BatchNorm: the single-process computation
    torch.nn.functional.cross_entropy(reference(x)["logits"], y).backward()
    distributed.prepare_model(net, sync_bn=True)
    local = distributed.shard_batch(Batch(x, y, torch.zeros(9, dtype=torch.bool)))
    loss = torch.nn.functional.cross_entropy(net(local.x)["logits"], local.y)
    (loss * len(local) / 9).backward()
    distributed.all_reduce_gradients(list(net.parameters()))
    grad_diff = max((a.grad - b.grad).abs().max().item() for a, b in zip(net.parameters(), reference.parameters()))
    buffers = [(a, b) for a, b in zip(net.buffers(), reference.buffers()) if a.numel() and a.is_floating_point()]
    stats_diff = max((a - b).abs().max().item() for a, b in buffers)
    distributed.teardown()
    return {"world": info.world_size, "rows": len(local), "grad_diff": grad_diff, "stats_diff": stats_diff}


@pytest.mark.e2e
def test_sharded_step_with_synced_norm_equals_the_whole_batch_step():
    results = run_ranks(_sharded_step)
    assert [r["rows"] for r in results] == [5, 4] and results[0]["world"] == 2
    for r in results:
        assert r["grad_diff"] < 1e-5, r  # float32 rounding of the summed statistics
        assert r["stats_diff"] < 1e-5, r  # running mean/var as BatchNorm2d on the whole batch


def _ccsi_losses_steps(rank):
    """Two steps of CCSI's batch-coupled losses (class-weighted CE, margin ranking, IdC with its centroid
    memory) on shards of 11 rows, against the same steps on the whole batch computed before joining the group."""
    import incremental_train_and_eval  # noqa: F401  (declares every key in this fresh process)
    from methods import losses

    torch.manual_seed(0)
    head = torch.nn.Linear(6, 5)  # 5 classes: 3 old, 2 new
    weights = torch.tensor([2.0, 1.0, 1.0, 0.5, 0.5])
    steps = [(torch.randn(11, 6), torch.arange(11) % 5, torch.randn(11, 6)) for _ in range(2)]

    def losses_and_grads(rows, idc, shard):
        out = []
        for feats, y, target in steps:
            head.zero_grad()
            scores = head(feats[rows])
            loss = (
                losses.weighted_cross_entropy(scores, y[rows], weights, shard)
                + losses.margin_ranking(scores.tanh(), y[rows], 3, 2, 0.5, shard)
                + idc(scores, y[rows], head(target[rows]), shard)
            )
            (loss * len(y[rows]) / len(y)).backward()
            distributed.all_reduce_gradients(list(head.parameters()))
            out.append((loss.item(), [p.grad.clone() for p in head.parameters()]))
        return out

    whole = losses_and_grads(slice(None), losses.IntraDomainContrastive(0.9, 1.0), WHOLE_BATCH)
    distributed.setup("cpu", "gloo")
    rows = distributed.shard_range(11)
    shard = BatchShard(rows, 11, distributed.sum_over_ranks)
    sharded = losses_and_grads(rows, losses.IntraDomainContrastive(0.9, 1.0), shard)
    distributed.teardown()
    loss_diff = max(abs(a[0] - b[0]) for a, b in zip(whole, sharded))
    grad_diff = max((ga - gb).abs().max().item() for a, b in zip(whole, sharded) for ga, gb in zip(a[1], b[1]))
    return {"loss_diff": loss_diff, "grad_diff": grad_diff}


@pytest.mark.e2e
def test_ccsi_batch_coupled_losses_on_shards_equal_the_whole_batch():
    for r in run_ranks(_ccsi_losses_steps):
        assert r["loss_diff"] < 1e-5 and r["grad_diff"] < 1e-5, r  # every rank computes the global batch's loss


def _collectives(rank, marker):
    import time

    distributed.setup("cpu", "gloo")
    with distributed.main_first():  # rank 0 "downloads" first, slowly; rank 1 must then find the file
        if rank == 0:
            time.sleep(0.5)
            Path(marker).write_text("data")
        found = Path(marker).is_file()
    gathered = distributed.all_gather_rows(torch.full((rank + 1, 2), float(rank)))  # 1 row, then 2 rows
    means = distributed.all_reduce_mean({"loss": float(rank), "acc": 10.0 * rank})
    net = torch.nn.BatchNorm2d(2)
    net.running_mean.fill_(float(rank))

    class Holder:
        def __init__(self, value):
            self.value = value

        def state_dict(self):
            return {"w": torch.full((2,), self.value), "n": 3}

        def load_state_dict(self, state):
            self.value = float(state["w"][0])

    distributed.average_buffers(net)
    holder = Holder(float(rank))
    fingerprints = distributed.broadcast_method_state(holder)
    distributed.teardown()
    return {
        "gathered": gathered.tolist(),
        "means": means,
        "running_mean": net.running_mean.tolist(),
        "value": holder.value,
        "fingerprints": fingerprints,
        "found": found,
    }


@pytest.mark.e2e
def test_collectives_gather_average_broadcast_and_order(tmp_path):
    r0, r1 = run_ranks(_collectives, str(tmp_path / "downloaded"))
    assert r0["found"] and r1["found"]
    assert r0["gathered"] == r1["gathered"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    assert r0["means"] == r1["means"] == {"loss": 0.5, "acc": 5.0}
    assert r0["running_mean"] == r1["running_mean"] == [0.5, 0.5]
    assert r0["value"] == r1["value"] == 0.0  # rank 0's state everywhere
    assert r0["fingerprints"] == r1["fingerprints"] and len(set(r0["fingerprints"])) == 2  # they differed before


def _ccsi_run(rank, out, data):
    """A small CCSI run in this rank, recording every file it opens for writing under the run folder."""
    import incremental_train_and_eval as engine

    written = []

    def audit(event, args):
        if event == "open" and args[0] is not None and str(args[0]).startswith(out):
            mode, flags = args[1], args[2]
            if (mode and any(c in mode for c in "wax+")) or (flags and flags & (os.O_WRONLY | os.O_RDWR)):
                written.append(os.path.relpath(str(args[0]), out))

    sys.addaudithook(audit)
    summary = engine.run(config.load_config(overrides={**CCSI_SMALL, "data_path": data, "output_dir": out}))
    ckpt = torch.load(Path(out) / "task_2.pt", weights_only=True) if rank == 0 else None
    return {"summary": summary, "written": written, "has_ckpt": ckpt is not None}


CCSI_SMALL = {
    "method": "ccsi",
    "dataset": "npz",  # digits 0-5 (tiny.write_digits): 300 training, 16 val, 100 test images
    "nb_cl_fg": 4,
    "nb_cl": 2,  # two tasks: the second one replays impressions
    "epochs": 2,
    "batch_size": 32,
    "lr": 0.02,
    "device": "cpu",
    "progress": False,
    "nb_generation": 3,  # 3 batches over 2 ranks: shares of 2 and 1
    "syn_batch_size": 16,
    "syn_iterations": 4,
    "syn_warmup": 1,
}


@pytest.mark.e2e
def test_ccsi_on_two_ranks_writes_from_rank_0_only_and_agrees_with_one_process(tmp_path):
    import incremental_train_and_eval as engine

    out = str(tmp_path / "ddp")
    data = write_digits(tmp_path / "digits6.npz", 6, 300)
    r0, r1 = run_ranks(_ccsi_run, out, data)
    single = engine.run(
        config.load_config(overrides={**CCSI_SMALL, "data_path": data, "output_dir": str(tmp_path / "single")})
    )
    assert r1["written"] == [] and r0["has_ckpt"]
    written = " ".join(r0["written"])  # atomic writes open a temporary file named after the target
    assert all(name in written for name in ("task_2.pt", "metrics.json", "config.yaml", "impressions_task_2.png"))
    assert r0["summary"]["accuracy_per_task"] == r1["summary"]["accuracy_per_task"]  # identical on all ranks
    tasks = json.loads((Path(out) / "metrics.json").read_text())["tasks"]
    for t in tasks:  # method state (net, class means and moments) agreed on both ranks before the broadcast
        assert len(t["rank_state_fingerprints"]) == 2 and len(set(t["rank_state_fingerprints"])) == 1
    assert_agrees(r0["summary"], single)


def assert_agrees(ddp: dict, single: dict) -> None:
    """Same global batches, synchronised statistics, the global batch's losses, the same impressions: float
    rounding (summation order) alone separates the runs. It does not grow in the first task (equal accuracy
    measured), so task 1 agrees within 2 points; later tasks amplify it as much as running one process with 2
    threads instead of 1 (measured on this CCSI setting: average incremental accuracy 62.8 vs 65.2; 2 ranks differed
    from 1 process by 6.9 on another machine), so they are not compared here: each step's exactness on shards is
    (test_every_method_step_on_shards_equals_the_whole_batch_step, test_sharded_step_with_synced_norm...)."""
    first = abs(ddp["accuracy_per_task"][0] - single["accuracy_per_task"][0])
    assert first <= 2.0, (ddp["accuracy_per_task"], single["accuracy_per_task"])
    assert len(ddp["accuracy_per_task"]) == len(single["accuracy_per_task"])


@pytest.mark.e2e
def test_torchrun_finetune_matches_one_process(tmp_path, make_cfg):
    import incremental_train_and_eval as engine

    args = ["--config", "configs/digits/finetune.yaml", "--epochs=2", "--lr=0.02", "--progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main.py"]
    cmd += [*args, f"--output_dir={tmp_path / 'ddp'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("avg_inc_acc") == 1  # rank 0 alone prints the results table
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    files = config.load_config([str(ROOT / "configs/digits/finetune.yaml")], {"epochs": 2, "lr": 0.02})
    single = engine.run(files.replace(progress=False, output_dir=str(tmp_path / "single")))
    assert_agrees(ddp, single)


@pytest.mark.e2e
@pytest.mark.parametrize("bad", [["--lr=-1"], ["--output_dir={tmp}/held"]])
def test_bad_input_under_torchrun_is_one_line_from_rank_0_and_exit_2_from_every_rank(tmp_path, bad):
    """Under a real torchrun with two processes: our part of stderr is one line (torchrun then reports the failed
    child in its own words, README "Multi-GPU"); no traceback from the project's code."""
    held = tmp_path / "held"
    held.mkdir()
    lock = subprocess.Popen(  # another live process holds the folder's lock
        [sys.executable, "-c", f"import fcntl, os, time, json; fd = os.open({str(held / '.lock')!r}, os.O_RDWR | "
         "os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, json.dumps({'pid': os.getpid(), 'host': "
         "__import__('socket').gethostname()}).encode()); print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert lock.stdout.readline().strip() == "held"
    args = ["--config", "configs/digits/finetune.yaml", "--epochs=1", "--progress=false", "--device=cpu"]
    args += [a.format(tmp=tmp_path) for a in bad] or [f"--output_dir={tmp_path / 'run'}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main.py", *args]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        lock.kill()
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(ours) == 1 and ("key 'lr'" in ours[0] or "is in use by process" in ours[0]), proc.stderr[-3000:]
    assert "failed (exitcode: 2)" in proc.stderr and proc.returncode != 0  # torchrun's report of the children
    assert re.search(rf'File "{re.escape(str(ROOT))}/(?!\.venv)', proc.stderr) is None  # no frame of our code


@pytest.mark.e2e
def test_subcommands_refuse_torchrun(monkeypatch, capsys):
    import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main.main(["demo"]) == 2
    assert "runs in one process" in capsys.readouterr().err


def _method_steps_on_shards(rank, names):
    """For each method: its first training step of task 2, on the whole global batch in one process and on this
    rank's shard in a 2-rank group (gradients summed). Equal gradients mean every loss term forms its sums over
    the global batch (a loss that is not a per-sample mean but ignores the batch's shard fails here)."""
    with tempfile.TemporaryDirectory(prefix=f"rank{rank}-") as folder:  # impressions grids: not in the repo
        return _shard_differences(names, Path(folder))


def _shard_differences(names, folder):
    prepared = []
    for name in names:
        keys = METHOD_VARIANTS.get(name, {"method": name})
        cfg = config.load_config(overrides={**METHOD_STEP, **keys, "output_dir": str(folder / name)})
        method, ctx = method_at_task_2(cfg)
        prepared.append((name, method, ctx, next(iter(method.train_batches(ctx, 0)))))

    def gradients(method, ctx, batch):
        method.train()
        method.on_epoch_start(ctx, 0)
        params = [p for p in method.net.parameters() if p.requires_grad]
        method.net.zero_grad(set_to_none=True)
        generator_state = ctx.generator.get_state()
        local = method.before_step(distributed.shard_batch(batch))
        distributed.backward(method.training_step(local)["loss"], len(local) / len(batch), params)
        ctx.generator.set_state(generator_state)  # the same per-row draws for the next computation
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]

    whole = {name: gradients(method, ctx, batch) for name, method, ctx, batch in prepared}
    distributed.setup("cpu", "gloo")
    diffs = {}
    for name, method, ctx, batch in prepared:
        distributed.prepare_model(method.net, sync_bn=True)
        sharded = gradients(method, ctx, batch)
        a, b = torch.cat([g.flatten() for g in whole[name]]), torch.cat([g.flatten() for g in sharded])
        diffs[name] = ((a - b).norm() / a.norm()).item()
    distributed.teardown()
    return diffs


METHOD_STEP = {
    "dataset": "digits",
    "norm": "bn",  # behind CN's GroupNorm, float32 rounding alone moves some gradients by ~1e-3 (float64: ~1e-8)
    "nb_cl_fg": 2,
    "nb_cl": 2,
    "batch_size": 13,  # shards of 7 and 6 rows
    "device": "cpu",
    "progress": False,
    "memory_size": 20,
    "nb_generation": 1,
    "syn_batch_size": 8,
    "syn_iterations": 1,
    "syn_warmup": 1,
    "idc_source": "train",
    "K": 1,
    "gen_iterations": 2,  # abd, rdfcil: their generator trains thousands of steps at the keys' defaults
    "gen_batch_size": 8,
    "gen_width": 8,
    "gen_z_dim": 16,
    "rdfcil_ft_epochs": 1,
}


# options that change a method's losses, checked beside the methods' defaults
METHOD_VARIANTS = {"ccsi+local_ce": {"method": "ccsi", "ccsi_local_ce": True}}


@pytest.mark.e2e
def test_every_method_step_on_shards_equals_the_whole_batch_step():
    from methods import METHODS

    names = sorted([*METHODS, *METHOD_VARIANTS])
    for diffs in run_ranks(_method_steps_on_shards, names):
        assert sorted(diffs) == names
        for name, diff in diffs.items():
            # measured: float32 rounding <= 3e-4; masked_mean summing only its shard: deepinversion 1.8e-2, lucir 0.1
            assert diff < 5e-3, f"{name}: sharded gradients differ from the whole batch's by {diff:.2e} (relative)"
