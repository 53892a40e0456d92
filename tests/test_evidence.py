"""experiments/evidence.py on synthetic inputs: the statistics in closed form, each claim's rule on a clear effect
(must pass) and on simulated nulls (must pass at most at the nominal rate), a flipped quality direction and a broken
seed pairing (must fail), unreached early-stopping matches, the frontier (chord widths, the one definition of
"guard better"), the knob question, the table, strict JSON, the figures."""

import json
import math
import random
import statistics

import pytest

from experiments import evidence as E
from trainer import cli

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


def test_paired_is_the_t_interval_and_one_sided_t_test():
    d = [1.0, 2.0, 3.0, 4.0]
    s = E.paired(d)
    se = statistics.stdev(d) / 2
    t975_3 = 3.182446305284263  # Student t, 3 degrees of freedom, 97.5 % quantile
    assert (s.n, s.mean) == (4, 2.5)
    assert s.lo == pytest.approx(2.5 - t975_3 * se) and s.hi == pytest.approx(2.5 + t975_3 * se)
    x = 2.5 / se / math.sqrt(3)  # t = 2.5 / se; Student t with 3 degrees of freedom has a closed-form tail
    assert s.p == pytest.approx(0.5 - (x / (1 + x * x) + math.atan(x)) / math.pi, rel=1e-9)
    assert E.paired([-x for x in d]).p == pytest.approx(1 - s.p)
    assert E.paired([0.3]).p == 1.0 and "no test" in E.paired([0.3]).text()  # one seed: nothing to conclude
    assert E.paired([0.2, 0.2]).p == 0.0 and E.paired([-0.2, -0.2]).p == 1.0  # no spread: the sign decides


def test_two_sided_p_doubles_the_smaller_tail():
    d = [1.0, 2.0, 3.0, 4.0]
    assert E.two_sided_p(E.paired(d)) == pytest.approx(2 * E.paired(d).p)
    assert E.two_sided_p(E.paired([-x for x in d])) == pytest.approx(2 * E.paired(d).p)  # either direction
    assert E.two_sided_p(E.paired([0.3])) == 1.0  # one seed: no test
    assert E.two_sided_p(E.paired([0.2, 0.2])) == 0.0 and E.two_sided_p(E.paired([0.0, 0.0])) == 1.0


def test_margin_position_says_where_the_interval_lies():
    assert E.margin_position(E.paired([0.1, 0.12, 0.11, 0.13])) == "above the margin"
    assert E.margin_position(E.paired([-0.1, 0.2, 0.05])) == "on the margin"
    assert E.margin_position(E.paired([-0.1, -0.12, -0.11, -0.13])) == "below the margin"
    assert E.margin_position(E.paired([0.1])) is None


def test_paired_refuses_what_it_cannot_judge():
    for bad in ([1.0, float("nan")], [float("inf")], []):
        with pytest.raises(ValueError, match="d: expected one finite difference per seed"):
            E.paired(bad)


def test_holm_steps_down():
    assert E.holm({"a": 0.01, "b": 0.04, "c": 0.03}) == {"a": True, "b": False, "c": False}  # 0.03 > 0.05/2
    assert E.holm({"a": 0.01, "b": 0.024, "c": 0.04}) == {"a": True, "b": True, "c": True}
    assert E.holm({"a": 0.2, "b": 0.001}) == {"a": False, "b": True}
    assert E.holm({}) == {}


def test_equivalence_needs_the_whole_interval_inside_the_margin():
    assert E.equivalence_p([0.01, -0.02, 0.0, 0.015, -0.01], 0.2) < 0.01
    assert E.equivalence_p([0.5, 0.6, 0.55, 0.45, 0.5], 0.2) > 0.5  # clearly outside
    assert E.equivalence_p([0.1, -0.3, 0.4, -0.2, 0.0], 0.2) > 0.05  # too noisy to claim equivalence


def test_paired_diff_and_quality_gain_follow_the_direction():
    assert E.paired_diff([3, 5], [1, 1]) == [2, 4]
    assert LOGP.gain([3, 5], [1, 1]) == [2, 4]
    assert FD.gain([3, 5], [1, 1]) == [-2, -4]  # a larger FD is worse


def test_verdict_word_names_the_methods_that_pass():
    assert E.verdict_word({}) == "NOT TESTED"
    assert E.verdict_word({"nft": True, "awm": True}) == "REPRODUCED"
    assert E.verdict_word({"nft": False, "awm": True, "dpo": True}) == "PARTLY reproduced (awm, dpo)"
    assert E.verdict_word({"nft": False}) == "NOT reproduced"


def test_read_path_reads_the_path_at_its_first_crossing():
    assert E.read_path([0.0, 1.0, 2.0], [10.0, 20.0, 40.0], 1.5)[0] == 30.0
    assert E.read_path([0.0, 1.0, 0.5, 2.0], [0.0, 1.0, 5.0, 9.0], 0.8)[0] == pytest.approx(0.8)


def test_read_path_gives_the_chord_width_as_a_share_of_the_gain():
    rewards, qualities = [0.0, 0.2, 1.0, 2.0], [0.0, 1.0, 5.0, 9.0]  # gain 2
    assert E.read_path(rewards, qualities, 0.6) == (pytest.approx(3.0), pytest.approx(0.4), True)  # 0.2 -> 1.0
    assert E.read_path(rewards, qualities, 1.5) == (pytest.approx(7.0), pytest.approx(0.5), True)
    assert E.read_path(rewards, qualities, 1.0) == (5.0, 0.0, True)  # an exact hit is a measured point
    assert E.read_path(rewards, qualities, -1.0) == (0.0, 0.0, True)  # the start
    assert E.read_path([0.0, 2.0, 1.0], [0.0, 7.0, 3.0], 2.5) == (7.0, 0.0, False)  # never reached: its best point
    assert E.read_path([0.0, 0.5, 0.0], [0.0, 1.0, 2.0], 0.25)[1] == math.inf  # a path without gain


