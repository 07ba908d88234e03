"""The one module that touches ZeRO state, through deepspeed.utils' public fragment API.

What a mask update needs from ZeRO:
- the values the decision is made on, identical wherever they are read: under ZeRO-1/2 every
  data-parallel rank holds the whole (TP-shard of the) module weight; under ZeRO-3 each holds a
  flat slice of it, read as fp32 with ``safe_get_local_fp32_param``;
- a way to make pruned weights exactly zero everywhere they live: the module weight, the fp32
  master copy and the optimizer moments. ZeRO-3 has local setters for its slices. ZeRO-1/2
  has only full-tensor getters (an all-reduce over the DP group each); but every rank holds
  the whole mask there, so each zeroes its own fragments of the master and the moments in
  place, through the fragment views DeepSpeed's setters use: no communication. RigL's
  gradient is read the same way, each rank its fragment of the reduced gradient; only N:M,
  which decides on whole shards, still reads it whole (counted in ``bytes_applied``);
- no host synchronisation per tensor in the step: ZeRO-3's local getters and setters wait for
  the reduce stream on every call, so the gradient partitions, master partitions and moments
  are reached through the views those calls read (``local_grads``, ``_z3_state``).

Every DeepSpeed internal read here is named, with the deepspeed 0.19.8 routine it stands in
for, in the docstring of the one function that reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_grad, safe_get_full_optimizer_state,
                             safe_set_full_grad,
                             safe_get_local_fp32_param, safe_get_local_grad, safe_get_local_optimizer_state,
                             safe_set_full_fp32_param, safe_set_full_optimizer_state,
                             safe_set_local_fp32_param, safe_set_local_grad,
                             safe_set_local_optimizer_state)

from dist_sparse.distributed import comm

# The moments of Adam, AdamW and LAMB (DeepSpeed's and ours use the same names).
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


@dataclass
class LocalSlice:
    """This rank's elements of a target: flat positions [start, stop) of its TP shard."""

    values: torch.Tensor  # fp32, 1-D, stop - start elements
    start: int
    stop: int


def link_optimizer_state(zero_optimizer, stage: int) -> None:
    """Make the fragment API see the optimizer state of every parameter (ZeRO-1/2).

    ZeRO-1/2 link each parameter's fragment to its optimizer state lazily, right after the
    optimizer step of the *first* param group, and never again (deepspeed 0.19.8,
    ``stage_1_and_2._optimizer_step``). With one param group per tensor (our layer-wise LAMB)
    only the first tensor gets linked and ``safe_get_full_optimizer_state`` fails for all others.
    The trainer calls this after an engine's first optimizer step and after loading a checkpoint;
    the shrink after creating state outside a step (``Lamb.init_state``). DeepSpeed has no public
    call for it, so this re-runs its own linking routine. ZeRO-3 reads the state directly.
    """
    if stage not in (1, 2):
        return
    link = getattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is None or not hasattr(zero_optimizer, "_hp_optimizer_states_linked"):
        raise RuntimeError("this DeepSpeed version's ZeRO-1/2 optimizer has no optimizer-state linking "
                           "routine; dist_sparse needs deepspeed 0.19.x")
    if not zero_optimizer.optimizer.state:
        return  # no state before the first step: nothing to link yet
    zero_optimizer._hp_optimizer_states_linked = False
    link()


def _fragment(param: torch.nn.Parameter):
    """(mapping, start, stop) of the part of ``param`` this rank's ZeRO-1/2 optimizer partition
    owns, flat positions [start, stop) of the (TP-shard) tensor; (None, 0, 0) if none.

    DeepSpeed keeps it in ``param._hp_mapping`` (``deepspeed.utils.tensor_fragment``): the fp32
    master and moment fragments are views into the optimizer's flat partitions, which is what
    its full-tensor getters and setters read and write. No public call exposes the local part.
    """
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None, 0, 0
    address = mapping.lp_fragment_address
    return mapping, int(address.start), int(address.start + address.numel)


