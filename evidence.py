"""The evidence behind every experiment here: statistics over seeds, the five verdict rules, the early-stopping
control, the results table, strict JSON and the shared figures. Written once, used by toy_2d.py and digits.py.

The data every function reads, per method (nft, awm, dpo) and variant ("none": base loss, "guard": + NormGuard):

    runs[method][variant]  a list, one per seed, of evaluations: {"full": {...}, "few": {...}, "profile": [...]}
                           and, for "none" only, "rescale" and "rescale_few" (the same model sampled with
                           v <- v·‖v_ref‖/‖v‖ at every step). Each phase holds "ratio" (mean ‖v_θ‖/‖v_ref‖ along
                           the model's own trajectories; absent under rescale, where it is 1 by construction),
                           "reward" and the quality metric (Quality.key); "profile" is that ratio per bin of t.
    adjoint[method]        a list, one per seed, of the un-guarded model's {"total_mean", "total_std",
                           "frac_positive"} of Σ_k dR/dα_k (ng.velocity_scale_sensitivity).
    histories[method][variant]  a list, one per seed, of checkpoint curves {"step", "reward", <quality key>, ...}.

Seed s of both variants of a method draws the same rollout noise, so differences over seeds are paired. A
difference counts as significantly positive when its paired mean exceeds two standard errors; with one seed
that is "positive", which the verdict lines flag as indicative only. Imports only torch and the standard
library (matplotlib inside the plotting functions).
"""

import json
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

VARIANTS = ("none", "guard")
METHOD_COLORS = {"nft": "tab:blue", "awm": "tab:orange", "dpo": "tab:green"}


@dataclass(frozen=True)
class Quality:
    """The quality metric the verdicts judge by: its key in an evaluation, its name in the text, its direction.

    toy_2d: Quality("logp", "log p", higher_is_better=True); digits: Quality("fd", "FD", False, digits=1).
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


def significantly_positive(d):
    """The rule for "a difference counts": paired mean over seeds > 2 standard errors (std / sqrt(n)).

    n counts every entry given, NaN included. With one seed the standard error is 0: positive is enough.
    """
    m, s = mean_std(d)
    return m > 2 * s / math.sqrt(max(len(d), 1)) if not math.isnan(m) else False


def verdict_word(ok):
    """One word for a claim from its per-method outcomes."""
    if not ok:
        return "NOT TESTED"
    return "REPRODUCED" if all(ok) else ("PARTLY reproduced" if any(ok) else "NOT reproduced")


def collect(runs, method, variant, phase, key):
    """Per-seed values of one metric: [evaluation[phase][key] for each seed of runs[method][variant]]."""
    return [r[phase][key] for r in runs[method][variant]]


# ---------------------------------------------------------------------------------------------------------------
# the early-stopping control


def early_stopping_control(history_none, history_guard, quality):
    """Quality of the guarded run vs the un-guarded run's own checkpoints at the guarded run's final reward.

    Walk the un-guarded checkpoints (the first one: the reference) to the first whose reward reaches the guarded
    run's final reward and interpolate the quality there linearly in reward. Returns quality.gain of the guarded
    run over that matched checkpoint (> 0: the guard beats stopping the un-guarded run early), or NaN when the
    un-guarded run never reaches that reward (no early stop matches it; the verdict counts these).
    """
    key = quality.key
    target, q_guard = history_guard["reward"][-1], history_guard[key][-1]
    r, q = history_none["reward"], history_none[key]
    for c in range(len(r)):
        if r[c] >= target:
            if c == 0:
                return quality.gain([q_guard], [q[0]])[0]
            w = (target - r[c - 1]) / (r[c] - r[c - 1])
            return quality.gain([q_guard], [q[c - 1] + w * (q[c] - q[c - 1])])[0]
    return float("nan")


# ---------------------------------------------------------------------------------------------------------------
# the verdicts: one rule per claim of the paper, fixed before any result was seen


def claim_inflation(runs, m):
    """(1) RL inflates the norm: the un-guarded norm ratio along the policy's own trajectories is above 1."""
    r = collect(runs, m, "none", "full", "ratio")
    return significantly_positive([x - 1 for x in r]), f"{m} {mean_std(r)[0]:.3f}±{mean_std(r)[1]:.3f}"


def claim_rescale(runs, m, quality):
    """(2) rescaling at inference does not help: the guarded model beats the rescaled one on reward or quality."""
    q = quality.key
    dr = paired_diff(collect(runs, m, "guard", "full", "reward"), collect(runs, m, "none", "rescale", "reward"))
    guard_q, rescaled_q = collect(runs, m, "guard", "full", q), collect(runs, m, "none", "rescale", q)
    ok = significantly_positive(dr) or significantly_positive(quality.gain(guard_q, rescaled_q))
    dq = mean_std(paired_diff(guard_q, rescaled_q))[0]
    return ok, f"{m} guard−rescaled: reward {mean_std(dr)[0]:+.3f}, {quality.label} {dq:+.{quality.digits + 1}f}"


def claim_adjoint(adjoint, m):
    """(3) no coherent first-order magnitude signal: |mean dR/dα| < 0.5·std across samples, on every seed."""
    snr = [abs(a["total_mean"]) / a["total_std"] for a in adjoint[m]]
    positive = mean_std([a["frac_positive"] for a in adjoint[m]])[0]
    return all(x < 0.5 for x in snr), f"{m} |mean|/std {mean_std(snr)[0]:.2f}, positive {positive:.0%}"


