"""The CUDA branches, on a GPU (skipped without one): the mixed gloo/NCCL process group, where the
masks live and that the gradient hook never waits for the device, a bf16 sparse step with exact
zeros in weights, fp32 masters and LAMB moments, and ``costs.count_costs`` against CUDA's own
synchronisation detector (``torch.cuda.set_sync_debug_mode``) on a LAMB step and a mask update.

Written against the public APIs (``Sparsifier``, ``build_engine``, ``Trainer`` and its
components, ``Lamb``, ``count_costs``), so that they hold while those change inside. One process,
a world of one on a fresh port; engines on bert-tiny, bf16, LAMB, ZeRO-2 (the shipped BERT-large
config with a small micro batch), as the GPU suite runs them.

    pytest -q tests/gpu          # on a machine with CUDA
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "ds_configs" / "bert_large_phase1_seq128_zero2.json"
VOCAB, SEQ, BATCH = 512, 32, 4

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU (tests the CUDA branches: NCCL, device masks, bf16)")]


@pytest.fixture(scope="module")
def world():
    """torch.distributed for this process as a world of one, with the project's CUDA backend
    config (gloo for CPU tensors, NCCL for CUDA tensors)."""
    import socket

    from dist_sparse.distributed import comm

    if not comm.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                     ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
            os.environ.setdefault(k, v)
        comm.init("cpu:gloo,cuda:nccl")
    torch.cuda.set_device(comm.local_rank())
    return comm


def sparse_setup(world, *, method: str, interval: int = 2, sparsify_step: bool = True):
    """(engine, sparsifier, trainer) of bert-tiny, bf16 LAMB ZeRO-2, 90% ERK. With
    ``sparsify_step=False`` the trainer runs the sparsifier's before-step and gradient hooks but
    not ``Sparsifier.step`` (the mask update), which the test then calls itself."""
    from dist_sparse.config import parse_run_config
    from dist_sparse.model.presets import build_config, build_model
    from dist_sparse.train.components import Component
    from dist_sparse.train.engine import build_engine
    from dist_sparse.train.sparse import SparsityComponent, build_sparsifier
    from dist_sparse.train.trainer import Trainer

    raw = json.loads(CONFIG.read_text())
    raw.update(train_micro_batch_size_per_gpu=BATCH, gradient_accumulation_steps=1)
    raw.pop("train_batch_size", None)
    raw["sparsity"] = {"method": method, "sparsity": 0.9, "distribution": "erk", "update_interval": interval,
                       "seed": 1}
    run_cfg = parse_run_config(raw, source="tests/gpu")
    cfg = build_config("bert-tiny", vocab_size=VOCAB, max_position_embeddings=512)
    torch.manual_seed(0)
    engine = build_engine(build_model(cfg), run_cfg, lr_lambda=lambda step: 1.0)
    engine.train()
    groups = world.parallel_groups(1)
    sp = build_sparsifier(engine, run_cfg, groups, 10_000)
    sp.prepare(draw=True)

    class Hooks(Component):  # the sparsity component's hooks without the update
        def on_step_begin(self, trainer, step):
            sp.before_step(step)

        def on_before_optimizer_step(self, trainer, step):
            sp.mask_gradients()

    part = (SparsityComponent(None, seq_len=SEQ, tokens_per_step=BATCH * SEQ, sparsifier=sp) if sparsify_step
            else Hooks())
    trainer = Trainer(engine, cfg, groups, zero_stage=2, components=[part])
    return engine, sp, trainer


def batch(step: int, device) -> dict:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.where(torch.rand(BATCH, SEQ, generator=g) < 0.15, ids, torch.full_like(ids, -100))
    labels[:, 0] = ids[:, 0]  # at least one label per sequence
    b = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": torch.ones_like(ids),
         "labels": labels, "next_sentence_label": torch.randint(0, 2, (BATCH,), generator=g)}
    return {k: v.to(device) for k, v in b.items()}


@contextlib.contextmanager
def cuda_syncs():
    """The synchronising CUDA calls of the block, as CUDA's detector reports them (one warning
    each in "warn" mode): yields a list that holds their messages when the block exits."""
    torch.cuda.synchronize()
    found: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found.extend(str(w.message) for w in caught if "synchroniz" in str(w.message).lower())


def test_mixed_gloo_nccl_group_reduces_cpu_and_cuda_tensors(world):
    from dist_sparse.distributed.startup import backend_devices

    assert backend_devices(torch.distributed.get_backend_config()) == {"cpu": "gloo", "cuda": "nccl"}
    cpu = torch.arange(5, dtype=torch.float64)
    gpu = torch.arange(5, dtype=torch.float32, device="cuda") * 3
    world.all_reduce_sum_(cpu)   # gloo
    world.all_reduce_sum_(gpu)   # NCCL
    # a world of one: the sum is the tensor itself, and each stays on its device
    assert cpu.device.type == "cpu" and torch.equal(cpu, torch.arange(5, dtype=torch.float64))
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), torch.arange(5, dtype=torch.float32) * 3)
    assert world.all_gather_object({"rank": world.rank()}) == [{"rank": 0}]  # gloo, objects


def test_masks_live_on_the_parameters_device_after_install(world):
    engine, sp, _ = sparse_setup(world, method="static")
    try:
        assert sp.targets
        wrong = {t.name: (str(sp.masks[t.name].device), str(t.param.device)) for t in sp.targets
                 if sp.masks[t.name].device != t.param.device}
        assert sp.targets[0].param.device.type == "cuda"
        assert wrong == {}, f"masks not on their parameter's device: {dict(list(wrong.items())[:3])}"
    finally:
        sp.remove_hooks()


def test_gradient_hook_masks_without_a_host_sync(world):
    """ZeRO-1/2's per-step work of a fixed mask is the gradient hook: it must never wait for the
    device. torch.autograd.grad with the weight as input runs the tensor's hooks (ours) and not
    DeepSpeed's gradient-accumulation hooks, so the sync detector sees only our code."""
    engine, sp, _ = sparse_setup(world, method="static")
    try:
        for t in sp.targets[:4]:
            g = torch.randn(t.param.shape, device=t.param.device)
            for _ in range(2):  # the first call may place the mask; the second is the steady state
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    (grad,) = torch.autograd.grad((t.param.float() * g).sum(), t.param)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            mask = sp.shard_mask(t.name).to(grad.device).view(grad.shape)
            assert torch.equal(grad, g.to(grad.dtype).masked_fill(~mask, 0)), t.name
    finally:
        sp.remove_hooks()


