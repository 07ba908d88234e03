"""The sparsifier in one process, without DeepSpeed: plain tensors for weights, threads for ranks.

Every mask decision can then be unit-tested in one process, through the very layouts, patterns
and selection that a run uses: only the two things below them are stood in for.

- ``FakeZero``: ``distributed.zero.ZeroAccess`` over plain tensors. Each simulated rank has its
  own module weights (fp32, or bf16 beside fp32 masters), its own copy of the fp32 masters of
  which it owns a part (ZeRO-1/2: its fragments of one flat buffer of all weights, cut in
  ``dp`` equal partitions, so a weight may be split anywhere or lie on one rank only; ZeRO-3:
  its flat slice of every weight), and the reduced gradient. Optimizer moments are not kept.
- ``FakeCollectives``: ``distributed.comm``'s collectives for one rank of a ``ThreadGroup``,
  a group of threads that meet at a barrier for every collective.

``FakeWorld(weights, dp=P, stage=S)`` builds P such ranks (tensor parallelism 1: the
data-parallel group is the world) and ``world.sparsifiers(cfg, max_steps)`` one ``Sparsifier``
per rank; ``world.run(fn)`` calls ``fn(rank)`` on all ranks at once. With ``dp=1`` it is the
unsliced reference, with ``dp>1`` the decisions run on slices or fragments and must give the
same masks bit for bit.
"""

from __future__ import annotations

import threading

import torch

from dist_sparse.distributed.comm import ParallelGroups
from dist_sparse.distributed.zero import LocalSlice, ring_all_reduce_bytes
from dist_sparse.sparsity.targets import Target

TIMEOUT_S = 60  # a simulated rank left waiting in a collective fails the test instead of hanging it


class ThreadGroup:
    """A process group of threads: a collective is every rank posting one value and reading all."""

    def __init__(self, size: int):
        self.size = size
        self._barrier = threading.Barrier(size, timeout=TIMEOUT_S)
        self._slots = [None] * size

    def exchange(self, rank: int, value) -> list:
        """Every rank's ``value``, in rank order, on every rank."""
        self._slots[rank] = value
        self._barrier.wait()
        everyone = list(self._slots)
        self._barrier.wait()  # everyone has read the slots before any rank posts the next value
        return everyone

    def run(self, fn) -> list:
        """``fn(rank)`` on every rank at once, in threads; the results in rank order. The first
        failure (by rank) is raised after every rank has stopped."""
        results, errors = [None] * self.size, [None] * self.size

        def body(rank):
            try:
                results[rank] = fn(rank)
            except BaseException as err:  # noqa: BLE001 - re-raised below, on the caller's thread
                errors[rank] = err
                self._barrier.abort()  # the others must not wait for this rank

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self._barrier.reset()
        failed = [e for e in errors if e is not None]
        # A rank that only saw the barrier break is a consequence: report the cause.
        causes = [e for e in failed if not isinstance(e, threading.BrokenBarrierError)] or failed
        if causes:
            raise causes[0]
        return results


class FakeCollectives:
    """The functions of ``distributed.comm`` that the sparsity code calls, for rank ``rank`` of
    ``group``. Every group argument (the data-parallel group, or None for the world) is
    ``group``: with tensor parallelism 1 they are the same ranks."""

    def __init__(self, group: ThreadGroup, rank: int):
        self.group = group
        self.me = rank

    def world_size(self, group=None) -> int:
        return self.group.size

    def rank(self, group=None) -> int:
        return self.me

    def all_reduce_sum_(self, tensor: torch.Tensor, group=None) -> torch.Tensor:
        everyone = self.group.exchange(self.me, tensor.clone())
        return tensor.copy_(torch.stack(everyone).sum(dim=0))

    def all_reduce_min_max(self, tensor: torch.Tensor, group=None):
        everyone = torch.stack(self.group.exchange(self.me, tensor.clone()))
        return everyone.amin(dim=0), everyone.amax(dim=0)

    def all_gather_cat(self, tensor: torch.Tensor, group=None, dim: int = 0) -> torch.Tensor:
        return torch.cat(self.group.exchange(self.me, tensor.clone()), dim=dim)

    def all_gather_object(self, obj, group=None) -> list:
        return self.group.exchange(self.me, obj)

    def exchange_with_neighbours(self, to_prev, to_next, n_from_prev: int, n_from_next: int, group=None):
        everyone = self.group.exchange(self.me, (to_prev.clone(), to_next.clone()))
        from_prev = everyone[self.me - 1][1] if self.me > 0 else to_prev[:0]
        from_next = everyone[self.me + 1][0] if self.me + 1 < self.group.size else to_next[:0]
        assert (from_prev.numel(), from_next.numel()) == (n_from_prev, n_from_next), "halo sizes disagree"
        return from_prev, from_next


