"""experiments/digits_testbed.py (the splits, the label encoder, the reference it pretrains, the reward proxy, the
quality judges) and experiments/digits.py (the runs, their reuse, the verdicts).

Everything is built in the session's fresh digits caches (conftest.shared_digits_cache: no file from an earlier run
is trusted). The plumbing runs on a reference with the experiment's --smoke pretraining budget and a short-budget
judge (conftest.DIGITS_UNIT); the `experiment` tests use the real judge and a reference pretrained with a short
budget (DIGITS_TRAINED): the testbed is sound only if even that budget gives digits a judge it has never met
recognises far above chance.
"""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

import normguard as ng
import train_full as tf
from experiments import digits as dx
from experiments import digits_testbed as dg
from trainer import recipes


@pytest.fixture(scope="module")
def cache(digits_cache):
    return digits_cache[0]


@pytest.fixture(scope="module")
def trained_cache(trained_digits_cache):
    return trained_digits_cache[0]


@pytest.fixture(scope="module")
def reference(trained_digits_cache):
    path = trained_digits_cache[1]
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
def test_reward_is_hackable_off_the_manifold_and_the_judges_see_it(trained_cache):
    """Sign-gradient ascent on the reward pushes real digits to a higher reward than any real digit gets on
    average, while the reward-independent judges say the images got worse: the hack the RL runs can find."""
    x, y = dg.load_split("heldout")
    x, y = x[:200], y[:200]
    hacked = x.clone()
    for _ in range(20):
        hacked.requires_grad_(True)
        (grad,) = torch.autograd.grad(dg.reward_fn(hacked, y, cache_dir=trained_cache).sum(), hacked)
        hacked = (hacked + 0.05 * grad.sign()).clamp(-1, 1).detach()
    r0, r1 = dg.reward_fn(x, y, cache_dir=trained_cache).mean(), dg.reward_fn(hacked, y, cache_dir=trained_cache).mean()
    q0, q1 = dg.quality_metrics(x, y, cache_dir=trained_cache), dg.quality_metrics(hacked, y, cache_dir=trained_cache)
    assert r1 > 0.9 > r0 + 0.1
    assert q1["fd"] > 2 * q0["fd"] and q1["disc_acc"] > q0["disc_acc"] + 0.1


@pytest.mark.experiment
def test_quality_metrics_contract_and_real_digits_beat_noise(trained_cache):
    x, y = dg.load_split("judge")  # real digits the metrics' reference set (held-out) does not contain
    real = dg.quality_metrics(x[:300], y[:300], cache_dir=trained_cache)
    noise = dg.quality_metrics(
        torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1, y[:300], cache_dir=trained_cache
    )
    judge = __import__("safetensors").safe_open(str(Path(trained_cache) / "judge_classifier.safetensors"), "pt")
    assert judge.metadata()["epochs"] == "300"  # the judge classifier() trains, as in the experiment
    assert set(real) == {"judge_acc", "fd", "disc_acc"} and all(isinstance(v, float) for v in real.values())
    assert real["judge_acc"] > 0.9 and noise["judge_acc"] < 0.3
    assert 0 <= real["fd"] < noise["fd"] / 10
    assert 0.3 < real["disc_acc"] < 0.65 and noise["disc_acc"] > 0.95
    with pytest.raises(ValueError, match="B >= 10"):
        dg.quality_metrics(x[:5], y[:5], cache_dir=trained_cache)
    with pytest.raises(ValueError, match="labels"):
        dg.quality_metrics(x[:20], y[:19], cache_dir=trained_cache)


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
    assert abs(dg.frechet_distance(z, z)) < 1e-6  # a float64 cancellation of terms of size tr(cov) = 4: ~1e-15