# ---------------------------------------------------------------------------------------------------------------
# the early-stopping control


def test_early_stopping_control_interpolates_at_the_guarded_reward():
    none = {"reward": [0.0, 1.0, 2.0], "logp": [0.0, 10.0, 20.0], "fd": [0.0, 10.0, 20.0]}
    guard = {"reward": [0.0, 1.5], "logp": [0.0, 16.0], "fd": [0.0, 16.0]}
    # the un-guarded run reaches reward 1.5 halfway between its checkpoints 1 and 2: quality 15 there, on a chord
    # half the un-guarded gain wide
    assert E.early_stopping_control(none, guard, LOGP) == (pytest.approx(1.0), True, 0.5)
    assert E.early_stopping_control(none, guard, FD) == (pytest.approx(-1.0), True, 0.5)  # FD 16 against 15: worse
    assert E.early_stopping_control(none, {"reward": [-1.0], "logp": [3.0]}, LOGP) == (3.0, True, 0.0)  # the start
    assert E.early_stopping_control(none, {"reward": [1.0], "logp": [9.0]}, LOGP) == (pytest.approx(-1.0), True, 0.0)


def test_an_unreached_seed_is_compared_with_the_best_checkpoint_and_counted():
    none = {"reward": [0.0, 2.0, 1.0], "logp": [0.0, 20.0, 5.0]}
    assert E.early_stopping_control(none, {"reward": [2.5], "logp": [21.0]}, LOGP) == (1.0, False, 0.0)  # vs step 1


# ---------------------------------------------------------------------------------------------------------------
# the verdicts on synthetic experiments: seed noise from a fixed generator, effects set by hand

METHODS = ("nft", "awm", "dpo")


def experiment(
    rng,
    n_seeds=5,
    quality=LOGP,
    ratio=1.10,
    null_ratio=1.0,
    reward_gain=0.08,
    kept=0.9,
    q_gain=1.0,
    few_gain=2.0,
    rescale_q=0.5,
    rescale_r=0.01,
    delta=0.05,
    control=1.0,
    sd=0.02,
    seed_effect=0.0,
):
    """Inputs of verdicts() for three methods: un-guarded runs inflating to `ratio` (the shuffled-reward control
    to `null_ratio`), guarded runs keeping `kept` of the reward gain and better by q_gain (few_gain at few steps),
    the guarded model better than the rescaled one by `rescale_q` in quality and `rescale_r` in reward (rescaling
    concedes reward in both testbeds: 0.006-0.04 in the toy), the
    adjoint's standardised mean `delta`, early-stopping gains `control` (as checkpoint histories). Every difference
    carries N(0, sd) noise per seed; `seed_effect` adds a per-seed offset shared by every run of that seed (what
    pairing cancels). Quality gains are in the metric's own direction: for FD a gain of 1 is an FD lower by 1."""
    r0, q0, sign = 0.5, 10.0, quality.sign
    g, g_r = lambda: rng.gauss(0, sd), lambda: rng.gauss(0, sd / 4)  # rewards are less noisy than quality
    runs, null_runs, adjoint, histories = {}, {}, {}, {}
    for m in METHODS:
        runs[m], null_runs[m], adjoint[m], histories[m] = {"none": [], "guard": []}, {"none": []}, [], []
        for _ in range(n_seeds):
            o = seed_effect * rng.gauss(0, 1)
            q_none, r_none = q0 + o + g(), r0 + reward_gain + g_r()
            q_guard, r_guard = q_none + sign * (q_gain + g()), r0 + kept * (r_none - r0) + g_r()
            few_none = q0 + o + g()
            runs[m]["none"].append(
                {
                    "full": {"rms_ratio": ratio + o / 10 + g(), "reward": r_none, quality.key: q_none},
                    "few": {"rms_ratio": ratio, "reward": r0, quality.key: few_none},
                    "rescale": {"reward": r_guard - rescale_r + g_r(), quality.key: q_guard - sign * (rescale_q + g())},
                    "rescale_few": {"reward": r0, quality.key: q0},
                    "profile": [ratio, float("nan")],
                }
            )
            runs[m]["guard"].append(
                {
                    "full": {"rms_ratio": 1.0 + g(), "reward": r_guard, quality.key: q_guard},
                    "few": {"rms_ratio": 1.0, "reward": r0, quality.key: few_none + sign * (few_gain + g())},
                    "profile": [1.0, float("nan")],
                }
            )
            null = runs[m]["none"][-1]["full"]["rms_ratio"] - (ratio - null_ratio) + g()
            null_runs[m]["none"].append({"full": {"rms_ratio": null, "reward": r0, quality.key: q0}})
            adjoint[m].append({"total_mean": delta + g(), "total_std": 1.0, "frac_positive": 0.6})
            # the un-guarded run's checkpoints on a straight line, 5 % of its gain apart (chords narrower than
            # CHORD_MAX)
            along = [k / 20 for k in range(21)]
            q_matched = q0 + (r_guard - r0) / (r_none - r0) * (q_none - q0)  # on the line the un-guarded run took
            histories[m].append(
                (
                    {
                        "reward": [r0 + a * (r_none - r0) for a in along],
                        quality.key: [q0 + a * (q_none - q0) for a in along],
                    },
                    {"reward": [r0, r_guard], quality.key: [q0, q_matched + sign * (control + g())]},
                )
            )
    adjoint_ref = [{"total_mean": 0.0, "total_std": 1.0, "frac_positive": 0.5} for _ in range(n_seeds)]
    reference = {"full": {"reward": r0, quality.key: q0}, "few": {"reward": r0, quality.key: q0}}
    return runs, reference, adjoint, adjoint_ref, histories, null_runs


