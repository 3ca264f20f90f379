"""The one home of torch.distributed's process groups and collectives.

Joining the world (env:// rendezvous: MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE, set by
torchrun or by paci's own launcher), the (dp, pp) mesh and its groups, and every collective a run
makes: the replicas' gradient mean, the stages' norm exchange, gathering traces and stage files on
rank 0, a flag any rank may raise, rank 0's object broadcast. Point-to-point traffic lives in
`paci.runtime.transport`; no other module touches torch.distributed (tests/test_layers.py).
"""

from __future__ import annotations

import atexit
import os
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh


class RankInfo(NamedTuple):
    rank: int
    world_size: int
    local_rank: int


def env_rank() -> RankInfo | None:
    """This process's rank from the environment (torchrun or `spawn`), or None when not distributed."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    return RankInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                    int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))


def rank_device(info: RankInfo) -> torch.device:
    """The device a rank computes on: its local GPU where there are GPUs, else the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def join(device: torch.device, timeout_s: float) -> None:
    """Join the world (once; later calls do nothing): NCCL for a CUDA device, gloo otherwise.
    Gives up after `timeout_s` if a rank never arrives."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    store = {}
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt != "0" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun --max-restarts keeps its agent's store across restarts, so a restarted rank could
        # read a dead rank's gloo address left by the attempt before: give each attempt its own keys
        client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                               int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timedelta(seconds=timeout_s))
        store = {"store": dist.PrefixStore(f"paci/attempt-{attempt}", client), "rank": int(os.environ["RANK"]),
                 "world_size": int(os.environ["WORLD_SIZE"])}
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None, **store)
    atexit.register(_leave_at_exit)


def leave() -> None:
    """Leave the world, if this process joined it."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _leave_at_exit() -> None:
    """Registered by `join`; runs while the interpreter is still whole. Destroys the process group
    if the script did not (torchrun scripts rarely do), then waits a moment with the GIL released:
    a gloo worker thread releases a finished collective's tensors only once it holds the GIL, and
    one still waiting for it when the interpreter shuts down aborts the process ("terminate called
    without an active exception")."""
    leave()
    time.sleep(0.05)


def rank() -> int:
    return dist.get_rank()


def world_size(group=None) -> int:
    return dist.get_world_size(group)


def new_group(ranks, backend: str | None = None, timeout_s: float | None = None):
    """A process group over `ranks` (a collective: every rank of the world creates every group, in
    the same order, whether it belongs to it or not)."""
    timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
    return dist.new_group(list(ranks), backend=backend, timeout=timeout)


def groups(device: torch.device, dp: int, num_ranks: int, timeout_s: float, pipeline: bool = True):
    """(this rank's pipeline group, its replica group) over dp x num_ranks ranks laid out as a
    (dp, pp) device mesh, rank = replica x num_ranks + p. The pipeline group holds its replica's
    ranks (the global clipping norm; the trace gathered by replica 0), the replica group the copies
    of its stage (the gradient mean). Without replicas: a pipeline group only if `pipeline` asks for
    one, and no replica group. A collective: every rank calls it."""
    if dp == 1:
        return (new_group(range(num_ranks), timeout_s=timeout_s) if pipeline else None), None
    mesh = init_device_mesh(device.type, (dp, num_ranks), mesh_dim_names=("dp", "pp"))
    return mesh.get_group("pp"), mesh.get_group("dp")


def barrier() -> None:
    dist.barrier()


def norm_exchange(group, num_stages: int) -> Callable[[int, torch.Tensor], list[torch.Tensor]]:
    """`Stage.exchange` over processes: an all-gather of every rank's gradient norm on `group`
    (every rank gets the same list in rank order, so single- and multi-process runs compute the
    same total)."""
    def exchange(step: int, norm: torch.Tensor) -> list[torch.Tensor]:
        gathered = [torch.empty(1, dtype=norm.dtype, device=norm.device) for _ in range(num_stages)]
        dist.all_gather(gathered, norm.reshape(1), group=group)
        return [t.reshape(()) for t in gathered]

    return exchange


def replica_mean(group, replicas: int) -> Callable[[list[torch.Tensor]], None]:
    """`Stage.replica_mean` for data parallelism: the mean over a stage's replicas (`group`) of
    every tensor given, in place, with one all-reduce of them all flattened (per dtype)."""
    def reduce(tensors: list[torch.Tensor]) -> None:
        for dtype in dict.fromkeys(t.dtype for t in tensors):
            same = [t for t in tensors if t.dtype == dtype]
            flat = torch.cat([t.reshape(-1) for t in same])
            dist.all_reduce(flat, group=group)
            flat.div_(replicas)
            for t, part in zip(same, flat.split([t.numel() for t in same])):
                t.copy_(part.view_as(t))

    return reduce


def gather_objects(value: Any, group=None) -> list[Any] | None:
    """Every rank's picklable `value`, in rank order, on the group's first rank (global rank 0);
    None on the others. A collective on `group` (default: the world)."""
    parts = [None] * dist.get_world_size(group) if dist.get_rank() == 0 else None
    dist.gather_object(value, parts, dst=0, group=group)
    return parts


def any_rank(flag: bool, group, device: torch.device) -> bool:
    """Did any rank of `group` pass True? A collective (an all-reduce of one number)."""
    asked = torch.tensor([float(flag)], device=device)
    dist.all_reduce(asked, op=dist.ReduceOp.MAX, group=group)
    return bool(asked.item())


def broadcast(value):
    """Rank 0's `value` (a picklable object) on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
