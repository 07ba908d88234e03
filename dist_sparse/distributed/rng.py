"""A tensor-parallel RNG region: dropout on split activations draws its own mask on every TP rank.

The training loop seeds torch's global RNG per micro step from (seed, step, micro step,
data-parallel rank), so tensor-parallel peers draw the same numbers. That is what replicated
activations need (a hidden state's dropout mask must be the same on every peer, or the
replicas diverge) and what split ones must not have: under AutoTP each TP rank holds its own
heads, and the same mask on every rank's heads would correlate heads that tp=1 drops
independently. Megatron solves this with an RNG tracker that forks a separate state for
model-parallel regions; this module does the same for the attention's SDPA dropout.

Unlike Megatron's tracker the region keeps no running state: on every entry it seeds the
generators afresh from (micro-step seed, TP rank, key), the key being the attention module's
position in the model. So

- activation checkpointing's recompute (which restores the global RNG state, not ours) draws
  the same mask as the forward did;
- resume is exact with nothing to checkpoint: the loop seeds it per micro step;
- on exit the global generators are put back exactly, so dropout outside the region (hidden
  states, embeddings) sees the same global stream as if the region had drawn nothing, on every
  TP rank alike.

A module that runs twice in one micro step draws the same mask both times; a caller that runs
several passes per micro step (e.g. sub-networks) should reseed between them.

Until ``seed`` is called (tp=1, evaluation, unit tests, exported models) the region does nothing
and dropout draws from the global stream as before.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Iterator

import torch

# The attribute a model module exposes when it has dropout that runs on split activations; the
# module calls it (no arguments) for a context manager to run that dropout under. The model code
# must not import dist_sparse (its compact export is standalone), so the region is installed
# into the modules from outside (``TensorParallelRng.install``) rather than looked up.
REGION_ATTR = "dropout_rng_region"


def region_seed(seed: int, tp_rank: int, key: int) -> int:
    """The 63-bit seed of one region entry: distinct for every (seed, TP rank, key)."""
    digest = hashlib.blake2b(f"{seed}:{tp_rank}:{key}".encode(), digest_size=8, person=b"dsp-tprng").digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class TensorParallelRng:
    """The RNG region of one process (torch's generators are per process, and so is this)."""

    def __init__(self) -> None:
        self._seed: tuple[int, int] | None = None

    @property
    def seeded(self) -> bool:
        return self._seed is not None

    def seed(self, seed: int, tp_rank: int) -> None:
        """Seed the region for the next forward/backward: ``seed`` the micro step's (the same on
        TP peers), ``tp_rank`` this rank's position in its TP group (what makes peers differ)."""
        self._seed = (int(seed), int(tp_rank))

    def clear(self) -> None:
        """Back to the unseeded no-op."""
        self._seed = None

    @contextlib.contextmanager
    def fork(self, key: int) -> Iterator[None]:
        """Run the body on generators seeded from (seed, TP rank, ``key``); put the global
        generators (CPU and the current CUDA device) back afterwards. A no-op when unseeded."""
        if self._seed is None:
            yield
            return
        seed = region_seed(*self._seed, key)
        cpu_state = torch.get_rng_state()
        # Only an initialised CUDA can have drawn or be about to draw: the tensors are there.
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            device = torch.cuda.current_device()
            cuda_state = torch.cuda.get_rng_state(device)
        try:
            torch.default_generator.manual_seed(seed)
            if cuda:
                torch.cuda.default_generators[device].manual_seed(seed)
            yield
        finally:
            torch.set_rng_state(cpu_state)
            if cuda:
                torch.cuda.set_rng_state(cuda_state, device)

    def install(self, model: torch.nn.Module) -> int:
        """Give every module of ``model`` that exposes ``REGION_ATTR`` its region, keyed by its
        position among them (the same on every TP rank). Returns how many it found."""
        found = [m for m in model.modules() if hasattr(m, REGION_ATTR)]
        for key, module in enumerate(found):
            setattr(module, REGION_ATTR, functools.partial(self.fork, key))
        return len(found)

    # A model carrying regions may be deep-copied (a teacher, an EMA copy): the copy must use
    # this process's region, not a private clone that the loop never seeds.
    def __deepcopy__(self, memo) -> "TensorParallelRng":
        return self

    def __copy__(self) -> "TensorParallelRng":
        return self


# The process's region. The training loop seeds it every micro step (``tp_rng.seed``);
# ``dist_sparse.train.engine.build_engine`` installs it into the model when tp > 1.
tp_rng = TensorParallelRng()

__all__ = ["REGION_ATTR", "TensorParallelRng", "region_seed", "tp_rng"]