def controls(histories, quality):
    return {m: [E.early_stopping_control(none, guard, quality) for none, guard in h] for m, h in histories.items()}


def judged(quality=LOGP, seed=0, **kw):
    runs, reference, adjoint, adjoint_ref, histories, null_runs = experiment(random.Random(seed), quality=quality, **kw)
    control = controls(histories, quality)
    return E.verdicts(runs, reference, adjoint, adjoint_ref, control, quality, 3, null_runs=null_runs)


@pytest.mark.parametrize("quality", [LOGP, FD], ids=["higher_is_better", "lower_is_better"])
def test_a_clear_effect_reproduces_every_claim(quality):
    lines, flags = judged(quality)
    assert len(lines) == 6 and all(": REPRODUCED — " in line for line in lines), lines
    assert flags["not_tested"] == [] and all(flags[c] == dict.fromkeys(METHODS, True) for c in "1 2 3 4 4b 5".split())


NULLS = {  # per claim: the data under which the claim is false (at the boundary of its rule), and its flag
    "1": dict(ratio=1.0, null_ratio=1.0),
    "2": dict(rescale_q=0.0, rescale_r=0.0),
    "3": dict(delta=E.EQUIVALENCE_MARGIN),
    "4": dict(q_gain=0.0),
    "5": dict(control=0.0),
}


@pytest.mark.parametrize("claim", sorted(NULLS))
def test_under_the_null_a_claim_passes_at_most_at_its_nominal_rate(claim):
    """1,000 simulated experiments (5 seeds, 3 methods) where the claim is false: the share in which any method
    passes after Holm stays within the family-wise 5 % (plus three Monte Carlo standard errors)."""
    draws = 1000
    hits = sum(any(judged(seed=i, sd=0.05, **NULLS[claim])[1][claim].values()) for i in range(draws))
    assert hits / draws <= E.ALPHA + 3 * math.sqrt(E.ALPHA * (1 - E.ALPHA) / draws), hits


def test_without_holm_the_null_would_pass_too_often():
    """The same null, judged per method at 5 % without a correction: "partly" would come far more often."""
    rng, draws, hits = random.Random(1), 1000, 0
    for _ in range(draws):
        hits += any(E.paired([rng.gauss(0, 1) for _ in range(5)]).p <= E.ALPHA for _ in METHODS)
    assert hits / draws > 0.1


def test_flipping_the_quality_direction_fails_the_quality_claims():
    """The same numbers judged by a metric of the opposite direction: the guard's better quality becomes worse."""
    runs, reference, adjoint, adjoint_ref, histories, null_runs = experiment(random.Random(0))
    flipped = E.Quality("logp", "log p", higher_is_better=False)
    flags = {}
    for q in (LOGP, flipped):
        _, flags[q] = E.verdicts(
            runs, reference, adjoint, adjoint_ref, controls(histories, q), q, 3, null_runs=null_runs
        )
    for claim in ("2", "4", "5"):
        assert all(flags[LOGP][claim].values()) and not any(flags[flipped][claim].values()), claim
    assert flags[flipped]["1"] == flags[LOGP]["1"] and flags[flipped]["3"] == flags[LOGP]["3"]  # norm, adjoint stay


def test_the_rules_pair_seeds():
    """Seed offsets 5x larger than the effect cancel in paired differences; rotating the guarded runs' seeds
    (a broken pairing) buries the effect under them."""
    runs, reference, adjoint, adjoint_ref, histories, null_runs = experiment(random.Random(0), seed_effect=5.0, sd=0.01)
    args = (reference, adjoint, adjoint_ref, controls(histories, LOGP), LOGP, 3)
    assert all(E.verdicts(runs, *args, null_runs=null_runs)[1]["4"].values())
    for m in METHODS:
        runs[m]["guard"] = runs[m]["guard"][1:] + runs[m]["guard"][:1]
    assert not any(E.verdicts(runs, *args, null_runs=null_runs)[1]["4"].values())


def test_claim_1_needs_the_null_control_and_reports_the_papers_range():
    assert not any(judged(null_ratio=1.10)[1]["1"].values())  # inflation without reward is not RL's doing
    runs, reference, adjoint, adjoint_ref, histories, _ = experiment(random.Random(0))
    lines, flags = E.verdicts(runs, reference, adjoint, adjoint_ref, controls(histories, LOGP), LOGP, 3)
    assert not any(flags["1"].values()) and "no shuffled-reward control run: untested" in lines[0]
    lines, flags = judged(ratio=1.6)
    assert all(flags["1"].values()) and not any(flags["1_in_paper_range"].values())
    assert "PARTLY reproduced (nft: outside 5-15 %, awm: outside 5-15 %, dpo: outside 5-15 %)" in lines[0]


def test_claim_2_is_pareto_a_reward_edge_with_worse_quality_fails():
    # seeds differ by 0.05 in every run's quality (what pairing cancels), the paired noise is 0.002: the margin,
    # a quarter of the un-guarded runs' seed-to-seed sd, is ~0.0125
    kw = dict(rescale_r=0.03, sd=0.002, seed_effect=0.05)
    assert all(judged(rescale_q=0.0, **kw)[1]["2"].values())  # better reward, the same quality
    assert not any(judged(rescale_q=-0.05, **kw)[1]["2"].values())  # better reward, quality worse by 4 margins
    lines, _ = judged(rescale_q=0.0, **kw)
    assert "log p not worse by more than 0.01" in lines[1]  # the margin is printed


