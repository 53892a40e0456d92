"""digits.py (the splits, the label encoder, the reference it pretrains, the reward proxy, the quality judges) and
digits_experiment.py (the runs, their reuse, the verdicts).

Everything is built in the session's fresh digits cache (conftest.digits_cache: no file from an earlier run is
trusted). The reference there is pretrained with a short budget (DIGITS_TEST_STEPS); the testbed is sound only if
even that budget gives digits a judge it has never met recognises far above chance.
"""

import json
import math
from pathlib import Path

import pytest
import torch

import digits as dg
import digits_experiment as dx
import normguard as ng


@pytest.fixture(scope="module")
def cache(digits_cache):
    return digits_cache[0]


@pytest.fixture(scope="module")
def reference(digits_cache):
    path = digits_cache[1]
    return path, dg.load_reference(path)


# ---------------------------------------------------------------------------------------------------------------
# data and label encoder


def test_splits_are_disjoint_cover_all_digits_and_hold_every_class():
    images, _ = dg._all_digits()
    parts = {name: dg.load_split(name) for name in ("reward", "judge", "heldout")}
    assert [len(parts[n][1]) for n in ("reward", "judge", "heldout")] == [600, 600, 597]
    flat = {n: {tuple(x.flatten().tolist()) for x in parts[n][0]} for n in parts}
    # sklearn's digits contain no exact duplicates across these splits, so pixel sets must not overlap
    assert not (flat["reward"] & flat["judge"]) and not (flat["reward"] & flat["heldout"])
    assert not (flat["judge"] & flat["heldout"])
    assert sum(len(parts[n][1]) for n in parts) == len(images)
    for x, y in parts.values():
        assert x.min() == -1 and x.max() == 1 and set(y.tolist()) == set(range(10))
    train_x, _ = dg.load_split("train")
    assert len(train_x) == 1200
    with pytest.raises(ValueError, match="name"):
        dg.load_split("test")


