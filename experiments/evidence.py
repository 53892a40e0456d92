"""The evidence behind every experiment here: statistics over seeds, the verdict rules of docs/protocol.md, the
early-stopping control, the reward-quality frontiers, the results table and the shared figures.
Written once, used by both experiments (toy.py, digits.py).

The data every function reads, per method (nft, awm, dpo) and variant ("none": base loss, "guard": + NormGuard):

    runs[method][variant]  a list, one per seed, of evaluations: {"full": {...}, "few": {...}, "profile": [...]}
                           and, for "none" only, "rescale" and "rescale_few" (the same model sampled with
                           v <- v·‖v_ref‖/‖v‖ at every step). Each phase holds "reward", the quality metric
                           (Quality.key), and along the model's own trajectories "ratio" (mean of per-point
                           ‖v_θ‖/‖v_ref‖) and "rms_ratio" (√mean‖v_θ‖² / √mean‖v_ref‖²), both absent under
                           rescale, where they are 1 by construction; "profile" is the ratio per bin of t.
    null_runs[method]["none"]  the same for the shuffled-reward control (rewards permuted across the batch).
    reference_eval         the reference's evaluation: one dict for every seed (a shared eval set, the toy) or a
                           list, one per seed (each seed its own eval set, digits): gains pair with the seed's own.
    adjoint[method]        a list, one per seed, of the un-guarded model's {"total_mean", "total_std",
                           "frac_positive"} of Σ_k dR/dα_k (ng.velocity_scale_sensitivity); adjoint_reference the
                           reference's, one per seed on that seed's noise (or one dict for every seed).
    histories[method][variant]  a list, one per seed, of checkpoint curves {"step", "reward", <quality key>, ...}.
    paths[method][family]  a list, one per seed, of [(reward, quality), ...] from the reference to the official
                           un-guarded run through the family's members (see frontier).
    knob_values[method][family]  the knob of each member of paths[method][family] in path order (see knobs).

Seed s of every variant and family draws the same noise, so differences over seeds are paired. Statistics: a
paired t interval and one-sided t-test per method, Holm across methods, for the paper's claims; a two-sided test,
Holm across families, for "guard better" / "<family> better" at matched reward; a frontier reading on a chord wider
than CHORD_MAX of the gain is no verdict (docs/protocol.md, amendment 2). Imports torch, scipy (its
t distribution) and the standard library; matplotlib inside the functions that draw.
"""

import math
import statistics
from dataclasses import dataclass

import torch
from scipy.special import stdtr, stdtrit  # Student t's CDF and its inverse

VARIANTS = ("none", "guard")
METHOD_COLORS = {"nft": "tab:blue", "awm": "tab:orange", "dpo": "tab:green"}
ALPHA = 0.05  # one-sided level of every test, family-wise across the methods of one claim (Holm)
PAPER_RANGE = (1.05, 1.15)  # claim 1: the inflation the paper reports
KEEP_GAIN = 0.7  # claim 4: the guard keeps at least this share of the un-guarded reward gain
EQUIVALENCE_MARGIN = 0.2  # claim 3: a standardised mean sensitivity inside ±0.2 is "no coherent signal"
OPERATING = "guard"  # frontier level: each seed's headline guarded run's own reward (primary, docs/protocol.md)
LEVELS = (0.5, 0.75, 0.9)  # frontier: secondary levels, matched reward r_ref + f·(un-guarded gain)
PRIMARY_FALLBACK = 0.75  # the primary level where no guarded run's point is given
# a frontier comparison read on a chord wider than this share of the un-guarded gain is no verdict: a chord's gap to
# a smooth frontier grows as its width squared, and the 30 % chords the review measured misread SW by 0.025
CHORD_MAX = 0.10
# claim 2: the axis that does not carry the claim may be worse by at most this share of the un-guarded run's
# seed-to-seed sd on that axis (a difference smaller than a quarter of what the seed does is not one a user sees)
NONINFERIORITY_SD = 0.25


@dataclass(frozen=True)
class Quality:
    """The quality metric the verdicts judge by: its key in an evaluation, its name in the text, its direction.

    toy: Quality("sw", "SW→tilted", higher_is_better=False, digits=3); digits: Quality("fd", "FD", False, digits=1).
    """

    key: str
    label: str
    higher_is_better: bool
    digits: int = 2  # decimals of its differences in the verdict lines

    @property
    def sign(self):
        return 1 if self.higher_is_better else -1

    def gain(self, a, b):
        """Per-seed improvement of a over b in this metric (> 0: a is better), whatever its direction."""
        return [self.sign * (x - y) for x, y in zip(a, b)]


@dataclass(frozen=True)
class Column:
    """One column of the results table: the evaluation's phase ("full" or "few") and key, header, decimals."""

    phase: str
    key: str
    header: str
    digits: int = 3
    reference_digits: int | None = None  # the reference row's decimals (a single number): default `digits`


# ---------------------------------------------------------------------------------------------------------------
# statistics over seeds


def mean_std(x):
    """Mean and sample std (n - 1) over seeds, NaN entries dropped; std 0 for one value, (nan, nan) for none."""
    x = torch.as_tensor(x, dtype=torch.float64)
    x = x[~x.isnan()]
    if len(x) == 0:
        return float("nan"), float("nan")
    return x.mean().item(), (x.std(unbiased=True).item() if len(x) > 1 else 0.0)