def test_claim_2_fails_a_guard_worse_in_quality_by_more_than_its_margin():
    """The review's case: rescaling concedes reward, and the guard is 0.6 sd worse in quality (sd: the seed-to-seed
    sd of quality, here also the paired noise). Judged 1,000 times it passes at most at the nominal rate; the rule
    without a margin (only "not significantly worse") would have passed most of the same draws."""
    draws, sd, passed, old_rule = 1000, 0.05, 0, 0
    for i in range(draws):
        runs, reference, adjoint, adjoint_ref, histories, null_runs = experiment(
            random.Random(i), sd=sd, rescale_r=0.03, rescale_q=-0.6 * sd
        )
        p, _ = E.claim_rescale(runs, "nft", LOGP)
        passed += p <= E.ALPHA
        d_quality = LOGP.gain(
            *(E.collect(runs, "nft", v, ph, "logp") for v, ph in (("guard", "full"), ("none", "rescale")))
        )
        old_rule += E.paired([-x for x in d_quality]).p > E.ALPHA  # not significantly worse
    assert passed / draws <= E.ALPHA + 3 * math.sqrt(E.ALPHA * (1 - E.ALPHA) / draws), passed
    assert old_rule / draws > 0.5, old_rule


def test_claim_3_is_an_equivalence_with_the_reference_reported():
    assert all(judged(delta=0.0)[1]["3"].values()) and not any(judged(delta=0.5)[1]["3"].values())
    assert "reference +0.00, change" in judged()[0][2]


def test_each_seed_gains_from_its_own_reference():
    """Digits evaluates each seed on its own eval set, so each seed has its own reference reward: a seed offset
    50x the reward gain, added to every reward of that seed and to its reference, leaves every verdict as it was
    when the per-seed references are given; judged against their mean the gain is lost in the offsets."""
    runs, reference, adjoint, adjoint_ref, histories, null_runs = experiment(random.Random(0))
    rng, per_seed = random.Random(1), []
    for s in range(len(adjoint_ref)):
        offset = rng.choice((-1, 1)) * 4.0  # 50x the reward gain (0.08)
        for m in METHODS:
            for variant, phases in (("none", ("full", "rescale")), ("guard", ("full",))):
                for phase in phases:
                    runs[m][variant][s][phase]["reward"] += offset
        per_seed.append({**reference, "full": {**reference["full"], "reward": reference["full"]["reward"] + offset}})
    args = (adjoint, adjoint_ref, controls(histories, LOGP), LOGP, 3)
    lines, flags = E.verdicts(runs, per_seed, *args, null_runs=null_runs)
    assert all(": REPRODUCED — " in line for line in lines), lines
    mean_reference = {
        **reference,
        "full": {**reference["full"], "reward": statistics.fmean(r["full"]["reward"] for r in per_seed)},
    }
    assert set(E.verdicts(runs, mean_reference, *args, null_runs=null_runs)[1]["not_tested"]) == set(METHODS)
    with pytest.raises(ValueError, match="reference_eval"):
        E.verdicts(runs, per_seed[:-1], *args, null_runs=null_runs)


def test_claim_4_keeps_seventy_percent_of_the_reward_gain():
    assert all(judged(kept=0.8, sd=0.002)[1]["4"].values()) and not any(judged(kept=0.6, sd=0.002)[1]["4"].values())


def keeping(kept, q_gain=1.0):
    """claim_keeps_reward on one method: reference reward 0.5, un-guarded gain 0.1 (+ 0.001 per seed), the guarded
    run keeping `kept[s]` of it on seed s and better by q_gain (+ 0.1 per seed) in log p."""
    gains = [0.1 + 0.001 * s for s in range(len(kept))]
    runs = {
        "nft": {
            "none": [{"full": {"reward": 0.5 + g, "logp": 0.0}} for g in gains],
            "guard": [
                {"full": {"reward": 0.5 + k * g, "logp": q_gain + 0.1 * s}} for s, (k, g) in enumerate(zip(kept, gains))
            ],
        }
    }
    return E.claim_keeps_reward(runs, "nft", LOGP, [0.5] * len(kept))


def test_claim_4_reports_the_spread_over_seeds_and_where_its_margin_test_lies():
    p, _, position, text = keeping([0.61, 0.66, 0.70, 0.74, 0.72])  # the review's 800-step AWM: 61-74 %
    assert position == "on the margin" and p > E.ALPHA
    assert "reward gain kept 69% (seeds 61% to 74%); 70% margin test" in text and ": on the margin;" in text
    p, _, position, text = keeping([0.80, 0.82, 0.79, 0.81, 0.83])
    assert position == "above the margin" and p <= E.ALPHA and "(seeds 79% to 83%)" in text
    p, _, position, _ = keeping([0.50, 0.52, 0.48, 0.55, 0.51])
    assert position == "below the margin" and p > 0.5
    lines, flags = judged(kept=0.7, sd=0.0005)
    assert set(flags["4_margin"].values()) <= {"on the margin", "above the margin", "below the margin"}


def test_claim_4b_is_judged_only_where_4_holds():
    lines, flags = judged(q_gain=0.0)
    assert flags["4b"] == {} and "(4b) more so at 3 steps: NOT TESTED" in lines[4]
    assert not any(judged(few_gain=1.0)[1]["4b"].values())  # the few-step gain must exceed the full-step one


def test_claim_5_counts_unreached_seeds():
    runs, reference, adjoint, adjoint_ref, histories, null_runs = experiment(random.Random(0))
    control = {m: [(d, s > 1, w) for s, (d, _, w) in enumerate(c)] for m, c in controls(histories, LOGP).items()}
    lines, flags = E.verdicts(runs, reference, adjoint, adjoint_ref, control, LOGP, 3, null_runs=null_runs)
    assert all(flags["5"].values()) and "(2 of 5 seeds never reached the guarded reward" in lines[5]
    assert "chord 0.05 (max 0.05))" in lines[5]  # checkpoints 5 % of the gain apart