def claim_keeps_reward(runs, m, quality, few_steps, r0):
    """(4) the guard keeps >= 70 % of the reward gain and improves quality; (4b) by more at few steps.

    Returns (ok, ok_few, text)."""
    q, d = quality.key, quality.digits
    gain_n = mean_std(collect(runs, m, "none", "full", "reward"))[0] - r0
    gain_g = mean_std(collect(runs, m, "guard", "full", "reward"))[0] - r0
    kept = gain_g / gain_n if gain_n > 0 else float("nan")
    dq_full = quality.gain(collect(runs, m, "guard", "full", q), collect(runs, m, "none", "full", q))
    dq_few = quality.gain(collect(runs, m, "guard", "few", q), collect(runs, m, "none", "few", q))
    ok = gain_n > 0 and kept >= 0.7 and significantly_positive(dq_full)
    ok_few = ok and significantly_positive(paired_diff(dq_few, dq_full))
    full, few = (quality.sign * mean_std(x)[0] for x in (dq_full, dq_few))  # back to guard − none, as printed
    return (
        ok,
        ok_few,
        f"{m} reward gain kept {kept:.0%}, Δ{quality.label} {full:+.{d}f} (at {few_steps} steps {few:+.{d}f})",
    )


def claim_not_early_stopping(control, m, quality):
    """(5) not early stopping: the guarded run beats the un-guarded run's checkpoints at matched reward.

    A seed whose un-guarded run never reaches the guarded reward (NaN) has no early stop to match; if that holds
    for every seed the claim stands, otherwise the matched seeds decide (one matched seed: its sign)."""
    d = control[m]
    defined = [x for x in d if not math.isnan(x)]
    unreached = len(d) - len(defined)
    if len(defined) == 0:
        ok = unreached > 0
    else:
        ok = significantly_positive(defined) if len(defined) > 1 else defined[0] > 0
    delta = quality.sign * mean_std(d)[0]  # back to guard − matched checkpoint, as printed
    text = (
        f"{m} Δ{quality.label} at matched reward {delta:+.{quality.digits}f} ({len(defined)} matched, "
        f"{unreached} never reached)"
    )
    return ok, text


def verdicts(runs, reference_eval, adjoint, adjoint_reference, control, quality, few_steps):
    """One line per claim of the paper, reproduced or not, with the numbers it rests on. Returns (lines, flags).

    runs, adjoint: see the module docstring; reference_eval: the reference's evaluation ({"full": {"reward", ...}});
    adjoint_reference: its {"total_mean", "total_std"}; control: {method: [early_stopping_control per seed]};
    few_steps: the few-step sampler's step count, for the text. A method whose un-guarded run gained no reward
    (mean gain <= 0.01 or not significant) did not learn: it cannot test any claim and is set apart. Quality
    differences are printed as guard − other in the metric's own units; the rules read them through quality.gain.
    """
    methods = list(runs)
    r0 = reference_eval["full"]["reward"]
    gains = {m: [x - r0 for x in collect(runs, m, "none", "full", "reward")] for m in methods}
    skipped = [m for m in methods if not (mean_std(gains[m])[0] > 0.01 and significantly_positive(gains[m]))]
    methods = [m for m in methods if m not in skipped]
    note = "".join(
        f"; {m} not tested (un-guarded reward gain {mean_std(gains[m])[0]:+.3f}: it did not learn)" for m in skipped
    )
    if len(next(iter(runs.values()))["none"]) == 1:
        note += " [1 seed: no error bars, indicative only]"
    flags = {"not_tested": skipped}

    def claim(name, results, sep="; "):  # record the per-method outcomes, join the per-method texts
        flags[name] = {m: ok for m, (ok, _) in zip(methods, results)}
        return [ok for ok, _ in results], sep.join(text for _, text in results)

    ok, text = claim("1", [claim_inflation(runs, m) for m in methods], sep=", ")
    lines = [
        f"(1) RL inflates the velocity norm: {verdict_word(ok)} — un-guarded ‖v_θ‖/‖v_ref‖ "
        + text
        + " (1.000 = no drift; paper: 1.05-1.15)"
        + note
    ]
    ok, text = claim("2", [claim_rescale(runs, m, quality) for m in methods])
    lines.append(f"(2) inference-time rescale does not help: {verdict_word(ok)} — " + text + note)
    ok, text = claim("3", [claim_adjoint(adjoint, m) for m in methods])
    snr_ref = abs(adjoint_reference["total_mean"]) / adjoint_reference["total_std"]
    lines.append(
        f"(3) no coherent first-order magnitude signal: {verdict_word(ok)} — "
        + text
        + f"; reference |mean|/std {snr_ref:.2f} (rule: < 0.5)"
        + note
    )
    results = [claim_keeps_reward(runs, m, quality, few_steps, r0) for m in methods]
    ok, text = claim("4", [(ok, text) for ok, _, text in results])
    ok_few, _ = claim("4_few", [(ok_few, text) for _, ok_few, text in results])
    lines.append(
        f"(4) guard keeps reward and improves quality: {verdict_word(ok)}; more so at few steps: "
        f"{verdict_word(ok_few)} — " + text + note
    )
    ok, text = claim("5", [claim_not_early_stopping(control, m, quality) for m in methods])
    lines.append(f"(5) not an early-stopping effect: {verdict_word(ok)} — " + text + note)
    return lines, flags


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
# outputs: strict JSON, the code's version


def json_safe(obj):
    """NaN and ±inf -> None, tuples -> lists, dict keys -> str, recursively: what strict JSON can hold."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path, obj, indent=1):
    """Write obj as strict JSON (no NaN or Infinity tokens: json_safe first, then allow_nan=False)."""
    Path(path).write_text(json.dumps(json_safe(obj), indent=indent, allow_nan=False))


def git_revision():
    """The commit of this checkout, or "unknown" outside git."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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
