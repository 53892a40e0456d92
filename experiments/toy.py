"""The 2D experiment: RL inflates the velocity norm, and the one-sided hinge stops it — or the toy says not.

    python -m experiments.toy             # headline: each method un-guarded, guarded, on shuffled rewards (~16 s)
    python -m experiments.toy --frontier  # the guard against a stronger KL, lower lr, early stopping, rescaling
    python -m experiments.toy --smoke     # tiny sizes, for tests

toy_2d.py is the world, the model, RL through normguard.py's losses and the norm-ratio measurement; read it first.
This file is the experiment around it: its config (toy_2d's, with the experiment's defaults and its own knobs); the
arms (per method the official loss "none", "guard" and the shuffled-reward control "null"; or, with --frontier, the
families of docs/protocol.md), trained as toy_2d ensembles, one per process (--jobs, each a share of the arms on
every seed), every arm of seed s on the same noise; their evaluation (full and few-step sampling, the norm ratio per
timestep, the inference-time rescale, the adjoint diagnostic); evidence.py's verdict on each claim of the paper or its
frontiers, by the rules of docs/protocol.md; the figures, the JSON and the command line.
"""

import dataclasses
import math
import multiprocessing
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import normguard as ng
import toy_2d as toy
from experiments import evidence as E
from trainer import cli

# ---------------------------------------------------------------------------------------------------------------
# the experiment's settings: its config, its quality endpoint, the frontier families, the smoke sizes, the command line


@dataclass
class Config(toy.Config):
    """toy_2d.Config with the experiment's defaults where they differ, and the knobs only the experiment reads."""

    seeds: int = 5  # RL seeds per arm; every arm of seed s draws the same rollout and training noise
    rl_lr: float = 5e-5  # NFT and AWM: with rl_steps=400 their un-guarded runs land near the paper's 5-15 % drift
    out_dir: str = "runs/toy_experiment"
    few_steps: int = 3  # Euler steps of the few-step evaluation
    adjoint_samples: int = 256  # noise draws per model for the adjoint diagnostic
    plot: bool = True  # headline.png (with --frontier: frontier_<method>.png) next to the JSON
    jobs: int = 2  # processes, each training a share of the arms (every seed); the numbers do not depend on it


QUALITY = E.Quality("sw", "SW→tilted", higher_is_better=False, digits=3)

# the frontier families of docs/protocol.md (amendment 2: members where the review found wide chords), each member
# from the strongest effect to the weakest
GRIDS = {
    "guard": (1.6, 0.8, 0.4, 0.2, 0.1, 0.05, 0.025),  # λ, absolute margin
    "guard_relative": (0.4, 0.1),  # λ, relative margin
    "kl": (1.0, 0.1, 0.05, 0.03, 0.02, 0.01, 0.005, 0.003, 0.002, 1e-3),  # β_KL, no guard (official: 1e-4)
    # learning-rate factor, no guard; 0.849 and 0.748 added by amendment 2's first added-member round: the geometric
    # midpoints of (0.8, 0.9) and (0.7, 0.8), the chords over 0.10 of the gain that left the reference-2 confirmation's
    # primary readings against a lower lr no verdict (AWM at 400 steps, NFT and AWM at 800)
    "lower_lr": (0.25, 0.5, 0.7, 0.748, 0.8, 0.849, 0.9, 0.95),
}
DPO_GRIDS = {"guard": (0.4, 0.1)}
# inference: v <- s·v·‖v_ref‖/‖v‖ on the official un-guarded model, up to the largest un-guarded RMS ratio seen (1.60)
RESCALES = (0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2, 1.3, 1.4, 1.5, 1.6)


SMOKE = dict(toy.SMOKE, seeds=2, adjoint_samples=32, few_steps=2, out_dir="runs/toy_experiment_smoke")
FLAGS = {"smoke": f"tiny sizes, for tests ({SMOKE})", "frontier": "the frontier families of docs/protocol.md"}


def check_config(cfg):
    """toy_2d's checks, then the experiment's own: a ValueError naming the first key the run cannot use."""
    toy.check_config(cfg)
    for key in ("few_steps", "adjoint_samples", "jobs"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key}: expected an int >= 1, got {getattr(cfg, key)!r}")


