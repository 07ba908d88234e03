"""The one AutoTP layout rule shared by sparsity targets, the shrink and the export."""

import pytest
import torch

from dist_sparse.distributed.tp_layout import module_layout, split_dim


class LinearLayer(torch.nn.Module):      # named like DeepSpeed's column-parallel AutoTP layer
    pass


class LinearAllreduce(torch.nn.Module):  # named like DeepSpeed's row-parallel AutoTP layer
    pass


def test_column_parallel_splits_rows_and_row_parallel_splits_columns():
    assert module_layout(LinearLayer(), (6, 16), tp_rank=1, tp_size=2) == ((12, 16), 0, 6)
    assert module_layout(LinearAllreduce(), (16, 6), tp_rank=1, tp_size=2) == ((16, 12), 1, 6)
    assert module_layout(LinearAllreduce(), (16, 6), tp_rank=0, tp_size=2) == ((16, 12), 1, 0)


def test_other_modules_and_tp1_are_replicated():
    assert module_layout(torch.nn.Linear(4, 4), (4, 4), tp_rank=1, tp_size=2) == ((4, 4), None, 0)
    assert module_layout(LinearLayer(), (6, 16), tp_rank=0, tp_size=1) == ((6, 16), None, 0)


def test_split_dim_finds_the_one_split_dimension():
    assert split_dim("w", (6, 16), (12, 16), 2) == 0
    assert split_dim("w", (16, 3), (16, 12), 4) == 1
    assert split_dim("b", (6,), (12,), 2) == 0
    assert split_dim("ln", (16,), (16,), 2) is None


@pytest.mark.parametrize("local,full", [((6, 8), (12, 16)), ((5, 16), (12, 16)), ((6,), (12, 16))])
def test_split_dim_refuses_what_is_not_an_even_shard(local, full):
    with pytest.raises(ValueError, match=r"^q\.weight: a tensor-parallel shard of shape .* is not an even 2-way split"):
        split_dim("q.weight", local, full, 2)