def test_claim_5_on_checkpoints_far_apart_is_no_verdict():
    """The same clear effect read between checkpoints half the gain apart: not a verdict, so it does not pass."""
    runs, reference, adjoint, adjoint_ref, histories, null_runs = experiment(random.Random(0))
    sparse = {
        m: [({k: v[::10] for k, v in none.items()}, guard) for none, guard in h] for m, h in histories.items()
    }  # checkpoints 0, 10, 20 of 21: at 0 %, 50 %, 100 % of the gain
    lines, flags = E.verdicts(
        runs, reference, adjoint, adjoint_ref, controls(sparse, LOGP), LOGP, 3, null_runs=null_runs
    )
    assert not any(flags["5"].values()) and "chord 0.50 (max 0.50) > 0.1: no verdict" in lines[5]
    assert all(judged()[1]["5"].values())  # the dense checkpoints: reproduced


def test_claim_3_without_an_adjoint_is_not_tested():
    runs, reference, _, _, histories, null_runs = experiment(random.Random(0))
    lines, flags = E.verdicts(runs, reference, None, None, controls(histories, LOGP), LOGP, 3, null_runs=null_runs)
    assert flags["3"] == {} and lines[2].startswith("(3) no coherent first-order magnitude signal: NOT TESTED")
    assert all(flags[c] == dict.fromkeys(METHODS, True) for c in ("1", "2", "4", "5"))


def test_a_method_that_did_not_learn_is_set_apart():
    lines, flags = judged(reward_gain=-0.01)
    assert set(flags["not_tested"]) == set(METHODS) and all("NOT TESTED" in line for line in lines)
    assert "nft set aside: its un-guarded run gained no reward" in lines[0]


def test_one_seed_says_no_test_is_possible_rather_than_no_reward_gained():
    """With one seed every method's reward gain has p = 1 (no interval): the lines say why nothing was tested, not
    that the methods gained no reward (here each gained 0.08)."""
    lines, flags = judged(n_seeds=1)
    assert set(flags["not_tested"]) == set(METHODS) and len(lines) == 6
    for line in lines:
        assert ": NOT TESTED — no method to test" in line and line.endswith("; 1 seed: no test possible"), line
        assert "set aside" not in line, line


def test_drift_lead_finds_the_first_crossings_and_counts_the_seeds_without_one():
    history = {"step": [0, 20, 40, 60], "reward": [0.5, 0.6, 0.7, 0.8], "ratio_max": [1.0, 1.06, 1.2, 1.3]}
    fd = {**history, "fd": [10.0, 14.0, 21.0, 30.0]}  # lower is better: worse by >= 10 first at step 40
    lead = E.drift_lead(fd, FD, alarm=1.05, damage=10)
    assert lead == dict(step_alarm=20, reward_alarm=0.6, step_damage=40, reward_damage=0.7, lead=20)
    logp = {**history, "logp": [-1.0, -1.5, -2.5, -3.0]}  # higher is better: worse by >= 1 first at step 40
    assert E.drift_lead(logp, LOGP, alarm=1.1, damage=1.0)["lead"] == 0  # the alarm at 40 too
    flipped = E.Quality("logp", "log p", higher_is_better=False)
    assert E.drift_lead(logp, flipped, alarm=1.1, damage=1.0)["step_damage"] is None
    silent = E.drift_lead(fd, FD, alarm=2.0, damage=10)
    assert silent["step_alarm"] is None and silent["lead"] is None and silent["step_damage"] == 40
    line = E.drift_lead_line("nft", [lead, lead, silent], FD, 1.05, 10)
    assert "lead +20 [+20, +20] steps on 2 of 3 seeds; 1 seeds degraded without an alarm" in line
    assert "mean reward at the alarm 0.600, at the damage 0.700" in line


# ---------------------------------------------------------------------------------------------------------------
# the frontier


def test_frontier_reads_every_family_at_matched_reward():
    # one method, two seeds; reference (0, 0), official un-guarded run (1, -10) shared by every family
    paths = {
        "nft": {
            "guard": [[(0.0, 0.0), (0.5, -1.0), (1.0, -10.0)], [(0.0, 0.0), (0.5, -1.2), (1.0, -10.0)]],
            "kl": [[(0.0, 0.0), (0.5, -4.0), (1.0, -10.0)], [(0.0, 0.0), (0.5, -4.4), (1.0, -10.0)]],
            "rescale": [[(0.0, 0.0), (0.9, -2.0), (1.0, -10.0)], [(0.0, 0.0), (0.9, -2.2), (1.0, -10.0)]],
        }
    }
    lines, summary = E.frontier(paths, LOGP, levels=(0.5, 0.75))
    at_half = summary["nft"][0.5]
    assert at_half["guard"]["mean"] == pytest.approx(-1.1) and at_half["kl"]["mean"] == pytest.approx(-4.2)
    assert at_half["kl"]["diff"].mean == pytest.approx(3.1)
    # rescale's first member is past r* = 0.5: read between the reference and it, marked as interpolated
    assert at_half["rescale"]["mean"] == pytest.approx((-2.0 * 0.5 / 0.9 - 2.2 * 0.5 / 0.9) / 2)
    assert at_half["rescale"]["interpolated"] == 2 and "interpolated from the reference in 2 seeds" in lines[0]
    at_primary = summary["nft"][0.75]  # guard: halfway between -1 and -10 -> -5.5 (seed 1), -5.6 (seed 2)
    assert at_primary["guard"]["mean"] == pytest.approx(-5.55)
    assert lines[1].startswith("nft at 75% of the un-guarded gain (primary): best")
    assert at_half["guard"]["diff"] is None and at_primary["kl"]["passed"] is not None
    # chords at 50 %: the guard and KL have a member there (width 0); rescaling is read from the reference to 0.9
    assert at_half["guard"]["chord"] == 0 and at_half["kl"]["chord"] == 0 and at_half["kl"]["word"] != "no verdict"
    assert at_half["rescale"]["chord"] == pytest.approx(0.9) and at_half["rescale"]["word"] == "no verdict"
    assert "chord 0.90 (max 0.90) > 0.1: no verdict" in lines[0]


