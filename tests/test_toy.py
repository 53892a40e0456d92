"""toy_2d.py and experiments/toy.py: the closed-form world, the ensemble trick it rests on, the pairing of arms by
seed, the null-reward control, the norm ratios, each config holding what its file reads, smoke runs of the demo, the
headline and the frontier, and regression tests that pin, at the default settings and fixed seeds, what the toy shows
(marked `experiment`; the headline runs once per session, in conftest.toy_headline)."""

import contextlib
import dataclasses
import io
import json
import math
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch

import normguard as ng
import toy_2d as toy
from experiments import evidence as E
from experiments import toy as toy_experiment
from trainer import cli

ROOT = Path(__file__).resolve().parents[1]


def flat_table(metrics):
    """{method: {variant: {"<phase>_<key>": per-seed values}}}: the per-seed evaluations by metric."""
    out = {}
    for m, variants in metrics["runs"].items():
        out[m] = {}
        for v, evals in variants.items():
            out[m][v] = {
                f"{phase}_{k}": [e[phase][k] for e in evals]
                for phase in evals[0]
                if phase != "profile"
                for k in evals[0][phase]
            }
    return out


# ---------------------------------------------------------------------------------------------------------------
# the 2D world in closed form


def test_log_density_integrates_to_one_and_peaks_at_the_modes():
    cfg = toy.Config()
    g = torch.linspace(-4, 4, 801, dtype=torch.float64)
    gx, gy = torch.meshgrid(g, g, indexing="xy")
    dens = toy.log_density(cfg, torch.stack([gx, gy], -1)).exp()
    assert abs(dens.sum().item() * (g[1] - g[0]).item() ** 2 - 1) < 1e-3
    centers = toy.mode_centers(cfg).double()
    peak = -math.log(cfg.n_modes * 2 * math.pi * cfg.mode_std**2)  # the other modes add < 1e-10 at a center
    torch.testing.assert_close(toy.log_density(cfg, centers), torch.full((cfg.n_modes,), peak, dtype=torch.float64))


def test_reward_is_a_classifier_that_can_be_hacked_off_the_support():
    cfg = toy.Config()
    centers = toy.mode_centers(cfg)
    targets = [int(k) for k in cfg.target_modes.split(",")]
    r = toy.reward(cfg, centers)
    assert ((r >= 0) & (r <= 1)).all()
    assert (r[targets] > 0.85).all() and (r[[k for k in range(cfg.n_modes) if k not in targets]] < 0.15).all()
    # overshooting a target mode radially leaves the support yet raises the classifier's confidence
    outward = centers[targets[0]] * torch.tensor([[1.0], [1.5], [2.0]])
    r_out = toy.reward(cfg, outward)
    assert (r_out[1:] > r_out[:-1]).all() and toy.on_support(cfg, outward)[1:].sum() == 0


def test_tilted_target_has_more_reward_than_the_data_and_sliced_wasserstein_is_a_distance():
    cfg = toy.Config()
    gen = torch.Generator().manual_seed(0)
    data, tilted = toy.sample_data(cfg, 4000, gen), toy.sample_tilted(cfg, 4000, gen)
    assert toy.reward(cfg, tilted).mean() > toy.reward(cfg, data).mean() + 0.3
    d = torch.nn.functional.normalize(torch.randn(32, 2, generator=gen), dim=1)
    assert toy.sliced_wasserstein(data, data, d) == 0
    shifted = toy.sliced_wasserstein(data + torch.tensor([0.5, 0.0]), data, d)
    assert 0.2 < shifted.item() < 0.5  # a shift by 0.5 along x projects to 0.5·|cos| on each direction


# ---------------------------------------------------------------------------------------------------------------
# the ensemble: one batched step must equal independent runs