def paired_diff(a, b):
    """a - b seed by seed."""
    return [x - y for x, y in zip(a, b)]


def collect(runs, method, variant, phase, key):
    """Per-seed values of one metric: [evaluation[phase][key] for each seed of runs[method][variant]]."""
    return [r[phase][key] for r in runs[method][variant]]


@dataclass(frozen=True)
class Paired:
    """Per-seed differences d (> 0: the claim's direction): n, mean, two-sided 95 % t interval [lo, hi], and the
    one-sided p value of mean > 0 (paired t-test). One seed gives no interval and p = 1: no test is possible."""

    n: int
    mean: float
    lo: float
    hi: float
    p: float

    def text(self, digits=3):
        if self.n < 2:
            return f"{self.mean:+.{digits}f} (1 seed: no test)"
        return f"{self.mean:+.{digits}f} [{self.lo:+.{digits}f}, {self.hi:+.{digits}f}]"


def paired(d):
    """The paired summary of per-seed differences d. A NaN is an error: the caller decides what it means."""
    x = [float(v) for v in d]
    if not x or not all(math.isfinite(v) for v in x):
        raise ValueError(f"d: expected one finite difference per seed, got {x}")
    n, mean = len(x), math.fsum(x) / len(x)
    if n == 1:
        return Paired(1, mean, math.nan, math.nan, 1.0)
    if min(x) == max(x):  # every seed gave the same difference: the interval collapses, the sign decides
        return Paired(n, mean, mean, mean, 0.0 if mean > 0 else 1.0)
    # the sample sd in floats: statistics.stdev's exact Fractions took half the time of a whole verdict, and the
    # suite's simulated nulls call this ~40,000 times
    se = math.sqrt(math.fsum((v - mean) ** 2 for v in x) / (n - 1) / n)
    half = float(stdtrit(n - 1, 0.975)) * se
    return Paired(n, mean, mean - half, mean + half, float(stdtr(n - 1, -mean / se)))


def holm(pvalues, alpha=ALPHA):
    """{name: passed} by Holm's step-down procedure: with p sorted ascending, the i-th (from 0) passes when
    p <= alpha / (m - i) and every smaller one passed. Family-wise error <= alpha under any dependence."""
    passed = {k: False for k in pvalues}
    for i, k in enumerate(sorted(pvalues, key=pvalues.get)):
        if pvalues[k] > alpha / (len(pvalues) - i):
            break
        passed[k] = True
    return passed


def two_sided_p(s):
    """The two-sided p value of a Paired summary, 2·min(p, 1 - p): 1 for one seed (no test), 0 when every seed
    gave the same non-zero difference, 1 when they all gave 0."""
    if s.n < 2:
        return 1.0
    if s.lo == s.hi:
        return 0.0 if s.mean != 0 else 1.0
    return min(1.0, 2 * min(s.p, 1 - s.p))


def margin_position(s):
    """Where the 95 % interval of a non-inferiority difference (margin already added) lies against 0: "above the
    margin", "on the margin" (it contains 0) or "below the margin"; None for one seed (no interval)."""
    if s.n < 2:
        return None
    return "above the margin" if s.lo > 0 else "below the margin" if s.hi < 0 else "on the margin"


def equivalence_p(d, margin):
    """Two one-sided tests that the mean of d lies inside (-margin, margin): the larger of the two p values."""
    return max(paired([v + margin for v in d]).p, paired([margin - v for v in d]).p)


def verdict_word(passed):
    """One phrase for a claim from {method: passed}: REPRODUCED (all), PARTLY reproduced (naming those that
    pass), NOT reproduced (none), NOT TESTED (no method could test it)."""
    if not passed:
        return "NOT TESTED"
    winners = [m for m, ok in passed.items() if ok]
    if len(winners) == len(passed):
        return "REPRODUCED"
    return f"PARTLY reproduced ({', '.join(winners)})" if winners else "NOT reproduced"


def read_path(rewards, qualities, target):
    """A path of points (rewards[i], qualities[i]) read at its first crossing of `target`, linear in reward
    between the two points around it. Returns (quality, chord width, reached): the width is the reward distance
    between those two points as a share of the path's gain rewards[-1] - rewards[0] (inf if the path has none), 0
    on a measured point (the first point, an exact hit); a path that never reaches `target` is read at its point of
    highest reward, the closest it comes (width 0, reached False)."""
    gain = rewards[-1] - rewards[0]
    for i, r in enumerate(rewards):
        if r >= target:
            if i == 0 or r == target:
                return qualities[i], 0.0, True
            w = (target - rewards[i - 1]) / (r - rewards[i - 1])
            width = (r - rewards[i - 1]) / gain if gain > 0 else math.inf
            return qualities[i - 1] + w * (qualities[i] - qualities[i - 1]), width, True
    return qualities[max(range(len(rewards)), key=rewards.__getitem__)], 0.0, False


def chord_text(widths):
    """A comparison's chord widths over seeds as printed: mean and largest share of the gain."""
    return f"chord {statistics.fmean(widths):.2f} (max {max(widths):.2f})"


# ---------------------------------------------------------------------------------------------------------------
# the early-stopping control


