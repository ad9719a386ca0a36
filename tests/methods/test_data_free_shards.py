"""ABD, R-DFCIL and PASS under torchrun: the first training step of task 2 on two shards (gloo, 2 processes) gives
the gradients of the same step on the whole batch (their generator draws, prototype draws, relational and
norm losses are formed over the global batch). The all-method check of tests/runtime/test_distributed.py runs
the same comparison at each key's default, where the generator trains for thousands of steps; here with tiny
generator settings."""

import sys
import tempfile

import torch

from experiment import config
from runtime import distributed
from tiny import ROOT

sys.path.insert(0, str(ROOT / "tests" / "runtime"))
from test_distributed import METHOD_STEP, run_ranks

NAMES = ["abd", "pass", "rdfcil"]
TINY = {"gen_iterations": 2, "gen_batch_size": 8, "gen_width": 8, "gen_z_dim": 16, "rdfcil_ft_epochs": 1}


def _steps_on_shards(rank):
    import incremental_train_and_eval as engine

    prepared = []
    for name in NAMES:
        folder = tempfile.mkdtemp(prefix=f"rank{rank}-")
        cfg = config.load_config(overrides={**METHOD_STEP, **TINY, "method": name, "output_dir": folder})
        state = engine.build_run(cfg, torch.device("cpu"))
        for task in (1, 2):
            task_cfg = cfg.for_task(task)
            ctx = engine.task_context(state, task, task_cfg, engine.seed_everything(task))
            state.method.begin_task(ctx, task_cfg)
            if task == 1:
                state.method.end_task(ctx)
        prepared.append((name, state.method, ctx, next(iter(state.method.train_batches(ctx, 0)))))

    def gradients(method, ctx, batch):
        method.train()
        method.on_epoch_start(ctx, 0)
        params = [p for p in method.net.parameters() if p.requires_grad]
        method.net.zero_grad(set_to_none=True)
        generator_state = ctx.generator.get_state()
        local = distributed.shard_batch(batch)
        terms = method.training_step(local)
        distributed.backward(terms["loss"], local, batch, params)
        ctx.generator.set_state(generator_state)
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params], terms["loss"].item()

    whole = {name: gradients(method, ctx, batch) for name, method, ctx, batch in prepared}
    distributed.setup("cpu", "gloo")
    diffs = {}
    for name, method, ctx, batch in prepared:
        distributed.prepare_model(method.net, sync_bn=True)
        sharded, _ = gradients(method, ctx, batch)
        a, b = torch.cat([g.flatten() for g in whole[name][0]]), torch.cat([g.flatten() for g in sharded])
        diffs[name] = ((a - b).norm() / a.norm()).item()
    distributed.teardown()
    return diffs


def test_data_free_method_steps_on_shards_equal_the_whole_batch_step():
    for diffs in run_ranks(_steps_on_shards):
        assert sorted(diffs) == NAMES
        for name, diff in diffs.items():
            assert diff < 5e-3, f"{name}: sharded gradients differ from the whole batch's by {diff:.2e} (relative)"