@pytest.mark.parametrize("loss", ["nft", "awm", "dpo", "guard"])
def test_flattened_model_dim_times_models_is_the_sum_of_per_model_losses(loss):
    """toy_2d trains M models at once by calling the core on the flattened (M·N, 2) batch and multiplying by M."""
    M, N = 4, 6
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    v, v_old, v_ref, x0, noise = r(M, N, 2), r(M, N, 2), r(M, N, 2), r(M, N, 2), r(M, N, 2)
    t, adv = torch.rand(M, N, generator=gen, dtype=torch.float64) * 0.9 + 0.05, r(M, N)

    def f(s):  # the loss over models s (a slice), flattened
        xt, u = ng.forward_process(x0[s].reshape(-1, 2), noise[s].reshape(-1, 2), t[s].reshape(-1))
        a = [v[s].reshape(-1, 2), v_old[s].reshape(-1, 2), v_ref[s].reshape(-1, 2)]
        if loss == "nft":
            return ng.nft_loss(*a, xt, x0[s].reshape(-1, 2), t[s].reshape(-1), adv[s].reshape(-1))[0]
        if loss == "awm":
            return ng.awm_loss(*a, u, t[s].reshape(-1), adv[s].reshape(-1))[0]
        if loss == "dpo":
            return ng.dpo_loss(a[0], a[1], a[2], x0[s].reshape(-1, 2), u, noise[s].reshape(-1, 2))[0]
        return ng.normguard_penalty(a[0], a[2], lam=0.3)[0]

    together = M * f(slice(None))
    separately = sum(f(slice(i, i + 1)) for i in range(M))
    torch.testing.assert_close(together, separately)


def test_ensemble_copies_the_reference_and_keeps_models_independent():
    cfg = toy.Config(hidden=16, depth=2)
    torch.manual_seed(0)
    ref = toy.Ensemble(cfg, 1)
    ens = ref.replicate(3)
    x, t = torch.randn(3, 5, 2), torch.rand(3, 5)
    for i in range(3):
        torch.testing.assert_close(ens(x, t)[i], ref(x[i : i + 1], t[i : i + 1])[0])
    ens(x, t)[1].sum().backward()
    for w in ens.weights:
        assert w.grad[[0, 2]].abs().sum() == 0 and w.grad[1].abs().sum() > 0
    sub = ens(x[1:], t[1:], slice(1, 3))  # a slice is a view: the same models, the same outputs
    torch.testing.assert_close(sub, ens(x, t)[1:])


def test_ensemble_equals_a_loop_over_single_velocity_mlps():
    """Row s of the batched ensemble is VelocityMLP.forward of model s: outputs and parameter gradients."""
    cfg = toy.Config(hidden=16, depth=2)
    torch.manual_seed(0)
    ens = toy.Ensemble(cfg, 4)
    x, t = torch.randn(4, 7, 2), torch.rand(4, 7)
    (ens(x, t) ** 2).sum().backward()
    for s in range(4):
        single = ens.model(s).requires_grad_(True)
        assert isinstance(single, toy.VelocityMLP)
        out = single(x[s], t[s])
        torch.testing.assert_close(out, ens(x, t)[s].detach())
        (out**2).sum().backward()
        for layer, w, b in zip(single.layers, ens.weights, ens.biases):
            torch.testing.assert_close(layer.weight.grad, w.grad[s].T)
            torch.testing.assert_close(layer.bias.grad, b.grad[s, 0])


