"""EarlyBERT's decisions as pure functions: which heads and neurons to keep, and when to stop.

Everything here is a function of the slimming coefficients' magnitudes, which are identical on
every rank once gathered, so every rank takes the same decision without further communication.
Ties are taken in the seeded order of their index (``masks.topk.tie_order``), the one tie rule
of the project: the lower index first would favour the first heads and neurons of every layer.
The salt is fixed per layer, not per check, so that keep-sets of consecutive checks differ only
where the scores moved (the early-bird distance compares them).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import torch

from dist_sparse.masks.topk import stable_seed, tie_order, tie_order_bits

TIE_SEED = 0x5EED  # keys the tie order of keep-sets; the same in every run, rank and TP degree


def tie_salt(layer: int) -> int:
    """The tie-order salt of one layer's keep-set (and, with ``layer = -1``, of the global scope's
    ranking over all layers)."""
    return stable_seed(TIE_SEED, 0, layer + 1)


def round_to_multiple(x: float, multiple: int) -> int:
    """Nearest multiple of ``multiple`` to ``x``; halfway rounds up (keeps more)."""
    return int(math.floor(x / multiple + 0.5)) * multiple


def kept_count(total: int, ratio: float, multiple: int, minimum: int) -> int:
    """Units a layer keeps when it loses ``ratio`` of its ``total``: the nearest multiple of
    ``multiple`` (halfway rounds up: keep more), at least ``minimum`` rounded up to a multiple,
    at most ``total``. Raises ValueError when no multiple fits."""
    if total % multiple:
        raise ValueError(f"{total} units cannot be split evenly in multiples of {multiple}")
    floor_units = max(1, math.ceil(minimum / multiple)) * multiple
    if floor_units > total:
        raise ValueError(f"a layer of {total} units cannot keep at least {minimum} in multiples of {multiple}")
    target = total * (1.0 - ratio)
    return int(min(max(round_to_multiple(target, multiple), floor_units), total))


def _order(scores: torch.Tensor, salt: int) -> torch.Tensor:
    """Indices by descending score, equal scores in the seeded tie order of their index."""
    n = scores.numel()
    by_key = tie_order(torch.arange(n), salt, tie_order_bits(n)).argsort()
    return by_key[torch.sort(-scores.double()[by_key], stable=True).indices]


def top_mask(scores: torch.Tensor, k: int, salt: int = tie_salt(0)) -> torch.Tensor:
    """Boolean mask of the ``k`` largest scores (ties: the seeded order keyed by ``salt``)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[_order(scores.flatten(), salt)[:k]] = True
    return mask


def layer_counts(totals: list[int], ratio: float, multiple: int, minimum: int) -> list[int]:
    """Per-layer scope: every layer keeps ``kept_count`` of its own units."""
    return [kept_count(t, ratio, multiple, minimum) for t in totals]


def global_counts(scores: list[torch.Tensor], ratio: float, multiple: int, minimum: int) -> list[int]:
    """Global scope: the ``(1 - ratio)`` share of all units with the largest scores, counted per
    layer, then each count rounded like :func:`kept_count` (so the total can move by a few units:
    balanced tensor-parallel shards come first)."""
    flat = torch.cat([s.flatten().double() for s in scores])
    total_keep = int(round(flat.numel() * (1.0 - ratio)))
    chosen = top_mask(flat, total_keep, tie_salt(-1))
    counts, start = [], 0
    for s in scores:
        n = int(chosen[start:start + s.numel()].sum())
        start += s.numel()
        share = 1.0 - n / s.numel()  # the fraction this layer loses under the global choice
        counts.append(kept_count(s.numel(), share, multiple, minimum))
    return counts


def keep_masks(scores: list[torch.Tensor], counts: list[int]) -> list[torch.Tensor]:
    return [top_mask(s, k, tie_salt(i)) for i, (s, k) in enumerate(zip(scores, counts))]


def hamming(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Normalised Hamming distance between two keep-sets: the fraction of units that differ."""
    differ = sum(int((x != y).sum()) for x, y in zip(a, b))
    return differ / max(sum(x.numel() for x in a), 1)


@dataclass
class Observation:
    step: int
    head_distance: float | None      # None at the first check (nothing to compare with)
    neuron_distance: float | None
    drawn: bool                      # the ticket is drawn at this check
    forced: bool = False             # ... because max_search_steps was reached


@dataclass
class EarlyBirdDetector:
    """The early-bird stopping rule over a stream of keep-sets (one per check).

    The distance of a check is the larger of the head and the neuron distance to the previous
    check's keep-set; the ticket is drawn when the last ``window`` distances are all below
    ``epsilon``, or at ``max_search_steps`` whatever they are.
    """

    window: int
    epsilon: float
    max_search_steps: int
    previous: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
    distances: deque = field(default_factory=deque)

    def observe(self, step: int, heads: list[torch.Tensor], neurons: list[torch.Tensor]) -> Observation:
        dh = dn = None
        if self.previous is not None:
            dh, dn = hamming(self.previous[0], heads), hamming(self.previous[1], neurons)
            self.distances.append(max(dh, dn))
            while len(self.distances) > self.window:
                self.distances.popleft()
        self.previous = ([h.clone() for h in heads], [n.clone() for n in neurons])
        stable = len(self.distances) == self.window and max(self.distances) < self.epsilon
        forced = not stable and step >= self.max_search_steps
        return Observation(step, dh, dn, drawn=stable or forced, forced=forced)

    def state_dict(self) -> dict:
        prev = None
        if self.previous is not None:
            prev = {"heads": [m.nonzero().flatten().tolist() for m in self.previous[0]],
                    "neurons": [m.nonzero().flatten().tolist() for m in self.previous[1]],
                    "head_sizes": [m.numel() for m in self.previous[0]],
                    "neuron_sizes": [m.numel() for m in self.previous[1]]}
        return {"previous": prev, "distances": list(self.distances)}

    def load_state_dict(self, state: dict) -> None:
        prev = state["previous"]
        if prev is None:
            self.previous = None
        else:
            def masks(idx_lists, sizes):
                out = []
                for idx, n in zip(idx_lists, sizes):
                    m = torch.zeros(n, dtype=torch.bool)
                    m[torch.as_tensor(idx, dtype=torch.long)] = True
                    out.append(m)
                return out
            self.previous = (masks(prev["heads"], prev["head_sizes"]), masks(prev["neurons"], prev["neuron_sizes"]))
        self.distances = deque(float(d) for d in state["distances"])


__all__ = ["EarlyBirdDetector", "Observation", "global_counts", "hamming", "keep_masks", "kept_count",
           "layer_counts", "top_mask"]
