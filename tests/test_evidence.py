"""evidence.py on small synthetic inputs: every rule in closed form, a clear effect that must pass, a null that must
not, a flipped quality direction that flips the verdict, unreached early-stopping matches, the table, strict JSON."""

import json
import math
import statistics

import pytest

import evidence as E

LOGP = E.Quality("logp", "log p", higher_is_better=True)
FD = E.Quality("fd", "FD", higher_is_better=False, digits=1)


# ---------------------------------------------------------------------------------------------------------------
# statistics over seeds


def test_mean_std_is_the_sample_mean_and_std_without_nans():
    x = [1.0, 2.0, 4.0, float("nan")]
    m, s = E.mean_std(x)
    assert m == pytest.approx(7 / 3) and s == pytest.approx(statistics.stdev([1.0, 2.0, 4.0]))
    assert E.mean_std([3.0]) == (3.0, 0.0)
    assert all(math.isnan(v) for v in E.mean_std([float("nan")])) and all(math.isnan(v) for v in E.mean_std([]))


def test_significantly_positive_is_mean_above_two_standard_errors():
    # two values a > b: mean (a + b)/2, standard error |a - b|/2, so the rule reads (a + b)/2 > |a - b|
    assert not E.significantly_positive([3.0, 1.0])  # 2 > 2 is false: the threshold itself does not pass
    assert E.significantly_positive([3.1, 1.1])
    assert E.significantly_positive([0.5, 0.52, 0.48, 0.51, 0.49])  # a clear effect
    assert not E.significantly_positive([0.3, -0.3, 0.2, -0.2, 0.05])  # a null
    assert not E.significantly_positive([-1.0, -1.1])
    assert E.significantly_positive([1e-6]) and not E.significantly_positive([0.0])  # one seed: its sign
    assert not E.significantly_positive([float("nan")]) and not E.significantly_positive([])


def test_paired_diff_and_quality_gain_follow_the_direction():
    assert E.paired_diff([3, 5], [1, 1]) == [2, 4]
    assert LOGP.gain([3, 5], [1, 1]) == [2, 4]
    assert FD.gain([3, 5], [1, 1]) == [-2, -4]  # a larger FD is worse


def test_verdict_word():
    assert E.verdict_word([]) == "NOT TESTED"
    assert E.verdict_word([True, True]) == "REPRODUCED"
    assert E.verdict_word([True, False]) == "PARTLY reproduced"
    assert E.verdict_word([False, False]) == "NOT reproduced"


# ---------------------------------------------------------------------------------------------------------------
# the early-stopping control


def test_early_stopping_control_interpolates_at_the_guarded_reward():
    none = {"reward": [0.0, 1.0, 2.0], "logp": [0.0, 10.0, 20.0], "fd": [0.0, 10.0, 20.0]}
    guard = {"reward": [0.0, 1.5], "logp": [0.0, 16.0], "fd": [0.0, 16.0]}
    # the un-guarded run reaches reward 1.5 halfway between its checkpoints 1 and 2: quality 15 there
    assert E.early_stopping_control(none, guard, LOGP) == pytest.approx(1.0)
    assert E.early_stopping_control(none, guard, FD) == pytest.approx(-1.0)  # FD 16 against 15: worse
    assert E.early_stopping_control(none, {"reward": [-1.0], "logp": [3.0]}, LOGP) == 3.0  # matched at the start
    assert E.early_stopping_control(none, {"reward": [1.0], "logp": [9.0]}, LOGP) == pytest.approx(-1.0)  # exact hit
    assert math.isnan(E.early_stopping_control(none, {"reward": [2.5], "logp": [0.0]}, LOGP))  # never reached


# ---------------------------------------------------------------------------------------------------------------
# the verdicts on synthetic experiments


def noise(s):
    return 0.01 * ((-1) ** s) * (1 + s % 3)  # a small deterministic spread over seeds, mean near 0