def parse_args(argv):
    """(Config, frontier?) from --key=value overrides and the --smoke and --frontier flags (trainer/cli.py). --help
    lists the experiment's own keys and defaults first, then toy_2d's others."""
    own = set(Config.__annotations__)  # the keys this class declares, not those it inherits
    rest = [f.name for f in dataclasses.fields(toy.Config) if f.name not in own]
    (mine, world), flags = cli.parse(argv, [(Config, own), (toy.Config, rest)], flags=FLAGS, doc=__doc__)
    cfg = Config(**{**(SMOKE if "smoke" in flags else {}), **world, **mine})
    cli.checked(check_config, cfg)
    on_grid = cfg.lam in GRIDS["guard"] and cfg.lam in DPO_GRIDS["guard"] and cfg.margin == "absolute"
    if "frontier" in flags and not on_grid:  # the guard family's member at lam is the frontier's operating point
        raise cli.UsageError(f"lam, margin: --frontier needs lam in {DPO_GRIDS['guard']} with the absolute margin")
    return cfg, "frontier" in flags


# ---------------------------------------------------------------------------------------------------------------
# the arms: what each model of the ensemble is trained with


def arms(cfg, frontier=False):
    """Per method: "none", "guard" (toy_2d.make_arm at cfg's lam, margin) and "null" (shuffled rewards); or, for the
    frontier, "none" and every member of the method's families (GRIDS, DPO_GRIDS), in grid order."""
    out = []
    for m in cfg.methods.split(","):
        none = toy.make_arm(cfg, m)
        knobs = {
            "guard": lambda v: dict(guard=True, lam=v, margin="absolute"),
            "guard_relative": lambda v: dict(guard=True, lam=v, margin="relative"),
            "kl": lambda v: dict(kl_weight=v),
            "lower_lr": lambda v, lr=none.lr_scale: dict(lr_scale=lr * v),
        }
        out.append(none)
        if not frontier:
            out += [toy.make_arm(cfg, m, guard=True), replace(none, name="null", shuffle_rewards=True)]
        for family, grid in (DPO_GRIDS if m == "dpo" else GRIDS).items() if frontier else ():
            out += [replace(none, name=f"{family} {v:g}", **knobs[family](v)) for v in grid]
    return out


# ---------------------------------------------------------------------------------------------------------------
# evaluation over arms: full and few-step sampling, the norm ratio per timestep, rescaling, the adjoint


def rescaled(policy, ref, models, s):
    """The inference-time baseline on `models` of the ensemble: v <- s·v·‖v_ref‖/‖v‖ at every point."""

    def velocity(x, t):
        v, v_ref = toy.velocity_fn(policy, models)(x, t), toy.reference_fn(ref)(x, t[:, None].expand(x.shape[:2]))
        return s * ng.rescale_to_reference(v.reshape(-1, 2), v_ref.reshape(-1, 2)).reshape(v.shape)

    return velocity


