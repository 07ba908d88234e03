"""The one module that calls collectives.

Everything that talks to other ranks goes through these functions, each taking the process
group explicitly (None means the whole world), so the rest of the code stays testable in one
process and the communication volume of a feature can be read off one file.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from dataclasses import dataclass

import torch
import deepspeed
from deepspeed import comm as dist

from dist_sparse.distributed import startup
from dist_sparse.distributed.topology import ParallelDims


def init(backend: str | None = None) -> None:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU; on CUDA, NCCL for CUDA
    tensors and gloo for the CPU-side bookkeeping collectives), after pointing gloo at the
    network interface NCCL_SOCKET_IFNAME selects. Raises ValueError, saying what to fix, when
    the process group (ours or one initialised before) has no CPU backend on a CUDA machine,
    or an interface variable selects no interface of this node. See ``startup``."""
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        if not torch.distributed.is_initialized():  # else DeepSpeed adopts the existing group
            backend = backend or startup.default_backend(cuda)
            problem = startup.cpu_backend_problem(backend, cuda)
            if problem:  # before the rendezvous: every rank stops here alike
                raise ValueError(problem)
            ifname = startup.gloo_socket_ifname(os.environ, usable_interfaces())
            if ifname is not None:
                # Read by gloo when it creates its devices, i.e. in init_process_group below.
                os.environ["GLOO_SOCKET_IFNAME"] = ifname
        deepspeed.init_distributed(dist_backend=backend)
    # The group that exists now, whoever made it; the config names the backend of every device.
    problem = startup.cpu_backend_problem(torch.distributed.get_backend_config(), cuda)
    if problem:
        raise ValueError(problem)


def usable_interfaces() -> list[str]:
    """This node's network interfaces that are up and have an IPv4/IPv6 address, in system order
    (the candidates NCCL considers too)."""
    import socket

    import psutil  # a dependency of DeepSpeed

    stats = psutil.net_if_stats()
    return [name for name, addrs in psutil.net_if_addrs().items()
            if name in stats and stats[name].isup and any(a.family in (socket.AF_INET, socket.AF_INET6) for a in addrs)]


def is_initialized() -> bool:
    return dist.is_initialized()


def rank(group=None) -> int:
    return dist.get_rank(group=group) if dist.is_initialized() else 0


def world_size(group=None) -> int:
    return dist.get_world_size(group=group) if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def shutdown() -> None:
    """End this process's part of the job cleanly: wait for every rank, then destroy the process
    groups. Left to the interpreter's exit, gloo's background threads can be torn down while a
    peer still talks to them ("terminate called without an active exception", exit -6)."""
    if torch.distributed.is_initialized():
        dist.barrier()
        torch.distributed.destroy_process_group()


def all_reduce_sum_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``tensor`` in place over ``group``; returns it. A no-op in a single process."""
    if dist.is_initialized() and world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_reduce_min_max(tensor: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise (min, max) of ``tensor`` over ``group``; equal results mean all ranks agree."""
    lo, hi = tensor.clone(), tensor.clone()
    if dist.is_initialized() and world_size(group) > 1:
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    return lo, hi


