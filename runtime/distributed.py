"""Data parallelism over processes launched by ``torchrun`` (one per GPU, or CPU processes with gloo).

The engine stays the same loop on every rank; this module supplies the few collective steps:

- the engine's step: every rank draws the same global batch (same seeds) and trains on its contiguous
  shard of it (``shard_batch``, which also gives the shard a differentiable ``sum_over_ranks`` for losses
  that are not a mean over samples, see ``dataloaders.batches.BatchShard``); each rank back-propagates its
  loss weighted by its share of the batch and the gradients are summed across ranks (``backward``), so a
  step equals the single-process step on the global batch; after each epoch running statistics are
  averaged and the loss terms reduced (``end_epoch``);
- batch normalisation (also inside Continual Normalization) uses the global batch's statistics
  (``sync_bn: true``, models/layers/synced_batch_norm.py, given ``sum_over_ranks``) or each rank's shard
  (``sync_bn: false``, cheaper);
- evaluation and CCSI synthesis are split across ranks and gathered (``all_gather_rows``);
- after each task rank 0's method state (net, teacher, class statistics, memory, ...) is given to every
  rank (``broadcast_method_state``), so all ranks continue from the same state; only rank 0 writes files.

Without torchrun (``WORLD_SIZE`` unset or 1) every function here is a no-op and nothing is initialised.
This is the only module that imports ``torch.distributed``.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dataloaders.batches import Batch, BatchShard
from experiment.config import ConfigError, Option, register_options
from experiment.errors import UserError
from models.layers.synced_batch_norm import sync_batch_norm

log = logging.getLogger(__name__)

register_options(
    "distributed",
    [
        Option(
            "backend",
            "str",
            "auto",
            "torch.distributed backend when launched with torchrun (auto: nccl on CUDA, gloo on CPU)",
            choices=("auto", "nccl", "gloo"),
        ),
        Option("dist_timeout_minutes", "int", 30, "how long a rank waits for the others before failing", min=1),
        Option(
            "sync_bn",
            "bool",
            True,
            "under torchrun, batch norm (and CN) normalise by the statistics of the global batch (all ranks), "
            "as a single process would; false: each rank's shard (no extra communication)",
        ),
    ],
    scope="run",
)

LAUNCH_HINT = "launch with: torchrun --nproc_per_node=N main.py --config FILE [--key=value ...]"


@dataclass(frozen=True)
class LaunchInfo:
    """What torchrun told this process (RANK, WORLD_SIZE, LOCAL_RANK)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def launch_info(environ: Mapping[str, str] | None = None) -> LaunchInfo:
    """Read and check torchrun's environment; a single plain process gives world size 1."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return LaunchInfo()
    try:
        world = int(env["WORLD_SIZE"])
        rank = int(env.get("RANK", "-1"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE/RANK/LOCAL_RANK must be integers; {LAUNCH_HINT}") from None
    if world < 1:
        raise ConfigError(f"WORLD_SIZE={world} must be >= 1; {LAUNCH_HINT}")
    if world == 1:
        return LaunchInfo()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} is set but {', '.join(missing)} is not; {LAUNCH_HINT}")
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside 0..{world - 1}; {LAUNCH_HINT}")
    return LaunchInfo(rank, world, local)


def choose_backend(name: str, device_type: str) -> str:
    """nccl for CUDA, gloo for CPU; a clear error for a combination that cannot work."""
    if name == "auto":
        return "nccl" if device_type == "cuda" else "gloo"
    if name == "nccl" and device_type != "cuda":
        raise ConfigError("backend 'nccl' needs CUDA GPUs; use --backend=gloo (or auto) to train on the CPU")
    return name


NVIDIA_MARKERS = ("/proc/driver/nvidia/version", "/dev/nvidiactl")  # present when an NVIDIA driver is loaded


def nvidia_gpu_present() -> bool:
    """Whether the machine shows an NVIDIA driver or ``nvidia-smi``, whether or not torch can use the GPU."""
    return any(os.path.exists(p) for p in NVIDIA_MARKERS) or shutil.which("nvidia-smi") is not None


def resolve_device(name: str) -> torch.device:
    """``device`` of a single process: auto picks cuda when available; cuda without a GPU is refused."""
    if name == "auto":
        if not torch.cuda.is_available() and nvidia_gpu_present():
            log.warning(
                "device auto: this machine has an NVIDIA GPU that torch %s (CUDA %s) cannot use, so the run is on "
                "the CPU; usually the NVIDIA driver is older than torch's CUDA build: update the driver or install "
                "a torch wheel for your CUDA version (https://pytorch.org/get-started/locally/); --device=cpu "
                "silences this",
                torch.__version__,
                torch.version.cuda,
            )
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was requested but no CUDA GPU is available; use --device=cpu or auto")
    return torch.device(name)


def setup(device_name: str, backend: str, timeout_minutes: int = 30) -> tuple[LaunchInfo, torch.device]:
    """Join the process group torchrun prepared (if any) and pick this rank's device."""
    info = launch_info()
    device = resolve_device(device_name)
    if info.world_size == 1:
        return info, device
    if not dist.is_available():
        raise ConfigError(f"this torch build has no torch.distributed; run without torchrun ({LAUNCH_HINT})")
    if device.type == "cuda":
        if info.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={info.local_rank} but this node has {torch.cuda.device_count()} GPU(s); "
                "use --nproc_per_node at most the number of GPUs, or --device=cpu"
            )
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    chosen = choose_backend(backend, device.type)
    if not dist.is_initialized():
        dist.init_process_group(
            chosen,
            rank=info.rank,
            world_size=info.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    log.info("rank %d/%d on %s (backend %s)", info.rank, info.world_size, device, chosen)
    return info, device


def teardown() -> None:
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this process writes files and logs (rank 0, or the only process)."""
    return rank() == 0


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. downloads a data set, takes the folder's lock), the other ranks after it
    succeeded. When the block fails on rank 0, the other ranks stop too (``RankStopped``, which main.py reports
    from rank 0 only: one line, exit 2 on every rank) instead of waiting in a collective for a rank that is gone."""
    if not is_distributed():
        yield
        return
    if is_main():
        try:
            yield
        except BaseException:
            _broadcast_flag(True)
            raise
        _broadcast_flag(False)
        return
    if _broadcast_flag(False):
        raise RankStopped("rank 0 stopped the run (its error is printed by rank 0)")
    yield


class RankStopped(UserError):
    """Raised on the other ranks when rank 0 stopped in a ``main_first`` block."""


def _broadcast_flag(value: bool) -> bool:
    """Rank 0's ``value`` on every rank (one small broadcast)."""
    flag = _device_for_collectives(torch.tensor([float(value)]))
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def _device_for_collectives(tensor: Tensor) -> Tensor:
    """nccl moves CUDA tensors only; gloo works on CPU tensors."""
    if dist.get_backend() == "nccl":
        return tensor.cuda()
    return tensor.cpu()


# ----- shards ---------------------------------------------------------------------------------
def shard_range(n: int, rank_: int | None = None, world: int | None = None) -> slice:
    """Rank's contiguous part of n items; parts differ in size by at most one and follow rank order."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


def shard_batch(batch: Batch) -> Batch | None:
    """This rank's rows of a global batch; None when the batch has fewer rows than ranks (it is skipped)."""
    if not is_distributed():
        return batch
    if len(batch) < world_size():
        return None
    rows = shard_range(len(batch))
    shard = BatchShard(rows, len(batch), sum_over_ranks)
    index, draws, valid = (None if t is None else t[rows] for t in (batch.index, batch.draws, batch.valid))
    return Batch(batch.x[rows], batch.y[rows], batch.synthetic[rows], shard, index, draws, valid)


def backward(loss: Tensor, share: float, params: list[Tensor]) -> None:
    """Back-propagate this rank's share of the batch's loss and sum the gradients over ranks.

    ``loss`` is this rank's rows' loss (a mean over its rows, or a global-batch loss built with
    ``BatchShard.total``); weighting it by ``share``, the rank's fraction of the global batch's rows, makes the
    summed gradients those of the global batch.
    """
    (loss * share).backward()
    all_reduce_gradients(params)


def end_epoch(net: nn.Module, sums: dict[str, Tensor], steps: int) -> dict[str, float]:
    """After an epoch: average the running statistics over ranks; the mean of each loss term over steps and ranks."""
    average_buffers(net)
    return all_reduce_mean({name: (value / max(steps, 1)).item() for name, value in sums.items()})


def prepare_model(net: nn.Module, sync_bn: bool) -> None:
    """Before a task's training under torchrun: share batch-norm statistics across ranks if asked."""
    if is_distributed() and sync_bn:
        sync_batch_norm(net, sum_over_ranks)


class _SumOverRanks(torch.autograd.Function):
    """y = sum over ranks of x; the gradient of x is likewise the sum over ranks of y's gradient."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        y = _device_for_collectives(x.clone())
        dist.all_reduce(y)
        return y.to(x.device)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        g = _device_for_collectives(grad.clone())
        dist.all_reduce(g)
        return g.to(grad.device)


def sum_over_ranks(x: Tensor) -> Tensor:
    """Differentiable sum of ``x`` over ranks (``x`` itself in a single process).

    A loss that is not a mean over samples (a class-weighted mean, a mean over the batch's old-class samples,
    class centroids) builds its sums with this, so every rank computes the loss of the global batch; the
    engine's share weighting then makes the summed gradients those of that loss.
    """
    return _SumOverRanks.apply(x) if is_distributed() else x


# ----- collectives ----------------------------------------------------------------------------
def all_reduce_gradients(params: Iterable[Tensor]) -> None:
    """Sum each gradient over ranks (each rank back-propagated its loss times its share of the batch).

    One flat buffer, one all-reduce. A parameter without a gradient on every rank keeps ``grad=None``
    (so optimisers skip it as in a single process); one with a gradient on some ranks gets zeros elsewhere.
    """
    if not is_distributed():
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    device = params[0].device
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
    buffer = _device_for_collectives(torch.cat([flat, has_grad]))
    dist.all_reduce(buffer)
    buffer = buffer.to(device)
    present = buffer[len(flat) :] > 0
    offset = 0
    for p, keep in zip(params, present.tolist()):
        n = p.numel()
        p.grad = buffer[offset : offset + n].view_as(p).to(p.dtype).clone() if keep else None
        offset += n


def average_buffers(module: nn.Module) -> None:
    """Average every floating-point buffer (BN/CN running statistics) over ranks."""
    if not is_distributed():
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = _device_for_collectives(torch.cat([b.reshape(-1).float() for b in buffers]))
    dist.all_reduce(flat)
    flat = flat.to(buffers[0].device) / world_size()
    offset = 0
    for b in buffers:
        b.copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Mean over ranks of each named float (e.g. per-epoch loss terms), identical on every rank."""
    if not is_distributed() or not values:
        return values
    names = sorted(values)
    t = _device_for_collectives(torch.tensor([float(values[k]) for k in names], dtype=torch.float64))
    dist.all_reduce(t)
    return dict(zip(names, (t / world_size()).tolist()))


def all_gather_rows(local: Tensor) -> Tensor:
    """Concatenate every rank's tensor along dim 0 in rank order (shapes may differ in dim 0 only)."""
    if not is_distributed():
        return local
    world = world_size()
    size = _device_for_collectives(torch.tensor([local.shape[0]], dtype=torch.long))
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    padded = torch.zeros((max(counts), *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    padded = _device_for_collectives(padded)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(local.device)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def state_fingerprint(state: Any) -> str:
    """A short hash of a (nested) state: equal fingerprints mean equal keys, values and tensor bits."""
    digest = hashlib.sha256()

    def visit(obj: Any) -> None:
        if isinstance(obj, Tensor):
            t = obj.detach().cpu().contiguous()
            digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, dict):
            for key in sorted(obj, key=str):
                digest.update(f"K{key!r}".encode())
                visit(obj[key])
        elif isinstance(obj, (list, tuple)):
            digest.update(f"L{len(obj)}".encode())
            for item in obj:
                visit(item)
        else:
            digest.update(f"V{obj!r}".encode())

    visit(state)
    return digest.hexdigest()[:16]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's (picklable, CPU) object, in rank order."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_method_state(method: Any) -> list[str]:
    """Give rank 0's method state to every rank; returns each rank's fingerprint from before the broadcast.

    Ranks run the same deterministic code on the same data, so their states normally agree already;
    the broadcast makes that hold also where GPU kernels are not bit-reproducible.
    """
    if not is_distributed():
        return []
    state = _to_cpu(method.state_dict())
    fingerprints = all_gather_objects(state_fingerprint(state))
    holder = [state if is_main() else None]
    dist.broadcast_object_list(holder, src=0)
    if not is_main():
        method.load_state_dict(holder[0])
    return fingerprints