def evaluate(cfg, policy, ref, arm_list, fixed, scales=(1.0,)):
    """Every model's final evaluation at the full and few-step samplers, its norm ratio profile over t, and the
    un-guarded ("none") models rescaled by each s in scales (phases "rescale", "rescale_few" at s = 1, else
    "rescale_<s>"). Returns (evaluations in model order, the full-step samples (M, 600, 2) for the figures)."""
    M = len(arm_list) * cfg.seeds
    evals = [{} for _ in range(M)]
    none = [i for i in range(M) if arm_list[i // cfg.seeds].name == "none"]
    for phase, steps in (("full", cfg.sample_steps), ("few", cfg.few_steps)):
        scored, x, ratio = toy.sample_and_score(cfg, toy.velocity_fn(policy), M, ref, steps, fixed)
        for ev, score in zip(evals, scored):
            ev[phase] = score
        for s in (scales if phase == "full" else (1.0,)) if none else ():  # a share of the arms may hold no "none"
            key = f"rescale_{s:g}" if s != 1 else {"full": "rescale", "few": "rescale_few"}[phase]
            scored_rescaled = toy.sample_and_score(cfg, rescaled(policy, ref, none, s), len(none), ref, steps, fixed)[0]
            for i, score in zip(none, scored_rescaled):
                evals[i][key] = score
        if phase == "full":
            for ev, profile in zip(evals, toy.ratio_profiles(cfg, ratio)):
                ev["profile"] = profile
            samples = x[:, :600]
    return evals, samples


def evaluate_reference(cfg, ref, fixed):
    """The reference's evaluation at the full and few-step samplers, and its full-step samples (600, 2)."""
    full, x, _ = toy.sample_and_score(cfg, toy.velocity_fn(ref), 1, ref, cfg.sample_steps, fixed)
    few = toy.sample_and_score(cfg, toy.velocity_fn(ref), 1, ref, cfg.few_steps, fixed)[0]
    return {"full": full[0], "few": few[0]}, x[0, :600]


def adjoint_stats(cfg, model, M):
    """dR/dα_k for v_k -> (1 + α_k)·v_k (ng.velocity_scale_sensitivity) of the M models of ensemble `model`, model
    m on seed m % S's adjoint noise, one α per sample. Returns per model {"total_mean", "total_std",
    "frac_positive"} over samples of the uniform scaling Σ_k dR/dα_k."""
    S, n, grid = cfg.seeds, cfg.adjoint_samples, ng.flow_timesteps(cfg.sample_steps)
    gens = [torch.Generator().manual_seed(1000 * (cfg.seed + s) + 2) for s in range(S)]
    noise = torch.stack([torch.randn(n, 2, generator=g) for g in gens])
    v = lambda x, t: model(x.reshape(M, n, 2), t.reshape(M, n)).reshape(-1, 2)
    x = noise.repeat(M // S, 1, 1).reshape(-1, 2)
    total = ng.velocity_scale_sensitivity(v, lambda x0: toy.reward(cfg, x0), x, grid)[0].sum(-1).reshape(M, n)
    out = dict(total_mean=total.mean(1), total_std=total.std(1, unbiased=False))
    out["frac_positive"] = (total > 0).float().mean(1)
    return [dict(zip(out, row)) for row in zip(*(value.tolist() for value in out.values()))]


def adjoint_diagnostic(cfg, policy, arm_list):
    """adjoint_stats of every un-guarded model: {method: per seed stats} ({} for a share of the arms with no
    un-guarded arm). The reference's, on the same seeds' noise (so the change after RL is paired), is
    adjoint_stats(cfg, ref.replicate(S), S), taken once by run()."""
    S = cfg.seeds
    idx = [i for i in range(len(arm_list) * S) if arm_list[i // S].name == "none"]
    if not idx:
        return {}
    rows = adjoint_stats(cfg, policy.replicate(len(idx), idx), len(idx))
    methods = [arm.method for arm in arm_list if arm.name == "none"]
    return {m: rows[k * S : (k + 1) * S] for k, m in enumerate(methods)}


# ---------------------------------------------------------------------------------------------------------------
# the experiments: the headline verdicts, the frontiers


def by_arm(cfg, arm_list, per_model):
    """{method: {arm name: [per_model[i] for each seed]}} from a list in model order."""
    out = {}
    for a, arm in enumerate(arm_list):
        out.setdefault(arm.method, {})[arm.name] = per_model[a * cfg.seeds : (a + 1) * cfg.seeds]
    return out


def frontier_paths(evals, history_none, reference):
    """One method's paths (docs/protocol.md): {family: per seed [(reward, quality), ...]}, each from the reference
    through the family's members, strongest effect first, to the official un-guarded run ("none")."""
    point = lambda phase: (phase["reward"], phase[QUALITY.key])
    members = {}  # family -> per member, per seed
    for name, per_seed in evals.items():
        if " " in name:
            members.setdefault(name.split()[0], []).append([point(ev["full"]) for ev in per_seed])
    checkpoints = [list(zip(h["reward"], h[QUALITY.key]))[1:-1] for h in history_none]  # inner: step 0 and the end
    members["early_stop"] = [list(c) for c in zip(*checkpoints)]  # are the reference and the official run
    rescale = ["rescale" if s == 1 else f"rescale_{s:g}" for s in RESCALES]
    members["rescale"] = [[point(ev[key]) for ev in evals["none"]] for key in rescale]
    ends = [(point(reference["full"]), point(ev["full"])) for ev in evals["none"]]
    return {f: [[start, *(m[s] for m in ms), end] for s, (start, end) in enumerate(ends)] for f, ms in members.items()}


def columns(cfg):
    """The results table's columns (evidence.format_table)."""
    few = [E.Column("few", "reward", f"reward@{cfg.few_steps}"), E.Column("few", "sw", f"SW@{cfg.few_steps}")]
    keys = [("rms_ratio", "rms ratio", 3), ("ratio", "mean ratio", 3), ("reward", "reward", 3), ("sw", "SW→tilted", 3)]
    return [E.Column("full", *k) for k in keys + [("logp", "log p", 2), ("support", "support", 3)]] + few


def judge_headline(cfg, by, histories, reference, adjoint, adjoint_ref):
    """The headline's verdicts (evidence.verdicts) from the "none", "guard" and "null" arms, the adjoint diagnostic
    and the early-stopping control. Returns what it measured, as metrics.json holds it, and the results table."""
    runs, null_runs = {m: {v: by[m][v] for v in E.VARIANTS} for m in by}, {m: {"none": by[m]["null"]} for m in by}
    histories = {m: {v: histories[m][v] for v in E.VARIANTS} for m in by}
    control = {m: [E.early_stopping_control(*pair, QUALITY) for pair in zip(*histories[m].values())] for m in by}
    lines, flags = E.verdicts(runs, reference, adjoint, adjoint_ref, control, QUALITY, cfg.few_steps, null_runs)
    return dict(
        runs=runs,
        null_runs=null_runs,
        histories=histories,
        adjoint=adjoint,
        adjoint_reference=adjoint_ref,
        early_stopping_control=control,
        table=E.format_table(runs, reference, columns(cfg)),
        verdicts=lines,
        verdict_flags=flags,
    )


def judge_frontier(cfg, by, histories, reference):
    """Every family's path per method (frontier_paths) and evidence.frontier's comparison with the guard at the
    headline's lam, at matched reward. Returns what it measured, as frontier.json holds it."""
    paths = {m: frontier_paths(by[m], histories[m]["none"], reference) for m in by}
    headline = f"guard {cfg.lam:g}"  # the guard family's member at the headline's lam: its operating point
    operating = {m: [(ev["full"]["reward"], ev["full"][QUALITY.key]) for ev in by[m][headline]] for m in by}
    lines, summary = E.frontier(paths, QUALITY, operating)
    values = {m: {**(DPO_GRIDS if m == "dpo" else GRIDS), "rescale": RESCALES} for m in by}  # in path order
    knob_lines, knob_summary = E.knobs(paths, values, QUALITY)
    return dict(
        paths=paths,
        operating=operating,
        frontier=lines,
        summary=summary,
        knobs=knob_lines,
        knob_summary=knob_summary,
        runs=by,
        histories=histories,
    )


def measure(cfg, ref, arm_list, fixed, frontier, progress):
    """Train every arm on cfg's seeds as one ensemble and measure each model: one worker's share of run().

    Returns {"curves", "evals", "samples" (M, 600, 2), "models" (a VelocityMLP each)} in model order, and for the
    headline "adjoint" (adjoint_diagnostic's {method: per seed stats})."""
    torch.set_num_threads(cfg.threads)
    # the headline judges the "null" arms by their final evaluation alone: no checkpoints for them
    tracked = [a for a, arm in enumerate(arm_list) if frontier or arm.name != "null"]
    policy, curves = toy.train(cfg, ref, arm_list, fixed, progress, tracked, last=False)
    evals, samples = evaluate(cfg, policy, ref, arm_list, fixed, RESCALES if frontier else (1.0,))
    for curve, ev in zip(curves, evals):  # the last checkpoint is the final evaluation, not sampled twice
        for key, value in {"step": cfg.rl_steps, **ev["full"]}.items() if curve is not None else ():
            curve[key].append(value)
    models = [policy.model(i) for i in range(len(arm_list) * cfg.seeds)]
    out = dict(curves=curves, evals=evals, samples=samples, models=models)
    if not frontier:
        out["adjoint"] = adjoint_diagnostic(cfg, policy, arm_list)
    return out


def measure_in_parallel(cfg, ref, arm_list, fixed, frontier, progress):
    """measure() on cfg.jobs processes, each a contiguous share of the arms on every seed, joined in model order.

    Every number equals the one-process run's, bit for bit (tests/test_toy.py checks it): each arm's loss is a mean
    over its own seeds' models, every seed draws the same noise in every process, and the ensemble's ops act model
    by model. (Sharing out seeds instead would not: an arm's loss is scaled by its seed count, and the product of
    that count with β or λ rounds differently for 5 seeds than for 10.)"""
    jobs = min(cfg.jobs, len(arm_list))
    bounds = [len(arm_list) * j // jobs for j in range(jobs + 1)]
    tasks = [(cfg, ref, arm_list[lo:hi], fixed, frontier, progress and lo == 0) for lo, hi in zip(bounds, bounds[1:])]
    if jobs == 1:
        parts = [measure(*tasks[0])]
    else:  # fork: the workers start in milliseconds with the reference already in memory; elsewhere, spawn
        context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        with context.Pool(jobs) as pool:
            parts = pool.starmap(measure, tasks)
    joined = {key: [x for part in parts for x in part[key]] for key in ("curves", "evals", "models")}
    joined["samples"] = torch.cat([part["samples"] for part in parts])
    if not frontier:
        joined["adjoint"] = {m: rows for part in parts for m, rows in part["adjoint"].items()}
    return joined


def run(cfg, frontier=False, progress=True, out_dir=None):
    """The headline experiment (or, with frontier, the frontiers) in memory; with out_dir, also its JSON (config,
    command, git revision, metrics) and figures there.

    Returns {"metrics": everything measured (JSON-able; runs, null_runs, histories, adjoint, paths as evidence.py
    reads them), "reference": the reference as a VelocityMLP, "models": {method: {arm: [VelocityMLP per seed]}},
    "samples": {"models": (M, 600, 2) in model order, "reference", "ideal"}}."""
    t0 = time.time()
    torch.set_num_threads(cfg.threads)  # here, not only in main(): the reference's evaluations run in this process
    ref, pretrain_loss = toy.make_reference(cfg)
    arm_list, fixed = arms(cfg, frontier), toy.evaluation_inputs(cfg)
    measured = measure_in_parallel(cfg, ref, arm_list, fixed, frontier, progress)
    reference, reference_samples = evaluate_reference(cfg, ref, fixed)
    by, histories = by_arm(cfg, arm_list, measured["evals"]), by_arm(cfg, arm_list, measured["curves"])
    metrics = {
        "pretrain_loss": pretrain_loss,
        "reference": reference,
        "ideal_tilted": toy.scores(cfg, fixed["ideal"][None], fixed)[0],
    }
    if frontier:
        metrics.update(judge_frontier(cfg, by, histories, reference))
    else:
        adjoint_ref = adjoint_stats(cfg, ref.replicate(cfg.seeds), cfg.seeds)
        metrics.update(judge_headline(cfg, by, histories, reference, measured["adjoint"], adjoint_ref))
    metrics["wall_time_s"] = time.time() - t0
    samples = {"models": measured["samples"], "reference": reference_samples, "ideal": fixed["ideal"][:600]}
    models = by_arm(cfg, arm_list, measured["models"])
    result = {"metrics": metrics, "reference": ref.model(0), "models": models, "samples": samples}
    if out_dir is not None:
        save(cfg, result, Path(out_dir), frontier)
    return result


def save(cfg, result, out, frontier):
    """metrics.json and config.json (frontier.json for the frontier) with the config, command and git revision,
    and the figures unless cfg.plot is off."""
    out.mkdir(parents=True, exist_ok=True)
    info = {"config": dataclasses.asdict(cfg), "command": sys.argv, "git_revision": cli.git_revision()}
    cli.write_atomic(
        out / ("frontier.json" if frontier else "metrics.json"), cli.dumps({**info, **result["metrics"]}, indent=1)
    )
    if not frontier:  # the frontier's config lives in frontier.json: both can share one out_dir
        cli.write_atomic(out / "config.json", cli.dumps(info, indent=2))
    if cfg.plot:
        plot(cfg, result, out, frontier)


# ---------------------------------------------------------------------------------------------------------------
# figures and the command line


def plot(cfg, result, out, frontier):
    """frontier_<method>.png per method; or headline.png: samples (first seed) over the true density, norm ratio vs
    t and during RL, reward vs quality, training paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics, samples = result["metrics"], result["samples"]
    if frontier:
        for m, paths in metrics["paths"].items():
            fig, ax = plt.subplots(figsize=(6, 4.5))
            title = f"{m}: reward vs {QUALITY.label}, mean of {cfg.seeds} seeds"
            E.plot_frontier(ax, paths, QUALITY, title, metrics["operating"][m])
            fig.tight_layout()
            fig.savefig(out / f"frontier_{m}.png", dpi=110)
            plt.close(fig)
        return
    lim = cfg.radius + 1.6
    gx, gy = torch.meshgrid(torch.linspace(-lim, lim, 200), torch.linspace(-lim, lim, 200), indexing="xy")
    density = toy.log_density(cfg, torch.stack([gx, gy], -1)).exp()
    targets = toy.mode_centers(cfg)[[int(k) for k in cfg.target_modes.split(",")]]
    panels = [("reference", samples["reference"]), ("ideal tilted p·e^{r/τ}", samples["ideal"])]
    names = [f"{m} {arm} (seed {cfg.seed})" for m, per_arm in result["models"].items() for arm in per_arm]
    panels += [(name, samples["models"][i * cfg.seeds]) for i, name in enumerate(names)]
    rows = math.ceil(len(panels) / 4) + 1
    fig, axes = plt.subplots(rows, 4, figsize=(16, 4 * rows))
    for ax, (title, x) in zip(axes.flat, panels):
        ax.contourf(gx, gy, density, levels=12, cmap="Greys")
        ax.scatter(x[:, 0], x[:, 1], s=2, c="tab:red", alpha=0.5)
        ax.scatter(targets[:, 0], targets[:, 1], marker="*", s=120, c="gold", edgecolors="k", zorder=3)
        ax.set(title=title, xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xticks=[], yticks=[])
    for ax in list(axes.flat)[len(panels) : -4]:
        ax.axis("off")
    ax_t, ax_steps, ax_rq, ax_path = axes[-1]
    E.plot_profile(ax_t, metrics["runs"], cfg.profile_bins)
    E.plot_curves(ax_steps, metrics["histories"], "step", "rms_ratio")
    ax_steps.axhline(1, c="k", lw=0.8)
    ax_steps.set(xlabel="RL step", ylabel="√mean‖v_θ‖² / √mean‖v_ref‖²", title="RMS norm ratio during RL")
    E.plot_reward_quality(ax_rq, metrics["runs"], metrics["reference"], QUALITY, (cfg.sample_steps, cfg.few_steps))
    E.plot_curves(ax_path, metrics["histories"], "reward", QUALITY.key)
    ax_path.set(xlabel="reward", ylabel=QUALITY.label, title=f"training path (every {cfg.eval_every} steps)")
    fig.tight_layout()
    fig.savefig(out / "headline.png", dpi=110)
    plt.close(fig)


def main(argv):
    """The command line: the setup, then run() with its outputs in out_dir, then the table and verdicts (or the
    frontiers). Returns run()'s result."""
    cfg, frontier = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    n_arms = len(arms(cfg, frontier))
    print(
        f"device cpu | float32 | {torch.get_num_threads()} thread(s) | {n_arms} arms x {cfg.seeds} seeds = "
        f"{n_arms * cfg.seeds} models, trained as {min(cfg.jobs, n_arms)} ensemble(s) in parallel processes | "
        f"{cfg.groups}x{cfg.group_size} rollouts/step | {cfg.rl_steps} RL steps | lr {cfg.rl_lr:g} (dpo "
        f"{cfg.dpo_lr:g}) | {cfg.sample_steps} and {cfg.few_steps} Euler steps | reference seed {cfg.ref_seed}, RL "
        f"seeds {cfg.seed}-{cfg.seed + cfg.seeds - 1}"
    )
    result = run(cfg, frontier, out_dir=cfg.out_dir)
    metrics = result["metrics"]
    ideal = metrics["ideal_tilted"]
    print(
        f"pretrain loss {metrics['pretrain_loss']:.3f} | ideal tilted: reward {ideal['reward']:.3f}, "
        f"log p {ideal['logp']:.2f}"
    )
    if not frontier:
        print(metrics["table"])
        for m, null in metrics["null_runs"].items():
            ratio, r = (sum(e["full"][k] for e in null["none"]) / cfg.seeds for k in ("rms_ratio", "reward"))
            print(f"{m} shuffled-reward control: rms ratio {ratio:.3f}, reward {r:.3f}")
    print("\n".join(metrics["frontier"] + metrics["knobs"] if frontier else metrics["verdicts"]))
    print(f"wall time {metrics['wall_time_s']:.1f} s | outputs in {cfg.out_dir}")
    return result


if __name__ == "__main__":
    cli.run(main)