def on(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tensor`` on ``device`` (and in ``dtype``), copied only where it is not: a copy between
    devices waits for the device, and the cost counter counts every ``to(device)``."""
    if tensor.device != device:
        tensor = tensor.to(device)
    return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)


def ring_all_reduce_bytes(payload_bytes: int, ranks: int) -> int:
    """Bytes one rank sends in a ring all-reduce of ``payload_bytes``: 2 (p - 1) / p of them
    (a reduce-scatter and an all-gather, each passing p - 1 of p chunks); 0 for one rank."""
    return 2 * (ranks - 1) * payload_bytes // ranks if ranks > 1 else 0


def _z3_swapping(params: list) -> bool:
    """Whether ZeRO-3 swaps the optimizer partitions of any of ``params`` to NVMe (deepspeed
    0.19.8 ``DeepSpeedZeroOptimizer_Stage3._swappable_optimizer_subgroup``): their gradient and
    master partitions are then only reachable through the public getters and setters."""
    opt = params[0]._z3_optimizer
    return any(opt._swappable_optimizer_subgroup(opt.grad_position[opt.get_param_id(p)][0]) for p in params)


@dataclass
class ZeroAccess:
    stage: int
    dp_group: object
    dp_rank: int
    dp_size: int
    bytes_applied: int = field(default=0)

    @property
    def partitioned(self) -> bool:
        """Whether a rank holds only a slice of each parameter (ZeRO-3)."""
        return self.stage == 3

    def local_slice(self, param: torch.nn.Parameter, shard_numel: int) -> LocalSlice:
        if self.partitioned:
            view = self._z3_state(param)  # what safe_get_local_fp32_param reads, without its wait
            flat = (view if view is not None else safe_get_local_fp32_param(param)).detach().flatten().float()
            start = min(self.dp_rank * flat.numel(), shard_numel)
            stop = min(start + flat.numel(), shard_numel)
            return LocalSlice(flat[: stop - start], start, stop)
        return LocalSlice(param.detach().flatten().float(), 0, shard_numel)

    def master_fragment(self, param: torch.nn.Parameter, shard_numel: int) -> LocalSlice:
        """ZeRO-1/2: this rank's fragment of the fp32 master of ``param``: the flat positions
        [start, stop) of its TP shard that this rank's optimizer partition owns (possibly none).

        The fragment API has whole-tensor getters only for ZeRO-1/2 (an fp32 all-reduce each);
        this reads the local view (``_fragment``) without communication. Fragments of one
        parameter are disjoint over the data-parallel ranks and together cover it.
        """
        assert not self.partitioned, "ZeRO-3 slices: use local_slice"
        mapping, start, stop = _fragment(param)
        if mapping is None:
            return LocalSlice(torch.zeros(0, dtype=torch.float32, device=param.device), 0, 0)
        values = mapping.get_hp_fragment().detach().flatten().float()
        assert values.numel() == stop - start and stop <= shard_numel, "unexpected ZeRO fragment layout"
        return LocalSlice(values, start, stop)

    def apply_mask(self, param: torch.nn.Parameter, mask: torch.Tensor, moments: bool) -> None:
        """Zero ``param`` where ``mask`` (its TP-shard shape) is False, in every copy ZeRO keeps.

        ZeRO-1/2: every rank holds the whole mask, so it zeroes the module weight, and in place,
        its own fragment of the fp32 master and of each moment (``_hp_mapping``'s views into the
        optimizer's flat partitions, what the full-tensor setters write into): no communication.
        ``moments``: whether the optimizer has state yet (not before its first step).
        """
        assert not self.partitioned, "ZeRO-3 masks are slices: use apply_local_mask"
        param.data.mul_(on(mask, param.device, param.dtype))
        mapping, start, stop = _fragment(param)
        if mapping is None:
            return  # no part of this parameter lives in this rank's optimizer partition
        keep = mask.reshape(-1)[start:stop]
        targets = [mapping.get_hp_fragment()]
        for key in MOMENT_KEYS if moments else ():
            if key not in mapping.get_optim_state_keys():  # an internal fault, not bad input
                raise RuntimeError(f"{key} not found in optimizer state fragment (optimizer state not linked?)")
            targets.append(mapping.get_hp_fragment(key))
        for fragment in targets:
            fragment.data.mul_(on(keep, fragment.device, fragment.dtype).view_as(fragment))

    def _padded_local(self, param, local_mask: torch.Tensor) -> torch.Tensor:
        """The local mask slice padded to ZeRO-3's partition size (padding is pruned: it is zero),
        on the partition's device."""
        part = param.ds_tensor
        local = torch.zeros(part.numel(), dtype=torch.bool, device=part.device)
        local[: local_mask.numel()] = on(local_mask, part.device)
        return local

    def _z3_state(self, param, key: str | None = None) -> torch.Tensor:
        """ZeRO-3: a view of this rank's fp32 master partition of ``param`` (``key``: of an
        optimizer moment), to write in place.

        ``safe_get_local_fp32_param`` / ``safe_get_local_optimizer_state`` synchronise the host
        with the reduce stream and return copies for the matching setters (deepspeed 0.19.8,
        ``DeepSpeedZeroOptimizer_Stage3._get_fp32_opt_state_partition``); masking every sparse
        weight at an install would wait once per tensor. The views they copy from are
        ``fp32_partitioned_groups_flat[group]`` (and ``optimizer.state[that][key]``) narrowed to
        ``grad_position[param_id]``; the reduce stream writes gradients only, which this does not
        touch. With NVMe swapping the public calls are used instead (None here).
        """
        opt = param._z3_optimizer
        group, offset, numel = opt.grad_position[opt.get_param_id(param)]
        if opt._swappable_optimizer_subgroup(group):
            return None
        flat = opt.fp32_partitioned_groups_flat[group]
        if key is not None:
            flat = opt.optimizer.state[flat][key]
        # ``.data``: the master partition is a leaf the optimizer steps on; this write is no
        # step of the autograd graph (the setters copy into ``.data`` likewise)
        return flat.data.narrow(0, offset, numel)

    def apply_local_mask(self, param, local_mask: torch.Tensor, moments: bool) -> None:
        """ZeRO-3: zero this rank's slice of ``param`` where its slice mask is False, in the fp32
        master, the low-precision partition and the moments, in place. No communication, no
        host synchronisation."""
        local = self._padded_local(param, local_mask)
        # The low-precision partition that the next all-gather serves to the forward pass.
        param.ds_tensor.data.mul_(local.view_as(param.ds_tensor).to(param.ds_tensor.dtype))
        for key in (None, *MOMENT_KEYS) if moments else (None,):
            view = self._z3_state(param, key)
            if view is not None:
                view.mul_(on(local[: view.numel()], view.device, view.dtype).view_as(view))
            elif key is None:  # swapped to NVMe: through the public copies
                flat = safe_get_local_fp32_param(param)
                safe_set_local_fp32_param(param, flat * local.view_as(flat))
            else:
                state = safe_get_local_optimizer_state(param, key)
                safe_set_local_optimizer_state(param, state * local.view_as(state), key)

    def take_dense_grad(self, param, mask: torch.Tensor) -> torch.Tensor:
        """The reduced (data-parallel averaged) dense gradient of this rank's elements, flat fp32
        on the gradient's device; the gradient ZeRO keeps is masked on the way out.

        ZeRO-3 reads its local partition; ZeRO-1/2 reads the whole gradient (an fp32 all-reduce,
        counted in ``bytes_applied``), for patterns that decide on whole shards (N:M); the other
        patterns read this rank's fragment only (``take_grad_fragment``).
        """
        if self.partitioned:
            grad = self.local_grads([param])[0]
            if grad is None:
                raise RuntimeError(f"ZeRO-3 holds no gradient for a sparse weight of shape {tuple(mask.shape)}")
            dense = grad.detach().flatten()[: mask.numel()].float().clone()
            grad.mul_(self._padded_local(param, mask).view_as(grad).to(grad.dtype))
            return dense
        grad = safe_get_full_grad(param)
        self.bytes_applied += ring_all_reduce_bytes(grad.numel() * 4, self.dp_size)
        masked = grad * on(mask, grad.device, grad.dtype).view_as(grad)
        hp_grad = getattr(param, "_hp_grad", None)
        if hp_grad is not None:
            # DeepSpeed's BF16_Optimizer (ZeRO-1, bf16 weights, fp32 gradient accumulation) steps on
            # a whole fp32 accumulation buffer per parameter, which ``safe_set_full_grad`` misses:
            # it writes the bf16 staging ``param.grad`` when one exists (deepspeed 0.19.8). Every
            # rank writes the same whole reduced value into the buffer the step reads.
            hp_grad.copy_(masked.view_as(hp_grad))
        else:
            safe_set_full_grad(param, masked)
        return grad.detach().flatten().float()

    def take_grad_fragment(self, param, mask: torch.Tensor) -> LocalSlice:
        """ZeRO-1/2: this rank's fragment of the reduced gradient of ``param`` (flat positions
        [start, stop) of its TP shard, the same as ``master_fragment``'s), fp32, a copy; then
        zeroes the pruned entries of the gradient the optimizer reads. No communication.

        ZeRO-1/2 keep the reduced gradient of a parameter's fragment in the optimizer's gradient
        dict (``_hp_mapping.get_lp_grad_fragment(param._index_in_param_group)``: a view the
        full-gradient getter reads and ``set_full_hp_grad`` writes, deepspeed 0.19.8). With
        BF16_Optimizer that entry is the whole fp32 accumulation buffer of the parameter,
        reduced on every rank (``param._hp_grad``): the fragment is cut from it, and the whole
        buffer is masked, as ``take_dense_grad`` writes it. ``mask``: the whole shard mask.
        """
        assert not self.partitioned, "ZeRO-3 slices: use take_dense_grad"
        mapping, start, stop = _fragment(param)
        if mapping is None:
            hp_grad = getattr(param, "_hp_grad", None)
            if hp_grad is not None:  # BF16_Optimizer: this rank's whole buffer, masked as before
                hp_grad.mul_(on(mask, hp_grad.device, hp_grad.dtype).view_as(hp_grad))
            return LocalSlice(torch.zeros(0, dtype=torch.float32, device=mask.device), 0, 0)
        grad = mapping.get_lp_grad_fragment(param._index_in_param_group)
        flat_mask = mask.reshape(-1)
        if grad.numel() == param.numel() and stop - start != param.numel():
            values = grad.reshape(-1)[start:stop].float().clone()   # BF16_Optimizer's whole buffer
            grad.mul_(on(flat_mask, grad.device, grad.dtype).view_as(grad))
        else:
            values = grad.reshape(-1).float().clone()
            grad.mul_(on(flat_mask[start:stop], grad.device, grad.dtype).view_as(grad))
        assert values.numel() == stop - start, "unexpected ZeRO gradient fragment layout"
        return LocalSlice(values, start, stop)

    def padded_local_mask(self, param, local_mask: torch.Tensor) -> torch.Tensor:
        """ZeRO-3: the slice mask as the gradient partition's dtype, size and device, ready to
        multiply it (computed once per install; the padding is pruned: zero)."""
        grad = self.local_grads([param])[0]
        local = self._padded_local(param, local_mask)
        if grad is None:
            return local
        return on(local, grad.device, grad.dtype).view_as(grad)

    def local_grads(self, params: list) -> list:
        """ZeRO-3: views of this rank's reduced gradient partitions of ``params`` (None where a
        parameter has none), after one wait for the stream that writes them.

        ``safe_get_local_grad`` / ``safe_set_local_grad`` synchronise the host with ZeRO-3's
        ``reduce_and_partition_stream`` on every call and copy the partition (deepspeed 0.19.8,
        ``DeepSpeedZeroOptimizer_Stage3._get_fp32_grad_state_partition``); a masking pass over
        every sparse weight then costs a host synchronisation per tensor. This reads what they
        read, once: the partitions are views into the optimizer's ``grad_partitions_flat_buffer``
        (``__param_id_to_grad_partition[param.ds_id]``), or with optimizer offload into
        ``fp32_partitioned_groups_flat[group].grad`` at ``grad_position``; writes into the views
        are what the optimizer step reads. The current stream waits for the reduce stream on the
        device (no host wait). With NVMe swapping the public calls are used instead.
        """
        if not params:
            return []
        if _z3_swapping(params):  # copies, not views: see mask_local_grads
            return [safe_get_local_grad(p) for p in params]
        opt = params[0]._z3_optimizer
        from deepspeed.accelerator import get_accelerator

        accel = get_accelerator()
        if not accel.resolves_data_dependency():
            accel.current_stream().wait_stream(opt.reduce_and_partition_stream)
        by_id = opt._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition
        out = []
        for p in params:
            if not p.requires_grad:
                out.append(None)
            elif opt.offload_optimizer:
                group, offset, numel = opt.grad_position[opt.get_param_id(p)]
                out.append(opt.fp32_partitioned_groups_flat[group].grad.narrow(0, offset, numel))
            else:
                out.append(by_id[p.ds_id])
        return out

    def mask_local_grads(self, params: list, padded_masks: list) -> None:
        """ZeRO-3: zero pruned entries of this rank's reduced gradient partitions in place: one
        wait for the reduce stream and one fused multiply over every partition (``padded_masks``
        from ``padded_local_mask``)."""
        grads = self.local_grads(params)
        if params and _z3_swapping(params):  # NVMe-swapped partitions: the public copies, set back
            for p, g, m in zip(params, grads, padded_masks):
                if g is not None:
                    safe_set_local_grad(p, g * on(m, g.device, g.dtype).view_as(g))
            return
        pairs = [(g, m) for g, m in zip(grads, padded_masks) if g is not None]
        if pairs:
            torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])

    def mask_local_grad(self, param, padded_mask: torch.Tensor) -> None:
        """ZeRO-3: zero pruned entries of one reduced gradient partition (``mask_local_grads``)."""
        self.mask_local_grads([param], [padded_mask])

    def gather_shard_mask(self, local: torch.Tensor, start: int, stop: int, shard_shape: tuple[int, int],
                          counter: list[int]) -> torch.Tensor:
        """The whole TP-shard mask from each DP rank's slice; see ``gather_shard_masks``."""
        return self.gather_shard_masks([(local, start, stop, shard_shape)], counter)[0]

    def gather_shard_masks(self, pieces: list[tuple[torch.Tensor, int, int, tuple[int, int]]],
                           counter: list[int]) -> list[torch.Tensor]:
        """Whole TP-shard masks from each DP rank's slices ``(local, start, stop, shard_shape)``,
        all weights in one exchange of packed bits (1 bit per weight; ``counter`` gets the bytes
        this rank receives). ZeRO-3: for inspection and export, training never needs it. ZeRO-1/2
        with low-precision weights: masks decided on fp32 master fragments are put together this
        way after every update, every rank holding whole shard masks afterwards."""
        device = pieces[0][0].device if pieces else torch.device("cpu")
        outs = [torch.zeros(shape[0] * shape[1], dtype=torch.bool, device=device) for _, _, _, shape in pieces]
        if self.dp_size == 1:
            for out, (local, start, stop, _) in zip(outs, pieces):
                out[start:stop] = on(local.reshape(-1), device)
            return [out.view(shape) for out, (_, _, _, shape) in zip(outs, pieces)]
        everyone = self._piece_bounds([(start, stop) for _, start, stop, _ in pieces])
        # This rank's bits of every piece, one after the other, padded to the longest rank's
        # total (a multiple of 8), packed where they are and gathered in one all-gather.
        longest = max(sum(e - s for s, e in bounds) for bounds in everyone)
        longest += -longest % 8
        mine = torch.zeros(longest, dtype=torch.bool, device=device)
        offset = 0
        for local, start, stop, _ in pieces:
            mine[offset:offset + stop - start] = on(local.reshape(-1), device)
            offset += stop - start
        weights = torch.pow(2, torch.arange(7, -1, -1, device=device)).to(torch.uint8)  # MSB first
        packed = (mine.view(-1, 8).to(torch.uint8) * weights).sum(dim=1, dtype=torch.uint8)
        gathered = comm.all_gather_cat(packed, self.dp_group).view(len(everyone), -1)
        counter[0] += gathered.numel()
        bits = ((gathered.unsqueeze(-1) & weights) != 0).view(len(everyone), -1)
        for rank, bounds in enumerate(everyone):
            offset = 0
            for out, (s, e) in zip(outs, bounds):
                out[s:e] = bits[rank, offset:offset + e - s]
                offset += e - s
        return [out.view(shape) for out, (_, _, _, shape) in zip(outs, pieces)]

    def _piece_bounds(self, mine: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
        """Every DP rank's [start, stop) of every piece, in rank order: one object all-gather per
        call (per mask update, not per step). Not cached: a cache each rank checks against its
        own bounds could let one rank skip the exchange that another makes (after a shrink)."""
        return [list(map(tuple, b)) for b in comm.all_gather_object([list(b) for b in mine], self.dp_group)]

    # -- structured pruning: whole-tensor reads and writes ------------------------------------------

    def full_fp32(self, param) -> torch.Tensor:
        """The fp32 master value of ``param`` (its whole TP shard), identical on every DP rank.
        A collective over the DP group at every stage: all ranks call it in the same order."""
        return safe_get_full_fp32_param(param).detach().float()

    def set_full_fp32(self, param, value: torch.Tensor) -> None:
        """Each rank copies its own fragment of ``value`` into the fp32 master of ``param``."""
        safe_set_full_fp32_param(param, value)

    def full_state(self, param, key: str) -> torch.Tensor:
        """An optimizer moment of ``param`` (whole TP shard); a collective, as ``full_fp32``."""
        return safe_get_full_optimizer_state(param, key).detach().float()

    def set_full_state(self, param, value: torch.Tensor, key: str) -> None:
        """Each rank copies its own fragment of ``value`` into the optimizer state of ``param``."""
        safe_set_full_optimizer_state(param, value, key)