def early_stopping_control(history_none, history_guard, quality):
    """Quality of the guarded run against the un-guarded run's own checkpoints at the guarded run's final reward.

    Walk the un-guarded checkpoints (the first: the reference) to the first whose reward reaches the guarded
    run's final reward and interpolate quality there, linear in reward. If the un-guarded run never reaches it,
    the comparator is its checkpoint of highest reward, the closest any early stop comes: such a seed is counted,
    not dropped. Returns (quality.gain of the guarded run over the comparator, > 0: guard better; reached?; the
    chord's width as a share of the un-guarded run's gain, read_path).
    """
    key = quality.key
    target, q_guard = history_guard["reward"][-1], history_guard[key][-1]
    matched, width, reached = read_path(history_none["reward"], history_none[key], target)
    return quality.gain([q_guard], [matched])[0], reached, width


# ---------------------------------------------------------------------------------------------------------------
# the drift alarm's lead: does the norm ratio cross its threshold before quality degrades?


def drift_lead(history, quality, alarm, damage):
    """One run's checkpoint evaluations (history: lists "step", "reward", quality.key and "ratio_max", the largest
    of the overall norm ratio and its t bins, as train_full's alarm reads it; the first entry is step 0): the
    first step whose ratio_max exceeds `alarm`, the first whose quality is worse than step 0's by at least
    `damage` (in the metric's own units), the reward at each, and lead = damage step - alarm step (> 0: the alarm
    came first). A step never reached is None, and so is the lead then."""
    worse = quality.gain([history[quality.key][0]] * len(history["step"]), history[quality.key])

    def first(crossed):
        i = next((i for i, c in enumerate(crossed) if c), None)
        return (None, None) if i is None else (history["step"][i], history["reward"][i])

    step_alarm, reward_alarm = first([r > alarm for r in history["ratio_max"]])
    step_damage, reward_damage = first([w >= damage for w in worse])
    lead = None if step_alarm is None or step_damage is None else step_damage - step_alarm
    return dict(
        step_alarm=step_alarm,
        reward_alarm=reward_alarm,
        step_damage=step_damage,
        reward_damage=reward_damage,
        lead=lead,
    )


def drift_lead_line(method, leads, quality, alarm, damage):
    """One line over seeds: the lead's mean [95 % t interval] (one-sided test of lead > 0), the seeds where the
    alarm never fired or quality never degraded (counted, not dropped), and the mean reward at each event."""
    both = [x["lead"] for x in leads if x["lead"] is not None]
    missed = sum(x["step_alarm"] is None and x["step_damage"] is not None for x in leads)
    early = sum(x["step_alarm"] is not None and x["step_damage"] is None for x in leads)
    lead = paired(both).text(0) + " steps" if both else "n/a"

    def mean(key):
        values = [x[key] for x in leads if x[key] is not None]
        return f"{statistics.fmean(values):.3f}" if values else "n/a"

    return (
        f"{method}: alarm at ratio {alarm:g} against {quality.label} worse by {damage:g}: lead {lead} on {len(both)} "
        f"of {len(leads)} seeds; {missed} seeds degraded without an alarm, {early} alarmed without degrading; mean "
        f"reward at the alarm {mean('reward_alarm')}, at the damage {mean('reward_damage')}"
    )


# ---------------------------------------------------------------------------------------------------------------
# the verdicts (docs/protocol.md): one one-sided p value per method and claim, Holm across the methods


def claim_inflation(runs, null_runs, m, key):
    """(1) The un-guarded norm ratio exceeds 1, and exceeds the shuffled-reward control's on the same seed (both
    must hold: p is the larger of the two). Returns (p, does the interval meet the paper's 5-15 %?, text)."""
    ratio = collect(runs, m, "none", "full", key)
    above_one = paired([r - 1 for r in ratio])
    lo, hi = 1 + above_one.lo, 1 + above_one.hi
    in_range = above_one.n > 1 and not (hi < PAPER_RANGE[0] or lo > PAPER_RANGE[1])
    text = f"{m} {1 + above_one.mean:.3f} [{lo:.3f}, {hi:.3f}]"
    if not null_runs or m not in null_runs:
        return 1.0, in_range, text + " (no shuffled-reward control run: untested)"
    above_null = paired(paired_diff(ratio, collect(null_runs, m, "none", "full", key)))
    return max(above_one.p, above_null.p), in_range, text + f", minus shuffled-reward control {above_null.text()}"


def claim_rescale(runs, m, quality):
    """(2) Pareto, guarded vs the rescaled un-guarded model: better on reward or on quality (the smaller p,
    Bonferroni over the two axes) and non-inferior on the other within NONINFERIORITY_SD of the un-guarded run's
    seed-to-seed sd on that axis (one-sided test of d + margin > 0). Returns (p, text)."""
    q = quality.key
    d_reward = paired_diff(collect(runs, m, "guard", "full", "reward"), collect(runs, m, "none", "rescale", "reward"))
    d_quality = quality.gain(collect(runs, m, "guard", "full", q), collect(runs, m, "none", "rescale", q))
    reward, qual = paired(d_reward), paired(d_quality)
    sd = {axis: mean_std(collect(runs, m, "none", "full", axis))[1] for axis in ("reward", q)}
    if reward.p <= qual.p:  # the reward carries the claim: quality must be non-inferior
        better, other, axis, label = reward, d_quality, q, quality.label
    else:
        better, other, axis, label = qual, d_reward, "reward", "reward"
    margin = NONINFERIORITY_SD * sd[axis]
    not_worse = paired([x + margin for x in other])
    p = max(min(1.0, 2 * better.p), not_worse.p)
    return p, (
        f"{m} guard − rescaled: reward {reward.text()}, {quality.label} better by {qual.text(quality.digits)}; "
        f"{label} not worse by more than {margin:.3g}: p = {not_worse.p:.3f}"
    )


