"""Issue 26, part 1 and 5: paired per-seed differences against the plain student, their verdict,
the methods table built on them, and the forest plot."""

import json
import math
from pathlib import Path

import pytest

from nst_det.pipeline.figures import ForestRow, forest_plot
from nst_det.pipeline.paired import (
    format_interval,
    mean_sd,
    noise_split,
    paired_difference,
    t_quantile,
    verdict,
)
from nst_det.pipeline.plan import Stage
from nst_det.pipeline.report_methods import methods_section

# Student-t 0.975 quantiles from a printed table (df = 1, 2, 4)
T975 = {1: 12.706205, 2: 4.302653, 4: 2.776445}


@pytest.mark.parametrize("df", sorted(T975))
def test_t_quantile_matches_the_table(df):
    assert t_quantile(0.975, df) == pytest.approx(T975[df], abs=1e-5)


def test_paired_difference_by_hand_three_seeds():
    method = {0: 12.0, 1: 15.0, 2: 13.0, 3: 40.0}  # seed 3 has no plain partner
    plain = {0: 10.0, 1: 12.0, 2: 12.0}
    p = paired_difference(method, plain)
    # deltas 2, 3, 1: mean 2, sd 1, half width t(0.975, 2) * 1 / sqrt(3)
    half = T975[2] / math.sqrt(3)
    assert p.seeds == (0, 1, 2) and p.unpaired == (3,) and p.n == 3
    assert p.deltas == (2.0, 3.0, 1.0)
    assert p.mean == pytest.approx(2.0)
    assert (p.low, p.high) == pytest.approx((2.0 - half, 2.0 + half), abs=1e-5)
    assert p.low == pytest.approx(-0.484138, abs=1e-5)
    assert p.verdict == "no difference detected at this size (3 seeds)"
    assert format_interval(p) == "+2.0 [-0.5, +4.5]"


def test_paired_difference_by_hand_five_seeds_better_and_worse():
    plain = {s: 10.0 + 7 * s for s in range(5)}  # a wide seed spread the pairing removes
    up = paired_difference({s: plain[s] + d for s, d in enumerate([1, 2, 3, 2, 2])}, plain)
    half = T975[4] * math.sqrt(0.5) / math.sqrt(5)  # sd of (1, 2, 3, 2, 2) is sqrt(0.5)
    assert up.mean == pytest.approx(2.0)
    assert (up.low, up.high) == pytest.approx((2 - half, 2 + half), abs=1e-5)
    assert up.verdict == "better (5 seeds)"
    down = paired_difference({s: plain[s] - d for s, d in enumerate([1, 2, 3, 2, 2])}, plain)
    assert (down.low, down.high) == pytest.approx((-2 - half, -2 + half), abs=1e-5)
    assert down.verdict == "worse (5 seeds)"


def test_one_seed_has_no_interval_and_says_so():
    p = paired_difference({4: 13.5, 5: 1.0}, {4: 11.0})
    assert p.n == 1 and p.mean == pytest.approx(2.5) and p.low is None and p.high is None
    assert p.unpaired == (5,)
    assert p.verdict == "1 seed only: no interval, no verdict"
    assert format_interval(p) == "+2.5"
    none = paired_difference({1: 3.0}, {0: 2.0})
    assert none.mean is None and none.verdict == "no paired seeds: not compared"
    assert format_interval(none) == "n/a"


def test_a_seed_with_a_nan_metric_is_left_out_not_a_crash():
    """COCOEvaluator reports NaN for a size without objects (APs, APm, APl): that seed is left
    out of the pair, as mean_sd leaves it out of the column."""
    method = {0: 17.0, 1: 18.0, 2: 16.5, 3: math.nan, 4: 18.1}
    plain = {0: 13.0, 1: 14.0, 2: 12.5, 3: 13.5, 4: math.nan}
    p = paired_difference(method, plain)
    assert p.seeds == (0, 1, 2) and p.unpaired == (3, 4)
    assert p.deltas == (4.0, 4.0, 4.0) and p.verdict == "better (3 seeds)"
    assert paired_difference({0: math.nan}, {0: 1.0}).verdict == "no paired seeds: not compared"


def test_verdict_at_the_intervals_edges():
    assert verdict(0.0, 2.0, 3) == "no difference detected at this size (3 seeds)"
    assert verdict(1e-12, 2.0, 3) == "better (3 seeds)"
    assert verdict(-2.0, 0.0, 3) == "no difference detected at this size (3 seeds)"
    assert verdict(-2.0, -1e-12, 3) == "worse (3 seeds)"
    # through the computed interval: deltas d-1, d, d+1 put the lower end at d - t * 1/sqrt(3)
    half = t_quantile(0.975, 2) / math.sqrt(3)
    plain = {0: 50.0, 1: 50.0, 2: 50.0}
    for d, word in ((half + 1e-6, "better"), (half - 1e-6, "no difference detected"),
                    (-half - 1e-6, "worse"), (-half + 1e-6, "no difference detected")):
        p = paired_difference({0: 50 + d - 1, 1: 50 + d, 2: 50 + d + 1}, plain)
        assert p.verdict.startswith(word), (d, p)