def zero3_slice(numel: int, rank: int, dp: int) -> tuple[int, int]:
    """ZeRO-3's flat partition of a weight: ceil(numel / dp) elements a rank, the last short or empty."""
    part = -(-numel // dp)
    start = min(rank * part, numel)
    return start, min(start + part, numel)


def zero12_fragments(numels: list[int], rank: int, dp: int) -> list[tuple[int, int]]:
    """This rank's part of each weight when all of them, one after the other in one flat buffer,
    are cut into ``dp`` equal partitions (ZeRO-1/2's optimizer partitions); (0, 0) for none."""
    start, stop = zero3_slice(sum(numels), rank, dp)
    out, offset = [], 0
    for n in numels:
        lo, hi = max(start, offset), min(stop, offset + n)
        out.append((lo - offset, hi - offset) if lo < hi else (0, 0))
        offset += n
    return out


class FakeZero:
    """``ZeroAccess`` over plain tensors for one simulated rank (see the module docstring)."""

    def __init__(self, stage: int, rank: int, dp: int, collectives: FakeCollectives, targets: list[Target],
                 masters: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]):
        self.stage, self.dp_rank, self.dp_size = stage, rank, dp
        self.dp_group = collectives.group
        self.collectives = collectives
        self.bytes_applied = 0
        self._names = {id(t.param): t.name for t in targets}
        self._masters = masters  # name -> flat fp32, this rank's copy (it owns its part only)
        self._grads = grads      # name -> flat fp32 reduced gradient, this rank's copy
        fragments = zero12_fragments([t.shard_numel for t in targets], rank, dp)
        self._fragments = {t.name: f for t, f in zip(targets, fragments)}
        self._slices = {t.name: zero3_slice(t.shard_numel, rank, dp) for t in targets}

    @property
    def partitioned(self) -> bool:
        return self.stage == 3

    def _own(self, param) -> tuple[str, int, int]:
        """(name, start, stop) of the part of ``param`` this rank owns in the optimizer."""
        name = self._names[id(param)]
        start, stop = (self._slices if self.partitioned else self._fragments)[name]
        return name, start, stop

    def local_slice(self, param, shard_numel: int) -> LocalSlice:
        if self.partitioned:
            name, start, stop = self._own(param)
            return LocalSlice(self._masters[name][start:stop].clone(), start, stop)
        return LocalSlice(param.detach().flatten().float(), 0, shard_numel)

    def master_fragment(self, param, shard_numel: int) -> LocalSlice:
        name, start, stop = self._own(param)
        return LocalSlice(self._masters[name][start:stop].clone(), start, stop)

    def full_fp32(self, param) -> torch.Tensor:
        """Put together from every rank's own part, as DeepSpeed's all-reduce of fragments does."""
        name, start, stop = self._own(param)
        whole = torch.zeros_like(self._masters[name])
        for s, e, values in self.collectives.all_gather_object((start, stop, self._masters[name][start:stop].clone())):
            whole[s:e] = values
        return whole.view(param.shape)

    def apply_mask(self, param, mask: torch.Tensor, moments: bool) -> None:
        name, start, stop = self._own(param)
        keep = mask.reshape(-1)[start:stop]
        param.data.mul_(mask.to(param.dtype).view(param.shape))
        self._masters[name][start:stop] *= keep

    def apply_local_mask(self, param, local_mask: torch.Tensor, moments: bool) -> None:
        name, start, stop = self._own(param)
        self._masters[name][start:stop] *= local_mask
        param.data.view(-1)[start:stop] *= local_mask.to(param.dtype)

    def take_dense_grad(self, param, mask: torch.Tensor) -> torch.Tensor:
        name, start, stop = self._own(param)
        grad = self._grads[name]
        if self.partitioned:
            dense = grad[start:stop].clone()
            grad[start:stop] *= mask
            return dense
        self.bytes_applied += ring_all_reduce_bytes(grad.numel() * 4, self.dp_size)
        dense = grad.clone()
        grad *= mask.reshape(-1)
        return dense

    def take_grad_fragment(self, param, mask: torch.Tensor) -> LocalSlice:
        """This rank's fragment of the reduced gradient (no communication), then masked."""
        name, start, stop = self._own(param)
        fragment = self._grads[name][start:stop]
        values = fragment.clone()
        fragment *= mask.reshape(-1)[start:stop]
        return LocalSlice(values, start, stop)

    def padded_local_mask(self, param, local_mask: torch.Tensor) -> torch.Tensor:
        """In the gradient's dtype (fp32 here), as ZeRO-3's."""
        return local_mask.to(torch.float32)

    def local_grads(self, params: list) -> list:
        """Views of this rank's slices of the reduced gradients."""
        out = []
        for p in params:
            name, start, stop = self._own(p)
            out.append(self._grads[name][start:stop])
        return out

    def mask_local_grads(self, params: list, padded_masks: list) -> None:
        torch._foreach_mul_(self.local_grads(params), list(padded_masks))

    def gather_shard_masks(self, pieces, counter: list[int]) -> list[torch.Tensor]:
        everyone = self.collectives.all_gather_object([(start, stop, local.clone()) for local, start, stop, _ in pieces])
        counter[0] += sum((stop - start + 7) // 8 for rank in everyone for start, stop, _ in rank)
        outs = []
        for i, (_, _, _, shape) in enumerate(pieces):
            out = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
            for rank in everyone:
                start, stop, bits = rank[i]
                out[start:stop] = bits
            outs.append(out.view(shape))
        return outs

    def gather_shard_mask(self, local, start, stop, shard_shape, counter) -> torch.Tensor:
        return self.gather_shard_masks([(local, start, stop, shard_shape)], counter)[0]


class FakeWorld:
    """``dp`` simulated data-parallel ranks holding the same logical ``weights`` (name -> 2-D fp32
    tensor) under ZeRO ``stage``, with module weights of ``dtype``."""

    def __init__(self, weights: dict[str, torch.Tensor], dp: int = 1, stage: int = 2,
                 dtype: torch.dtype = torch.float32):
        self.names = sorted(weights)
        self.stage, self.dp, self.dtype = stage, dp, dtype
        self.group = ThreadGroup(dp)
        self.targets, self.zeros, self.collectives, self._masters, self._grads = [], [], [], [], []
        for rank in range(dp):
            targets = [Target(i, name, torch.nn.Parameter(weights[name].detach().clone().to(dtype)),
                              tuple(weights[name].shape), tuple(weights[name].shape), None, 0)
                       for i, name in enumerate(self.names)]
            masters = {name: weights[name].detach().float().flatten().clone() for name in self.names}
            grads = {name: torch.zeros(weights[name].numel()) for name in self.names}
            collectives = FakeCollectives(self.group, rank)
            self.targets.append(targets)
            self.collectives.append(collectives)
            self._masters.append(masters)
            self._grads.append(grads)
            self.zeros.append(FakeZero(stage, rank, dp, collectives, targets, masters, grads))

    def groups(self, rank: int) -> ParallelGroups:
        return ParallelGroups(dp_group=self.group, tp_group=None, dp_rank=rank, dp_size=self.dp, tp_rank=0,
                              tp_size=1, global_rank=rank, world_size=self.dp)

    def sparsifiers(self, cfg, max_steps: int) -> list:
        """One ``Sparsifier`` per rank (not prepared yet)."""
        from dist_sparse.sparsifier import Sparsifier

        return [Sparsifier(cfg, self.targets[r], self.zeros[r], self.groups(r), max_steps,
                           collectives=self.collectives[r]) for r in range(self.dp)]

    def run(self, fn) -> list:
        """``fn(rank)`` on every rank at once; the results in rank order."""
        return self.group.run(fn)

    def set_gradient(self, name: str, grad: torch.Tensor) -> None:
        """The reduced (data-parallel averaged) dense gradient every rank reads on RigL's update steps."""
        for grads in self._grads:
            grads[name].copy_(grad.detach().float().flatten())

    def master(self, name: str) -> torch.Tensor:
        """The fp32 master of ``name`` put together from the part each rank owns."""
        out = torch.zeros_like(self._masters[0][name])
        for zero, masters in zip(self.zeros, self._masters):
            start, stop = (zero._slices if zero.partitioned else zero._fragments)[name]
            out[start:stop] = masters[name][start:stop]
        return out.view(self.targets[0][self.names.index(name)].full_shape)
