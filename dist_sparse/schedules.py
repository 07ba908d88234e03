"""Step -> schedule value, as pure functions.

The sparsifier stores only the step; every schedule value is recomputed from it, so a resumed
run follows exactly the schedule of an uninterrupted one and every rank agrees without talking.

Step convention: ``step`` is the number of optimizer steps completed (0 before the first).
"""

from __future__ import annotations

import math
import operator

DROP_SCHEDULES = ("constant", "linear", "cosine")


def _check_step(step: int, name: str = "step") -> int:
    try:
        step = operator.index(step)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {step!r}") from None
    if step < 0:
        raise ValueError(f"{name}={step} must be >= 0")
    return step


def drop_fraction(step: int, initial: float, schedule: str, end_step: int) -> float:
    """Fraction of a layer's active weights to drop (and regrow) at ``step``; 0 from ``end_step``.

    - ``"cosine"`` (RigL's default): ``initial * 0.5 * (1 + cos(pi * step / end_step))``
    - ``"linear"``: ``initial * (1 - step / end_step)``
    - ``"constant"``: ``initial``
    """
    step = _check_step(step)
    end_step = _check_step(end_step, "end_step")
    if end_step == 0:
        raise ValueError("end_step must be >= 1 (the step at which mask updates stop)")
    initial = float(initial)
    if not 0.0 <= initial <= 1.0:
        raise ValueError(f"initial drop fraction {initial} must be in [0, 1]")
    if schedule not in DROP_SCHEDULES:
        raise ValueError(f"drop fraction schedule {schedule!r} is unknown; use one of {DROP_SCHEDULES}")
    if step >= end_step:
        return 0.0
    if schedule == "constant":
        return initial
    if schedule == "linear":
        return initial * (1.0 - step / end_step)
    return initial * 0.5 * (1.0 + math.cos(math.pi * step / end_step))


def gmp_sparsity(
    step: int,
    final_sparsity: float,
    start_step: int,
    end_step: int,
    frequency: int,
    initial_sparsity: float = 0.0,
) -> float:
    """Target sparsity of gradual magnitude pruning (Zhu & Gupta 2017) at ``step``.

    ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (end_step - t0)) ** 3`` evaluated on the update
    grid ``t = t0 + j * frequency``: between grid points the value of the last one holds, so
    the target moves only when the pruner acts. Before ``start_step`` it is ``s_i``; from
    ``end_step`` on it is ``s_f`` (also when ``end_step - start_step`` is not a multiple of
    ``frequency``: the last step lands on ``s_f`` at ``end_step``).
    """
    step = _check_step(step)
    start_step = _check_step(start_step, "start_step")
    end_step = _check_step(end_step, "end_step")
    frequency = _check_step(frequency, "frequency")
    if frequency == 0:
        raise ValueError("frequency must be >= 1 (steps between pruning updates)")
    if end_step <= start_step:
        raise ValueError(f"end_step={end_step} must be greater than start_step={start_step}")
    s_i, s_f = float(initial_sparsity), float(final_sparsity)
    if not 0.0 <= s_i <= s_f < 1.0:
        raise ValueError(
            f"sparsities must satisfy 0 <= initial_sparsity ({s_i}) <= final_sparsity ({s_f}) < 1"
        )
    if step < start_step:
        return s_i
    if step >= end_step:
        return s_f
    grid_step = start_step + (step - start_step) // frequency * frequency
    remaining = 1.0 - (grid_step - start_step) / (end_step - start_step)
    return s_f + (s_i - s_f) * remaining**3


def is_update_step(step: int, interval: int, end_step: int, start_step: int = 0) -> bool:
    """Whether the mask is updated after optimizer step ``step``.

    True exactly when ``step`` is a positive multiple of ``interval`` (counted from 0, not from
    ``start_step``, so the update grid does not move when a start is changed) and
    ``start_step < step < end_step``. Step 0 is never an update: there is no gradient or
    trained weight yet to score.
    """
    step = _check_step(step)
    end_step = _check_step(end_step, "end_step")
    start_step = _check_step(start_step, "start_step")
    interval = _check_step(interval, "interval")
    if interval == 0:
        raise ValueError("interval must be >= 1 (steps between mask updates)")
    return step > 0 and step % interval == 0 and start_step < step < end_step