def _fake(tmp_path, name, meta, metrics, times=()):
    stage = Stage(name, "calibrate" if meta["role"] == "calibration" else "train",
                  str(tmp_path / name), meta=meta)
    Path(stage.out_dir).mkdir()
    (Path(stage.out_dir) / "stage.json").write_text(json.dumps(
        {"name": name, "kind": stage.kind, "seconds": 1.0, "meta": meta, "metrics": metrics}))
    (Path(stage.out_dir) / "metrics.json").write_text(
        "".join(json.dumps({"iteration": i, "time": t}) + "\n" for i, t in enumerate(times)))
    return stage


def test_methods_report_judges_paired_differences_not_group_means(tmp_path):
    """Plain AP50 10 / 20 / 30 (sd 10). 'steady' is +1 on every seed: the unpaired rule (mean
    difference within 2 x sd) calls it nothing, the paired one better. 'erratic' is +70, -5, -2:
    mean +21, beyond 2 x sd unpaired, but its paired interval holds 0."""
    plain = [10.0, 20.0, 30.0]
    deltas = {"steady": [1.0, 1.2, 0.8], "erratic": [70.0, -5.0, -2.0],
              "sinking": [-1.0, -1.1, -0.9], "lonely": [3.0, None, None]}
    stages = []
    for seed, ap50 in enumerate(plain):
        stages.append(_fake(tmp_path, f"det_plain_s{seed}", {
            "stage": "det", "role": "student", "method": "plain", "seed": seed, "det_nst": False},
            {"bbox": {"AP50": ap50, "AP": ap50 / 2}}, times=[0.5]))
        for method, ds in deltas.items():
            if ds[seed] is None:
                continue
            bbox = {"AP50": ap50 + ds[seed], "AP": (ap50 + ds[seed]) / 2}
            stages.append(_fake(tmp_path, f"det_method_{method}_s{seed}", {
                "stage": "det", "role": "method", "method": method, "seed": seed},
                {"bbox": bbox}, times=[0.5]))
    stages.append(_fake(tmp_path, "calibrate_steady", {
        "stage": "det", "role": "calibration", "method": "steady"},
        {"calibration": {"weights": {"loss_nst": 25.0}, "loss_ms": 20.0}}))

    lines, numbers = methods_section(stages, str(tmp_path))
    table = [[c.strip() for c in line.strip().strip("|").split("|")]
             for line in lines if line.startswith("| ")]
    header, rows = table[0], {r[0]: dict(zip(table[0], r)) for r in table[1:]}
    assert header[5:9] == ["ΔAP50 paired [95% CI]", "AP50 verdict", "ΔAP paired [95% CI]",
                           "AP verdict"]
    assert not any("spread" in line for line in lines)  # the unpaired rule is gone
    assert rows["steady"]["AP50 verdict"] == "better (3 seeds)"
    assert rows["steady"]["ΔAP50 paired [95% CI]"] == "+1.0 [+0.5, +1.5]"
    assert rows["steady"]["AP verdict"] == "better (3 seeds)"
    assert rows["erratic"]["AP50 verdict"] == "no difference detected at this size (3 seeds)"
    assert rows["sinking"]["AP50 verdict"] == "worse (3 seeds)"
    assert rows["lonely"]["AP50 verdict"] == "1 seed only: no interval, no verdict"
    assert rows["lonely"]["ΔAP50 paired [95% CI]"] == "+3.0"
    assert rows["plain"]["AP50 verdict"] == "—"
    # the numbers behind the table: hand values of the steady method's interval
    p = numbers["steady"]["paired"]["AP50"]
    half = T975[2] * 0.2 / math.sqrt(3)  # sd of (1.0, 1.2, 0.8) is 0.2
    assert (p["low"], p["high"]) == pytest.approx((1.0 - half, 1.0 + half), abs=1e-5)
    assert numbers["erratic"]["paired"]["AP50"]["mean"] == pytest.approx(21.0)
    assert numbers["steady"]["paired"]["AP"]["mean"] == pytest.approx(0.5)
    # the forest plot sits right after the table
    plot = tmp_path / "figures" / "methods_forest_ap50.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    last_row = max(i for i, line in enumerate(lines) if line.startswith("| "))
    assert lines[last_row + 2] == \
        "![paired ΔAP50 per method, 95% intervals](figures/methods_forest_ap50.png)"