def test_discriminator_accuracy_is_sklearns_cross_validated_score():
    """Its own loop over the folds equals sklearn's cross_val_score of the same classifier, balanced classes and
    folds, to the last bit."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    real, _ = dg.load_split("heldout")
    gen = torch.Generator().manual_seed(1)
    for fake in (
        torch.rand(20, 1, 8, 8, generator=gen) * 2 - 1,
        real[:300] + 0.3 * torch.randn(300, 1, 8, 8, generator=gen),
    ):
        n = len(fake)
        g = torch.Generator().manual_seed(0)
        x = torch.cat([fake[torch.randperm(n, generator=g)], real[torch.randperm(len(real), generator=g)[:n]]])
        folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
        scores = cross_val_score(
            LogisticRegression(max_iter=2000), x.flatten(1).double().numpy(), [0] * n + [1] * n, cv=folds
        )
        assert dg.discriminator_accuracy(fake, real) == float(scores.mean())


def test_the_held_out_features_are_the_judges_computed_once(cache):
    judge, (real, _) = dg.classifier("judge", cache, "cpu"), dg.load_split("heldout")
    with torch.no_grad():
        assert torch.equal(dg.heldout_features(cache), judge.features(real))
    assert dg.heldout_features(cache) is dg.heldout_features(cache)


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
def test_reference_generates_digits_the_judge_recognises_well_above_chance(reference, trained_cache):
    """The testbed is sound: even the short-budget reference draws the prompted digit, as judged by the CNN judge
    (trained on real digits only, never on a generated one; it never sees the reward MLP). Chance is 0.1; we
    require 0.5. The experiment's 2000-step reference scores ~0.97."""
    _, (transformer, encoder) = reference
    labels = torch.arange(10).repeat(20)
    noise = torch.randn(len(labels), 1, 8, 8, generator=torch.Generator().manual_seed(0))
    images = dg.generate(transformer, encoder, labels, noise, steps=10)
    q = dg.quality_metrics(images, labels, cache_dir=trained_cache)
    r = dg.reward_fn(images, labels, cache_dir=trained_cache)
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
# the null-reward control


def test_shuffled_reward_is_a_reproducible_permutation_of_the_real_one(cache):
    """digits_shuffled gives every sample some other sample's true reward: the same multiset per call, a fixed
    permutation of the batch for a given run seed and batch (so a resumed run draws the same), another for
    another seed."""
    import train_full as tf
    from trainer import rewards

    x, y = dg.load_split("heldout")
    x, prompts = x[:32], [str(d) for d in y[:32].tolist()]
    real = dg.reward_fn(x, y[:32], cache_dir=cache)
    make = lambda seed: tf.make_config({"cache_dir": cache, "seed": seed}, False, "digits")
    build = lambda seed: rewards.REWARDS["digits_shuffled"](make(seed), "cpu")
    shuffled = build(3)(x, prompts)
    perm = dg.batch_permutation(3, x)
    assert sorted(perm.tolist()) == list(range(32)) and perm.tolist() != list(range(32))
    torch.testing.assert_close(shuffled, real[perm], rtol=0, atol=0)
    torch.testing.assert_close(shuffled.sort().values, real.sort().values, rtol=0, atol=0)
    torch.testing.assert_close(build(3)(x, prompts), shuffled, rtol=0, atol=0)  # reproducible
    assert not torch.equal(build(4)(x, prompts), shuffled)  # another run seed, another permutation
    assert not torch.equal(shuffled, real)


# ---------------------------------------------------------------------------------------------------------------
# the experiment: train_full.py's digits preset, run per (method, arm, seed)


def smoke_args(digits_cache, out, *extra):
    """The experiment's --smoke on the session's reference: its pretraining budget, so it is reused, not rebuilt."""
    cache, path = digits_cache
    steps = json.loads((Path(path) / "pretrain.json").read_text())["steps"]
    return ["--smoke", f"--cache_dir={cache}", f"--out_dir={out}", f"--pretrain_steps={steps}", *extra]


# 2 RL steps, evaluated every step: one checkpoint evaluation inside the early-stopping path
SMOKE_EXTRA = ("--frontier", "--frontier_methods=nft,dpo", "--steps=2", "--eval_every=1")