def test_frontier_primary_level_is_the_guarded_runs_own_reward():
    """At each seed's guarded-run reward, the guard's measured quality against every family's path read there; a
    path that never reaches that reward is read at its highest reward and counted."""
    path = lambda q_mid: [(0.0, 0.0), (0.4, q_mid), (0.8, -10.0)]
    paths = {"nft": {"guard": [path(-1.0)] * 3, "kl": [path(-2.0), path(-2.2), path(-1.8)], "lr": [path(-3.0)] * 3}}
    operating = {"nft": [(0.6, -1.5), (0.6, -1.5), (0.9, -1.5)]}  # seed 3's guard earns more than any kl/lr run
    lines, summary = E.frontier(paths, LOGP, operating=operating, levels=(0.5,))
    rows = summary["nft"][E.OPERATING]
    assert rows["guard"]["mean"] == -1.5  # measured, not read off the guard's path
    kl_at = [-2.0 + 0.5 * (-10.0 + 2.0), -2.2 + 0.5 * (-10.0 + 2.2), -10.0]  # halfway from 0.4 to 0.8; seed 3: end
    assert rows["kl"]["mean"] == pytest.approx(statistics.fmean(kl_at))
    assert rows["kl"]["diff"].mean == pytest.approx(statistics.fmean([-1.5 - x for x in kl_at]))
    assert rows["kl"]["unreached"] == 1 and "never reached in 1 seeds" in lines[0]
    assert rows["kl"]["chord"] == pytest.approx(1 / 3)  # seeds 1, 2: from 0.4 to 0.8 of a 0.8 gain; seed 3: 0
    assert rows["guard"]["chord"] == 0 and "guard -1.50 (measured)" in lines[0]
    assert rows["kl"]["passed"] is not None and summary["nft"][0.5]["kl"]["passed"] is not None  # every level
    assert lines[0].startswith("nft at the guarded run's own reward (primary): best guard")


def test_frontier_direction_follows_the_quality():
    paths = {
        "awm": {"guard": [[(0.0, 5.0), (0.5, 6.0), (1.0, 20.0)]] * 3, "kl": [[(0.0, 5.0), (0.5, 9.0), (1.0, 20.0)]] * 3}
    }
    _, summary = E.frontier(paths, FD, levels=(0.5,))
    assert summary["awm"][0.5]["kl"]["diff"].mean == pytest.approx(3.0)  # FD 6 against 9: the guard is better
    _, summary = E.frontier(paths, LOGP, levels=(0.5,))
    assert summary["awm"][0.5]["kl"]["diff"].mean == pytest.approx(-3.0)


def one_reading(kl_paths, guard_quality, operating_reward=0.9):
    """E.frontier at the guarded run's own reward, one method: the guard measured at `operating_reward` with
    guard_quality[s] on seed s, the KL family's paths as given (reference (0, 0), official run (1, -10))."""
    guard = [[(0.0, 0.0), (operating_reward, q), (1.0, -10.0)] for q in guard_quality]
    operating = {"nft": [(operating_reward, q) for q in guard_quality]}
    return E.frontier({"nft": {"guard": guard, "kl": kl_paths}}, LOGP, operating=operating, levels=())


def test_a_comparison_on_a_wide_chord_is_no_verdict_until_a_member_is_measured_there():
    """KL clearly better at the guard's reward (0.9 of the gain) when read between members at 0.5 and 1.0 of the
    gain (a chord half the gain wide): no verdict, whatever the interval. With a KL member measured at 0.85 the
    chord is 0.15 wide, still no verdict; with one at 0.88, 0.12 -> 0.04 wide: a verdict, and its word."""
    guard_q = [-9.0 - 0.01 * s for s in range(5)]  # KL read at 0.9 on its chord: -8.2
    wide = [[(0.0, 0.0), (0.5, -1.0 + 0.01 * s), (1.0, -10.0)] for s in range(5)]
    lines, summary = one_reading(wide, guard_q)
    row = summary["nft"][E.OPERATING]["kl"]
    assert row["diff"].hi < 0 and row["passed"]  # the test alone would call KL better
    assert row["word"] == "no verdict" and row["chord"] == pytest.approx(0.5) and "> 0.1: no verdict" in lines[0]
    still_wide = [[(0.0, 0.0), (0.5, -1.0), (0.85, -2.0 + 0.01 * s), (1.0, -10.0)] for s in range(5)]
    assert one_reading(still_wide, guard_q)[1]["nft"][E.OPERATING]["kl"]["word"] == "no verdict"
    measured = [[(0.0, 0.0), (0.5, -1.0), (0.88, -2.0 + 0.01 * s), (0.92, -2.6), (1.0, -10.0)] for s in range(5)]
    lines, summary = one_reading(measured, guard_q)
    row = summary["nft"][E.OPERATING]["kl"]
    assert row["chord"] == pytest.approx(0.04) and row["word"] == "kl better" and ": kl better)" in lines[0]