def claim_adjoint(adjoint, adjoint_reference, m):
    """(3) No coherent first-order signal: the standardised mean sensitivity δ = mean(dR/dα) / sd(dR/dα) of the
    trained model is equivalent to 0 within ±EQUIVALENCE_MARGIN (TOST). Returns (p, text), δ at the reference too."""
    delta = [a["total_mean"] / a["total_std"] for a in adjoint[m]]
    refs = adjoint_reference if isinstance(adjoint_reference, list) else [adjoint_reference] * len(delta)
    delta_ref = [a["total_mean"] / a["total_std"] for a in refs]
    after, change = paired(delta), paired(paired_diff(delta, delta_ref))
    text = f"{m} δ {after.text(2)} (reference {statistics.fmean(delta_ref):+.2f}, change {change.text(2)})"
    return equivalence_p(delta, EQUIVALENCE_MARGIN), text


def claim_keeps_reward(runs, m, quality, r0):
    """(4) The guard improves quality over the un-guarded run and keeps >= KEEP_GAIN of its reward gain, tested as
    non-inferiority r_guard - r_none + (1 - KEEP_GAIN)·(r_none - r0) > 0, r0 the seed's reference reward. The text
    gives the kept share (ratio of means), its range over seeds and where the margin test's interval lies
    (margin_position: "on the margin" when it contains 0). Returns (p, quality gains, position, text)."""
    q = quality.key
    r_none, r_guard = collect(runs, m, "none", "full", "reward"), collect(runs, m, "guard", "full", "reward")
    gains = quality.gain(collect(runs, m, "guard", "full", q), collect(runs, m, "none", "full", q))
    keeps = paired([g - n + (1 - KEEP_GAIN) * (n - r) for g, n, r in zip(r_guard, r_none, r0)])
    kept = statistics.fmean(paired_diff(r_guard, r0)) / statistics.fmean(paired_diff(r_none, r0))
    per_seed = [(g - r) / (n - r) for g, n, r in zip(r_guard, r_none, r0) if n != r]
    spread = f" (seeds {min(per_seed):.0%} to {max(per_seed):.0%})" if len(per_seed) > 1 else ""
    position = margin_position(keeps)
    margin = f"; {KEEP_GAIN:.0%} margin test {keeps.text()}" + (f": {position}" if position else "")
    better = paired(gains)
    text = f"{m} reward gain kept {kept:.0%}{spread}{margin}; {quality.label} better by {better.text(quality.digits)}"
    return max(better.p, keeps.p), gains, position, text


def claim_few_steps(runs, m, quality, gains_full):
    """(4b) The guard's quality gain at the few-step sampler exceeds its gain at full steps. Returns (p, text)."""
    q = quality.key
    gains_few = quality.gain(collect(runs, m, "guard", "few", q), collect(runs, m, "none", "few", q))
    more = paired(paired_diff(gains_few, gains_full))
    return more.p, f"{m} few-step gain minus full-step gain {more.text(quality.digits)}"


def claim_not_early_stopping(control, m, quality):
    """(5) The guarded run beats the un-guarded run's own checkpoints at matched reward, every seed counted; read on
    chords wider than CHORD_MAX of the gain (mean over seeds) it is no verdict and does not pass."""
    deltas, reached, widths = zip(*control[m])
    better = paired(deltas)
    unreached = len(deltas) - sum(reached)
    wide = statistics.fmean(widths) > CHORD_MAX
    return 1.0 if wide else better.p, (
        f"{m} {quality.label} better by {better.text(quality.digits)} ({unreached} of {len(deltas)} seeds never "
        f"reached the guarded reward: compared at their best checkpoint; {chord_text(widths)}"
        + (f" > {CHORD_MAX:g}: no verdict)" if wide else ")")
    )


def reference_rewards(reference_eval, runs):
    """The reference's reward per seed: one evaluation for every seed (a dict: a shared eval set) or one per seed
    (a list in the seeds' order: each seed its own eval set), so that gains are paired with the seed's own."""
    n = len(next(iter(next(iter(runs.values())).values())))
    if isinstance(reference_eval, dict):
        return [reference_eval["full"]["reward"]] * n
    if len(reference_eval) != n:
        raise ValueError(f"reference_eval: expected one evaluation per seed ({n}), got {len(reference_eval)}")
    return [e["full"]["reward"] for e in reference_eval]


