"""The promotion gate: does a candidate beat `prod` on rows neither model was trained on, by more than the
sampling noise of an MAE and by at least a margin? compare and decide are pure functions of predictions;
decide_promotion asks the registry which version is prod now."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from components import tracking
from components.drift import MAX_COVERAGE_GAP

CONFIDENCE = 0.95
RESAMPLES = 2000
# Resamples drawn at once: memory is BATCH x rows floats, not RESAMPLES x rows (3 GB for 100k test rows).
BATCH = 50


@dataclass(frozen=True)
class Comparison:
    """Candidate and prod on the same rows. gain = prod MAE - candidate MAE (positive: the candidate is better),
    with a bootstrap interval over rows, paired: each resample scores both models on the same rows."""

    rows: int
    candidate_mae: float
    prod_mae: float
    gain: float
    gain_low: float
    gain_high: float

    def as_dict(self) -> dict:
        return asdict(self)


def compare(actual, candidate: np.ndarray, prod: np.ndarray, seed: int = 0) -> Comparison:
    from scipy import stats  # here: every step imports this module, only evaluate and register compare

    actual = np.asarray(actual, dtype=float)
    candidate_errors = np.abs(actual - np.asarray(candidate, dtype=float))
    prod_errors = np.abs(actual - np.asarray(prod, dtype=float))
    gains = prod_errors - candidate_errors  # per row: the paired difference
    interval = stats.bootstrap((gains,), np.mean, confidence_level=CONFIDENCE, n_resamples=RESAMPLES, batch=BATCH,
                               method="percentile", random_state=seed).confidence_interval
    return Comparison(rows=len(actual), candidate_mae=float(candidate_errors.mean()),
                      prod_mae=float(prod_errors.mean()), gain=float(gains.mean()),
                      gain_low=float(interval.low), gain_high=float(interval.high))


def decide(comparison: Comparison, margin: float) -> tuple[bool, str]:
    """Promote only when the whole interval of the gain lies above `margin`: better, and not by noise."""
    c = comparison
    figures = (f"on {c.rows} rows neither model was trained on: candidate MAE {c.candidate_mae:.3f}, prod "
               f"{c.prod_mae:.3f}, gain {c.gain:.3f} ({CONFIDENCE:.0%} interval {c.gain_low:.3f} to "
               f"{c.gain_high:.3f})")
    if c.gain_low > margin:
        return True, f"better than prod {figures}, all above the margin {margin}"
    if c.gain_high < 0:
        return False, f"worse than prod {figures}"
    if c.gain <= margin:
        return False, f"not better than prod by the margin {margin} {figures}"
    return False, f"not clearly better than prod: the interval reaches below the margin {margin} {figures}"


def coverage_problem(comparison: dict) -> str:
    """Why the candidate's price range cannot be trusted ("" when it can): it holds a share of the prices of rows it
    was not trained on further than MAX_COVERAGE_GAP from its nominal share."""
    if "coverage" not in comparison:
        return ""
    found, nominal = comparison["coverage"], comparison["nominal_coverage"]
    if abs(found - nominal) <= MAX_COVERAGE_GAP:
        return ""
    return (f"its price range holds {found:.1%} of the prices of {comparison['coverage_rows']} test rows it was not "
            f"trained on, against the nominal {nominal:.0%}: more than {MAX_COVERAGE_GAP * 100:.0f} points off")


def decide_promotion(name: str, version: str, comparison: dict, margin: float, run_started: float,
                     compare_again) -> tuple[bool, str, dict]:
    """Whether `version` takes `prod`, decided against the actual prod (call it holding the promotion lock).

    prod as evaluated: the evaluation decides. prod moved by another pipeline run since: compare with that one now
    (compare_again). prod set by hand after this run started: a person's choice stands. Returns (promote, reason,
    the comparison the decision rests on)."""
    current = tracking.prod_version(name)
    if current is not None and current.version == str(version):
        return True, f"already prod (an earlier attempt of this run promoted version {version})", comparison
    if current is not None and current.tags.get(tracking.PROMOTED_BY_TAG) == tracking.HAND \
            and float(current.tags.get(tracking.PROMOTED_AT_TAG, 0)) > run_started:
        return False, (f"prod was set by hand to version {current.version} after this run started: a person's "
                       "choice stands (run again to compare with it)"), comparison
    current_version = int(current.version) if current else None
    moved = ""
    if current_version != comparison.get("prod_version"):
        comparison = compare_again(current)
        moved = f"prod moved to version {current_version} during this run; compared with it instead: "
    badly_calibrated = coverage_problem(comparison)
    if badly_calibrated:
        return False, f"{moved}not promoted: {badly_calibrated}", comparison
    if current is None:
        return True, "no prod model yet", comparison
    if not comparison["comparable"]:
        return False, f"{moved}not promoted automatically: {comparison['why']}", comparison
    promote, reason = decide(Comparison(**{f.name: comparison[f.name] for f in fields(Comparison)}), margin)
    return promote, moved + reason, comparison