def test_bf16_sparse_steps_keep_exact_zeros_in_weights_masters_and_moments(world):
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    engine, sp, trainer = sparse_setup(world, method="rigl", interval=2)
    try:
        updates = 0
        for step in range(1, 6):
            trainer.train_step([batch(step, engine.device)], step)
            updates += trainer.components[0].last_update is not None
        assert updates == 2  # steps 2 and 4
        for t in sp.targets:
            pruned = ~sp.shard_mask(t.name).to(t.param.device).reshape(-1)
            master = safe_get_full_fp32_param(t.param)
            assert t.param.dtype == torch.bfloat16 and master.dtype == torch.float32
            for what, x in (("weight", t.param.detach()), ("master", master),
                            ("exp_avg", safe_get_full_optimizer_state(t.param, "exp_avg")),
                            ("exp_avg_sq", safe_get_full_optimizer_state(t.param, "exp_avg_sq"))):
                assert int((x.reshape(-1)[pruned] != 0).sum()) == 0, (t.name, what)
            assert int(pruned.sum()) == round((1 - sp.densities()[t.name]) * t.numel), t.name
    finally:
        sp.remove_hooks()


def lamb_on_cuda():
    from dist_sparse.optim import Lamb

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in (64, 128, 256)]
    opt = Lamb([{"params": [p]} for p in params], lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # the first step creates the moments; the steady state is measured
    return opt


def test_count_costs_agrees_with_cuda_on_the_lamb_step(world):
    from dist_sparse.costs import count_costs

    opt = lamb_on_cuda()
    with count_costs() as costs:
        opt.step()
    with cuda_syncs() as found:
        opt.step()
    # the CPU counter must see every synchronisation CUDA sees, and none where CUDA sees none
    assert len(found) <= costs.host_syncs, (found, costs.summary())
    assert (costs.host_syncs == 0) == (len(found) == 0), (found, costs.summary())


def test_lamb_step_has_no_host_sync_on_cuda(world):
    """Issue 16: LAMB with no per-call host sync (the trust ratio stays on the device)."""
    opt = lamb_on_cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_count_costs_sees_every_sync_cuda_sees_in_a_mask_update(world):
    """Two RigL updates of the same engine, one counted on the CPU side, one watched by CUDA:
    the counter is an upper bound of CUDA's synchronisations (it also counts host copies of CPU
    tensors, which a GPU does not pay for)."""
    from dist_sparse.costs import count_costs

    engine, sp, trainer = sparse_setup(world, method="rigl", interval=2, sparsify_step=False)
    try:
        counted = watched = None
        for step in range(1, 5):
            trainer.train_step([batch(step, engine.device)], step)
            if step == 2:
                with count_costs() as counted:
                    assert sp.step(step) is not None
            elif step == 4:
                with cuda_syncs() as watched:
                    assert sp.step(step) is not None
            else:
                assert sp.step(step) is None
        assert len(watched) <= counted.host_syncs, (watched[:5], counted.summary())
    finally:
        sp.remove_hooks()