def verdicts(
    runs, reference_eval, adjoint, adjoint_reference, control, quality, few_steps, null_runs=None, ratio_key="rms_ratio"
):
    """One line per claim of the paper with the numbers it rests on. Returns (lines, flags).

    Each claim gives a one-sided p value per method; Holm across the methods decides which pass (family-wise
    α = ALPHA). A method whose un-guarded run gained no reward (one-sided test) cannot test any claim and is set
    apart. Differences print as mean [95 % interval] over seeds; quality differences as "better by", signed by
    the metric's direction. adjoint None: claim 3 is not tested (a reward without a gradient). flags["4_margin"]:
    per method, where claim 4's margin test lies (margin_position). See the module docstring for the inputs and
    docs/protocol.md for the rules.
    """
    r0 = reference_rewards(reference_eval, runs)
    gained = {m: paired(paired_diff(collect(runs, m, "none", "full", "reward"), r0)).p <= ALPHA for m in runs}
    methods = [m for m, ok in gained.items() if ok]
    note = "".join(f"; {m} set aside: its un-guarded run gained no reward" for m, ok in gained.items() if not ok)
    if len(r0) < 2:  # one seed has no interval (paired gives p = 1): no gain test, nor any other, is possible
        note = "; 1 seed: no test possible"
    flags, lines = {"not_tested": [m for m, ok in gained.items() if not ok]}, []

    def judge(name, claim, results, extra="", word=verdict_word):
        flags[name] = passed = holm({m: r[0] for m, r in results.items()})
        texts = "; ".join(r[-1] for r in results.values()) or "no method to test"
        lines.append(f"({name}) {claim}: {word(passed)} — {texts}{extra}{note}")
        return passed

    inflation = {m: claim_inflation(runs, null_runs, m, ratio_key) for m in methods}
    flags["1_in_paper_range"] = in_range = {m: r[1] for m, r in inflation.items()}

    def inflation_word(passed):  # an inflation whose interval misses the paper's range counts for "partly" only
        if passed and all(passed.values()) and all(in_range.values()):
            return "REPRODUCED"
        winners = [m + ("" if in_range[m] else ": outside 5-15 %") for m, ok in passed.items() if ok]
        return f"PARTLY reproduced ({', '.join(winners)})" if winners else verdict_word(passed)

    judge("1", f"RL inflates the velocity norm ({ratio_key})", inflation, " (paper: 1.05-1.15)", inflation_word)
    judge("2", "inference-time rescale does not help", {m: claim_rescale(runs, m, quality) for m in methods})
    if adjoint is None:
        flags["3"] = {}
        lines.append(
            "(3) no coherent first-order magnitude signal: NOT TESTED — the reward has no gradient, so no "
            f"adjoint diagnostic{note}"
        )
    else:
        judge(
            "3",
            "no coherent first-order magnitude signal",
            {m: claim_adjoint(adjoint, adjoint_reference, m) for m in methods},
            f" (rule: δ within ±{EQUIVALENCE_MARGIN})",
        )
    keeps = {m: claim_keeps_reward(runs, m, quality, r0) for m in methods}
    flags["4_margin"] = {m: r[2] for m, r in keeps.items()}
    passed = judge("4", "guard keeps reward and improves quality", keeps)
    few = {m: claim_few_steps(runs, m, quality, keeps[m][1]) for m in methods if passed[m]}
    judge("4b", f"more so at {few_steps} steps", few)
    judge("5", "not an early-stopping effect", {m: claim_not_early_stopping(control, m, quality) for m in methods})
    return lines, flags


# ---------------------------------------------------------------------------------------------------------------
# the frontiers: quality at matched reward, family against family


def quality_at_level(per_seed, level, operating=None):
    """Each seed's path read at r* (read_path), where r* = r_ref + level·(r_official - r_ref) for a fraction, or
    r* = operating[s][0] (a measured point's reward on seed s) for level OPERATING. Returns (values, chord widths,
    seeds whose crossing lies between the reference and the first member: an interpolation from the reference,
    seeds whose path never reaches r*: read at its point of highest reward instead, the closest it comes)."""
    values, widths, interpolated, unreached = [], [], 0, 0
    for s, path in enumerate(per_seed):
        r, q = zip(*path)
        target = operating[s][0] if level == OPERATING else r[0] + level * (r[-1] - r[0])
        value, width, reached = read_path(r, q, target)
        values.append(value)
        widths.append(width)
        unreached += not reached
        interpolated += width > 0 and next(i for i, x in enumerate(r) if x >= target) == 1
    return values, widths, interpolated, unreached


def frontier(paths, quality, operating=None, levels=LEVELS):
    """Quality at matched reward along each family's path, the guard against every other family.

    paths[method][family]: one path per seed, [(reward, quality), ...] from the reference's point through the
    family's members (strongest effect first) to the official un-guarded run's point, which every family of a
    seed shares. operating[method]: per seed, the headline guarded run's (reward, quality). The primary level
    is OPERATING: every other family read at the guarded run's own reward, against its measured quality. The
    fractions in `levels` are secondary (without `operating`, the fraction PRIMARY_FALLBACK is primary). At every
    level each family's difference to the guard is judged by the one definition (judge_comparisons: two-sided,
    Holm across the level's families, no verdict on a chord wider than CHORD_MAX). Returns (lines, summary):
    summary[method][level][family] = {"mean", "diff": Paired of the guard's gain over the family (> 0: the guard
    is better; None for the guard), "chord", "chord_max" (the comparison's widths over seeds), "passed", "word",
    "interpolated", "unreached"} (see quality_at_level).
    """
    lines, summary = [], {}
    for m, families in paths.items():
        has_operating = operating is not None and m in operating
        primary = OPERATING if has_operating else PRIMARY_FALLBACK
        summary[m] = {}
        for level in ((OPERATING,) if has_operating else ()) + tuple(levels):
            rows = frontier_level(families, quality, level, operating and operating.get(m))
            summary[m][level] = rows
            where = "the guarded run's own reward" if level == OPERATING else f"{level:.0%} of the un-guarded gain"
            lines.append(frontier_line(m, rows, quality, where + (" (primary)" if level == primary else "")))
    return lines, summary


