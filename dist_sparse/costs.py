"""What a piece of code costs on the device, counted on any device: host syncs, kernels,
allocations, collectives.

A GPU step is fast only if the host never waits for the device and the device is not fed
thousands of tiny kernels. Those costs are invisible on a CPU, where the tests run, unless they
are counted at the level where they arise: which operations are dispatched, and what they do.
``count_costs()`` counts, for the code it wraps, on the calling thread:

- ``host_syncs``: operations that make the host wait for the device when their tensor lives on
  an accelerator. These are, at the dispatcher, the reads of a tensor's value into Python
  (``aten._local_scalar_dense``: ``item``, ``bool``, ``int``, ``float`` of a tensor), operations
  whose output size depends on the values (``nonzero``, ``masked_select``, ``unique``,
  ``repeat_interleave`` without ``output_size``, indexing by a boolean mask) and copies between
  devices; and, at the Python level, ``tolist``, ``numpy``, ``cpu`` and ``to("cpu")`` of *any*
  tensor. The last are counted even when the tensor already is on the CPU, so that a CPU run
  sees the crossings a GPU run would pay for: a hot path keeps its host-side bookkeeping in
  Python numbers, not in tensors it converts. (On a GPU, ``torch.cuda.set_sync_debug_mode`` is
  the ground truth; the GPU tests use it.)
- ``kernels``: dispatched operations that are not views or metadata: a proxy for kernel
  launches (a fused or foreach kernel counts once, as it launches once or a few times).
- ``allocations`` / ``allocated_bytes``: new tensors returned by those operations.
- ``collectives`` / ``collective_bytes``: calls of torch.distributed collectives (ours through
  ``distributed.comm`` and DeepSpeed's alike) and the payload this rank passes in.

``Costs.ops`` and ``Costs.sync_ops`` keep per-operation counts, so a failing assertion can say
where the cost comes from. Counting adds Python work per operation: never leave it on in training.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Operations whose output size, or the Python value they return, is only known once the device
# has computed it: on CUDA each one waits for the stream.
_VALUE_DEPENDENT = {
    aten._local_scalar_dense.default, aten.nonzero.default, aten.nonzero_static.default,
    aten.masked_select.default, aten.is_nonzero.default, aten.equal.default,
    aten._unique.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
}
# Metadata and aliasing: no kernel, no new memory.
_NO_KERNEL = {aten.detach.default, aten.lift_fresh.default, aten.alias.default, aten.set_.source_Tensor}
# Python-level crossings to the host (see the module docstring).
_HOST_METHODS = {"tolist", "numpy", "cpu"}
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
                "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "all_to_all", "all_to_all_single",
                "reduce", "gather", "scatter", "barrier", "send", "recv", "isend", "irecv")


@dataclass
class Costs:
    host_syncs: int = 0
    kernels: int = 0
    allocations: int = 0
    allocated_bytes: int = 0
    collectives: int = 0
    collective_bytes: int = 0
    ops: Counter = field(default_factory=Counter)       # kernels per operation name
    sync_ops: Counter = field(default_factory=Counter)  # host syncs per operation name
    collective_ops: Counter = field(default_factory=Counter)
    _crossing: bool = field(default=False, repr=False)

    def summary(self) -> str:
        return (f"host_syncs={self.host_syncs} {dict(self.sync_ops)}, kernels={self.kernels}, "
                f"allocations={self.allocations} ({self.allocated_bytes} B), collectives={self.collectives} "
                f"({self.collective_bytes} B) {dict(self.collective_ops)}")


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _is_sync(func, args, kwargs) -> bool:
    if func in _VALUE_DEPENDENT:
        return True
    if func is aten.repeat_interleave.Tensor or func is aten.repeat_interleave.self_Tensor:
        return kwargs.get("output_size") is None
    if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)
    if func in (aten._to_copy.default, aten.copy_.default):
        devices = {t.device.type for t in _tensors((args, kwargs))}
        target = kwargs.get("device")
        if target is not None:
            devices.add(torch.device(target).type)
        return len(devices) > 1
    return False


class _Dispatch(TorchDispatchMode):
    def __init__(self, costs: Costs):
        super().__init__()
        self.costs = costs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.costs
        if not c._crossing and _is_sync(func, args, kwargs):
            c.host_syncs += 1
            c.sync_ops[str(func.overloadpacket.__name__)] += 1
        out = func(*args, **kwargs)
        returns = func._schema.returns
        aliasing = any(r.alias_info is not None for r in returns)
        if func not in _NO_KERNEL and not (aliasing and not any(r.alias_info.is_write for r in returns
                                                                 if r.alias_info is not None)):
            c.kernels += 1
            c.ops[str(func.overloadpacket.__name__)] += 1
        if not aliasing:
            for t in _tensors(out):
                c.allocations += 1
                c.allocated_bytes += _nbytes(t)
        return out


class _Function(TorchFunctionMode):
    def __init__(self, costs: Costs):
        super().__init__()
        self.costs = costs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        to_host = name in _HOST_METHODS or (name == "to" and _targets_cpu(args, kwargs))
        if not (to_host and args and isinstance(args[0], torch.Tensor)) or self.costs._crossing:
            return func(*args, **kwargs)
        self.costs.host_syncs += 1
        self.costs.sync_ops[name] += 1
        self.costs._crossing = True  # the copy it dispatches is this crossing, not another
        try:
            return func(*args, **kwargs)
        finally:
            self.costs._crossing = False


def _targets_cpu(args, kwargs) -> bool:
    target = kwargs.get("device")
    for a in args[1:]:
        if isinstance(a, (str, torch.device)):
            target = a
    try:
        return target is not None and torch.device(target).type == "cpu"
    except (RuntimeError, TypeError):
        return False


# torch.distributed is patched once for all counters alive, in any thread (the one-process fake
# layout runs ranks as threads), and restored when the last one exits; a call is counted by the
# counters of the thread that makes it.
_lock = threading.Lock()
_active: dict[int, list[Costs]] = {}
_saved: dict[str, object] = {}


def _wrap(name, fn):
    def counted(*args, **kwargs):
        mine = _active.get(threading.get_ident(), ())
        if mine:
            first = args[0] if args else None
            if name in ("all_gather", "gather", "scatter"):
                first = args[1] if len(args) > 1 else kwargs.get("tensor")
            elif name in ("all_gather_into_tensor", "reduce_scatter_tensor"):
                first = args[1] if len(args) > 1 else kwargs.get("input_tensor", kwargs.get("input"))
            payload = sum(_nbytes(t) for t in _tensors(first))
            for costs in mine:
                costs.collectives += 1
                costs.collective_ops[name] += 1
                costs.collective_bytes += payload
        return fn(*args, **kwargs)
    counted.__name__ = name
    return counted


@contextlib.contextmanager
def _counting_collectives(costs: Costs):
    """Count torch.distributed's collectives (what deepspeed.comm calls too) for the duration."""
    import torch.distributed as dist

    me = threading.get_ident()
    with _lock:
        if not any(_active.values()):
            for name in _COLLECTIVES:
                fn = getattr(dist, name, None)
                if fn is not None:
                    _saved[name] = fn
                    setattr(dist, name, _wrap(name, fn))
        _active.setdefault(me, []).append(costs)
    try:
        yield
    finally:
        with _lock:
            _active[me].remove(costs)
            if not _active[me]:
                del _active[me]
            if not _active:
                for name, fn in _saved.items():
                    setattr(dist, name, fn)
                _saved.clear()


@contextlib.contextmanager
def count_costs():
    """Count the costs of the code run inside (see the module docstring); yields a ``Costs``
    that is complete when the block exits."""
    costs = Costs()
    with _counting_collectives(costs), _Function(costs), _Dispatch(costs):
        yield costs