@pytest.fixture(scope="module")
def smoke(digits_cache, tmp_path_factory):
    """The runs one after the other in this process (jobs=1): each spawned process would import torch, diffusers
    and scikit-learn again (~10 s). The spawned processes' path is tested on the finished runs below."""
    out = tmp_path_factory.mktemp("digits_smoke")
    return out, dx.main(smoke_args(digits_cache, out, *SMOKE_EXTRA, "--jobs=1"))


def test_smoke_run_writes_every_output_verdicts_and_frontier_lines(smoke):
    import train_full as tf

    out, metrics = smoke
    for name in (
        "metrics.json",
        "config.json",
        "digits.png",
        "frontier_nft.png",
        "frontier_awm.png",
        "frontier_dpo.png",
        "reference/seed0.pt",
        "grids/reference_eval_seed0_full.png",
        "grids/nft_guard_seed0_few.png",
        "grids/dpo_none_seed0_rescale.png",
        "grids/awm_none_seed0_rescale_1.05.png",
    ):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert [line.split(" ")[0] for line in saved["verdicts"]] == ["(1)", "(2)", "(3)", "(4)", "(4b)", "(5)"]
    assert "(rms_ratio)" in saved["verdicts"][0]
    # per method: the guarded run's own reward (primary, protocol amendment 1), then 50 %, 75 %, 90 % of the gain
    assert len(saved["frontier"]) == 4 * len(dx.METHODS) and "own reward (primary)" in saved["frontier"][0]
    assert set(saved["paths"]["nft"]) == {"guard", "kl", "lower_lr", "early_stop", "rescale"}
    # the drift alarm's lead per method and threshold, on the official run's checkpoints (train_full's evals.jsonl)
    assert len(saved["drift_lines"]) == len(dx.METHODS) * len(dx.DRIFT_ALARMS) and "lead" in saved["drift_lines"][0]
    lead = saved["drift_lead"]["nft@1.05"][0]
    ratio_max = saved["histories"]["nft_none_seed0"]["ratio_max"]
    assert lead["step_alarm"] == next((s for s, r in zip([0, 1, 2], ratio_max) if r > 1.05), None)
    assert set(saved["paths"]["awm"]) == {"guard", "early_stop", "rescale"}  # not in frontier_methods: headline only
    assert saved["config"]["frontier_methods"] == "nft,dpo" and saved["git_revision"]
    for m in dx.METHODS:
        for v in dx.HEADLINE:
            run = saved["null_runs"][m]["none"][0] if v == "null" else saved["runs"][m][v][0]
            assert 0 <= run["full"]["reward"] <= 1 and run["full"]["ratio"] > 0 and run["full"]["rms_ratio"] > 0
            assert len(run["profile"]) == tf.Config().profile_bins
            history = saved["histories"][f"{m}_{v}_seed0"]
            # train_full's own checkpoint evaluations: every eval_every steps for the official run only
            assert history["step"] == ([0, 1, 2] if v == "none" else [0, 2])
    assert len(saved["adjoint_reference"]) == 1 and set(saved["adjoint_reference"][0]) >= {"total_mean", "total_std"}
    none = saved["runs"]["nft"]["none"][0]
    assert {"rescale", "rescale_few", "rescale_0.95", "rescale_1.05"} <= set(none)
    assert "rescale" not in saved["runs"]["nft"]["guard"][0]
    assert abs(none["rescale_1.05"]["rms_ratio"] - 1.05) < 1e-4 and abs(none["rescale"]["ratio"] - 1) < 1e-4
    assert metrics["train_config"]["steps"] == 2 and metrics["train_config"]["lora_rank"] == 4