def experiment(
    n_seeds=5,
    quality=LOGP,
    ratio=1.10,
    reward_gain=0.08,
    kept=0.9,
    q_gain=1.0,
    few_gain=2.0,
    rescale_cost=0.5,
    snr=0.1,
    control=1.0,
):
    """Synthetic inputs of verdicts(): an un-guarded run that inflates by `ratio`, a guarded one that keeps `kept`
    of the reward gain and is better by q_gain (few_gain at few steps), rescaling that loses `rescale_cost` of
    quality, adjoint |mean|/std `snr`, and early-stopping deltas `control`. Quality gains are in the metric's
    own direction: for FD a gain of 1 is an FD lower by 1."""
    r0, q0, sign = 0.5, 10.0, quality.sign
    runs = {"nft": {"none": [], "guard": []}}
    for s in range(n_seeds):
        e = noise(s)
        none = {
            "full": {"ratio": ratio + e, "reward": r0 + reward_gain + e / 10, quality.key: q0 + e},
            "few": {"ratio": ratio, "reward": r0, quality.key: q0 + e},
            "rescale": {"reward": r0 + reward_gain + e / 10, quality.key: q0 + e - sign * rescale_cost},
            "rescale_few": {"reward": r0, quality.key: q0},
            "profile": [ratio, float("nan")],
        }
        guard = {
            "full": {"ratio": 1.0 + e, "reward": r0 + kept * reward_gain + e / 10, quality.key: q0 + e + sign * q_gain},
            "few": {"ratio": 1.0, "reward": r0, quality.key: q0 + e + sign * few_gain},
            "profile": [1.0, float("nan")],
        }
        runs["nft"]["none"].append(none)
        runs["nft"]["guard"].append(guard)
    reference = {
        "full": {"ratio": 1.0, "reward": r0, quality.key: q0},
        "few": {"ratio": 1.0, "reward": r0, quality.key: q0},
    }
    adjoint = {
        "nft": [{"total_mean": snr + noise(s) / 10, "total_std": 1.0, "frac_positive": 0.6} for s in range(n_seeds)]
    }
    ctrl = {"nft": [control + noise(s) if not math.isnan(control) else control for s in range(n_seeds)]}
    return runs, reference, adjoint, {"total_mean": 0.0, "total_std": 1.0}, ctrl


def judged(quality=LOGP, **kw):
    lines, flags = E.verdicts(*experiment(quality=quality, **kw), quality, 3)
    return lines, {k: v.get("nft") for k, v in flags.items() if k != "not_tested"}, flags["not_tested"]


@pytest.mark.parametrize("quality", [LOGP, FD], ids=["higher_is_better", "lower_is_better"])
def test_a_clear_effect_reproduces_every_claim(quality):
    lines, flags, skipped = judged(quality)
    assert flags == {"1": True, "2": True, "3": True, "4": True, "4_few": True, "5": True} and skipped == []
    assert len(lines) == 5 and all("REPRODUCED" in line for line in lines)


@pytest.mark.parametrize("quality", [LOGP, FD], ids=["higher_is_better", "lower_is_better"])
def test_a_null_reproduces_nothing(quality):
    _, flags, _ = judged(quality, ratio=1.0, kept=1.0, q_gain=0.0, few_gain=0.0, rescale_cost=0.0, snr=0.9, control=0.0)
    assert flags == {"1": False, "2": False, "3": False, "4": False, "4_few": False, "5": False}


def test_flipping_the_quality_direction_flips_the_quality_claims():
    """The same numbers judged by a metric where lower is better: the guard's higher quality becomes worse."""
    data = experiment(quality=LOGP)
    _, flags = E.verdicts(*data, LOGP, 3)
    flipped = E.Quality("logp", "log p", higher_is_better=False)
    _, flags_flipped = E.verdicts(*data[:4], {"nft": [-x for x in data[4]["nft"]]}, flipped, 3)
    assert flags["4"]["nft"] and not flags_flipped["4"]["nft"]
    assert flags["4_few"]["nft"] and not flags_flipped["4_few"]["nft"]
    assert flags["5"]["nft"] and not flags_flipped["5"]["nft"]
    assert flags_flipped["1"] == flags["1"] and flags_flipped["3"] == flags["3"]  # the norm and adjoint claims stay


def test_the_thresholds_of_claims_3_and_4():
    assert judged(snr=0.45)[1]["3"] and not judged(snr=0.55)[1]["3"]  # |mean|/std < 0.5 on every seed
    assert judged(kept=0.75)[1]["4"] and not judged(kept=0.65)[1]["4"]  # >= 70 % of the reward gain kept
    assert judged(few_gain=2.0)[1]["4_few"] and not judged(few_gain=1.0)[1]["4_few"]  # few-step gain must exceed


def test_rescale_claim_passes_on_reward_alone():
    _, flags, _ = judged(rescale_cost=0.0, q_gain=0.0, kept=1.2)  # same quality; the guard beats it on reward
    assert flags["2"]