def all_gather_cat(tensor: torch.Tensor, group=None, dim: int = 0) -> torch.Tensor:
    """Concatenate equally shaped tensors of every rank of ``group`` along ``dim``, in rank order
    (how AutoTP lays out shards). Returns ``tensor`` itself in a group of one."""
    n = world_size(group)
    if not dist.is_initialized() or n == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(n)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def exchange_with_neighbours(to_prev: torch.Tensor, to_next: torch.Tensor, n_from_prev: int, n_from_next: int,
                             group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Point-to-point with the ranks before and after this one in ``group`` (group ranks r-1, r+1).

    Sends ``to_prev`` to r-1 and ``to_next`` to r+1, and receives ``n_from_prev`` elements from
    r-1 and ``n_from_next`` from r+1 (what they send the other way; sizes are agreed by the
    caller's arithmetic, not exchanged). Empty transfers are skipped, so a rank that needs
    nothing from a neighbour sends no message. Returns (from_prev, from_next).
    """
    from_prev = torch.empty(n_from_prev, dtype=to_prev.dtype, device=to_prev.device)
    from_next = torch.empty(n_from_next, dtype=to_prev.dtype, device=to_prev.device)
    if not dist.is_initialized() or world_size(group) == 1:
        assert not (to_prev.numel() or to_next.numel() or n_from_prev or n_from_next), "no neighbours to talk to"
        return from_prev, from_next
    me, size = rank(group), world_size(group)

    def peer(group_rank: int) -> int:
        return group_rank if group is None else dist.get_global_rank(group, group_rank)

    ops = []
    # Receives land in the fresh tensors above; sends read contiguous copies where needed.
    for tensor, other, op in ((to_prev.contiguous(), me - 1, dist.isend), (to_next.contiguous(), me + 1, dist.isend),
                              (from_prev, me - 1, dist.irecv), (from_next, me + 1, dist.irecv)):
        if tensor.numel() == 0:
            continue
        assert 0 <= other < size, f"rank {me} of {size} has no group rank {other} to exchange with"
        ops.append(op(tensor, peer(other), group=group))
    for op in ops:
        op.wait()
    return from_prev, from_next


def all_gather_object(obj, group=None) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj, src: int = 0, group=None):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


@dataclass(frozen=True)
class ParallelGroups:
    """The process groups of a DP x TP layout, passed explicitly to whoever needs them."""

    dp_group: object
    tp_group: object
    dp_rank: int
    dp_size: int
    tp_rank: int
    tp_size: int
    global_rank: int
    world_size: int


def parallel_groups(dims: ParallelDims | int) -> ParallelGroups:
    """The DP and TP groups that DeepSpeed created in ``deepspeed.initialize``, checked against
    the layout ``dims`` (or a TP degree, in this world).

    AutoTP builds a (data_parallel, tensor_parallel) mesh, so TP peers are consecutive ranks
    and share a data-parallel rank: they must and do see the same batches. Without tensor
    parallelism the data-parallel group is the whole world. The one place that reads DeepSpeed's
    global groups: everything else is handed the result.
    """
    from deepspeed.utils import groups

    if isinstance(dims, int):
        dims = ParallelDims(world_size(), dims)
    if dims.world != world_size():
        raise RuntimeError(f"the process group has {world_size()} ranks, the layout {dims.world}")
    if dims.tp > 1:
        tp_group = groups.get_tensor_model_parallel_group()
        tp_rank = groups.get_tensor_model_parallel_rank()
        dp_group = groups.get_data_parallel_group()
    else:
        tp_group, tp_rank, dp_group = None, 0, None
    out = ParallelGroups(dp_group=dp_group, tp_group=tp_group,
                         dp_rank=rank(dp_group), dp_size=world_size(dp_group),
                         tp_rank=tp_rank, tp_size=dims.tp,
                         global_rank=rank(), world_size=world_size())
    me = out.global_rank
    if ((world_size(tp_group) if dims.tp > 1 else 1), out.dp_size, out.tp_rank, out.dp_rank) != \
            (dims.tp, dims.dp, dims.tp_rank(me), dims.dp_rank(me)):
        raise RuntimeError(f"DeepSpeed's groups disagree with the layout {dims}: rank {me} is at DP {out.dp_rank} "
                           f"of {out.dp_size}, TP {out.tp_rank}")
    return out


def remove_shm_buffers() -> list[str]:
    """Delete the shared-memory all-reduce buffers DeepSpeed's CPU backend created for this job.

    deepspeed 0.19.8's CPU comm op maps one ~66 MB file per local rank into /dev/shm, named
    ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``, and never unlinks
    them: every launch would leave them behind in RAM-backed /dev/shm. Called when a process of
    the job exits (normally or on error); unlinking a file that another rank still has mapped
    does not disturb that rank. Returns the names removed.
    """
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    shm = Path("/dev/shm")
    if not addr or not port or not shm.is_dir():
        return []
    removed = []
    for path in shm.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_*"):
        try:
            path.unlink()
            removed.append(path.name)
        except FileNotFoundError:  # another rank of the job got there first
            pass
        except OSError as err:
            # Cleanup at exit must not turn a finished run into a failed one; say what is left.
            print(f"dist_sparse: could not remove {path}: {err.strerror}", file=sys.stderr)
    return removed