def test_final_evaluation_is_train_fulls_eval_set(smoke):
    """Every point of a frontier path is measured on one sample set per seed: the final evaluation of the exported
    model reproduces train_full's own evaluation of its last step (same noise, labels and count), and the
    reference's evaluation reproduces step 0."""
    out, _ = smoke
    for name in ("nft_none_seed0", "awm_guard_seed0", "dpo_null_seed0", "nft_kl0.01_seed0"):
        folder = out / "runs" / name
        result = torch.load(folder / "result.pt", weights_only=False)
        evals = [json.loads(line) for line in (folder / "evals.jsonl").read_text().splitlines()]
        # the same images by two routes (the LoRA fused into the weights here, unfused in train_full), so they differ
        # by float32 reordering on whatever CPU runs both: rewards (in [0, 1]) to 8 ulps of 1, FD (a float64 formula
        # of float32 features) and the norm ratio relative to themselves (measured: 1.5e-8, 3.8e-8, 8.3e-8)
        assert result["eval"]["full"]["reward"] == pytest.approx(evals[-1]["reward_full"], abs=1e-6)
        assert result["eval"]["full"]["fd"] == pytest.approx(evals[-1]["fd_full"], rel=1e-6)
        assert result["eval"]["few"]["fd"] == pytest.approx(evals[-1]["fd_few"], rel=1e-6)
        assert result["eval"]["full"]["ratio"] == pytest.approx(evals[-1]["norm_ratio"], rel=1e-5)
        reference = torch.load(out / "reference" / "seed0.pt", weights_only=False)["eval"]["full"]
        assert reference["reward"] == pytest.approx(evals[0]["reward_full"], abs=1e-6)
        assert reference["fd"] == pytest.approx(evals[0]["fd_full"], rel=1e-6)


def test_frontier_paths_run_from_the_reference_through_the_members_to_the_official_run(smoke):
    out, metrics = smoke
    point = lambda name: tuple(
        torch.load(out / "runs" / f"{name}_seed0" / "result.pt", weights_only=False)["eval"]["full"][k]
        for k in ("reward", "fd")
    )
    reference = torch.load(out / "reference" / "seed0.pt", weights_only=False)["eval"]["full"]
    start, end = (reference["reward"], reference["fd"]), point("nft_none")
    paths = metrics["paths"]["nft"]
    for family, (path,) in paths.items():
        assert tuple(path[0]) == start and tuple(path[-1]) == end, family
    # strongest effect first: guard by decreasing lam (2, then the headline 1), KL by decreasing weight
    assert [tuple(p) for p in paths["guard"][0]] == [start, point("nft_guard_lam2"), point("nft_guard"), end]
    assert [tuple(p) for p in paths["kl"][0]] == [start, point("nft_kl0.01"), end]
    assert [tuple(p) for p in paths["lower_lr"][0]] == [start, point("nft_lr_x0.5"), end]
    evals = [json.loads(line) for line in (out / "runs" / "nft_none_seed0" / "evals.jsonl").read_text().splitlines()]
    assert tuple(paths["early_stop"][0][1]) == (evals[1]["reward_full"], evals[1]["fd_full"])  # the step-1 checkpoint
    official = torch.load(out / "runs" / "nft_none_seed0" / "result.pt", weights_only=False)["eval"]
    scaled = [(official[k]["reward"], official[k]["fd"]) for k in ("rescale_0.95", "rescale", "rescale_1.05")]
    assert [tuple(p) for p in paths["rescale"][0]][1:-1] == scaled
    assert [tuple(p) for p in metrics["paths"]["dpo"]["guard"][0]][1] == point("dpo_guard_lam4")


def test_the_second_reward_writes_to_its_own_folder_with_its_own_null_control():
    cfg, _ = dx.parse_args(["--reward=jpeg"])
    assert cfg.out_dir == "runs/digits_jpeg" and dx.parse_args(["--reward=jpeg", "--out_dir=x"])[0].out_dir == "x"
    assert dx.parse_args(["--reward=jpeg", "--smoke"])[0].out_dir == dx.SMOKE["out_dir"] + "_jpeg"
    assert dx.train_config(cfg, "nft", "guard", 0, "").reward == "jpeg"
    assert dx.train_config(cfg, "nft", "null", 0, "").reward == "jpeg_shuffled"
    assert dx.train_config(dx.parse_args([])[0], "awm", "null", 0, "").reward == "digits_shuffled"
    with pytest.raises(ValueError, match="reward: expected one of"):
        dx.parse_args(["--reward=pickscore"])
    images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    shuffled = dx.shuffled_jpeg_reward(dx.train_config(cfg, "nft", "null", 0, ""), "cpu")(images, ["0"] * 8)
    real = dx.reward_of(cfg, images, torch.zeros(8, dtype=torch.long))
    assert sorted(shuffled.tolist()) == sorted(real.tolist()) and not torch.equal(shuffled, real)  # a permutation