def fixed_differences(mean, one_sided_p, n=10):
    """n per-seed differences with this mean and this one-sided t-test p value (a fixed pattern, rescaled)."""
    from scipy.stats import t as student

    z = [-1.6, -1.1, -0.7, -0.3, 0.0, 0.2, 0.5, 0.8, 1.0, 1.2][:n]
    mz, sz = statistics.fmean(z), statistics.stdev(z)
    sd = mean / student.ppf(1 - one_sided_p, n - 1) * math.sqrt(n)
    return [mean + sd * (x - mz) / sz for x in z]


def test_guard_better_is_a_two_sided_test_with_holm():
    """The review's held-out AWM against KL: +0.007 [-0.0004, +0.014], one-sided p = 0.030. The one-sided rule
    (what evidence.py flagged before) would call the guard better; the one definition calls it a tie, and calls
    each direction once the interval clears 0."""
    d = fixed_differences(0.007, 0.030)
    s = E.paired(d)
    assert s.p == pytest.approx(0.030) and s.lo < 0 < s.hi and E.holm({"kl": s.p})["kl"]  # the old rule: "better"
    kl_at_guard = [[(0.0, 0.0), (0.9, -3.0 - x), (1.0, -10.0)] for x in d]  # measured at the guard's reward
    _, summary = one_reading(kl_at_guard, [-3.0] * 10)
    row = summary["nft"][E.OPERATING]["kl"]
    assert row["diff"].mean == pytest.approx(0.007) and row["chord"] == 0 and row["word"] == "tie"
    for sign, word in ((1, "guard better"), (-1, "kl better")):
        d = fixed_differences(0.007, 0.001)
        kl = [[(0.0, 0.0), (0.9, -3.0 - sign * x), (1.0, -10.0)] for x in d]
        assert one_reading(kl, [-3.0] * 10)[1]["nft"][E.OPERATING]["kl"]["word"] == word


def test_under_no_difference_a_word_other_than_tie_comes_at_most_at_the_nominal_rate():
    """1,000 simulated readings (10 seeds, four families, every difference N(0, 1), measured points): the share
    with any "better" word stays within the family-wise 5 % (plus three Monte Carlo standard errors). The earlier
    pair of rules (one-sided Holm for the guard, an unadjusted interval for the family) exceeds it."""
    rng, draws, words, old = random.Random(3), 1000, 0, 0
    families = ("kl", "lower_lr", "early_stop", "rescale")
    for _ in range(draws):
        rows = {"guard": {"diff": None, "chord": 0.0}}
        for fam in families:
            rows[fam] = {"diff": E.paired([rng.gauss(0, 1) for _ in range(10)]), "chord": 0.0}
        E.judge_comparisons(rows, "guard")
        words += any(rows[f]["word"] != "tie" for f in families)
        one_sided = E.holm({f: rows[f]["diff"].p for f in families})
        old += any(one_sided.values()) or any(rows[f]["diff"].hi < 0 for f in families)
    bound = E.ALPHA + 3 * math.sqrt(E.ALPHA * (1 - E.ALPHA) / draws)
    assert words / draws <= bound < old / draws, (words, old)


# ---------------------------------------------------------------------------------------------------------------
# the knob question


def knob_paths(n_seeds=3):
    """One method, n seeds: the guard at lam 0.4, 0.2, 0.1 at 80, 85, 90 % of the gain (reward 0 -> 1), KL at
    beta 0.1, 0.01, 0.001 at 30, 60, 90 %; KL's quality 1 better than the guard's at the same reward (+ 0.01 per
    seed), early stopping along the guard's line."""
    guard = [[(0.0, 0.0), (0.8, -2.0), (0.85, -2.5), (0.9, -3.0), (1.0, -10.0)] for _ in range(n_seeds)]
    kl = [[(0.0, 0.0), (0.3, 0.0), (0.6, -1.0), (0.9, -2.0 + 0.01 * s), (1.0, -10.0)] for s in range(n_seeds)]
    early = [[(0.0, 0.0), (0.5, -1.0), (0.9, -3.0), (1.0, -10.0)] for _ in range(n_seeds)]
    return {"nft": {"guard": guard, "kl": kl, "early_stop": early}}, {
        "nft": {"guard": [0.4, 0.2, 0.1], "kl": [0.1, 0.01, 1e-3]}
    }


def test_knobs_give_each_familys_spread_and_slope_per_doubling():
    paths, values = knob_paths()
    lines, summary = E.knobs(paths, values, LOGP)
    guard, kl = summary["nft"]["grids"]["guard"], summary["nft"]["grids"]["kl"]
    assert guard["share"][0] == pytest.approx([0.8, 0.85, 0.9]) and guard["spread_share"] == pytest.approx([0.1] * 3)
    assert guard["slope_share"] == pytest.approx([-0.1 / 2] * 3)  # 10 % of the gain over two doublings of lam
    assert kl["slope_share"] == pytest.approx([-0.6 / math.log2(100)] * 3)  # 60 % over two decades of beta
    assert summary["nft"]["guard_vs_kl"].mean == pytest.approx(0.05 - 0.6 / math.log2(100))  # the guard moves less
    assert any(
        line.startswith("nft guard over 3 members: reward spread 0.10 [0.10, 0.10] of the gain") for line in lines
    )
    assert any(line.startswith("nft guard against kl, |reward share moved per doubling|") for line in lines)
    assert "early_stop" not in summary["nft"]["grids"]  # no knob: read in the rankings only


