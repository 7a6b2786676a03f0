"""The statistics behind a comparison, all from scipy: a mean with its 95% t-interval across seeds, and the
difference between two arms tested twice, at the two places a result can be luck:

- across seeds (training randomness): Welch's t-test of the arms' per-seed values, or a one-sample t-test
  when one arm is a single deterministic run (a baseline evaluation); needs two or more seeds in an arm;
- across examples (which test examples happened to be drawn): McNemar's exact test for the accuracy of two
  single runs, else a paired permutation test over examples (the per-example differences' signs flipped) for
  metrics that are means over examples (accuracy, SQuAD exact/F1), with a bootstrap interval.

The verdict follows the seed-level test when there is one (seeds vary more than a fixed test set suggests),
else the example-level test, and says which. A difference is significant when its 95% interval excludes 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 4000
BOOTSTRAP_SEED = 0  # a report is reproducible: the same runs give the same intervals


@dataclass(frozen=True)
class Summary:
    """One arm's values of a metric across its runs (seeds)."""

    n: int
    mean: float
    std: float | None
    ci_low: float | None
    ci_high: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(values: Sequence[float]) -> Summary:
    """Mean and its 95% t-interval (n >= 2); a single value has no interval."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    n = len(x)
    mean = float(x.mean())
    if n < 2:
        return Summary(n, mean, None, None, None)
    std = float(x.std(ddof=1))
    if std == 0.0:
        return Summary(n, mean, 0.0, mean, mean)
    low, high = stats.t.interval(CONFIDENCE, n - 1, loc=mean, scale=std / math.sqrt(n))
    return Summary(n, mean, std, float(low), float(high))


@dataclass(frozen=True)
class Difference:
    """b - a: its size, 95% interval, p-value and which test gave them."""

    diff: float
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    test: str
    level: str  # "seeds" or "examples"
    effect_size: float | None = None  # Cohen's d (seed level, both arms with 2+ seeds)

    @property
    def significant(self) -> bool:
        if self.ci_low is None or self.ci_high is None:
            return False
        return self.ci_low > 0 or self.ci_high < 0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "significant": self.significant}


def seed_level(a: Sequence[float], b: Sequence[float]) -> Difference | None:
    """Across seeds: Welch's t-test when both arms have 2+ values, a one-sample t-test against a single value
    otherwise; None when neither arm was repeated."""
    from scipy import stats

    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = float(xb.mean() - xa.mean())
    if len(xa) >= 2 and len(xb) >= 2:
        if xa.std(ddof=1) == 0 and xb.std(ddof=1) == 0:
            return Difference(diff, diff, diff, 0.0 if diff else 1.0, "Welch t-test (no variance)", "seeds")
        res = stats.ttest_ind(xb, xa, equal_var=False)
        ci = res.confidence_interval(CONFIDENCE)
        pooled = math.sqrt((xa.var(ddof=1) + xb.var(ddof=1)) / 2)
        return Difference(diff, float(ci.low), float(ci.high), float(res.pvalue), "Welch t-test", "seeds",
                          diff / pooled if pooled else None)
    if len(xa) == 1 and len(xb) >= 2 or len(xb) == 1 and len(xa) >= 2:
        many, one, sign = (xb, float(xa[0]), 1.0) if len(xb) >= 2 else (xa, float(xb[0]), -1.0)
        if many.std(ddof=1) == 0:
            return Difference(diff, diff, diff, 0.0 if diff else 1.0, "one-sample t-test (no variance)", "seeds")
        res = stats.ttest_1samp(many, one)
        ci = res.confidence_interval(CONFIDENCE)
        lo, hi = sign * (float(ci.low) - one), sign * (float(ci.high) - one)
        return Difference(diff, min(lo, hi), max(lo, hi), float(res.pvalue), "one-sample t-test vs the single run",
                          "seeds")
    return None


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """McNemar's exact test (a two-sided binomial test on the discordant pairs) for two accuracy vectors."""
    from scipy import stats

    b = int(np.sum(correct_a & ~correct_b))  # a right, b wrong
    c = int(np.sum(~correct_a & correct_b))  # a wrong, b right
    if b + c == 0:
        return 1.0
    return float(stats.binomtest(c, b + c, 0.5).pvalue)


def example_level(scores_a: np.ndarray, scores_b: np.ndarray, accuracy: bool = False) -> Difference:
    """Across examples, paired: ``scores_x`` is (runs, examples) of per-example scores whose mean is the metric.
    The interval comes from a bootstrap over examples of the per-example differences (each arm averaged over
    its runs); the p-value from McNemar's test for the accuracy of two single runs, else from a permutation
    test of those differences (scipy's ``permutation_test``, paired: random sign flips)."""
    from scipy import stats

    d = scores_b.mean(axis=0) - scores_a.mean(axis=0)
    diff = float(d.mean())
    if np.all(d == d[0]):
        return Difference(diff, diff, diff, 0.0 if diff else 1.0, "paired permutation test (no variance)", "examples")
    res = stats.bootstrap((d,), np.mean, confidence_level=CONFIDENCE, n_resamples=BOOTSTRAP_RESAMPLES,
                          method="percentile", rng=np.random.default_rng(BOOTSTRAP_SEED))
    if accuracy and len(scores_a) == 1 and len(scores_b) == 1:
        p, test = mcnemar(scores_a[0].astype(bool), scores_b[0].astype(bool)), "McNemar exact test"
    else:  # under no difference, each example's difference is as likely negated: flip signs (scipy's paired test)
        perm = stats.permutation_test((d,), np.mean, permutation_type="samples", vectorized=True,
                                      n_resamples=BOOTSTRAP_RESAMPLES, rng=np.random.default_rng(BOOTSTRAP_SEED))
        p, test = float(perm.pvalue), "paired permutation test over examples"
    return Difference(diff, float(res.confidence_interval.low), float(res.confidence_interval.high), p, test,
                      "examples")


def verdict(name_a: str, name_b: str, primary: Difference | None, higher_is_better: bool) -> str:
    """One sentence: who is better, by how much, how sure, and on which evidence."""
    if primary is None:
        return "no test (no per-example scores and no repeats)"
    where = "across seeds" if primary.level == "seeds" else "across examples (single seed)"
    ci = f"95% CI [{primary.ci_low:+.4g}, {primary.ci_high:+.4g}]" if primary.ci_low is not None else "no CI"
    p = f"p = {primary.p_value:.2g}" if primary.p_value is not None else "no p-value"
    if not primary.significant:
        return f"no significant difference {where}: {name_b} - {name_a} = {primary.diff:+.4g}, {ci}, {p}"
    better = (primary.diff > 0) == higher_is_better
    winner, loser = (name_b, name_a) if better else (name_a, name_b)
    return f"{winner} beats {loser} by {abs(primary.diff):.4g} {where}, {ci}, {p}"