def test_the_second_reward_runs_through_the_same_trainer(digits_cache, tmp_path):
    """--reward=jpeg --smoke: every run trains on JPEG compressibility (its null control on the permuted one), the
    final evaluation scores the same reward as train_full's own, claim 3 is not tested (no gradient), and the
    frontier and the knob question are printed."""
    args = ("--reward=jpeg", "--methods=nft", "--frontier", "--steps=2", "--eval_every=1", "--jobs=1")
    metrics = dx.main(smoke_args(digits_cache, tmp_path, *args))
    assert metrics["verdicts"][2].startswith("(3) no coherent first-order magnitude signal: NOT TESTED")
    for arm in ("none", "guard", "null", "kl0.01"):
        folder = tmp_path / "runs" / f"nft_{arm}_seed0"
        saved = json.loads((folder / "config.json").read_text())["config"]
        assert saved["reward"] == ("jpeg_shuffled" if arm == "null" else "jpeg")
        evals = [json.loads(line) for line in (folder / "evals.jsonl").read_text().splitlines()]
        final = torch.load(folder / "result.pt", weights_only=False)["eval"]["full"]
        assert -1 < final["reward"] < 0  # minus kB: an 8x8 JPEG is a few hundred bytes
        if arm != "null":  # train_full evaluates on its run's reward: the null run's is the permuted one
            assert final["reward"] == pytest.approx(evals[-1]["reward_full"], abs=2e-3)  # a rounding can move a byte
    assert len(metrics["frontier"]) == 4 and metrics["knobs"] and metrics["adjoint"] is None
    assert any(line.startswith("nft kl ranking at its members") for line in metrics["knobs"])


def test_every_run_is_a_train_full_run(smoke):
    """Each (method, arm, seed) folder is what train_full with the digits preset (`python -m
    experiments.digits_testbed`) writes, with the experiment's per-run settings in its config.json."""
    out, _ = smoke
    for m in dx.METHODS:
        for v in dx.HEADLINE:
            folder = out / "runs" / f"{m}_{v}_seed0"
            for name in ("config.json", "log.jsonl", "evals.jsonl", "metrics.json", "train.log", "result.pt"):
                assert (folder / name).is_file(), folder / name
            assert (folder / "lora" / "pytorch_lora_weights.safetensors").is_file()
            saved = json.loads((folder / "config.json").read_text())["config"]
            assert saved["preset"] == "digits" and saved["method"] == m and saved["guard"] == (v == "guard")
            assert saved["reward"] == ("digits_shuffled" if v == "null" else "digits")
            assert saved["lr"] == (dx.Config.dpo_lr if m == "dpo" else 1e-3)
            assert "step      2 | reward" in (folder / "train.log").read_text()
    member = json.loads((out / "runs" / "nft_lr_x0.5_seed0" / "config.json").read_text())["config"]
    assert member["lr"] == 5e-4 and not member["guard"] and member["eval_every"] == member["steps"] == 2
    member = json.loads((out / "runs" / "nft_kl0.01_seed0" / "config.json").read_text())["config"]
    assert member["kl_weight"] == 0.01 and not member["guard"]


