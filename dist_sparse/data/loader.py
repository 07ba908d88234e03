"""Resumable, data-parallel-sharded iteration over example indices.

Every rank computes the same seeded permutation of the dataset for an epoch, cuts it into
global micro batches of `micro_batch_size * dp_size` indices and takes its own slice, so ranks
never draw the same example and together they consume each global batch. The state is two
integers (epoch, position), identical on every rank, so a checkpoint restores exactly the
sequence an uninterrupted run would have produced.

The epoch is measured in optimizer steps (``step_batch`` samples each), not in micro batches, so
that its length and the sample at every offset do not depend on how a step is split into ranks
and accumulation: a run resumed at another data-parallel size (``load_state_dict(...,
relayout=True)``) continues from the same global sample, with the same samples in each step.
"""

from __future__ import annotations

import torch


class ResumableBatchIterator:
    """Infinite iterator over this rank's micro batches (lists of example indices).

    Epoch e uses `torch.randperm(num_examples)` from a generator seeded with `seed + e`.
    With `drop_last=True` the incomplete last global batch of an epoch is skipped; with
    `drop_last=False` it is filled up with the first indices of the same epoch's permutation,
    so every rank still gets a full micro batch (static shapes).
    """

    def __init__(
        self,
        num_examples: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        drop_last: bool = True,
        step_batch: int | None = None,
    ) -> None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be at least 1, got {micro_batch_size}")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(
                f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}"
            )
        global_batch = micro_batch_size * dp_size
        if num_examples < global_batch:
            raise ValueError(
                f"the dataset has {num_examples} examples, fewer than one global micro batch "
                f"(micro_batch_size {micro_batch_size} x {dp_size} data-parallel ranks = "
                f"{global_batch}); use more data or a smaller batch"
            )
        step_batch = global_batch if step_batch is None else step_batch
        if step_batch % global_batch:
            raise ValueError(f"step_batch {step_batch} is not a multiple of the global micro batch {global_batch}")
        if num_examples < step_batch and drop_last:
            raise ValueError(
                f"the dataset has {num_examples} examples, fewer than one optimizer step's batch "
                f"({step_batch}); use more data or a smaller batch"
            )
        self.step_batch = step_batch
        self.num_examples = num_examples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0  # global micro batches already taken in this epoch
        self._order: torch.Tensor | None = None
        self._order_epoch = -1

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.dp_size

    @property
    def batches_per_epoch(self) -> int:
        """Global micro batches per epoch (the same on every rank): whole optimizer steps, the last
        incomplete one dropped (``drop_last``) or filled up from the epoch's start."""
        full, rest = divmod(self.num_examples, self.step_batch)
        steps = full + (rest > 0 and not self.drop_last)
        return steps * (self.step_batch // self.global_batch_size)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The permutation of example indices for `epoch` (identical on every rank)."""
        if self._order_epoch != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._order = torch.randperm(self.num_examples, generator=generator)
            self._order_epoch = epoch
        return self._order

    def __iter__(self) -> ResumableBatchIterator:
        return self

    def __next__(self) -> list[int]:
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
        order = self.epoch_order(self.epoch)
        start = self.position * self.global_batch_size + self.dp_rank * self.micro_batch_size
        indices = order[start : start + self.micro_batch_size]
        if len(indices) < self.micro_batch_size:  # only in the last step with drop_last=False
            wrap = torch.arange(start, start + self.micro_batch_size) % self.num_examples
            indices = order[wrap]
        self.position += 1
        return indices.tolist()

    def state_dict(self) -> dict:
        """Rank-independent state: any rank's copy restores every rank."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_examples": self.num_examples,
            "global_batch_size": self.global_batch_size,
            "drop_last": self.drop_last,
            "step_batch": self.step_batch,
            "samples": self.position * self.global_batch_size,  # of this epoch's order, consumed
        }

    def load_state_dict(self, state: dict, relayout: bool = False) -> None:
        """Continue exactly where `state` was taken; the data and batching must match.

        ``relayout``: the state may come from another data-parallel size or micro batch, as long
        as an optimizer step holds the same samples (``step_batch``): the position is then taken
        from the samples consumed, which every layout of the step divides."""
        keys = ("seed", "num_examples", "drop_last") + (("step_batch",) if relayout else ("global_batch_size",))
        for key in keys:
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume the data iterator: {key} was {state[key]} in the checkpoint "
                    f"but is {getattr(self, key)} now; use the same data, seed and "
                    + ("samples per optimizer step (train_batch_size)" if relayout else
                       "micro_batch_size x dp_size") + " as the run that saved it"
                )
        if relayout and "step_batch" not in state:
            raise ValueError("cannot resume the data iterator at another layout: the checkpoint predates "
                             "sample-based data positions; resume it at the layout that wrote it")
        epoch = int(state["epoch"])
        if relayout:
            samples = int(state["samples"])
            if samples % self.global_batch_size:
                raise ValueError(f"cannot resume the data iterator: {samples} samples of the epoch were consumed, "
                                 f"not a whole number of global micro batches of {self.global_batch_size}")
            position = samples // self.global_batch_size
        else:
            position = int(state["position"])
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise ValueError(f"invalid data iterator state: epoch={epoch}, position={position}")
        self.epoch, self.position = epoch, position