def test_a_method_that_did_not_learn_is_set_apart():
    lines, flags, skipped = judged(reward_gain=0.005)  # mean gain <= 0.01
    assert skipped == ["nft"] and set(flags.values()) == {None}
    assert all("NOT TESTED" in line and "nft not tested (un-guarded reward gain +0.006" in line for line in lines)


def test_unreached_early_stopping_matches():
    """Never reached on every seed: no early stop matches the guarded run, the claim stands. Otherwise the matched
    seeds decide, and a single matched seed by its sign."""
    assert judged(control=float("nan"))[1]["5"]
    assert "0 matched, 5 never reached" in judged(control=float("nan"))[0][4]
    data = list(experiment())
    data[4] = {"nft": [float("nan")] * 4 + [0.3]}
    _, flags = E.verdicts(*data, LOGP, 3)
    assert flags["5"]["nft"]
    data[4] = {"nft": [float("nan")] * 4 + [-0.3]}
    assert not E.verdicts(*data, LOGP, 3)[1]["5"]["nft"]


def test_one_seed_is_flagged_indicative():
    lines, flags, _ = judged(n_seeds=1)
    assert flags["1"] and all(line.endswith("[1 seed: no error bars, indicative only]") for line in lines)


def test_verdict_text_prints_guard_minus_other_in_the_metrics_units():
    line4 = judged(FD, q_gain=1.0, few_gain=2.0)[0][3]
    assert "ΔFD -1.0 (at 3 steps -2.0)" in line4  # FD lower by 1: guard − none = -1
    line4 = judged(LOGP, q_gain=1.0, few_gain=2.0)[0][3]
    assert "Δlog p +1.00 (at 3 steps +2.00)" in line4


# ---------------------------------------------------------------------------------------------------------------
# the table, strict JSON


def test_format_table():
    runs, reference, *_ = experiment(n_seeds=2, ratio=1.2)
    cols = [E.Column("full", "ratio", "norm ratio"), E.Column("full", "logp", "log p", 2, 3)]
    rows = E.format_table(runs, reference, cols).splitlines()
    assert rows[0] == f"{'run':<11}{'norm ratio':>14}{'log p':>14}" and rows[1] == "-" * 39
    assert rows[2] == f"{'reference':<11}{'1.000':>14}{'10.000':>14}"
    cell = lambda x, p: f"{statistics.mean(x):.{p}f}±{statistics.stdev(x):.{p}f}"
    assert rows[3] == f"{'nft':<11}{cell([1.21, 1.18], 3):>14}{cell([10.01, 9.98], 2):>14}"  # seed noise +0.01, -0.02
    assert rows[4] == f"{'nft+guard':<11}{cell([1.01, 0.98], 3):>14}{cell([11.01, 10.98], 2):>14}"
    assert rows[5] == f"{'nft rescl':<11}{'1.000':>14}{cell([9.51, 9.48], 2):>14}"  # rescaled: ratio 1 by construction
    assert len(rows) == 6


def test_json_is_strict():
    obj = {"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5], ("nft", "none"): (1, 2), "c": {"d": None}}
    safe = E.json_safe(obj)
    assert safe == {"a": None, "b": [None, None, 1.5], "('nft', 'none')": [1, 2], "c": {"d": None}}


def test_write_json_round_trips_without_nan_tokens(tmp_path):
    E.write_json(tmp_path / "m.json", {"x": [1.0, float("nan")], "y": "z"})
    text = (tmp_path / "m.json").read_text()
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert back == {"x": [1.0, None], "y": "z"}


def test_git_revision():
    rev = E.git_revision()
    assert rev == "unknown" or (len(rev) == 40 and all(c in "0123456789abcdef" for c in rev))


def test_shared_figures_draw(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, reference, *_ = experiment(n_seeds=2)
    histories = {"nft": {v: [{"step": [0, 1], "reward": [0.5, 0.6], "logp": [1.0, 2.0]}] * 2 for v in E.VARIANTS}}
    fig, axes = plt.subplots(1, 3)
    E.plot_profile(axes[0], runs, 2)
    E.plot_curves(axes[1], histories, "reward", "logp")
    E.plot_reward_quality(axes[2], runs, reference, LOGP, (10, 3))
    assert len(axes[0].lines) == 2 + 1 and len(axes[1].lines) == 2  # two variants (+ the line at ratio 1)
    fig.savefig(tmp_path / "f.png")
    plt.close(fig)