def test_a_finished_experiment_rerun_in_spawned_processes_reads_every_run_back(smoke, digits_cache, monkeypatch):
    """jobs=2: the jobs go to two spawned processes (each builds its run's train_full config there, with the digits
    preset its own import registered), which find every run finished under the same config and return it."""
    out, first = smoke
    cfg, frontier = dx.parse_args(smoke_args(digits_cache, out, *SMOKE_EXTRA, "--jobs=2"))
    jobs = dx.all_jobs(cfg, frontier)
    files = {
        job: out / "reference" / f"seed{job[2]}.pt" if job[0] == "reference" else dx.run_dir(cfg, *job) / "result.pt"
        for job in jobs
    }
    stamps = {job: file.stat().st_mtime_ns for job, file in files.items()}
    assert len(jobs) == 14

    def not_here(*args):
        raise AssertionError("a job ran in the test's process, not in a spawned one")

    monkeypatch.setattr(dx, "cached", not_here)  # a spawned process imports experiments.digits afresh
    again = dx.run_all(cfg, first["reference_path"], jobs, progress=False)
    assert {job: file.stat().st_mtime_ns for job, file in files.items()} == stamps
    assert set(again) == set(jobs)
    for job, result in again.items():
        stored = torch.load(files[job], weights_only=False)
        assert result["key"] == stored["key"], job
        assert json.dumps(ev_safe(result["eval"])) == json.dumps(ev_safe(stored["eval"])), job


def test_an_interrupted_experiment_reuses_finished_runs_and_restarts_unfinished_ones(smoke, digits_cache):
    out, first = smoke
    result = out / "runs" / "dpo_guard_seed0" / "result.pt"
    stamp = result.stat().st_mtime_ns
    unfinished = out / "runs" / "dpo_null_seed0"
    (unfinished / "result.pt").unlink()
    (unfinished / "checkpoints" / "stale").mkdir(parents=True)
    # the smoke's train_full settings, so that its finished runs are read back; jobs=1: in this process
    args = smoke_args(digits_cache, out, "--methods=dpo", "--steps=2", "--eval_every=1", "--jobs=1")
    again = dx.main(args)
    assert result.stat().st_mtime_ns == stamp  # same train_full config: read back, not retrained
    assert not (unfinished / "checkpoints" / "stale").exists() and (unfinished / "result.pt").is_file()
    assert json.dumps(ev_safe(again["runs"]["dpo"])) == json.dumps(ev_safe(first["runs"]["dpo"]))
    assert json.dumps(ev_safe(again["null_runs"])) == json.dumps(ev_safe({"dpo": first["null_runs"]["dpo"]}))
    unguarded = {p: p.stat().st_mtime_ns for p in out.glob("runs/dpo_n*_seed0/result.pt")}  # none and null
    changed = dx.main(args + ["--lam=0.5"])
    assert result.stat().st_mtime_ns != stamp  # the guarded run retrained
    assert len(unguarded) == 2 and {p: p.stat().st_mtime_ns for p in unguarded} == unguarded  # lam is inert there
    assert changed["train_config"]["lam"] == 0.5


def ev_safe(x):
    from trainer import cli

    return cli.json_safe(x)


def test_the_exported_lora_loads_as_the_trained_policy(smoke, digits_cache):
    """load_trained (diffusers' load_lora_adapter, then fuse) gives the same velocity as the unfused adapter, and
    not the reference's: the experiment evaluates what training produced."""
    from diffusers import SD3Transformer2DModel

    out, metrics = smoke
    ref_path = metrics["reference_path"]
    cfg, _ = dx.parse_args(smoke_args(digits_cache, out, *SMOKE_EXTRA))
    fused = dx.load_trained(dx.train_config(cfg, "nft", "guard", 0, ref_path), ref_path)
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


def test_runs_start_in_the_order_the_protocol_cuts_them_last():
    cfg, frontier = dx.parse_args(["--frontier", "--seeds=0,1"])
    jobs = dx.all_jobs(cfg, frontier)
    assert jobs[:2] == [("reference", None, 0), ("reference", None, 1)]
    order = [(dx.METHODS.index(m), dx.priority(cfg, m, a)) for m, a, _ in jobs[2:]]
    # per seed: 3 headline arms per method; NFT and AWM 3 guard, 6 KL and 3 lr members; DPO 1 guard member
    assert order == sorted(order) and len(jobs) == 2 + 2 * (3 * 3 + 2 * 12 + 1)  # method by method, then priority
    rank = {a: dx.priority(cfg, "nft", a) for a in dx.arms(cfg, "nft", True)}
    inner = dict.fromkeys(("guard_lam0.5", "kl0.0003", "kl0.001", "kl0.003", "kl0.01", "kl0.03"), 1)
    outer = dict.fromkeys(("guard_lam0.25", "guard_lam2", "kl0.1"), 2)
    assert rank == {
        "none": 0,
        "guard": 0,
        "null": 0,
        **inner,
        **outer,
        **dict.fromkeys(("lr_x0.5", "lr_x0.75", "lr_x0.9"), 3),
    }
    assert dx.priority(cfg, "dpo", "guard_lam4") == 4
    assert set(dx.arms(cfg, "dpo", False)) == set(dx.HEADLINE)


