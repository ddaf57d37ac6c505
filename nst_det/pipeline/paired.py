"""Paired comparison of a method against the plain student, seed by seed.

Every method run of seed s starts from the same pretrained student, data order and
initialisation as the plain run of seed s, so the per-seed differences
Δ_s = method_s − plain_s carry much less of the seed noise than the two groups' spreads do. The
comparison is the mean of Δ over the seeds both sides have, with a two-sided Student-t
confidence interval (n − 1 degrees of freedom); the verdict is "better" / "worse" only when
that interval excludes 0. With one paired seed there is no interval and no verdict, and the
text says so.

Pure: numbers in, numbers and words out (no files, no plotting).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

__all__ = ["Paired", "paired_difference", "t_quantile", "verdict", "format_interval", "mean_sd",
           "noise_split"]

LEVEL = 0.95


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom.

    scipy is not a direct dependency of nst_det but a hard one of POT (pot>=0.9 in
    pyproject.toml), so it is always installed alongside."""
    from scipy.stats import t

    return float(t.ppf(p, df))


@dataclass(frozen=True)
class Paired:
    """Δ = method − plain over the seeds both have; low/high None below 2 seeds."""

    seeds: tuple  # the paired seeds, ascending
    deltas: tuple  # method_s − plain_s, in the order of `seeds`
    mean: float | None  # None without any paired seed
    low: float | None
    high: float | None
    level: float
    unpaired: tuple  # seeds left out: on one side only, or not finite on one (COCO's NaN AP)
    verdict: str

    @property
    def n(self) -> int:
        return len(self.seeds)

    def as_dict(self) -> dict:
        return asdict(self)


def verdict(low: float | None, high: float | None, n: int) -> str:
    """Words for an interval [low, high] of method − plain from n paired seeds.

    "better" / "worse" only when the interval excludes 0 (an end exactly at 0 does not)."""
    seeds = f"{n} seed{'s' if n != 1 else ''}"
    if n == 0:
        return "no paired seeds: not compared"
    if low is None or high is None:
        return f"{seeds} only: no interval, no verdict"
    if low > 0:
        return f"better ({seeds})"
    if high < 0:
        return f"worse ({seeds})"
    return f"no difference detected at this size ({seeds})"


def paired_difference(method: dict, plain: dict, level: float = LEVEL) -> Paired:
    """Paired Δ of `method` against `plain`, both {seed: metric value}; a seed whose value is
    not finite on either side (COCO's NaN AP of a size without objects) is left out, as
    `mean_sd` leaves it out."""
    def finite(seed):
        return all(v is not None and math.isfinite(v) for v in (method[seed], plain[seed]))

    seeds = tuple(sorted(s for s in set(method) & set(plain) if finite(s)))
    unpaired = tuple(sorted((set(method) | set(plain)) - set(seeds)))
    deltas = tuple(method[s] - plain[s] for s in seeds)
    n = len(deltas)
    mean = statistics.fmean(deltas) if n else None
    low = high = None
    if n >= 2:
        half = t_quantile(0.5 + level / 2, n - 1) * statistics.stdev(deltas) / math.sqrt(n)
        low, high = mean - half, mean + half
    return Paired(seeds, deltas, mean, low, high, level, unpaired, verdict(low, high, n))


def format_interval(p: Paired) -> str:
    """'+1.2 [-0.3, +2.7]'; the mean alone with one seed; 'n/a' without any."""
    if p.mean is None:
        return "n/a"
    if p.low is None:
        return f"{p.mean:+.1f}"
    return f"{p.mean:+.1f} [{p.low:+.1f}, {p.high:+.1f}]"


def mean_sd(values: list) -> str:
    """"mean ± sample standard deviation" of the finite values (one value: itself; none: n/a),
    saying how many non-finite ones (a diverged run's NaN) it left out; None is no value."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    dropped = sum(v is not None for v in values) - len(finite)
    left_out = f" ({dropped} non-finite left out)" if dropped else ""
    if len(finite) < 2:
        return (f"{finite[0]:.1f}" if finite else "n/a") + left_out
    return f"{statistics.mean(finite):.1f} ± {statistics.stdev(finite):.1f}{left_out}"


def noise_split(full: list, half0: list, half1: list) -> dict:
    """How much of the seed-to-seed spread of a metric (or of a paired Δ) is evaluation noise.

    full / half0 / half1: one value per seed, measured on the whole test set and on its two
    disjoint halves. On a half, value = T_s + g + e (T_s: that seed's value on unlimited test
    data, g: the half's fixed difficulty offset, e: the test-sample error, variance v per half),
    so the half difference varies over seeds with variance 2v (the offsets' difference is the
    same for every seed and adds nothing to the spread), and the whole set (about the mean of
    its halves) carries v / 2 of evaluation variance:
        sd_eval  = sqrt(sample variance_s (half0_s − half1_s) / 4)   (the whole test set's)
        sd_total = sample sd of `full` over the seeds
        sd_train = sqrt(max(0, sd_total² − sd_eval²))      (what more seeds average out)
    Returns those three and eval_share = sd_eval² / sd_total² (None when sd_total is 0; every
    figure but n, the seeds with finite values, is None below 2 of them).
    """
    if not len(full) == len(half0) == len(half1) or not full:
        raise ValueError(f"one value per seed in each of full, half0, half1: got {len(full)}, "
                         f"{len(half0)}, {len(half1)}")
    # a seed with a non-finite value is left out, as mean_sd leaves it out
    kept = [i for i in range(len(full)) if all(math.isfinite(x[i]) for x in (full, half0, half1))]
    full, half0, half1 = ([x[i] for i in kept] for x in (full, half0, half1))
    out = {"n": len(full), "sd_eval": None, "sd_total": None, "sd_train": None,
           "eval_share": None}
    if len(full) >= 2:
        eval_var = statistics.variance([a - b for a, b in zip(half0, half1)]) / 4
        total_var = statistics.variance(full)
        out["sd_eval"] = math.sqrt(eval_var)
        out["sd_total"] = math.sqrt(total_var)
        out["sd_train"] = math.sqrt(max(0.0, total_var - eval_var))
        out["eval_share"] = eval_var / total_var if total_var > 0 else None
    return out
