"""The cost counter itself: what it counts as a host sync, a kernel, an allocation and a
collective (the hot-path tests assert on these numbers, so they must mean what they say)."""

import torch
import torch.distributed as dist

from dist_sparse.costs import count_costs


def test_scalar_reads_and_value_dependent_shapes_are_host_syncs():
    x = torch.arange(10.0)
    with count_costs() as c:
        x.sum().item()
        bool((x > 3).any())
        int(x[2])
        torch.nonzero(x > 4)
        x[x > 5]
        torch.unique(x)
        x.repeat_interleave(torch.full((10,), 2))
    assert c.host_syncs == 7, c.summary()
    assert c.sync_ops["_local_scalar_dense"] == 3


def test_crossings_to_the_host_count_even_for_cpu_tensors():
    x = torch.arange(4)
    with count_costs() as c:
        x.tolist()
        x.cpu()
        x.to("cpu")
        x.numpy()
    assert c.host_syncs == 4 and dict(c.sync_ops) == {"tolist": 1, "cpu": 1, "to": 1, "numpy": 1}


def test_device_side_work_is_no_sync():
    x = torch.randn(100)
    with count_costs() as c:
        k = torch.topk(x, 10).indices
        m = torch.zeros(100, dtype=torch.bool).scatter_(0, k, True)
        y = torch.where(m, x, 0.0)
        y.masked_fill_(~m, 1.0)
        torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 3]), output_size=6)
    assert c.host_syncs == 0, c.summary()


def test_kernels_and_allocations():
    x = torch.randn(8, 4)
    with count_costs() as c:
        y = x * 2            # kernel, new tensor
        y.add_(1)            # kernel, in place
        y.view(32)           # view: neither
        y.t()                # view: neither
    assert c.kernels == 2 and c.allocations == 1 and c.allocated_bytes == 8 * 4 * 4, c.summary()
    assert dict(c.ops) == {"mul": 1, "add_": 1}


def test_collectives_counted_with_payload(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        t = torch.zeros(16, dtype=torch.int64)
        with count_costs() as c:
            dist.all_reduce(t)
            out = [torch.zeros(4)]
            dist.all_gather(out, torch.ones(4))
        assert c.collectives == 2 and c.collective_bytes == 16 * 8 + 4 * 4, c.summary()
        assert dist.all_reduce.__name__ == "all_reduce"  # restored on exit
    finally:
        dist.destroy_process_group()


def test_counters_in_threads_restore_torch_distributed_whatever_the_exit_order():
    import threading

    original = dist.all_reduce
    entered, release = threading.Barrier(3), threading.Event()

    def worker(wait_first: bool):
        with count_costs():
            entered.wait()
            if wait_first:
                release.wait()

    early = threading.Thread(target=worker, args=(False,))
    late = threading.Thread(target=worker, args=(True,))
    early.start(), late.start()
    entered.wait()
    early.join()
    assert dist.all_reduce is not original  # the late thread still counts
    release.set()
    late.join()
    assert dist.all_reduce is original
