"""How many weights each layer keeps: uniform and Erdős–Rényi-Kernel (ERK) allocation.

Shapes are those of the full, unsharded logical parameter: the allocation is a global decision
and must not change with the tensor-parallel degree; the caller divides counts among shards.
Layers are keyed by name, and results come back in the caller's key order.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence


def _check_density(density: float) -> float:
    density = float(density)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density={density} must be in (0, 1] (the fraction of weights kept)")
    return density


def _check_shapes(shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    if not shapes:
        raise ValueError("shapes is empty: pass {parameter name: full shape} for the masked parameters")
    checked = {}
    for name, shape in shapes.items():
        shape = tuple(operator.index(d) for d in shape)
        if not shape or any(d < 1 for d in shape):
            raise ValueError(f"shape {shape} of {name!r} must have at least one dimension, all >= 1")
        checked[name] = shape
    return checked


def uniform_densities(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, float]:
    """The same density for every layer."""
    density = _check_density(density)
    return {name: density for name in _check_shapes(shapes)}


def erk_densities(shapes: Mapping[str, Sequence[int]], density: float, power_scale: float = 1.0) -> dict[str, float]:
    """Erdős–Rényi-Kernel densities (Evci et al. 2020, RigL) with the overall ``density``.

    Each layer's density is ``eps * raw_i`` with ``raw_i = (sum(shape_i) / prod(shape_i)) **
    power_scale``: small and thin layers stay denser, large square ones get sparser.
    ``eps`` is chosen so that ``sum(density_i * n_i) == density * sum(n_i)``. A layer whose
    density would exceed 1 is made dense (1.0) and the remaining budget is re-balanced over
    the other layers, until no layer exceeds 1. ``power_scale=0`` gives uniform densities.
    """
    density = _check_density(density)
    shapes = _check_shapes(shapes)
    power_scale = float(power_scale)
    if not power_scale >= 0.0:
        raise ValueError(f"power_scale={power_scale} must be >= 0 (0 = uniform, 1 = ERK)")
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: (sum(shape) / numel[name]) ** power_scale for name, shape in shapes.items()}
    target_active = density * sum(numel.values())

    if density == 1.0:
        # Every layer is dense; skip the balance, whose float eps would give 0.999... values.
        return {name: 1.0 for name in shapes}

    dense: set[str] = set()
    while True:
        sparse = [name for name in shapes if name not in dense]
        # density < 1 leaves a weight unkept somewhere, so some layer always stays sparse.
        assert sparse
        budget = target_active - sum(numel[name] for name in dense)
        assert budget > 0.0
        eps = budget / sum(raw[name] * numel[name] for name in sparse)
        # RigL marks only the layers with the largest raw probability per round. Marking every
        # layer above 1 at once gives the same set: making a layer dense costs n_i, less than
        # the eps * raw_i * n_i > n_i it would have taken, so eps only grows in later rounds
        # and a layer above 1 stays above 1. It just takes fewer rounds.
        over = {name for name in sparse if eps * raw[name] > 1.0}
        if not over:
            break
        dense |= over
    return {name: 1.0 if name in dense else min(1.0, eps * raw[name]) for name in shapes}


def active_counts(shapes: Mapping[str, Sequence[int]], densities: Mapping[str, float]) -> dict[str, int]:
    """Number of kept weights per layer: ``floor(density * numel + 0.5)``.

    Rounding is half-up (not Python's banker's ``round``) so that the rule is the obvious one
    and the same in every language a checkpoint might be read from. Per-layer rounding means
    the total can differ from ``density * total`` by at most half a weight per layer.
    """
    shapes = _check_shapes(shapes)
    if set(densities) != set(shapes):
        raise ValueError(
            f"densities and shapes name different parameters: only in shapes {sorted(set(shapes) - set(densities))}, "
            f"only in densities {sorted(set(densities) - set(shapes))}"
        )
    counts = {}
    for name, shape in shapes.items():
        d = float(densities[name])
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"density {d} of {name!r} must be in [0, 1]")
        n = math.prod(shape)
        counts[name] = min(n, math.floor(d * n + 0.5))
    return counts