def test_per_model_learning_rate_equals_separate_adam_runs():
    cfg = toy.Config(hidden=8, depth=1)
    torch.manual_seed(0)
    ens = toy.Ensemble(cfg, 1).replicate(2)
    singles = [toy.Ensemble(cfg, 1).replicate(1) for _ in range(2)]
    for i, single in enumerate(singles):
        for p, q in zip(single.parameters(), ens.parameters()):
            p.data.copy_(q.data[i : i + 1])
    opt = torch.optim.Adam(ens.parameters(), lr=1e-2)
    opts = [torch.optim.Adam(singles[0].parameters(), lr=1e-2), torch.optim.Adam(singles[1].parameters(), lr=4e-2)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, t = torch.randn(2, 5, 2, generator=gen), torch.rand(2, 5, generator=gen)
        opt.zero_grad()
        (ens(x, t) ** 2).sum().backward()
        toy.adam_step_per_model_lr(opt, ens, torch.tensor([1.0, 4.0]))
        for i, (single, o) in enumerate(zip(singles, opts)):
            o.zero_grad()
            (single(x[i : i + 1], t[i : i + 1]) ** 2).sum().backward()
            o.step()
    for i, single in enumerate(singles):
        for p, q in zip(single.parameters(), ens.parameters()):
            torch.testing.assert_close(p.data[0], q.data[i])


# ---------------------------------------------------------------------------------------------------------------
# arms: paired by seed, the null-reward control, the norm ratios


def smoke_config(**overrides):
    """toy_2d's smoke sizes with two seeds and a tinier model."""
    return toy.Config(**{**toy.SMOKE, "seeds": 2, "hidden": 16, "depth": 2, "pretrain_steps": 20, **overrides})


def train_arms(method, arm_list, **overrides):
    """Smoke-sized training of arm_list from a tiny reference: the ensemble's weights, one (seeds, ...) per arm."""
    cfg = smoke_config(rl_steps=4, **overrides)
    ref, _ = toy.make_reference(cfg)
    policy, _ = toy.train(cfg, ref, arm_list, toy.evaluation_inputs(cfg), progress=False)
    S = cfg.seeds
    return [[w.detach()[a * S : (a + 1) * S] for w in policy.parameters()] for a in range(len(arm_list))]


@pytest.mark.parametrize("method", toy.METHODS)
def test_arms_of_one_seed_share_rollout_and_training_noise(method):
    """Two arms with the same knobs end bit-identical, and so does a guard at λ = 0 with the un-guarded arm: every
    arm of seed s draws the same rollouts, t and ε. A guard at λ > 0 and a second seed do differ."""
    lr = 5e-3 if method != "dpo" else 2e-3  # large enough that four steps move every model
    none = toy.make_arm(smoke_config(rl_lr=lr, dpo_lr=lr), method)
    assert none.lr_scale == 1.0
    arm_list = [
        none,
        dataclasses.replace(none, name="twin"),
        dataclasses.replace(none, name="guard 0", guard=True, lam=0.0),
    ]
    arm_list.append(dataclasses.replace(none, name="guard 10", guard=True, lam=10.0))
    weights = train_arms(method, arm_list, rl_lr=lr, dpo_lr=lr)
    for other in weights[1:3]:
        assert all(torch.equal(a, b) for a, b in zip(weights[0], other))
    assert not all(torch.equal(a, b) for a, b in zip(weights[0], weights[3]))
    assert not torch.equal(weights[0][0][0], weights[0][0][1])  # seeds 1 and 2: different noise


def test_null_arm_learns_from_a_permutation_of_the_batch_rewards():
    """The shuffled-reward control: the same rewards, in an order unrelated to the samples. With one group its
    advantages are exactly the true advantages permuted; over many steps they do not correlate with them."""
    cfg = toy.Config(groups=1, group_size=64)
    none = toy.make_arm(cfg, "nft")
    null = dataclasses.replace(none, name="null", shuffle_rewards=True)
    gens = [torch.Generator().manual_seed(s) for s in range(3)]
    rewards = torch.rand(3, 64, generator=torch.Generator().manual_seed(9))
    corr = []
    for _ in range(100):
        perm = toy.draw_noise(cfg, gens)["perm"]
        assert torch.equal(toy.arm_rewards(none, rewards, perm), rewards)
        shuffled = toy.arm_rewards(null, rewards, perm)
        assert torch.equal(shuffled.sort(1).values, rewards.sort(1).values) and not torch.equal(shuffled, rewards)
        for r, r_null, p in zip(rewards, shuffled, perm):
            adv, adv_null = ng.group_advantages(r, 64), ng.group_advantages(r_null, 64)
            torch.testing.assert_close(adv_null, adv[p])  # up to the sum's order
            corr.append(torch.corrcoef(torch.stack([adv, adv_null]))[0, 1].item())
    assert abs(sum(corr) / len(corr)) < 0.03 and max(map(abs, corr)) < 0.5


def test_trajectory_ratios_mean_and_rms_in_closed_form():
    """With v_ref(x) = x and v = c·x point by point: per-point ratio |c|, RMS ratio √(Σ c²|x|² / Σ |x|²) per model."""
    gen = torch.Generator().manual_seed(0)
    states = torch.randn(4, 3, 5, 2, generator=gen, dtype=torch.float64)  # (K, M, n, 2)
    c = torch.rand(4, 3, 5, generator=gen, dtype=torch.float64) * 2 + 0.1
    ratio, rms = toy.trajectory_ratios(lambda x, t: x, states, c[..., None] * states)
    torch.testing.assert_close(ratio, c)
    sq = states.square().sum(-1)
    torch.testing.assert_close(rms, ((c**2 * sq).sum((0, 2)) / sq.sum((0, 2))).sqrt())
    assert rms[0] != ratio[:, 0].mean()  # not the mean of the ratios: large ‖v_ref‖ weigh more


# ---------------------------------------------------------------------------------------------------------------
# the script's interface


def test_overrides_are_typed_and_unknown_keys_rejected():
    cfg, frontier = toy_experiment.parse_args(["--rl_steps=7", "--lam=0.5", "--plot=false"])
    assert (cfg.rl_steps, cfg.lam, cfg.plot, frontier) == (7, 0.5, False, False)
    cfg, frontier = toy_experiment.parse_args(["--smoke", "--seeds=3"])
    assert cfg.seeds == 3 and cfg.rl_steps == toy_experiment.SMOKE["rl_steps"] and not frontier
    assert toy_experiment.parse_args(["--frontier"])[1]
    with pytest.raises(cli.UsageError, match="--help lists"):
        toy_experiment.parse_args(["--sweep"])
    with pytest.raises(cli.UsageError, match="--rl_steps: expected an int"):
        toy_experiment.parse_args(["--rl_steps=many"])
    with pytest.raises(cli.UsageError, match="methods"):
        toy_experiment.parse_args(["--methods=nft,ppo"])
    for bad in ("0,9", "0,0", "a", "0,1,2,3,4,5,6,7"):
        with pytest.raises(cli.UsageError, match="target_modes"):
            toy_experiment.parse_args([f"--target_modes={bad}"])
    with pytest.raises(cli.UsageError, match="group_size"):
        toy_experiment.parse_args(["--group_size=3"])
    with pytest.raises(cli.UsageError, match="lam: expected a finite number >= 0"):
        toy_experiment.parse_args(["--lam=-1"])


def test_help_exits_0_and_lists_every_key_and_a_bad_argument_exits_2_in_one_line(capsys, monkeypatch):
    with pytest.raises(SystemExit) as done:
        cli.run(toy_experiment.main, ["--help"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    for field in dataclasses.fields(toy_experiment.Config):  # each key once, with the experiment's default
        assert printed.count(f"--{field.name}=") == 1 and f"--{field.name}={field.default}" in printed, field.name
    assert "--tilt_temp=0.1  (float)  # tau of the ideal" in printed and "--smoke" in printed
    assert "--seeds=5  (int)  # RL seeds per arm" in printed and "--frontier" in printed
    # the script's own entry point, run as __main__: exit code 2, one line on stderr, no traceback (tests/test_cli.py
    # runs cli.run in a fresh interpreter)
    monkeypatch.setattr("sys.argv", ["experiments/toy.py", "--rl_steps=many"])
    monkeypatch.delitem(sys.modules, "experiments.toy", raising=False)  # run fresh as __main__, as `python -m` does
    with pytest.raises(SystemExit) as done:
        runpy.run_module("experiments.toy", run_name="__main__", alter_sys=True)
    assert done.value.code == 2
    assert capsys.readouterr() == ("", "error: --rl_steps: expected an int, got 'many'\n")


def test_each_config_holds_what_its_file_reads():
    """toy_2d.Config: only settings toy_2d.py reads; experiments/toy.py's Config adds only settings it reads itself
    (and toy_2d.py never does), plus defaults of its own for toy_2d's seeds, rl_lr and out_dir."""
    source = {path: (ROOT / path).read_text() for path in ("toy_2d.py", "experiments/toy.py")}
    reads = lambda path, name: re.search(rf"\bcfg\.{name}\b", source[path]) is not None
    for field in dataclasses.fields(toy.Config):
        assert reads("toy_2d.py", field.name), field.name
    own = set(toy_experiment.Config.__annotations__)
    assert own - {f.name for f in dataclasses.fields(toy.Config)} == {"few_steps", "adjoint_samples", "plot", "jobs"}
    for name in own - {"seeds", "rl_lr", "out_dir"}:
        assert reads("experiments/toy.py", name) and not reads("toy_2d.py", name), name


def test_demo_help_lists_every_key_and_a_bad_argument_exits_2_in_one_line(capsys, monkeypatch):
    with pytest.raises(SystemExit) as done:
        cli.run(toy.main, ["--help"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    for field in dataclasses.fields(toy.Config):
        assert f"--{field.name}={field.default}" in printed, field.name
    assert "python toy_2d.py --out_dir=docs" in printed and "--smoke" in printed
    monkeypatch.setattr("sys.argv", ["toy_2d.py", "--margin=both"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "toy_2d.py"), run_name="__main__")
    assert done.value.code == 2
    assert capsys.readouterr() == ("", "error: margin: expected relative or absolute, got 'both'\n")


def test_demo_smoke_prints_what_to_look_at_and_writes_its_figure_and_json(tmp_path, capsys):
    """`python toy_2d.py --smoke`: the run the README's first command makes, at tiny sizes (numbers mean nothing)."""
    result = toy.main(["--smoke", f"--out_dir={tmp_path}"])
    printed = capsys.readouterr().out
    assert (tmp_path / "toy_2d.png").stat().st_size > 10_000
    data = json.loads((tmp_path / "toy_2d.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert data["config"]["rl_steps"] == toy.SMOKE["rl_steps"] and data["command"] == sys.argv
    assert set(data["runs"]) == {f"{m} {arm}" for m in toy.METHODS for arm in ("none", "guard")}
    for m in toy.METHODS:
        assert f"{m}: the guard takes the norm ratio from" in printed
        assert f"{m} + guard " in printed
    assert "python -m experiments.toy (docs/toy_2d.md)" in printed and "top row, no guard" in printed
    for run, arm in zip(result["runs"], result["arms"]):  # the last checkpoint is the final evaluation
        assert run["curve"]["step"] == [0, 3, 6] and len(run["profile"]) == toy.Config.profile_bins, arm
        assert run["curve"]["rms_ratio"][-1] == pytest.approx(run["scores"]["rms_ratio"], rel=1e-5)


def test_bench_times_each_command_in_a_fresh_interpreter_and_prints_its_budget_ratio(monkeypatch, capsys):
    """bench/bench_toy.py times the README's two toy commands against their budgets; its plumbing runs here on two
    trivial commands (the real sizes are measured by running the bench, docs/toy_2d.md, never by a timed test)."""
    from bench import bench_toy

    assert bench_toy.COMMANDS == {"python toy_2d.py": 15.0, "python -m experiments.toy": 20.0}
    commands = {"python -c pass": 15.0, "python -c x=1": 20.0}  # each gets --out_dir=..., which -c leaves alone
    monkeypatch.setattr(bench_toy, "COMMANDS", commands)
    rows = bench_toy.main(["--repeats=2"])
    printed = capsys.readouterr().out
    for command, row in rows.items():
        assert 0 < row["cpu"] and 0 < row["wall"] and row["budget"] == commands[command]
        assert f"{row['wall'] / row['budget']:.2f}" in printed
    assert printed.startswith("machine: ") and "of the experiment's wall time (fastest of 2 each)" in printed
    with pytest.raises(cli.UsageError, match="repeats: expected an int >= 1"):
        bench_toy.main(["--repeats=0"])


def test_checkpointing_some_arms_leaves_their_curves_as_they_were():
    """The headline checkpoints only the arms it reads curves of: the others' curves are None, and the tracked
    arms' curves are those of a run that checkpoints every arm (rel 1e-6: each model is sampled by its own batched
    matmul whichever models sit beside it; equal to the bit on the CPUs we ran)."""
    cfg = smoke_config()
    ref, _ = toy.make_reference(cfg)
    arm_list = [toy.make_arm(cfg, m, guard) for m in ("nft", "dpo") for guard in (False, True)]
    fixed = toy.evaluation_inputs(cfg)
    _, every = toy.train(cfg, ref, arm_list, fixed, progress=False)
    _, some = toy.train(cfg, ref, arm_list, fixed, progress=False, tracked=[1, 2])
    for i, (a, b) in enumerate(zip(every, some)):
        if i // cfg.seeds in (1, 2):
            for key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (i, key)
        else:
            assert b is None


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """`python -m experiments.toy --smoke`, run once for every test below that reads it: (config, out_dir, run()'s
    result, what it printed)."""
    out = tmp_path_factory.mktemp("toy_smoke")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = toy_experiment.main(["--smoke", f"--out_dir={out}"])
    cfg, _ = toy_experiment.parse_args(["--smoke", f"--out_dir={out}"])
    return cfg, out, result, printed.getvalue()


def test_smoke_run_writes_config_metrics_and_figure(smoke):
    _, out, _, printed = smoke
    assert "nft+guard" in printed and printed.count("\n(") == 6  # six verdict lines: 1, 2, 3, 4, 4b, 5
    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    config = json.loads((out / "config.json").read_text())
    assert (out / "headline.png").stat().st_size > 10_000
    assert config["config"]["rl_steps"] == toy_experiment.SMOKE["rl_steps"] and len(config["git_revision"]) > 0
    assert config["command"] == sys.argv
    assert len(metrics["verdicts"]) == 6 and metrics["table"] in printed
    table, seeds = flat_table(metrics), toy_experiment.SMOKE["seeds"]
    for m in toy.METHODS:
        for v in E.VARIANTS:
            row = table[m][v]
            assert len(row["full_rms_ratio"]) == seeds and all(math.isfinite(x) for x in row["full_ratio"])
            assert all(len(e["profile"]) == toy.Config.profile_bins for e in metrics["runs"][m][v])
            steps = [h["step"] for h in metrics["histories"][m][v]]
            assert steps == [[0, 3, 6]] * seeds
        assert len(table[m]["none"]["rescale_reward"]) == seeds and "rescale_reward" not in table[m]["guard"]
        assert len(metrics["null_runs"][m]["none"]) == seeds
        assert len(metrics["adjoint"][m]) == len(metrics["early_stopping_control"][m]) == seeds
    assert len(metrics["adjoint_reference"]) == seeds


def test_checkpoints_are_measured_like_the_final_evaluation(smoke):
    """The last checkpoint is the final model on the same noise and sample count: the same numbers."""
    _, _, result, _ = smoke
    metrics = result["metrics"]
    for m, variants in metrics["runs"].items():
        for v, evals in variants.items():
            for ev, history in zip(evals, metrics["histories"][m][v]):
                for key in ("reward", "sw", "logp", "ratio", "rms_ratio"):
                    assert history[key][-1] == pytest.approx(ev["full"][key], rel=1e-5, abs=1e-6), (m, v, key)


def test_run_returns_the_models_it_evaluated(smoke):
    """The walkthrough samples from what run() returns: each VelocityMLP reproduces its run's evaluation."""
    cfg, _, result, _ = smoke
    grid = ng.flow_timesteps(cfg.sample_steps)
    noise = toy.evaluation_inputs(cfg)["noise"]
    models, i = result["models"], 0
    with torch.no_grad():
        for m, arms in models.items():
            for name, per_seed in arms.items():
                for s, model in enumerate(per_seed):
                    x = ng.euler_sample(model, noise, grid)
                    torch.testing.assert_close(x[:600], result["samples"]["models"][i], atol=1e-4, rtol=1e-4)
                    evals = result["metrics"]["runs"][m] if name != "null" else result["metrics"]["null_runs"][m]
                    expected = evals["none" if name == "null" else name][s]["full"]["reward"]
                    assert toy.reward(cfg, x).mean().item() == pytest.approx(expected, abs=1e-5)
                    i += 1
        x_ref = ng.euler_sample(result["reference"], noise, grid)
    torch.testing.assert_close(x_ref[:600], result["samples"]["reference"], atol=1e-4, rtol=1e-4)


def test_the_verdicts_are_evidence_rules_on_the_run(smoke):
    """toy_experiment judges by evidence.verdicts with SW to the tilted target, lower is better: recomputing them
    from the saved metrics gives the same lines."""
    cfg, _, result, _ = smoke
    metrics = result["metrics"]
    assert toy_experiment.QUALITY == E.Quality("sw", "SW→tilted", higher_is_better=False, digits=3)
    control = metrics["early_stopping_control"]
    args = ("runs", "reference", "adjoint", "adjoint_reference")
    lines, flags = E.verdicts(
        *(metrics[k] for k in args), control, toy_experiment.QUALITY, cfg.few_steps, metrics["null_runs"]
    )
    assert lines == metrics["verdicts"] and flags == metrics["verdict_flags"]
    for m in toy.METHODS:
        for s in range(cfg.seeds):
            h_none, h_guard = (metrics["histories"][m][v][s] for v in E.VARIANTS)
            assert control[m][s] == E.early_stopping_control(h_none, h_guard, toy_experiment.QUALITY)


def assert_same_numbers(a, b, where=""):
    """JSON-like a and b equal in structure and strings, their floats within rel 1e-6 (see the test below)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_numbers(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_numbers(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-6, abs=1e-7, nan_ok=True), where
    else:
        assert a == b, where


@pytest.mark.parametrize("frontier", [False, True])
def test_the_numbers_do_not_depend_on_the_processes(tmp_path, frontier):
    """--jobs shares the arms out to processes: one process, two (the default) and five (shares of one or two arms,
    some with no un-guarded arm) give the same metrics, table and verdicts. Equal to the bit on the CPUs we ran
    (every arm's loss sees only its own models, each model's matmul is its own); rel 1e-6 allows a BLAS that orders
    a matmul's sums by the batch beside it."""
    read = {}
    for jobs in (1, 2, 5):
        out = tmp_path / f"jobs{jobs}"
        flags = ["--smoke", f"--jobs={jobs}", "--plot=false", f"--out_dir={out}", *(["--frontier"] if frontier else [])]
        with contextlib.redirect_stdout(io.StringIO()):
            toy_experiment.main(flags)
        data = json.loads((out / ("frontier.json" if frontier else "metrics.json")).read_text())
        read[jobs] = {k: v for k, v in data.items() if k not in ("wall_time_s", "config", "command")}
    assert_same_numbers(read[1], read[2])
    assert_same_numbers(read[1], read[5])
    with pytest.raises(cli.UsageError, match="jobs: expected an int >= 1"):
        toy_experiment.parse_args(["--jobs=0"])


def test_frontier_smoke_writes_figures_and_json_with_paths_from_the_reference_to_the_official_run(tmp_path, capsys):
    toy_experiment.main(["--smoke", "--frontier", f"--out_dir={tmp_path}"])
    printed = capsys.readouterr().out
    data = json.loads((tmp_path / "frontier.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert data["frontier"] and all(line in printed for line in data["frontier"])
    # the knob question (protocol, amendment 2 (g)): each family's grid, and the rankings at every guard and KL member
    assert data["knobs"] and all(line in printed for line in data["knobs"])
    rankings = data["knob_summary"]["nft"]["rankings"]
    assert [r["knob"] for r in rankings["guard"]] == list(toy_experiment.GRIDS["guard"]) and "kl" in rankings
    assert data["command"] == sys.argv and data["config"]["rl_steps"] == toy_experiment.SMOKE["rl_steps"]
    q, ref = toy_experiment.QUALITY.key, data["reference"]["full"]
    for m in toy.METHODS:
        assert (tmp_path / f"frontier_{m}.png").stat().st_size > 10_000
        grids = toy_experiment.DPO_GRIDS if m == "dpo" else toy_experiment.GRIDS
        families = data["paths"][m]
        assert set(families) == set(grids) | {"early_stop", "rescale"}
        official = [[ev["full"]["reward"], ev["full"][q]] for ev in data["runs"][m]["none"]]
        for family, per_seed in families.items():
            assert len(per_seed) == toy_experiment.SMOKE["seeds"]
            for s, path in enumerate(per_seed):
                assert path[0] == [ref["reward"], ref[q]] and path[-1] == official[s], (m, family)
            members = {
                "early_stop": toy_experiment.SMOKE["rl_steps"] // toy_experiment.SMOKE["eval_every"] - 1,
                "rescale": len(toy_experiment.RESCALES),
            }
            assert len(per_seed[0]) == members.get(family, len(grids.get(family, ()))) + 2
        strongest = data["runs"][m][f"guard {grids['guard'][0]:g}"][0]["full"]  # members in grid order
        assert families["guard"][0][1] == [strongest["reward"], strongest[q]]


# ---------------------------------------------------------------------------------------------------------------
# regression: what the toy shows at the default settings (fixed exploration seeds; the headline, run once per
# session by conftest.toy_headline, ~60 s)


@pytest.fixture(scope="module")
def default_run(toy_headline):
    return toy_headline["metrics"]


def mean(x):
    return sum(x) / len(x)


@pytest.mark.experiment
def test_default_every_unguarded_method_drifts_up_and_the_hinge_holds_nft_and_awm(default_run):
    table = flat_table(default_run)
    for m in toy.METHODS:
        assert 1.04 < mean(table[m]["none"]["full_ratio"]) < 1.2, m
    for m in ("nft", "awm"):  # the hinge holds them below the un-guarded run on every seed (paired)
        none, guard = table[m]["none"]["full_rms_ratio"], table[m]["guard"]["full_rms_ratio"]
        assert all(n > g for n, g in zip(none, guard)) and mean(guard) < 1.0, (m, none, guard)
    assert default_run["verdict_flags"]["not_tested"] == []


@pytest.mark.experiment
def test_default_guard_keeps_most_of_the_reward_gain_and_beats_rescaling_on_reward(default_run):
    table, r0 = flat_table(default_run), default_run["reference"]["full"]["reward"]
    for m in toy.METHODS:
        none, guard = mean(table[m]["none"]["full_reward"]), mean(table[m]["guard"]["full_reward"])
        assert none > r0 + 0.05 and (guard - r0) / (none - r0) > 0.8, (m, r0, none, guard)
    for m in ("nft", "awm"):  # rescaling at inference gives up more of the gain than the guard, on every seed
        assert all(g > r for g, r in zip(table[m]["guard"]["full_reward"], table[m]["none"]["rescale_reward"]))


@pytest.mark.experiment
def test_default_shuffled_rewards_learn_nothing(default_run):
    """The null-reward control keeps the reference's reward: what it drifts is drift without a reward signal."""
    r0 = default_run["reference"]["full"]["reward"]
    for m, variants in default_run["null_runs"].items():
        assert abs(mean([e["full"]["reward"] for e in variants["none"]]) - r0) < 0.01, m


@pytest.mark.experiment
def test_default_adjoint_signal_is_weak_at_the_reference_but_leans_toward_larger_norms_after_rl(default_run):
    """Claim 3: at the reference δ = mean/sd of dR/dα is near 0; after RL most samples gain reward when every
    step's velocity is scaled up: δ 0.3-0.8, 60-85 % positive. Weak, but not sign-free."""
    for ref in default_run["adjoint_reference"]:
        assert abs(ref["total_mean"]) < 0.25 * ref["total_std"]
    for m in toy.METHODS:
        for a in default_run["adjoint"][m]:
            mu, sd, pos = a["total_mean"], a["total_std"], a["frac_positive"]
            assert mu > 0 and 0.25 < mu / sd < 0.8 and 0.55 < pos < 0.85, (m, mu, sd, pos)


@pytest.mark.experiment
def test_default_log_density_has_not_yet_moved_for_nft_and_awm_and_the_guard_ties_it(default_run):
    """At ~10 % inflation NFT's and AWM's log-density has not moved, so the guard has nothing to repair there: same
    log p as the un-guarded run; at 3 Euler steps the guard's is lower, where the inflated velocities offset
    Euler's undershoot. DPO's log p sits 0.1-0.3 below the reference's, with or without the guard."""
    table, ref = flat_table(default_run), default_run["reference"]["full"]
    for m in toy.METHODS:
        none, guard = table[m]["none"], table[m]["guard"]
        drop = ref["logp"] - mean(none["full_logp"])
        assert (0.1 < drop < 0.3) if m == "dpo" else abs(drop) < 0.2, (m, drop)
        assert abs(mean(guard["full_logp"]) - mean(none["full_logp"])) < 0.1, m
    for m in ("nft", "awm"):
        assert mean(table[m]["guard"]["few_logp"]) < mean(table[m]["none"]["few_logp"]) - 0.1, m


# ---------------------------------------------------------------------------------------------------------------
# regression: the longer run


@pytest.mark.experiment
def test_longer_training_hurts_quality_and_the_guard_repairs_it_beyond_early_stopping():
    """800 RL steps: the drift reaches ~1.5-2x and moves the samples off the ring; the guarded runs keep most of
    the reward gain much closer to the tilted target, beat rescaling on both axes and beat the un-guarded
    checkpoint of equal reward."""
    metrics = toy_experiment.run(
        toy_experiment.Config(methods="nft,awm", seeds=3, rl_steps=800, plot=False), progress=False
    )["metrics"]
    table, ref = flat_table(metrics), metrics["reference"]["full"]
    for m in ("nft", "awm"):
        none, guard = table[m]["none"], table[m]["guard"]
        assert mean(none["full_ratio"]) > 1.4 and mean(guard["full_ratio"]) < mean(none["full_ratio"]) - 0.3
        assert mean(none["full_logp"]) < ref["logp"] - 0.5 and mean(guard["full_logp"]) > ref["logp"] - 0.15
        assert all(g < n for g, n in zip(guard["full_sw"], none["full_sw"])), (m, guard["full_sw"], none["full_sw"])
        kept = (mean(guard["full_reward"]) - ref["reward"]) / (mean(none["full_reward"]) - ref["reward"])
        assert kept > 0.6, (m, kept)
        assert mean(guard["full_reward"]) > mean(none["rescale_reward"])
        assert mean(guard["full_sw"]) < mean(none["rescale_sw"])
        assert all(d > 0 for d, *_ in metrics["early_stopping_control"][m]), metrics["early_stopping_control"][m]


@pytest.mark.experiment
def test_relative_margin_destabilises_guarded_dpo_in_2d():
    """With the core's default relative margin, the hinge's 1/|v_ref|^2 gradient where the 2D reference velocity
    nearly vanishes leaves guarded DPO (at its large lr) with a much lower log-density."""
    metrics = toy_experiment.run(
        toy_experiment.Config(methods="dpo", seeds=3, margin="relative", plot=False), progress=False
    )["metrics"]
    dpo = flat_table(metrics)["dpo"]
    assert mean(dpo["guard"]["full_logp"]) < mean(dpo["none"]["full_logp"]) - 0.3