def frontier_level(families, quality, level, operating, anchor="guard"):
    """One reading of one method's families: {family: row} (see frontier). At level OPERATING the anchor family's
    point is the measured one in `operating` (per seed (reward, quality)) and every other family is read at its
    reward. A comparison's chord width on a seed is the wider of its two readings'."""
    at = {fam: quality_at_level(per_seed, level, operating) for fam, per_seed in families.items()}
    if level == OPERATING:  # the anchor's own point is measured, not read off its path
        at[anchor] = ([q for _, q in operating], [0.0] * len(operating), 0, 0)
    anchor_values, anchor_widths = at[anchor][:2]
    rows = {}
    for fam, (values, widths, interpolated, unreached) in at.items():
        own = fam == anchor
        w = widths if own else [max(a, b) for a, b in zip(anchor_widths, widths)]
        rows[fam] = {
            "mean": statistics.fmean(values),
            "diff": None if own else paired(quality.gain(anchor_values, values)),
            "chord": statistics.fmean(w),
            "chord_max": max(w),
            "interpolated": interpolated,
            "unreached": unreached,
        }
    judge_comparisons(rows, anchor)
    return rows


def judge_comparisons(rows, anchor):
    """The one definition of "<anchor> better" / "<family> better" (docs/protocol.md, amendment 2 (c)), in place:
    a two-sided paired t-test of each family's difference to the anchor, Holm across the families compared at this
    reading (family-wise ALPHA) sets row["passed"]; row["word"] is "<anchor> better" or "<family> better" by the
    sign of the mean where it passed, "tie" where not, and "no verdict" where the comparison's mean chord width
    exceeds CHORD_MAX, whatever its test (it still counts in Holm's m). The anchor's row gets None for both."""
    compared = [fam for fam, row in rows.items() if row["diff"] is not None]
    passed = holm({fam: two_sided_p(rows[fam]["diff"]) for fam in compared})
    for fam, row in rows.items():
        row["passed"], row["word"] = passed.get(fam), None
        if fam in compared:
            better = anchor if row["diff"].mean > 0 else fam
            row["word"] = "no verdict" if row["chord"] > CHORD_MAX else f"{better} better" if passed[fam] else "tie"


def frontier_line(method, rows, quality, where, anchor="guard"):
    """One printed line: every family's mean quality, its difference to the anchor with its interval, the chord it
    was read on, and the word (judge_comparisons)."""
    parts = []
    for fam, row in rows.items():
        part = f"{fam} {row['mean']:.{quality.digits}f}"
        chord = f"chord {row['chord']:.2f} (max {row['chord_max']:.2f})"
        if row["diff"] is None:
            part += f" ({chord})" if row["chord_max"] > 0 else " (measured)"
        else:
            word = f" > {CHORD_MAX:g}: no verdict" if row["word"] == "no verdict" else f": {row['word']}"
            part += f" ({anchor} better by {row['diff'].text(quality.digits)}, {chord}{word})"
        if row["interpolated"]:
            part += f" [interpolated from the reference in {row['interpolated']} seeds]"
        if row["unreached"]:
            part += f" [never reached in {row['unreached']} seeds: read at its highest reward]"
        parts.append(part)
    best = (max if quality.higher_is_better else min)(rows, key=lambda k: rows[k]["mean"])
    return f"{method} at {where}: best {best}; {quality.label}: " + "; ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# the knob question: how much tuning does each family need?


def estimate(xs, digits=2):
    """mean [95 % t interval] over seeds, unsigned (a level, not a difference); the mean alone for one seed."""
    s = paired(xs)
    return f"{s.mean:.{digits}f}" + ("" if s.n < 2 else f" [{s.lo:.{digits}f}, {s.hi:.{digits}f}]")


def slope(x, y):
    """Least-squares slope of y on x."""
    mx, my = statistics.fmean(x), statistics.fmean(y)
    return math.fsum((a - mx) * (b - my) for a, b in zip(x, y)) / math.fsum((a - mx) ** 2 for a in x)


def grid_stats(per_seed, values):
    """One family's members over the seeds whose un-guarded run gained reward: per seed, each member's share of the
    gain f = (r - r_ref)/(r_official - r_ref) and quality; the spread (max - min) of each over the grid and the
    slope of each per doubling of the knob (least squares on log2(knob); None with fewer than two knob values)."""
    x = [math.log2(v) for v in values]
    gained = [path for path in per_seed if path[-1][0] > path[0][0]]
    f = [[(r - path[0][0]) / (path[-1][0] - path[0][0]) for r, _ in path[1:-1]] for path in gained]
    q = [[quality for _, quality in path[1:-1]] for path in gained]
    varied = len(set(values)) > 1
    return {
        "knobs": list(values),
        "share": f,
        "quality": q,
        "spread_share": [max(v) - min(v) for v in f],
        "spread_quality": [max(v) - min(v) for v in q],
        "slope_share": [slope(x, v) for v in f] if varied else None,
        "slope_quality": [slope(x, v) for v in q] if varied else None,
        "without_gain": len(per_seed) - len(gained),
    }


