"""benchmarks/drills.py's pure parts: the trial schedule and the table (the drills themselves are
real multi-process runs: the script, and tests/distributed/test_drills.py for the cheap cases)."""

from __future__ import annotations

import random

import pytest


@pytest.fixture(scope="module")
def d(load_benchmark):
    return load_benchmark("drills")


def test_every_kind_in_turn_and_the_kill_launchers_alternate(d):
    plan = d.schedule(20, random.Random(1))
    kinds = [k for k, _ in plan]
    assert len(plan) == 20
    for start in (0, 7):  # each round of seven holds every kind once
        assert sorted(kinds[start:start + 7]) == sorted(d.KINDS)
    kill_launchers = [launcher for kind, launcher in plan if kind.startswith("sigkill")]
    assert kill_launchers == [("deepspeed", "spawn")[i % 2] for i in range(len(kill_launchers))]
    assert all(launcher == "spawn" for kind, launcher in plan if not kind.startswith("sigkill"))
    assert d.schedule(20, random.Random(1)) == plan  # the seed decides


def test_the_table_counts_each_kind_and_the_whole(d):
    T = d.Trial
    trials = [T(1, "sigkill", "deepspeed", exit_code=247, matched=True, landed="mid-save (never committed)"),
              T(2, "sigkill", "spawn", exit_code=0, matched=True, landed="after the end (no fault)"),
              T(3, "enospc", exit_code=2, matched=False, lost=["x"], latest_ok=False),
              T(4, "nan-skip", exit_code=0, matched=True),
              T(5, "sigkill-save", "spawn", exit_code=-9, hang=True, matched=True, lost=["slow"])]
    rows = {line.split(" | ")[0].strip("| "): line for line in d.table(trials).splitlines()[2:]}
    assert rows["sigkill"] == "| sigkill | 2 | 1 / 1 | 1 / 1 | 0 | 2 / 2 | 2 / 2 | 2 / 2 | 0 |"
    assert rows["enospc"] == "| enospc | 1 | 0 / 1 | 1 / 1 | 0 | 0 / 1 | 1 / 1 | 0 / 1 | 1 |"
    assert rows["nan-skip"] == "| nan-skip | 1 | 0 / 1 | 0 / 0 | 0 | 1 / 1 | 1 / 1 | 1 / 1 | 0 |"
    assert rows["sigkill-save"] == "| sigkill-save | 1 | 0 / 1 | 0 / 1 | 1 | 1 / 1 | 1 / 1 | 1 / 1 | 1 |"
    assert rows["all"] == "| all | 5 | 1 / 4 | 2 / 3 | 1 | 4 / 5 | 5 / 5 | 4 / 5 | 2 |"
    assert "truncate" not in rows
