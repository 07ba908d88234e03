"""Schedules: exact values at key steps."""

import math

import pytest

from dist_sparse.schedules import drop_fraction, gmp_sparsity, is_update_step


def test_cosine_drop_fraction():
    assert drop_fraction(0, 0.3, "cosine", 1000) == 0.3
    assert drop_fraction(500, 0.3, "cosine", 1000) == pytest.approx(0.15, abs=1e-15)
    assert drop_fraction(250, 0.3, "cosine", 1000) == pytest.approx(0.3 * 0.5 * (1 + math.sqrt(0.5)), rel=1e-15)
    assert drop_fraction(999, 0.3, "cosine", 1000) == pytest.approx(0.3 * 0.5 * (1 + math.cos(math.pi * 0.999)))
    assert drop_fraction(1000, 0.3, "cosine", 1000) == 0.0
    assert drop_fraction(5000, 0.3, "cosine", 1000) == 0.0


def test_linear_and_constant_drop_fraction():
    assert drop_fraction(0, 0.4, "linear", 100) == 0.4
    assert drop_fraction(25, 0.4, "linear", 100) == pytest.approx(0.3, rel=1e-15)
    assert drop_fraction(100, 0.4, "linear", 100) == 0.0
    assert drop_fraction(0, 0.4, "constant", 100) == 0.4
    assert drop_fraction(99, 0.4, "constant", 100) == 0.4
    assert drop_fraction(100, 0.4, "constant", 100) == 0.0


def test_drop_fraction_errors():
    with pytest.raises(ValueError, match="unknown"):
        drop_fraction(0, 0.3, "exponential", 10)
    with pytest.raises(ValueError, match="end_step"):
        drop_fraction(0, 0.3, "cosine", 0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        drop_fraction(0, 1.3, "cosine", 10)
    with pytest.raises(ValueError, match="step=-1"):
        drop_fraction(-1, 0.3, "cosine", 10)


def test_gmp_cubic_on_the_update_grid():
    kwargs = dict(final_sparsity=0.9, start_step=100, end_step=1100, frequency=100)
    assert gmp_sparsity(0, **kwargs) == 0.0
    assert gmp_sparsity(99, **kwargs) == 0.0
    assert gmp_sparsity(100, **kwargs) == 0.0  # the first update prunes to s_i
    assert gmp_sparsity(600, **kwargs) == pytest.approx(0.9 - 0.9 * 0.5**3, rel=1e-15)  # 0.7875
    assert gmp_sparsity(699, **kwargs) == gmp_sparsity(600, **kwargs)  # held between updates
    assert gmp_sparsity(1000, **kwargs) == pytest.approx(0.9 - 0.9 * 0.1**3, rel=1e-15)  # 0.8991
    assert gmp_sparsity(1099, **kwargs) == gmp_sparsity(1000, **kwargs)
    assert gmp_sparsity(1100, **kwargs) == 0.9
    assert gmp_sparsity(10**6, **kwargs) == 0.9
    values = [gmp_sparsity(t, **kwargs) for t in range(0, 1300, 7)]
    assert values == sorted(values)


def test_gmp_initial_sparsity_and_ragged_grid():
    kwargs = dict(final_sparsity=0.8, start_step=0, end_step=250, frequency=100, initial_sparsity=0.5)
    assert gmp_sparsity(0, **kwargs) == 0.5
    assert gmp_sparsity(150, **kwargs) == pytest.approx(0.8 - 0.3 * 0.6**3, rel=1e-15)
    assert gmp_sparsity(249, **kwargs) == pytest.approx(0.8 - 0.3 * 0.2**3, rel=1e-15)
    assert gmp_sparsity(250, **kwargs) == 0.8


def test_gmp_errors():
    with pytest.raises(ValueError, match="end_step=10 must be greater"):
        gmp_sparsity(0, 0.9, 10, 10, 1)
    with pytest.raises(ValueError, match="frequency"):
        gmp_sparsity(0, 0.9, 0, 10, 0)
    with pytest.raises(ValueError, match="sparsities"):
        gmp_sparsity(0, 0.5, 0, 10, 1, initial_sparsity=0.6)
    with pytest.raises(ValueError, match="sparsities"):
        gmp_sparsity(0, 1.0, 0, 10, 1)


def test_is_update_step():
    updates = [t for t in range(0, 1000) if is_update_step(t, 100, end_step=750)]
    assert updates == [100, 200, 300, 400, 500, 600, 700]
    # Multiples of the interval counted from 0, strictly after start, strictly before end.
    assert [t for t in range(1000) if is_update_step(t, 100, 800, start_step=250)] == [300, 400, 500, 600, 700]
    assert [t for t in range(1000) if is_update_step(t, 100, 800, start_step=300)] == [400, 500, 600, 700]
    assert not is_update_step(0, 1, 10)
    assert is_update_step(1, 1, 10) and not is_update_step(10, 1, 10)
    with pytest.raises(ValueError, match="interval"):
        is_update_step(5, 0, 10)