def grid_lines(method, family, g, quality):
    """Two printed lines of grid_stats: each member, then the spread and the slope per doubling (one line saying
    so where no seed's un-guarded run gained reward: there is no gain to take a share of)."""
    d = quality.digits
    if not g["share"]:
        return [f"{method} {family}: no seed's un-guarded run gained reward, no share of a gain to report"]
    members = "; ".join(
        f"{v:g}: reward {estimate([s[k] for s in g['share']])} of the gain, {quality.label} "
        f"{estimate([s[k] for s in g['quality']], d)}"
        for k, v in enumerate(g["knobs"])
    )
    left_out = f" ({g['without_gain']} seeds without gain left out)" if g["without_gain"] else ""
    spread = f"{method} {family} over {len(g['knobs'])} members{left_out}: reward spread {estimate(g['spread_share'])}"
    spread += f" of the gain, {quality.label} spread {estimate(g['spread_quality'], d)}"
    if g["slope_share"] is not None:
        spread += f"; per doubling of the knob: reward {estimate(g['slope_share'], 3)} of the gain, "
        spread += f"{quality.label} {estimate(g['slope_quality'], d + 1)}"
    return [f"{method} {family} members: {members}", spread]


def knobs(paths, knob_values, quality, anchors=("guard", "kl")):
    """The knob question (docs/protocol.md, amendment 2 (g)): how far each family's reward and quality move over its
    grid, and whether the guard's ranking against each family holds at every member.

    paths as frontier's; knob_values[method][family]: the knob of each member of that family's paths in path order
    (a family without one, early stopping, is read in the rankings only). Per family with a knob: grid_stats and
    its lines; guard against KL, the paired difference of |slope of the reward share| per seed (two-sided p). Per
    anchor family: at each of its members (measured), every other family read at the member's reward on each seed
    and compared by the one definition (frontier_level at OPERATING), then one line per anchor with each family's
    words over the members and whether the word is the same at every member. Returns (lines, summary):
    summary[method] = {"grids": {family: grid_stats}, "guard_vs_kl": Paired or None, "rankings": {anchor: [{"knob",
    "share", "rows"}, ...]}}.
    """
    lines, summary = [], {}
    for m, families in paths.items():
        values = knob_values.get(m, {})
        grids = {fam: grid_stats(families[fam], v) for fam, v in values.items() if fam in families}
        summary[m] = {"grids": grids, "guard_vs_kl": None, "rankings": {}}
        for fam, g in grids.items():
            lines += grid_lines(m, fam, g, quality)
        if all(k in grids and grids[k]["slope_share"] for k in ("guard", "kl")):
            if len(grids["guard"]["slope_share"]) == len(grids["kl"]["slope_share"]):
                d = [abs(a) - abs(b) for a, b in zip(grids["guard"]["slope_share"], grids["kl"]["slope_share"])]
                summary[m]["guard_vs_kl"] = s = paired(d)
                lines.append(
                    f"{m} guard against kl, |reward share moved per doubling| guard − kl: {s.text(3)}, two-sided "
                    f"p = {two_sided_p(s):.3f}"
                )
        for anchor in (a for a in anchors if a in grids):
            rankings = summary[m]["rankings"][anchor] = member_rankings(families, grids[anchor], anchor, quality)
            lines += [frontier_line(m, r["rows"], quality, r["where"], anchor) for r in rankings]
            lines.append(ranking_line(m, anchor, rankings))
    return lines, summary


def member_rankings(families, grid, anchor, quality):
    """At each member of the anchor family (grid: its grid_stats), every other family read at the member's reward
    on each seed against the member's measured quality: [{"knob", "share", "where", "rows"}, ...]."""
    rankings = []
    for k, v in enumerate(grid["knobs"]):
        rows = frontier_level(families, quality, OPERATING, [path[k + 1] for path in families[anchor]], anchor)
        share = statistics.fmean(s[k] for s in grid["share"]) if grid["share"] else math.nan
        where = f"{anchor} {v:g} ({share:.0%} of the gain)" if math.isfinite(share) else f"{anchor} {v:g} (no gain)"
        rankings.append({"knob": v, "share": share, "where": where, "rows": rows})
    return rankings


def ranking_line(method, anchor, rankings):
    """One line: for each family, its word against the anchor at each of the anchor's members, and whether that
    word is the same at every member (a tie everywhere holds too; no verdict anywhere does not)."""
    parts = []
    for fam in (f for f in rankings[0]["rows"] if f != anchor):
        words = [r["rows"][fam]["word"] for r in rankings]
        holds = len(set(words)) == 1 and words[0] != "no verdict"
        parts.append(f"{fam}: {', '.join(words)}" + (" (the same at every member)" if holds else ""))
    knobs = ", ".join(f"{r['knob']:g}" for r in rankings)
    return f"{method} {anchor} ranking at its members ({knobs}): " + "; ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# the results table


def format_table(runs, reference_eval, columns):
    """Mean±std over seeds per (method, variant) and the rescaled un-guarded runs, under the reference's row.

    columns: a list of Column. A "ratio" column reads 1 in the rescaled rows: rescaling sets it to 1."""
    fmt = lambda x, p: "{:.{p}f}±{:.{p}f}".format(*mean_std(x), p=p)
    rescaled = {"full": "rescale", "few": "rescale_few"}
    names = ["reference"] + [m + s for m in runs for s in ("", "+guard", " rescl")]
    width = max(map(len, names)) + 2
    head = f"{'run':<{width}}" + "".join(f"{c.header:>14}" for c in columns)
    ref_cells = [
        f"{reference_eval[c.phase][c.key]:.{c.digits if c.reference_digits is None else c.reference_digits}f}"
        for c in columns
    ]
    rows = [head, "-" * len(head), f"{'reference':<{width}}" + "".join(f"{x:>14}" for x in ref_cells)]
    for m in runs:
        for v in VARIANTS:
            cells = [fmt(collect(runs, m, v, c.phase, c.key), c.digits) for c in columns]
            rows.append(f"{m + ('+guard' if v == 'guard' else ''):<{width}}" + "".join(f"{x:>14}" for x in cells))
        cells = [
            f"{1:.{c.digits}f}"
            if c.key == "ratio"
            else fmt(collect(runs, m, "none", rescaled[c.phase], c.key), c.digits)
            for c in columns
        ]
        rows.append(f"{m + ' rescl':<{width}}" + "".join(f"{x:>14}" for x in cells))
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------------------
# the shared figures: each draws on a matplotlib Axes it is given (solid: no guard, dashed: NormGuard)