def test_knob_rankings_judge_every_member_by_the_one_definition():
    paths, values = knob_paths()
    lines, summary = E.knobs(paths, values, LOGP)
    at_guard = summary["nft"]["rankings"]["guard"]
    assert [r["knob"] for r in at_guard] == [0.4, 0.2, 0.1]
    # lam 0.4, 0.2: KL read between its members at 60 % and 90 % of the gain (a chord 0.3 wide): no verdict; lam
    # 0.1 at 90 %: KL measured there, better by 1 on every seed
    assert [r["rows"]["kl"]["word"] for r in at_guard] == ["no verdict", "no verdict", "kl better"]
    assert at_guard[2]["rows"]["kl"]["diff"].mean == pytest.approx(-1.01)
    ranking = next(line for line in lines if line.startswith("nft guard ranking at its members (0.4, 0.2, 0.1): "))
    assert "kl: no verdict, no verdict, kl better;" in ranking
    # at KL's members, the guard's path is read: 30 % and 60 % lie below its strongest member (chords from the
    # reference, 0.8 wide), 90 % on its measured member
    at_kl = summary["nft"]["rankings"]["kl"]
    assert [r["rows"]["guard"]["word"] for r in at_kl] == ["no verdict", "no verdict", "kl better"]
    assert lines[-1].startswith("nft kl ranking at its members (0.1, 0.01, 0.001): guard: ")
    same = E.knobs(
        {"nft": {**paths["nft"], "kl": [[(0.0, 0.0), (0.8, -1.0), (0.85, -1.5), (0.9, -2.0), (1.0, -10.0)]] * 3}},
        values,
        LOGP,
    )[0]
    assert any("kl: kl better, kl better, kl better (the same at every member)" in line for line in same)


def test_knobs_without_a_gain_say_so_instead_of_a_share():
    paths, values = knob_paths()
    flat = {f: [[(r * 0.0, q) for r, q in path] for path in per_seed] for f, per_seed in paths["nft"].items()}
    lines, summary = E.knobs({"nft": flat}, values, LOGP)
    assert "nft guard: no seed's un-guarded run gained reward, no share of a gain to report" in lines
    assert summary["nft"]["guard_vs_kl"] is None


# ---------------------------------------------------------------------------------------------------------------
# the table, strict JSON


def test_format_table():
    ev = lambda ratio, logp: {"full": {"ratio": ratio, "logp": logp}}
    runs = {
        "nft": {
            "none": [{**ev(1.21, 10.01), "rescale": {"logp": 9.51}}, {**ev(1.18, 9.98), "rescale": {"logp": 9.48}}],
            "guard": [ev(1.01, 11.01), ev(0.98, 10.98)],
        }
    }
    cols = [E.Column("full", "ratio", "norm ratio"), E.Column("full", "logp", "log p", 2, 3)]
    rows = E.format_table(runs, ev(1.0, 10.0), cols).splitlines()
    assert rows[0] == f"{'run':<11}{'norm ratio':>14}{'log p':>14}" and rows[1] == "-" * 39
    assert rows[2] == f"{'reference':<11}{'1.000':>14}{'10.000':>14}"
    cell = lambda x, p: f"{statistics.mean(x):.{p}f}±{statistics.stdev(x):.{p}f}"
    assert rows[3] == f"{'nft':<11}{cell([1.21, 1.18], 3):>14}{cell([10.01, 9.98], 2):>14}"
    assert rows[4] == f"{'nft+guard':<11}{cell([1.01, 0.98], 3):>14}{cell([11.01, 10.98], 2):>14}"
    assert rows[5] == f"{'nft rescl':<11}{'1.000':>14}{cell([9.51, 9.48], 2):>14}"  # rescaled: ratio 1 by construction
    assert len(rows) == 6


def test_json_is_strict():
    obj = {"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5], ("nft", "none"): (1, 2), "c": {"d": None}}
    safe = cli.json_safe(obj)
    assert safe == {"a": None, "b": [None, None, 1.5], "('nft', 'none')": [1, 2], "c": {"d": None}}


def test_json_files_round_trip_without_nan_tokens(tmp_path):
    """What the drivers write: cli.dumps's strict JSON through cli.write_atomic."""
    cli.write_atomic(tmp_path / "m.json", cli.dumps({"x": [1.0, float("nan")], "y": "z"}, indent=1))
    text = (tmp_path / "m.json").read_text()
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert back == {"x": [1.0, None], "y": "z"}


def test_shared_figures_draw(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, reference, *_ = experiment(random.Random(0), n_seeds=2)
    runs = {"nft": runs["nft"]}
    histories = {"nft": {v: [{"step": [0, 1], "reward": [0.5, 0.6], "logp": [1.0, 2.0]}] * 2 for v in E.VARIANTS}}
    paths = {"guard": [[(0.0, 0.0), (0.5, -1.0), (1.0, -3.0)]] * 2, "kl": [[(0.0, 0.0), (0.6, -2.0), (1.0, -3.0)]] * 2}
    fig, axes = plt.subplots(1, 4)
    E.plot_profile(axes[0], runs, 2)
    E.plot_curves(axes[1], histories, "reward", "logp")
    E.plot_reward_quality(axes[2], runs, reference, LOGP, (10, 3))
    E.plot_frontier(axes[3], paths, LOGP, "nft", operating=[(0.5, -1.0), (0.7, -1.0)])
    assert len(axes[0].lines) == 2 + 1 and len(axes[1].lines) == 2  # two variants (+ the line at ratio 1)
    assert [line.get_label() for line in axes[3].lines[:2]] == ["guard", "kl"]
    marks = [line.get_xdata()[0] for line in axes[3].lines[2:]]  # the guarded reward, then 50 / 75 / 90 % of gain
    assert marks == pytest.approx([0.6, *E.LEVELS]) and len(axes[3].texts) == 4
    assert list(axes[3].lines[1].get_xdata()) == [0.0, 0.6, 1.0]  # the mean path over seeds
    fig.savefig(tmp_path / "f.png")
    plt.close(fig)
