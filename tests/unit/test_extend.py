"""A run's length plan (``--resume --extend``): checks, the length in force at each step, and the
learning rate it gives."""

import pytest

from dist_sparse.config import TrainingConfig, lr_multiplier
from dist_sparse.train import extend


def test_a_new_run_and_a_plain_resume_keep_the_plan():
    assert extend.check_length([], 100, False, None) == [(0, 100)]
    with pytest.raises(ValueError, match="--extend continues a run to more steps: use it with --resume"):
        extend.check_length([], 100, True, None)
    assert extend.check_length([(0, 100)], 100, False, 40) == [(0, 100)]
    with pytest.raises(ValueError, match="planned for 100 steps, not 150.*add --extend"):
        extend.check_length([(0, 100)], 150, False, 40)


def test_extensions_append_and_replace_what_came_after_the_checkpoint():
    plan = extend.check_length([(0, 100)], 150, True, 100)          # a finished run extended
    assert plan == [(0, 100), (100, 150)]
    assert extend.check_length(plan, 150, False, 120) == plan       # resumed again later, plainly
    assert extend.check_length(plan, 200, True, 140) == [(0, 100), (100, 150), (140, 200)]
    # from a checkpoint before the first extension: that extension is replaced
    assert extend.check_length(plan, 180, True, 60) == [(0, 100), (60, 180)]
    with pytest.raises(ValueError, match="--max-steps 150 does not extend the run, which is planned for 150"):
        extend.check_length(plan, 150, True, 120)
    with pytest.raises(ValueError, match="planned for 100 steps, not 150"):
        extend.check_length(plan, 150, False, 60)  # before the extension the run was planned for 100
    assert extend.plan_of({"max_steps": 80}, 99) == [(0, 80)]  # run.json of an older version
    assert extend.plan_of({"schedule_plan": [[0, 100], [100, 150]]}, 150) == plan
    assert extend.planned(plan) == 100


def test_the_learning_rate_follows_the_longer_plan_from_the_resumed_step():
    cfg = TrainingConfig(warmup_fraction=0.1, decay="linear")
    plan = [(0, 100), (60, 200)]
    lr = [lr_multiplier(s, cfg, extend.max_steps_at(plan, s)) for s in range(200)]
    assert lr[:60] == [lr_multiplier(s, cfg, 100) for s in range(60)]      # as planned before
    assert lr[60:] == [lr_multiplier(s, cfg, 200) for s in range(60, 200)]  # re-stretched decay
    # warmup 10 then 20 steps (a fraction of the plan): 1 - 49/90 at step 59, 1 - 40/180 at 60
    assert lr[59] == pytest.approx(1 - 49 / 90) and lr[60] == pytest.approx(1 - 40 / 180)  # the jump up
    assert lr[199] == pytest.approx(1 / 180) and lr[60] > lr[59]