def test_a_run_is_reused_on_what_it_computed_not_on_where_its_files_went(monkeypatch):
    cfg, _ = dx.parse_args(["--seeds=0"])
    key = {**dataclasses.asdict(dx.train_config(cfg, "nft", "guard", 0, "/a/reference-seed0-steps2000")), "eval": 1}
    moved = {
        **key,
        "out_dir": "/b/runs/x",
        "cache_dir": "/b",
        "pretrained_model_name_or_path": "/b/reference-seed0-steps2000",
    }
    assert dx.same_run(key, moved) and dx.same_run(key, {**key, "checkpoint_every": 7})
    assert not dx.same_run(key, {**key, "lam": 0.5}) and not dx.same_run(key, {**key, "eval": 2})
    unguarded = {**key, "guard": False}  # lam weighs the hinge only
    assert dx.same_run(unguarded, {**unguarded, "lam": 0.5}) and not dx.same_run(unguarded, key)
    assert not dx.same_run(key, {**key, "pretrained_model_name_or_path": "/a/reference-seed1-steps2000"})
    added = {**key, "new_option": "old behaviour"}  # a train_full key that did not exist when `key` was cached
    assert not dx.same_run(key, added)
    monkeypatch.setitem(tf.KEYS_ADDED_SINCE, "new_option", "old behaviour")
    assert dx.same_run(key, added) and not dx.same_run(key, {**key, "new_option": "new behaviour"})


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
    with pytest.raises(ValueError, match="eval_samples"):
        dx.parse_args(["--eval_samples=15"])
    with pytest.raises(ValueError, match="kl_weights"):
        dx.parse_args(["--kl_weights=1e-3,-1"])
    with pytest.raises(ValueError, match="train_batch_size"):
        dx.parse_args(["--train_batch_size=8"])  # the null control's permutation must see the whole rollout batch


def test_command_line_help_exits_0_and_a_bad_argument_exits_2_with_one_line(capsys, monkeypatch):
    import runpy

    from trainer import cli

    with pytest.raises(SystemExit) as done:
        cli.run(dx.main, ["--help"])
    printed = capsys.readouterr().out
    assert done.value.code == 0 and "--frontier" in printed and "--kl_weights=" in printed
    # train_full's keys show the values the runs start from (digits preset < TRAIN_DEFAULTS), not the sd3 preset's
    assert "  --resolution=8  " in printed and "  --lr=0.001  " in printed and "  --steps=160  " in printed
    # the script's own entry point, run as __main__ (tests/test_cli.py runs cli.run in a fresh interpreter)
    monkeypatch.setattr("sys.argv", [dx.__file__, "--seeds=x"])
    monkeypatch.delitem(sys.modules, "experiments.digits", raising=False)  # run fresh as __main__, as `python -m` does
    with pytest.raises(SystemExit) as done:
        runpy.run_module("experiments.digits", run_name="__main__", alter_sys=True)
    printed = capsys.readouterr()
    assert done.value.code == 2 and printed.out == "" and printed.err.count("\n") == 1 and "seeds" in printed.err


