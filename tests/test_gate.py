"""The promotion gate (components/gate.py): a paired bootstrap of the MAE difference against a margin."""

import numpy as np
import pytest

from components import gate

rng = np.random.default_rng(7)
ACTUAL = rng.uniform(20, 300, 4000)
PROD = ACTUAL + rng.normal(0, 40, ACTUAL.size)  # errors of about 32, like prod on the sample


def test_a_small_consistent_gain_is_evidence_because_rows_are_paired():
    """Every row 1.0 better: a tight interval around 1.0, although both MAEs spread far more than that."""
    better = ACTUAL + (PROD - ACTUAL) * (1 - 1.0 / np.abs(PROD - ACTUAL).clip(min=1.0))
    c = gate.compare(ACTUAL, better, PROD)
    assert c.rows == 4000 and c.gain == pytest.approx(c.prod_mae - c.candidate_mae)
    assert 0.9 < c.gain_low <= c.gain <= c.gain_high < 1.1
    promote, reason = gate.decide(c, margin=0.1)
    assert promote and reason.startswith("better than prod on 4000 rows neither model was trained on")


def test_a_gain_within_noise_is_not_promoted():
    """Two models as good as each other, differing row by row: the interval straddles zero."""
    other = ACTUAL + rng.normal(0, 40, ACTUAL.size)
    c = gate.compare(ACTUAL, other, PROD)
    assert c.gain_low < 0 < c.gain_high
    promote, reason = gate.decide(c, margin=0.1)
    assert not promote and "not" in reason.split(" than")[0]


def test_a_gain_below_the_margin_is_not_promoted_however_sure():
    slightly = ACTUAL + (PROD - ACTUAL) * 0.995
    c = gate.compare(ACTUAL, slightly, PROD)
    assert 0 < c.gain_low and c.gain_high < 0.5
    promote, reason = gate.decide(c, margin=0.5)
    assert not promote and reason.startswith("not better than prod by the margin 0.5")


def test_a_worse_candidate_is_named_worse():
    c = gate.compare(ACTUAL, ACTUAL + rng.normal(0, 60, ACTUAL.size), PROD)
    promote, reason = gate.decide(c, margin=0.1)
    assert not promote and reason.startswith("worse than prod") and c.gain_high < 0


def test_the_interval_is_reproducible():
    assert gate.compare(ACTUAL, PROD * 0.99, PROD) == gate.compare(ACTUAL, PROD * 0.99, PROD)