def test_label_encoder_shapes_round_trip_and_errors(tmp_path):
    enc = dg.LabelEncoder(num_tokens=3, joint_attention_dim=8, pooled_projection_dim=5)
    hidden, pooled = enc(torch.tensor([0, 9, dg.NULL_LABEL]))
    assert hidden.shape == (3, 3, 8) and pooled.shape == (3, 5)
    enc.save_pretrained(tmp_path)
    again = dg.LabelEncoder.from_pretrained(tmp_path)
    for a, b in zip(enc(torch.arange(11)), again(torch.arange(11))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="labels"):
        enc(torch.tensor([11]))
    with pytest.raises(ValueError, match="labels"):
        enc(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="path"):
        dg.LabelEncoder.from_pretrained(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------------------------
# reward proxy and quality judges


def test_reward_fn_contract_and_it_prefers_the_right_digit(cache):
    x, y = dg.load_split("heldout")
    r = dg.reward_fn(x, y, cache_dir=cache)
    assert r.shape == (len(y),) and ((r >= 0) & (r <= 1)).all()
    wrong = dg.reward_fn(x, (y + 1) % 10, cache_dir=cache)
    assert r.mean() > 0.5 > wrong.mean() * 5  # a classifier it has never seen these digits with still agrees
    meta = json.loads(
        json.dumps(
            dict(
                __import__("safetensors").safe_open(str(Path(cache) / "reward_classifier.safetensors"), "pt").metadata()
            )
        )
    )
    assert meta["split"] == "reward" and float(meta["heldout_accuracy"]) > 0.9
    for bad, match in [(x[:, 0], "images"), (x.reshape(-1, 1, 4, 16), "images"), (x[:0], "images")]:
        with pytest.raises(ValueError, match=match):
            dg.reward_fn(bad, y[: len(bad)], cache_dir=cache)
    for bad_labels in (y.float(), y[:-1], torch.full_like(y, 10), torch.full_like(y, -1)):
        with pytest.raises(ValueError, match="labels"):
            dg.reward_fn(x, bad_labels, cache_dir=cache)
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        dg.reward_fn(nan, y, cache_dir=cache)


@pytest.mark.experiment
def test_reward_is_hackable_off_the_manifold_and_the_judges_see_it(cache):
    """Sign-gradient ascent on the reward pushes real digits to a higher reward than any real digit gets on
    average, while the reward-independent judges say the images got worse: the hack the RL runs can find."""
    x, y = dg.load_split("heldout")
    x, y = x[:200], y[:200]
    hacked = x.clone()
    for _ in range(20):
        hacked.requires_grad_(True)
        (grad,) = torch.autograd.grad(dg.reward_fn(hacked, y, cache_dir=cache).sum(), hacked)
        hacked = (hacked + 0.05 * grad.sign()).clamp(-1, 1).detach()
    r0, r1 = dg.reward_fn(x, y, cache_dir=cache).mean(), dg.reward_fn(hacked, y, cache_dir=cache).mean()
    q0, q1 = dg.quality_metrics(x, y, cache_dir=cache), dg.quality_metrics(hacked, y, cache_dir=cache)
    assert r1 > 0.9 > r0 + 0.1
    assert q1["fd"] > 2 * q0["fd"] and q1["disc_acc"] > q0["disc_acc"] + 0.1


@pytest.mark.experiment
def test_quality_metrics_contract_and_real_digits_beat_noise(cache):
    x, y = dg.load_split("judge")  # real digits the metrics' reference set (held-out) does not contain
    real = dg.quality_metrics(x[:300], y[:300], cache_dir=cache)
    noise = dg.quality_metrics(
        torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1, y[:300], cache_dir=cache
    )
    assert set(real) == {"judge_acc", "fd", "disc_acc"} and all(isinstance(v, float) for v in real.values())
    assert real["judge_acc"] > 0.9 and noise["judge_acc"] < 0.3
    assert 0 <= real["fd"] < noise["fd"] / 10
    assert 0.3 < real["disc_acc"] < 0.65 and noise["disc_acc"] > 0.95
    with pytest.raises(ValueError, match="B >= 10"):
        dg.quality_metrics(x[:5], y[:5], cache_dir=cache)
    with pytest.raises(ValueError, match="labels"):
        dg.quality_metrics(x[:20], y[:19], cache_dir=cache)


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    """For N(μ1, diag(s1²)) and N(μ2, diag(s2²)): FD = ‖μ1 - μ2‖² + Σ (s1 - s2)²; here from exact moments."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 4, generator=gen, dtype=torch.float64)
    z = (z - z.mean(0)) / z.std(0)  # unit sample moments, so the formula holds up to the cov's tiny off-diagonals
    s1, s2 = (
        torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=torch.float64),
        torch.tensor([2.0, 1.0, 0.5, 3.0], dtype=torch.float64),
    )
    mu = torch.tensor([1.0, 0.0, -1.0, 2.0], dtype=torch.float64)
    expected = (mu**2).sum() + ((s1 - s2) ** 2).sum()
    assert abs(dg.frechet_distance(z * s1 + mu, z * s2) - expected.item()) < 0.05
    assert abs(dg.frechet_distance(z, z)) < 1e-6


# ---------------------------------------------------------------------------------------------------------------
# the reference


def test_reference_is_a_diffusers_folder_and_pretraining_is_deterministic(tmp_path):
    from diffusers import SD3Transformer2DModel

    a = dg.get_reference(tmp_path / "a", "cpu", steps=3, progress=False)
    b = dg.get_reference(tmp_path / "b", "cpu", steps=3, progress=False)
    assert (Path(a) / "transformer" / "config.json").is_file() and (Path(a) / "label_embeddings.safetensors").is_file()
    transformer = SD3Transformer2DModel.from_pretrained(str(Path(a) / "transformer"))
    assert transformer.config.in_channels == 1 and transformer.config.out_channels == 1
    assert transformer.config.sample_size == 8 and transformer.config.patch_size == 2
    (ta, ea), (tb, eb) = dg.load_reference(a), dg.load_reference(b)
    for p, q in zip(list(ta.parameters()) + list(ea.parameters()), list(tb.parameters()) + list(eb.parameters())):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    stamp = (Path(a) / "pretrain.json").stat().st_mtime_ns
    assert dg.get_reference(tmp_path / "a", "cpu", steps=3, progress=False) == a  # reused, not retrained
    assert (Path(a) / "pretrain.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="steps"):
        dg.get_reference(tmp_path / "c", "cpu", steps=0)


@pytest.mark.experiment
def test_reference_generates_digits_the_judge_recognises_well_above_chance(reference, cache):
    """The testbed is sound: even the short-budget reference draws the prompted digit, as judged by the CNN judge
    (trained on real digits only, never on a generated one; it never sees the reward MLP). Chance is 0.1; we
    require 0.5. The experiment's 2000-step reference scores ~0.97."""
    _, (transformer, encoder) = reference
    labels = torch.arange(10).repeat(20)
    noise = torch.randn(len(labels), 1, 8, 8, generator=torch.Generator().manual_seed(0))
    images = dg.generate(transformer, encoder, labels, noise, steps=10)
    q = dg.quality_metrics(images, labels, cache_dir=cache)
    r = dg.reward_fn(images, labels, cache_dir=cache)
    assert q["judge_acc"] > 0.5
    assert r.mean() > 0.3  # the reward proxy agrees it sees the prompted digit more often than not-quite
    assert images.abs().max() < 3  # pixel space stays near [-1, 1]: no blow-up in the sampler


@pytest.mark.experiment
def test_reference_velocity_follows_the_diffusers_convention(reference):
    """On a real digit x0, the trained velocity at x_t points along ε - x0 (cosine well above 0) at mid t."""
    _, (transformer, encoder) = reference
    x0, y = dg.load_split("train")
    x0, y = x0[:64], y[:64]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((64,), 0.5)
    x_t, target = ng.forward_process(x0, noise, t)
    with torch.no_grad():
        v = dg.velocity(transformer, encoder, x_t, t, y)
    cos = torch.nn.functional.cosine_similarity(v.flatten(1), target.flatten(1), dim=1)
    assert cos.mean() > 0.8


# ---------------------------------------------------------------------------------------------------------------
# the experiment: train_full.py's digits preset, run per (method, variant, seed)


def smoke_args(digits_cache, out, *extra):
    """The experiment's --smoke on the session's reference: its pretraining budget, so it is reused, not rebuilt."""
    cache, path = digits_cache
    steps = json.loads((Path(path) / "pretrain.json").read_text())["steps"]
    return ["--smoke", f"--cache_dir={cache}", f"--out_dir={out}", f"--pretrain_steps={steps}", *extra]


@pytest.fixture(scope="module")
def smoke(digits_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("digits_smoke")
    return out, dx.main(smoke_args(digits_cache, out))


def test_smoke_run_writes_every_output_and_a_verdict_per_claim(smoke):
    import train_full as tf

    out, metrics = smoke
    for name in (
        "metrics.json",
        "config.json",
        "digits.png",
        "grids/reference_full.png",
        "grids/nft_guard_seed0_few.png",
        "grids/dpo_none_seed0_rescale.png",
    ):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert [line[:3] for line in saved["verdicts"]] == ["(1)", "(2)", "(3)", "(4)", "(5)"]
    for m in dx.METHODS:
        for v in dx.VARIANTS:
            run = saved["runs"][m][v][0]
            assert 0 <= run["full"]["reward"] <= 1 and run["full"]["ratio"] > 0
            assert len(run["profile"]) == tf.Config().profile_bins
            history = saved["histories"][f"{m}_{v}_seed0"]
            assert history["step"] == [0, tf.SMOKE["steps"]]  # train_full's own checkpoint evaluations
    assert "rescale" in saved["runs"]["nft"]["none"][0] and "rescale" not in saved["runs"]["nft"]["guard"][0]
    assert metrics["train_config"]["steps"] == tf.SMOKE["steps"] and metrics["train_config"]["lora_rank"] == 4


def test_every_run_is_a_train_full_run(smoke):
    """Each (method, variant, seed) folder is what train_full with the digits preset (`python digits.py`) writes,
    with the experiment's per-run settings in its config.json."""
    out, _ = smoke
    for m in dx.METHODS:
        for v in dx.VARIANTS:
            folder = out / "runs" / f"{m}_{v}_seed0"
            for name in (
                "config.json",
                "log.jsonl",
                "evals.jsonl",
                "metrics.json",
                "train.log",
                "result.pt",
                "lora/pytorch_lora_weights.safetensors",
            ):
                assert (folder / name).is_file(), folder / name
            saved = json.loads((folder / "config.json").read_text())["config"]
            assert saved["preset"] == "digits" and saved["method"] == m and saved["guard"] == (v == "guard")
            assert saved["lr"] == (dx.Config.dpo_lr if m == "dpo" else 1e-3)
            assert "step      2 | reward" in (folder / "train.log").read_text()


def test_an_interrupted_experiment_reuses_finished_runs_and_reruns_changed_ones(smoke, digits_cache):
    out, first = smoke
    result = out / "runs" / "dpo_guard_seed0" / "result.pt"
    stamp = result.stat().st_mtime_ns
    again = dx.main(smoke_args(digits_cache, out, "--methods=dpo", "--jobs=1"))  # jobs=1: in this process
    assert result.stat().st_mtime_ns == stamp  # same train_full config: read back, not retrained
    assert dx.json_safe(again["runs"]["dpo"]) == dx.json_safe(first["runs"]["dpo"])  # profile bins may be NaN
    changed = dx.main(smoke_args(digits_cache, out, "--methods=dpo", "--lam=0.5", "--jobs=1"))
    assert result.stat().st_mtime_ns != stamp
    assert changed["train_config"]["lam"] == 0.5


def test_the_exported_lora_loads_as_the_trained_policy(smoke, digits_cache):
    """load_trained (diffusers' load_lora_adapter, then fuse) gives the same velocity as the unfused adapter, and
    not the reference's: the experiment evaluates what training produced."""
    from diffusers import SD3Transformer2DModel

    out, metrics = smoke
    ref_path = metrics["reference_path"]
    tcfg = dx.train_config(dx.parse_args(smoke_args(digits_cache, out)), "nft", "guard", 0, ref_path)
    fused = dx.load_trained(tcfg, ref_path)
    unfused = SD3Transformer2DModel.from_pretrained(str(Path(ref_path) / "transformer"))
    unfused.load_lora_adapter(
        str(out / "runs" / "nft_guard_seed0" / "lora"),
        weight_name="pytorch_lora_weights.safetensors",
        prefix="transformer",
    )
    ref_t, encoder = dg.load_reference(ref_path)
    x, labels = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(6)
    t = torch.full((6,), 0.6)
    with torch.no_grad():
        v_fused, v_unfused, v_ref = (dg.velocity(m, encoder, x, t, labels) for m in (fused, unfused, ref_t))
    torch.testing.assert_close(v_fused, v_unfused, rtol=1e-4, atol=1e-5)
    assert (v_fused - v_ref).abs().max() > 1e-4


def test_early_stopping_control_interpolates_the_unguarded_path():
    none = {"reward": [0.5, 0.7, 0.9], "fd": [10.0, 30.0, 50.0]}
    assert dx.early_stopping_control(none, {"reward": [0.5, 0.8], "fd": [10.0, 25.0]}) == pytest.approx(15.0)
    assert dx.early_stopping_control(none, {"reward": [0.5, 0.4], "fd": [10.0, 12.0]}) == pytest.approx(-2.0)
    assert math.isnan(dx.early_stopping_control(none, {"reward": [0.5, 0.95], "fd": [10.0, 20.0]}))


def test_bad_arguments_name_the_key():
    with pytest.raises(ValueError, match="rl_step"):
        dx.parse_args(["--rl_step=3"])
    with pytest.raises(ValueError, match="seeds"):
        dx.parse_args(["--seeds=0,a"])
    with pytest.raises(ValueError, match="methods"):
        dx.parse_args(["--methods=nft,ppo"])
    with pytest.raises(ValueError, match="lr"):
        dx.parse_args(["--lr=fast"])  # a train_full key, checked by train_full's own parser
    with pytest.raises(ValueError, match="method"):
        dx.parse_args(["--method=nft"])  # set per run by the experiment
    with pytest.raises(ValueError, match="ckpt_samples"):
        dx.parse_args(["--ckpt_samples=15"])


def test_forwarded_train_full_keys_reach_every_run():
    cfg = dx.parse_args(["--lam=0.25", "--full_finetune=true", "--seeds=3,4"])
    assert cfg.train == {"lam": 0.25, "full_finetune": True}  # converted by cli.parse to train_full's types
    for method in dx.METHODS:
        tcfg = dx.train_config(cfg, method, "guard", 4, "")
        assert tcfg.lam == 0.25 and tcfg.full_finetune and tcfg.seed == 4 and tcfg.steps == dx.TRAIN_DEFAULTS["steps"]
        assert tcfg.lr == (cfg.dpo_lr if method == "dpo" else 1e-3)