def test_forwarded_train_full_keys_reach_every_run():
    cfg, frontier = dx.parse_args(["--lam=0.25", "--full_finetune=true", "--seeds=3,4"])
    assert cfg.train == {"lam": 0.25, "full_finetune": True} and not frontier  # converted to train_full's types
    for method in dx.METHODS:
        tcfg = dx.train_config(cfg, method, "guard", 4, "")
        assert tcfg.lam == 0.25 and tcfg.full_finetune and tcfg.seed == 4 and tcfg.steps == dx.TRAIN_DEFAULTS["steps"]
        assert tcfg.lr == (cfg.dpo_lr if method == "dpo" else 1e-3)


# ---------------------------------------------------------------------------------------------------------------
# the digits runs stay what they were: the experiment running on the preset must not change under it

# Every key of the digits preset's run identity as its runs resolved it (git cfe7b99, before the AWM/NFT options).
DIGITS_RUN = dict(preset="digits", pretrained_model_name_or_path="", resolution=8, max_sequence_length=256)
DIGITS_RUN.update(train_prompts="", full_finetune=False, lora_rank=8, lora_alpha=16, prompts_per_step=4, group_size=8)
DIGITS_RUN.update(lora_targets="to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out")
DIGITS_RUN.update(sample_steps=10, cfg_scale=1.0, flux_guidance=3.5, shift=1.0, reward="digits", train_timesteps=0)
DIGITS_RUN.update(pickscore_model="yuvalkirstain/PickScore_v1", method="nft", nft_beta=1.0, kl_weight=1e-4)
DIGITS_RUN.update(adv_clip=5.0, awm_weighting="ghuber", awm_ema_weight=1.0, ema_decay_rate=0.001, dpo_beta=2000.0)
DIGITS_RUN.update(guard=True, lam=1.0, margin="relative", power=2, granularity="sample", tolerance=0.0, seed=0)
DIGITS_RUN.update(dpo_guard="both", lr=1e-3, weight_decay=1e-4, warmup_steps=0, max_grad_norm=1.0)
DIGITS_RUN.update(train_batch_size=32, mixed_precision="no")


def test_the_digits_preset_computes_what_its_runs_computed():
    """A key added to train_full must be declared in train_full.KEYS_ADDED_SINCE (the cached runs' reuse reads
    it too) with the value that keeps the digits runs as they were, and the preset must resolve to it; a changed
    default the preset inherits fails here. The old/EMA decay, step by step, is the formula those runs used:
    min(rate * step, 0.5 NFT / 0.3 AWM) at the 0-based step of the update just made."""
    added = tf.KEYS_ADDED_SINCE
    for method in ("nft", "awm", "dpo"):
        cfg = tf.make_config({"method": method}, preset="digits")
        identity = tf.run_identity(cfg)
        assert set(identity) <= set(DIGITS_RUN) | set(added), "declare the new key in KEYS_ADDED_SINCE"
        assert identity == {**DIGITS_RUN, **{k: v for k, v in added.items() if k in identity}, "method": method}
        assert {k: dataclasses.asdict(cfg)[k] for k in added} == added
    for method, cap in (("nft", 0.5), ("awm", 0.3)):
        cfg = tf.make_config({"method": method}, preset="digits")
        schedule = [recipes.old_policy_decay(cfg, step + 1) for step in range(1000)]
        assert schedule == [min(cfg.ema_decay_rate * step, cap) for step in range(1000)]  # bit for bit


def test_the_members_table_has_a_fixed_row_order_whatever_order_the_runs_finished_in():
    """format_members: per method the headline arms (none, guard, null), then the members by name."""
    point = {"eval": {"full": {"reward": 0.9, "fd": 10.0, "rms_ratio": 1.0, "judge_acc": 1.0}}}
    arms = ["kl0.1", "guard", "lr_x0.5", "null", "guard_lam2", "none", "kl0.01"]
    results = {(m, a, 0): point for a in arms for m in ("awm", "nft")}  # finished in this order
    rows = [line.split()[:2] for line in dx.format_members(results, ["nft", "awm"], [0]).splitlines()[1:]]
    expected = ["none", "guard", "null", "guard_lam2", "kl0.01", "kl0.1", "lr_x0.5"]
    assert rows == [[m, a] for m in ("nft", "awm") for a in expected]