def label(method, variant):
    return method + ("+guard" if variant == "guard" else "")


def plot_profile(ax, runs, bins):
    """Norm ratio per bin of t at the end of RL, mean over seeds; bins the sampling grid never visits are left out."""
    centers = (torch.arange(bins) + 0.5) / bins
    for m in runs:
        for v, ls in zip(VARIANTS, ("-", "--")):
            profile = torch.tensor([r["profile"] for r in runs[m][v]]).nanmean(0)
            keep = ~profile.isnan()
            ax.plot(centers[keep], profile[keep], ls, c=METHOD_COLORS.get(m), marker=".", label=label(m, v))
    ax.axhline(1, c="k", lw=0.8)
    ax.set(xlabel="t (1 = noise)", ylabel="‖v_θ‖/‖v_ref‖ on own trajectory", title="norm ratio vs t (end of RL)")
    ax.legend(fontsize=7)


def plot_curves(ax, histories, x_key, y_key):
    """One checkpoint curve per (method, variant): y_key against x_key, each the mean over the seeds given."""
    for m in histories:
        for v, ls in zip(VARIANTS, ("-", "--")):
            x, y = (torch.tensor([h[k] for h in histories[m][v]], dtype=torch.float64).mean(0) for k in (x_key, y_key))
            ax.plot(x, y, ls, c=METHOD_COLORS.get(m), marker=".", label=label(m, v))
    ax.legend(fontsize=7)


def plot_reward_quality(ax, runs, reference_eval, quality, steps):
    """Every seed's final (reward, quality): filled at the full step count, hollow at few steps; x: rescaled.

    steps: (full, few) Euler step counts, for the title."""
    for phase, fill in (("full", True), ("few", False)):
        ref = reference_eval[phase]
        ax.scatter(
            [ref["reward"]],
            [ref[quality.key]],
            marker="s",
            s=30,
            c="k" if fill else "none",
            edgecolors="k",
            label="reference" if fill else None,
        )
        for m in runs:
            color = METHOD_COLORS.get(m)
            for v, mk in zip(VARIANTS, ("o", "^")):
                ax.scatter(
                    collect(runs, m, v, phase, "reward"),
                    collect(runs, m, v, phase, quality.key),
                    marker=mk,
                    s=18,
                    c=color if fill else "none",
                    edgecolors=color,
                    label=label(m, v) if fill else None,
                )
            resc = "rescale" if phase == "full" else "rescale_few"
            ax.scatter(
                collect(runs, m, "none", resc, "reward"),
                collect(runs, m, "none", resc, quality.key),
                c=color,
                marker="x" if fill else "+",
                s=18,
                label=f"{m} rescaled" if fill else None,
            )
    better = "higher" if quality.higher_is_better else "lower"
    ax.set(
        xlabel="reward (proxy)",
        ylabel=f"{quality.label} ({better} = better)",
        title=f"reward vs quality: {steps[0]} steps (filled), {steps[1]} (hollow)",
    )
    ax.legend(fontsize=6, ncol=2)


def plot_frontier(ax, paths, quality, title, operating=None, levels=LEVELS):
    """One method's frontier: each family's path, mean over seeds point by point, reward against quality; the
    guard's line is bold. paths: {family: [per-seed [(reward, quality), ...]]} (one method of frontier's input).
    The matched reward levels are marked, means over seeds: the guarded run's own reward (operating: per-seed
    (reward, quality), the primary level, dashed) and each fraction f of the un-guarded gain (dotted)."""
    for family, per_seed in paths.items():
        points = torch.tensor(per_seed, dtype=torch.float64).mean(0)
        bold = family == "guard"
        ax.plot(
            points[:, 0], points[:, 1], marker="o", ms=3, lw=2.5 if bold else 1.2, label=family, zorder=3 if bold else 2
        )
    ends = torch.tensor([[p[0][0], p[-1][0]] for p in next(iter(paths.values()))], dtype=torch.float64).mean(0)
    marks = [(float(ends[0] + f * (ends[1] - ends[0])), f"{f:.0%} of gain", ":") for f in levels]
    if operating:
        marks.insert(0, (statistics.fmean(r for r, _ in operating), "guard's reward", "--"))
    for reward, text, style in marks:
        ax.axvline(reward, ls=style, c="grey", lw=0.8, zorder=1)
        ax.annotate(text, (reward, 1), xycoords=("data", "axes fraction"), rotation=90, fontsize=6, va="top")
    better = "higher" if quality.higher_is_better else "lower"
    ax.set(xlabel="reward (proxy)", ylabel=f"{quality.label} ({better} = better)", title=title)
    ax.legend(fontsize=7)
