"""A run's length: the steps it was started for, and every extension (``--resume --extend
--max-steps M``). Pure functions; the loops keep the plan in run.json.

The plan is a list of ``(from_step, max_steps)``: ``(0, N)`` for a run started for N steps, and one
entry per extension at the step it resumed from. What an extension changes, and only that:

* the learning rate: from the step the run resumed at, the schedule is that of a run planned for
  the new length (``lr_multiplier`` with the new ``max_steps``): the decay is re-stretched over the
  longer run, so the rate jumps from its value at the resumed step up to the longer schedule's
  value there (a warmup given as a fraction is a fraction of the new length);
* nothing else: the sparsity schedule keeps the length the run was started for (GMP has reached or
  reaches its final sparsity when it planned to; SET and RigL stop updating masks at
  ``end_fraction`` of the first plan, and the extension trains on fixed masks), and the structured
  search and DynaBERT count steps, not fractions.
"""

from __future__ import annotations

Plan = list[tuple[int, int]]


def plan_of(run_json: dict, max_steps: int) -> Plan:
    """The run's plan as run.json records it (a run of an older version: one entry)."""
    recorded = run_json.get("schedule_plan")
    if recorded:
        return [(int(a), int(b)) for a, b in recorded]
    return [(0, int(run_json.get("max_steps", max_steps)))]


def max_steps_at(plan: Plan, step: int) -> int:
    """The length in force for optimizer step ``step`` (0-based): the last entry begun by then."""
    current = plan[0][1]
    for start, length in plan:
        if start <= step:
            current = length
    return current


def planned(plan: Plan) -> int:
    """The length the run was started for (the sparsity schedule's horizon)."""
    return plan[0][1]


def check_length(plan: Plan, max_steps: int, extend: bool, resumed_step: int | None) -> Plan:
    """The plan of this launch: ``plan`` (run.json's; ignored for a new run) checked against
    ``--max-steps`` and ``--extend``; ``resumed_step``: the checkpoint's step (None: a new run)."""
    if resumed_step is None:
        if extend:
            raise ValueError("--extend continues a run to more steps: use it with --resume")
        return [(0, max_steps)]
    current = max_steps_at(plan, resumed_step)
    if not extend:
        if max_steps != current:
            raise ValueError(f"--resume: the run is planned for {current} steps, not {max_steps}; the learning-rate "
                             "and sparsity schedules depend on it (to continue it to more steps, add --extend; "
                             "the README says what that does to the schedules)")
        return plan
    if max_steps <= current:
        raise ValueError(f"--extend: --max-steps {max_steps} does not extend the run, which is planned for {current} "
                         "steps; give more steps, or drop --extend")
    # a resume from a checkpoint before (or at) an earlier extension replaces that extension
    return [plan[0]] + [(a, b) for a, b in plan[1:] if a < resumed_step] + [(resumed_step, max_steps)]


def record(run, run_json: dict, plan: Plan, argv: list[str]) -> None:
    """run.json after an extension (rank 0): the new length and plan, and the extension listed."""
    from pathlib import Path

    from dist_sparse.folders import write_json_atomic

    start, new = plan[-1]
    updated = {**run_json, "max_steps": new, "schedule_plan": plan,
               "extensions": [*run_json.get("extensions", []),
                              {"at_step": start, "from_max_steps": max_steps_at(plan[:-1], start), "to_max_steps": new,
                               "argv": argv}]}
    write_json_atomic(Path(run) / "run.json", updated)


__all__ = ["Plan", "check_length", "max_steps_at", "plan_of", "planned", "record"]
