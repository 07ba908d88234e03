"""Which ranks LAMB's squared norms are summed over, per kind of tensor (in one process).

The collectives are replaced by a recorder that multiplies the rows it is given by the size of
the group, which is what a sum over that group gives when every rank holds equal parts: so a
row's final factor says exactly which ranks it was summed over.
"""

import pytest
import torch

from dist_sparse.distributed import comm
from dist_sparse.distributed.tp_layout import is_tp_split
from dist_sparse.optim import Lamb
from dist_sparse.train import engine as engine_mod

DP, TP = 3, 2
SIZES = {"dp": DP, "tp": TP, None: DP * TP}  # None: the whole world


def layout(tp_size: int = TP) -> comm.ParallelGroups:
    dp = DP
    return comm.ParallelGroups(dp_group="dp", tp_group="tp" if tp_size > 1 else None, dp_rank=0, dp_size=dp,
                               tp_rank=0, tp_size=tp_size, global_rank=0, world_size=dp * tp_size)


@pytest.fixture
def calls(monkeypatch):
    log = []

    def fake_all_reduce_sum_(tensor, group=None):
        log.append((group, tensor.shape[0]))
        return tensor.mul_(SIZES[group])

    monkeypatch.setattr(engine_mod.comm, "all_reduce_sum_", fake_all_reduce_sum_)
    return log


def groups_named(*names):
    return [{"name": n} for n in names]


def reduce(reducer, names):
    sq = torch.ones(len(names), 2, dtype=torch.float64)
    reducer(sq, groups_named(*names))
    return sq[:, 0].tolist()


def test_under_zero_split_tensors_sum_over_the_world_and_replicated_over_dp(calls):
    reducer = engine_mod.lamb_norm_reducer(layout(), {"q.weight", "q.bias"}, dp_sharded=True)
    assert reduce(reducer, ["q.weight", "ln.weight", "q.bias", "emb"]) == [DP * TP, DP, DP * TP, DP]
    assert calls == [(None, 2), ("dp", 2)]  # one all-reduce per kind of tensor in the call


def test_zero_steps_one_group_per_call_one_all_reduce_each(calls):
    reducer = engine_mod.lamb_norm_reducer(layout(), {"q.weight"}, dp_sharded=True)
    assert reduce(reducer, ["q.weight"]) == [DP * TP]
    assert reduce(reducer, ["ln.weight"]) == [DP]
    assert calls == [(None, 1), ("dp", 1)]


def test_without_zero_only_split_tensors_are_summed_over_tp(calls):
    reducer = engine_mod.lamb_norm_reducer(layout(), {"q.weight"}, dp_sharded=False)
    assert reduce(reducer, ["ln.weight", "q.weight", "emb"]) == [1, TP, 1]
    assert calls == [("tp", 1)]


def test_nothing_to_sum_gives_no_reducer(calls):
    assert engine_mod.lamb_norm_reducer(layout(tp_size=1), set(), dp_sharded=False) is None
    assert engine_mod.lamb_norm_reducer(layout(), set(), dp_sharded=False) is None
    # tp=1: no tensor is split, whatever the names say; ZeRO still sums over DP (the world).
    reducer = engine_mod.lamb_norm_reducer(layout(tp_size=1), {"q.weight"}, dp_sharded=True)
    assert reduce(reducer, ["q.weight", "ln.weight"]) == [DP, DP]


def test_split_marks_are_deepspeeds():
    p = torch.nn.Parameter(torch.ones(2))
    assert not is_tp_split(p)
    p.tensor_model_parallel = True  # what AutoTP (and EarlyBERT's coefficients) set
    assert is_tp_split(p)
    q = torch.nn.Parameter(torch.ones(2))
    q.model_parallel = True  # Megatron's mark, which DeepSpeed's gradient norm also reads
    assert is_tp_split(q)


def test_lamb_hands_the_reducer_only_the_groups_it_steps():
    # ZeRO-3 steps one group per call and leaves the other groups' params empty.
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(4))
    seen = []
    opt = Lamb([{"params": [a], "name": "a"}, {"params": [b], "name": "b"}], lr=0.1,
               norm_reducer=lambda sq, groups: seen.append((sq.shape, [g["name"] for g in groups])))
    a.grad, b.grad = torch.ones(3), torch.ones(4)
    opt.param_groups[0]["params"] = []
    opt.step()
    assert seen == [(torch.Size([1, 2]), ["b"])]
    assert torch.equal(a.detach(), torch.ones(3)) and not torch.equal(b.detach(), torch.ones(4))
