"""Which ranks LAMB's squared norms are summed over, per kind of tensor (in one process).

The collectives are replaced by a recorder that multiplies the rows it is given by the size of
the group, which is what a sum over that group gives when every rank holds equal parts: so a
row's final factor says which ranks it was summed over (0: this rank does not contribute it).
"""

import pytest
import torch

from dist_sparse.distributed import comm
from dist_sparse.distributed.tp_layout import is_tp_split
from dist_sparse.optim import Lamb
from dist_sparse.train import engine as engine_mod

DP, TP = 3, 2
SIZES = {"dp": DP, "tp": TP, None: DP * TP}  # None: the whole world


def layout(tp_size: int = TP, tp_rank: int = 0) -> comm.ParallelGroups:
    dp = DP
    return comm.ParallelGroups(dp_group="dp", tp_group="tp" if tp_size > 1 else None, dp_rank=0, dp_size=dp,
                               tp_rank=tp_rank, tp_size=tp_size, global_rank=tp_rank, world_size=dp * tp_size)


@pytest.fixture
def calls(monkeypatch):
    log = []

    def fake_all_reduce_sum_(tensor, group=None):
        log.append((group, tensor.shape[0]))
        return tensor.mul_(SIZES[group])

    monkeypatch.setattr(engine_mod.comm, "all_reduce_sum_", fake_all_reduce_sum_)
    return log


def reduce(reducer, names):
    sq = torch.ones(len(names), 2, dtype=torch.float64)
    reducer(sq, names)
    return sq[:, 0].tolist()


def test_under_zero_split_tensors_sum_over_the_world_and_replicated_over_dp(calls):
    # Every rank holds equal parts here: a replicated row counts on TP rank 0 only, so its sum
    # over the world is its sum over DP; a split row's is over DP x TP.
    names = ["q.weight", "ln.weight", "q.bias", "emb"]
    reducer = engine_mod.lamb_norm_reducer(layout(), {"q.weight", "q.bias"}, dp_sharded=True)
    assert reduce(reducer, names) == [DP * TP, DP * TP, DP * TP, DP * TP]  # TP rank 0's view: all its rows
    reducer = engine_mod.lamb_norm_reducer(layout(tp_rank=1), {"q.weight", "q.bias"}, dp_sharded=True)
    assert reduce(reducer, names) == [DP * TP, 0, DP * TP, 0]  # TP rank 1 adds its split rows only
    assert calls == [(None, 4), (None, 4)]  # one all-reduce per call, over the world


def test_zero_without_tp_sums_every_row_over_dp(calls):
    reducer = engine_mod.lamb_norm_reducer(layout(tp_size=1), {"q.weight"}, dp_sharded=True)
    assert reduce(reducer, ["q.weight", "ln.weight"]) == [DP, DP]
    assert calls == [("dp", 2)]


def test_without_zero_split_tensors_are_summed_over_tp(calls):
    reducer = engine_mod.lamb_norm_reducer(layout(tp_rank=1), {"q.weight"}, dp_sharded=False)
    assert reduce(reducer, ["ln.weight", "q.weight", "emb"]) == [0, TP, 0]
    assert calls == [("tp", 3)]


def test_nothing_to_sum_gives_no_reducer(calls):
    assert engine_mod.lamb_norm_reducer(layout(tp_size=1), set(), dp_sharded=False) is None
    assert engine_mod.lamb_norm_reducer(layout(), set(), dp_sharded=False) is None


def test_split_marks_are_deepspeeds():
    p = torch.nn.Parameter(torch.ones(2))
    assert not is_tp_split(p)
    p.tensor_model_parallel = True  # what AutoTP (and EarlyBERT's coefficients) set
    assert is_tp_split(p)
    q = torch.nn.Parameter(torch.ones(2))
    q.model_parallel = True  # Megatron's mark, which DeepSpeed's gradient norm also reads
    assert is_tp_split(q)


def test_lamb_hands_the_reducer_only_the_rows_of_the_groups_it_steps():
    # ZeRO-3 steps one group per call and leaves the other groups' params empty.
    a, b, c = (torch.nn.Parameter(torch.ones(n)) for n in (3, 4, 5))
    seen = []
    opt = Lamb([{"params": [a], "names": ["a"]}, {"params": [b, c], "names": ["b", "c"]}], lr=0.1,
               norm_reducer=lambda sq, names: seen.append((sq.shape, list(names))))
    a.grad, b.grad, c.grad = torch.ones(3), torch.ones(4), torch.ones(5)
    opt.param_groups[0]["params"] = []
    opt.step()
    assert seen == [(torch.Size([2, 2]), ["b", "c"])]
    assert torch.equal(a.detach(), torch.ones(3)) and not torch.equal(b.detach(), torch.ones(4))