def test_forest_plot_is_written_without_touching_pyplot(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    rows = [ForestRow("nst_poly", 2.0, 0.5, 3.5, 5, "nst 25; loss 17.6 ms/step"),
            ForestRow("kd", -1.0, None, None, 1, "kd 1; loss 2.0 ms/step"),
            ForestRow("at", None, None, None, 0, "")]
    path = tmp_path / "forest.png"
    forest_plot(rows, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000
    assert plt.get_fignums() == before  # drawn on its own Agg canvas, no pyplot figure left


def test_forest_plot_row_names_fit_in_the_figure(tmp_path):
    # the methods table's longest names are the controls'
    long = "plain_aa (control: A/A, expect no difference)"
    rows = [ForestRow(long, 2.4, -1.9, 6.6, 3, "weight n/a"),
            ForestRow("pkd", 2.1, 0.9, 3.3, 3, "pkd 0.155; loss 26.8 ms/step")]
    fig = forest_plot(rows, str(tmp_path / "forest.png"))
    renderer = fig.canvas.get_renderer()
    for label in fig.axes[0].get_yticklabels():
        assert label.get_window_extent(renderer).x0 >= 0, label.get_text()


def test_mean_sd_is_the_sample_standard_deviation_of_the_finite_values():
    # 1, 2, 6: mean 3, sample variance ((-2)^2 + (-1)^2 + 3^2) / 2 = 7
    assert mean_sd([1.0, 2.0, None, 6.0, float("nan")]) == \
        f"3.0 ± {7 ** 0.5:.1f} (1 non-finite left out)"  # (None: no value, not a diverged one)
    assert mean_sd([4.25]) == "4.2" and mean_sd([None]) == mean_sd([]) == "n/a"


def test_noise_split_by_hand():
    # halves differ by 2, 0, -2 -> sample variance 4 -> eval variance 4 / 4 = 1 of the whole
    # set; full 10, 12, 14 -> sample variance 4 -> training variance 4 - 1
    out = noise_split([10.0, 12.0, 14.0], [11.0, 12.0, 13.0], [9.0, 12.0, 15.0])
    assert out["n"] == 3
    assert out["sd_eval"] == pytest.approx(1.0)
    assert out["sd_total"] == pytest.approx(2.0)
    assert out["sd_train"] == pytest.approx(math.sqrt(3))
    assert out["eval_share"] == pytest.approx(1 / 4)


def test_noise_split_leaves_a_seed_with_a_nan_out_as_mean_sd_does():
    """max(0, nan) is 0: a diverged seed made the training noise a confident 0."""
    out = noise_split([10.0, float("nan"), 12.0, 14.0], [11.0, 12.0, 12.0, 13.0],
                      [9.0, 12.0, 12.0, 15.0])
    assert out == noise_split([10.0, 12.0, 14.0], [11.0, 12.0, 13.0], [9.0, 12.0, 15.0])
    assert out["n"] == 3 and out["sd_train"] == pytest.approx(math.sqrt(3))
    assert mean_sd([10.0, float("nan"), 14.0]) == "12.0 ± 2.8 (1 non-finite left out)"


def test_a_half_harder_for_every_seed_is_not_evaluation_noise():
    """One half 6 points harder for every seed: a fixed offset, the same in each seed's value,
    so none of the seeds' spread (the mean square of the half differences would say all)."""
    out = noise_split([10.0, 12.0, 14.0], [13.0, 15.0, 17.0], [7.0, 9.0, 11.0])
    assert out["sd_eval"] == pytest.approx(0.0)
    assert out["sd_train"] == pytest.approx(2.0) and out["eval_share"] == pytest.approx(0.0)


def test_noise_split_when_evaluation_explains_more_than_the_spread():
    # halves far apart but the seeds agree: training variance is clipped at 0, not negative
    out = noise_split([5.0, 5.0], [8.0, 2.0], [2.0, 8.0])  # differences 6, -6: variance 72
    assert out["sd_eval"] == pytest.approx(math.sqrt(18)) and out["sd_train"] == 0.0
    assert out["eval_share"] is None  # no spread to share


def test_noise_split_with_one_seed_has_no_spread_and_unequal_lists_are_refused():
    out = noise_split([5.0], [6.0], [4.0])
    assert out["n"] == 1 and out["sd_eval"] is None
    assert out["sd_total"] is None and out["sd_train"] is None and out["eval_share"] is None
    with pytest.raises(ValueError, match="one value per seed"):
        noise_split([1.0, 2.0], [1.0], [1.0, 2.0])
