"""train_full.py against tiny SD3 and FLUX pipelines of the real diffusers classes, built from constructor configs
(tiny CLIP/T5 text encoders, tokenizers from in-memory vocabularies), saved with save_pretrained, on CPU."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

import normguard as ng
import train_full as tf
from trainer import adapters, checkpoints, cli, recipes, rewards

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "car", "bowl", "lighthouse"]


# the tests' tiny SD3 transformer: 2 blocks, 4 latent channels, 8x8 latents in 2x2 patches (16 tokens)
TINY_SD3 = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=32,
    caption_projection_dim=16,
    pooled_projection_dim=32,
    pos_embed_max_size=16,
)


def tokenizers():
    from transformers import CLIPTokenizer, T5Tokenizer

    chars = sorted(set("".join(WORDS)))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    clip = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    t5 = T5Tokenizer(
        vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
        + [("▁" + w, -1.0) for w in WORDS]
        + [(c, -2.0) for c in chars],
        extra_ids=0,
    )
    return clip, t5


def text_encoders(clip_tok, t5_tok, t5_dim, with_projection):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    kw = dict(
        vocab_size=len(clip_tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok) + 4,
            d_model=t5_dim,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
        )
    )
    return cls(CLIPTextConfig(**kw)), cls(CLIPTextConfig(**kw)), t5


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[8, 8],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        shift_factor=0.06,
        scaling_factor=1.5,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


@pytest.fixture(scope="module")
def sd3_path(tmp_path_factory):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    clip_tok, t5_tok = tokenizers()
    te, te2, te3 = text_encoders(clip_tok, t5_tok, 32, True)
    transformer = SD3Transformer2DModel(**TINY_SD3)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(),
        text_encoder=te,
        tokenizer=clip_tok,
        text_encoder_2=te2,
        tokenizer_2=clip_tok,
        text_encoder_3=te3,
        tokenizer_3=t5_tok,
    )
    path = tmp_path_factory.mktemp("tiny_sd3")
    pipe.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def flux_path(tmp_path_factory):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    clip_tok, t5_tok = tokenizers()
    te, _, t5 = text_encoders(clip_tok, t5_tok, 16, False)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        guidance_embeds=True,
        axes_dims_rope=[2, 2, 4],
    )
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=tiny_vae(),
        text_encoder=te,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
    )
    path = tmp_path_factory.mktemp("tiny_flux")
    pipe.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red cat\n\na blue car\na photo of a dog\n")
    return str(path)


def run(path, out, *extra, preset="sd3"):
    """A --smoke run, rewarded by JPEG size unless `extra` names a reward (the command line refuses a key twice)."""
    reward = [] if any(arg.startswith("--reward=") for arg in extra) else ["--reward=jpeg"]
    return tf.main(
        [
            f"--preset={preset}",
            "--smoke",
            f"--pretrained_model_name_or_path={path}",
            *reward,
            f"--out_dir={out}",
            *extra,
        ]
    )


@pytest.mark.parametrize("method", tf.METHODS)
def test_sd3_each_method_guard_on_and_off(sd3_path, prompt_file, tmp_path, method):
    """Two steps per run: finite losses, the guard's stats logged, the hinge zero when the guard is off."""
    for guard in ("true", "false"):
        out = tmp_path / guard
        m = run(sd3_path, out, f"--method={method}", f"--guard={guard}", f"--train_prompts={prompt_file}")
        lines = [json.loads(s) for s in (out / "log.jsonl").read_text().splitlines()]
        assert [x["step"] for x in lines] == [1, 2] and m["steps"] == 2
        for x in lines:
            assert all(math.isfinite(x[k]) for k in ("loss", "reward_mean", "norm_ratio", "hinge", "active_frac"))
            if guard == "false":
                assert x["guard"] == 0.0
        assert lines[0]["norm_ratio"] > 0 and m["eval"]["profile"] and math.isfinite(m["eval"]["reward_few"])
        assert (out / "eval" / "grid_0000002.png").is_file()
        evals = [json.loads(s) for s in (out / "evals.jsonl").read_text().splitlines()]
        assert [e["step"] for e in evals] == [0, 2]  # step 0: the reference, the baseline of every later eval
        assert abs(evals[0]["norm_ratio"] - 1) < 1e-5  # the LoRA starts at zero: the policy is the reference
        saved = json.loads((out / "config.json").read_text())
        assert saved["config"]["method"] == method and "git_revision" in saved


@pytest.mark.parametrize("method", tf.METHODS)
def test_flux_each_method(flux_path, tmp_path, method):
    m = run(flux_path, tmp_path, f"--method={method}", f"--guard={method != 'awm'}", preset="flux")
    assert m["steps"] == 2 and math.isfinite(m["last_step"]["loss"]) and m["eval"]["norm_ratio"] > 0


@pytest.mark.parametrize("preset", ["sd3", "flux"])
def test_rollout_matches_the_pipeline(sd3_path, flux_path, preset):
    """The adapters' conventions (timestep scale, sigmas with shift or dynamic mu, FLUX packing and guidance) are
    pinned by the pipeline itself: our Euler rollout from the same noise equals pipe(..., output_type="latent")."""
    cfg = tf.parse_args(
        [
            f"--preset={preset}",
            "--smoke",
            f"--pretrained_model_name_or_path={sd3_path if preset == 'sd3' else flux_path}",
            "--sample_steps=4",
        ]
    )
    ad = adapters.registered(preset).adapter(cfg, cfg.pretrained_model_name_or_path, torch.device("cpu"), torch.float32)
    noise = torch.randn(2, *ad.latent_shape, generator=torch.Generator().manual_seed(3))
    prompts = ["a red cat", "a blue car"]
    with torch.no_grad():
        ours = tf.rollout(ad, ad.transformer, ad.encode(prompts), noise, ad.sigmas(4), 1.0, None)
        if preset == "sd3":
            theirs = ad.pipe(
                prompts,
                num_inference_steps=4,
                guidance_scale=1.0,
                latents=noise,
                height=16,
                width=16,
                max_sequence_length=16,
                output_type="latent",
            ).images
        else:
            packed = ad.pipe._pack_latents(noise, 2, *ad.latent_shape)
            theirs = ad.pipe(
                prompts,
                num_inference_steps=4,
                guidance_scale=cfg.flux_guidance,
                latents=packed,
                height=16,
                width=16,
                max_sequence_length=16,
                output_type="latent",
            ).images
            theirs = ad.pipe._unpack_latents(theirs, 16, 16, ad.pipe.vae_scale_factor)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# the official rollout samplers, minibatches (several optimiser steps per rollout batch), AWM's ratio and off-policy


def test_presets_default_to_each_methods_official_sampler():
    """sd3/flux: NFT dpm2 with 10 steps, AWM the SA-Solver with 14 (train timesteps as its PickScore configs), DPO
    Euler with 10; digits: Euler, 10 steps and AWM's first-90 % subset for every method (its tables ran so); the
    recipes carry their reward's settings; an explicit choice wins."""
    from experiments import digits_testbed as digits  # noqa: F401 (registers the digits preset)

    for method, sampler, steps in (("nft", "dpm2", 10), ("awm", "sa_solver", 14), ("dpo", "euler", 10)):
        for preset in ("sd3", "flux"):
            cfg = tf.make_config({"preset": preset, "method": method, "pretrained_model_name_or_path": "x"})
            assert (cfg.sampler, cfg.sample_steps, cfg.awm_timesteps) == (sampler, steps, "discrete")
        cfg = tf.make_config({"method": method}, preset="digits")
        assert (cfg.sampler, cfg.sample_steps, cfg.awm_timesteps) == ("euler", 10, "subset")
    cfg = tf.make_config({"sampler": "euler", "sample_steps": 4, "pretrained_model_name_or_path": "x"})
    assert (cfg.method, cfg.sampler, cfg.sample_steps) == ("nft", "euler", 4)
    for recipe, timesteps, noise in (("awm_pickscore", "discrete", 0.0), ("awm_geneval", "discrete_wo_init", 0.4)):
        cfg = tf.make_config({"recipe": recipe, "reward": "jpeg", "pretrained_model_name_or_path": "x"})
        assert (cfg.sampler, cfg.sample_steps, cfg.awm_timesteps, cfg.sa_noise_level) == (
            "sa_solver",
            14,
            timesteps,
            noise,
        )


@pytest.mark.parametrize("sampler", ["dpm2", "sa_solver"])
def test_rollout_runs_the_official_sampler_on_its_grid(sd3_path, sampler):
    """The trainer's rollout is samplers.<sampler> on the same velocity, noise and grid: dpm2 on the SD3 pipeline's
    sigmas (sd3_pipeline_timesteps) with the transformer called at the integer floor(1000·t), as NFT's pipeline
    calls it; the SA-Solver on AWM's edit of those sigmas (t_0 = 0.999, last step halved) at 1000·t, its noise
    drawn from the generator passed."""
    from trainer import rollouts, samplers

    cfg = tf.parse_args(["--preset=sd3", "--smoke", f"--pretrained_model_name_or_path={sd3_path}"])
    ad = adapters.SD3Adapter(cfg, sd3_path, torch.device("cpu"), torch.float32)
    sigmas = ad.sigmas(6)
    torch.testing.assert_close(sigmas, samplers.sd3_pipeline_timesteps(6), rtol=0, atol=1e-7)  # the scheduler's shift 3
    grid, noise = rollouts.rollout_grid(sampler, sigmas), torch.randn(2, *ad.latent_shape)
    cond, seen = ad.encode(["a red cat", "a blue car"]), []
    hook = ad.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"]), with_kwargs=True)
    with torch.no_grad():
        gen = lambda: torch.Generator().manual_seed(5)
        ours = rollouts.rollout(ad, ad.transformer, cond, noise, grid, 1.0, None, sampler, gen(), 0.4)
        other_noise = rollouts.rollout(
            ad, ad.transformer, cond, noise, grid, 1.0, None, sampler, gen().manual_seed(6), 0.4
        )
        hook.remove()
        velocity = lambda x, t: ad.velocity(ad.transformer, x, t, cond)
        if sampler == "dpm2":
            floored = lambda x, t: velocity(x, torch.floor(1000 * t).double() / 1000)
            theirs, called_at = samplers.dpm2_sample(floored, noise, sigmas), torch.floor(1000 * sigmas[:-1])
            assert torch.equal(ours, other_noise)  # deterministic
        else:
            theirs = samplers.sa_solver_sample(velocity, noise, grid, noise_level=0.4, generator=gen())
            called_at = 1000 * grid[:-1]
            assert grid[0] == 1 - 1e-3 and grid[-2] == grid[-3] / 2 and not torch.equal(ours, other_noise)
    assert torch.equal(ours, theirs)
    assert torch.equal(torch.stack([s[0].float() for s in seen[: len(grid) - 1]]), called_at)


@pytest.mark.parametrize("method, sampler, steps", [("nft", "dpm2", 10), ("awm", "sa_solver", 14), ("dpo", "euler", 3)])
def test_a_run_rolls_out_with_its_sampler_and_trains_on_its_grid(
    sd3_path, tmp_path, monkeypatch, method, sampler, steps
):
    """The preset's sampler reaches the rollouts with its grid; NFT trains at K - 1 distinct points of the model's
    sigmas per step, AWM at one index from each of its 6 strata of 0..int(0.9K)-1 (never the last 10 % of the
    steps), DPO rolls out with Euler."""
    from trainer import samplers

    grids, train_t = [], []
    for name in ("dpm2", "sa_solver"):
        real = getattr(samplers, f"{name}_sample")
        spy = lambda *a, real=real, name=name, **k: grids.append((name, a[2])) or real(*a, **k)
        monkeypatch.setattr(samplers, f"{name}_sample", spy)
    real_point = ng.forward_process
    monkeypatch.setattr(ng, "forward_process", lambda x0, eps, t: train_t.append(float(t[0])) or real_point(x0, eps, t))
    run(sd3_path, tmp_path, f"--method={method}", f"--sample_steps={steps}", "--eval_every=100", "--steps=2")
    sigmas = samplers.sd3_pipeline_timesteps(steps).tolist()
    if sampler == "euler":
        assert grids == []
        return
    expected = samplers.sd3_pipeline_timesteps(steps)
    expected = samplers.sa_solver_timesteps(expected) if sampler == "sa_solver" else expected
    assert {name for name, _ in grids} == {sampler} and len(grids) == 2  # one rollout micro-batch per step
    assert all(torch.allclose(g, expected, rtol=0, atol=1e-7) for _, g in grids)
    index = [min(range(len(sigmas)), key=lambda i: abs(sigmas[i] - t)) for t in train_t]
    assert all(abs(sigmas[i] - t) < 1e-6 for i, t in zip(index, train_t))  # points of the unedited grid
    per_step = [sorted(set(index[: len(index) // 2])), sorted(set(index[len(index) // 2 :]))]
    for step_index in per_step:
        if method == "nft":
            assert len(step_index) == steps - 1 and set(step_index) <= set(range(steps))
        else:  # int(0.9 * 14) = 12: strata [0, 2), [2, 4), [4, 6), [6, 8), [8, 10), [10, 12)
            strata = [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12)]
            assert len(step_index) == 6 and all(lo <= i < hi for i, (lo, hi) in zip(step_index, strata))


@pytest.mark.parametrize("rule, first", [("discrete", 0), ("discrete_wo_init", 1)])
def test_awm_strata_cover_each_stratum_as_the_official_draw_does(rule, first):
    """rollouts.train_timestep_plan's AWM draw (K = 14, T = 6) against the official strata, linspace(first, 12, 7)
    truncated, over many draws: each index in its stratum, every index of first..11 drawn, 12 and 13 never."""
    from trainer import rollouts

    cfg = tf.Config(method="awm", sample_steps=14, awm_timesteps=rule)
    sigmas, gen = torch.arange(15.0), torch.Generator().manual_seed(0)
    drawn = torch.stack([rollouts.train_timestep_plan(cfg, sigmas, gen) for _ in range(400)]).long()
    edges = torch.linspace(first, 12, 7).long()
    lower, upper = edges[:-1], edges[1:]
    assert ((drawn >= lower) & (drawn < upper)).all() and set(drawn.flatten().tolist()) == set(range(first, 12))


def test_grad_steps_per_batch_takes_that_many_optimiser_steps(sd3_path, tmp_path, monkeypatch):
    """N minibatches: N AdamW steps per rollout batch, each on 1/N of the samples (DPO: of the pairs); the LR
    schedule steps with the optimiser; the old/EMA copy and the step counter once per batch."""
    real, calls, sizes = torch.optim.AdamW.step, [], []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    real_loss = tf.sample_loss
    monkeypatch.setattr(tf, "sample_loss", lambda *a, **k: sizes.append(len(k["x0"])) or real_loss(*a, **k))
    m = run(sd3_path, tmp_path / "nft", "--grad_steps_per_batch=2", "--eval_every=100", "--steps=2")
    assert (
        len(calls) == 4
        and m["steps"] == 2
        and [x["step"] for x in read_jsonl(tmp_path / "nft" / "log.jsonl")] == [1, 2]
    )
    assert sizes == [2] * 8  # 4 rollouts: 2 per minibatch, at K - 1 = 2 train timesteps, 2 minibatches, 2 steps
    calls.clear()
    run(sd3_path, tmp_path / "dpo", "--method=dpo", "--grad_steps_per_batch=2", "--eval_every=100", "--steps=2")
    assert len(calls) == 4


def awm_ratio_calls(monkeypatch):
    """Spy on ng.awm_loss: a list of (dtype of v, mean rho, clip fraction) per call."""
    real, calls = ng.awm_loss, []

    def spy(v, *args, **kwargs):
        loss, stats = real(v, *args, **kwargs)
        calls.append((v.dtype, float(stats["ratio"]), float(stats["clip_frac"])))
        return loss, stats

    monkeypatch.setattr(ng, "awm_loss", spy)
    return calls


def test_awm_ratio_leaves_1_after_the_first_optimiser_step_and_clips(sd3_path, tmp_path, monkeypatch):
    """One step per batch: rho = 1 exactly (v_old is v detached). Two: rho = 1 on the first minibatch, then the
    pre-update log p_old (float64, computed before the first step on the same x_t, eps) against the updated policy:
    rho leaves 1, and with a small clip range most of it is clipped; rho and clip_frac reach the log."""
    calls = awm_ratio_calls(monkeypatch)
    common = ("--method=awm", "--eval_every=100", "--lr=0.05", "--steps=2", "--train_timesteps=1")
    run(sd3_path, tmp_path / "one", *common)
    assert calls and all(c == (torch.float32, 1.0, 0.0) for c in calls)
    runs = {}
    for clip in ("1e-6", "1.0"):
        calls.clear()
        run(sd3_path, tmp_path / clip, *common, "--grad_steps_per_batch=2", f"--awm_clip_range={clip}")
        runs[clip] = list(calls)
        first, later = calls[0::2], calls[1::2]  # smoke: one loss per minibatch (1 train timestep, 2 samples)
        assert all(dt == torch.float64 for dt, _, _ in calls) and all(r == 1.0 and c == 0 for _, r, c in first)
        assert all(abs(r - 1) > 1e-6 for _, r, _ in later), calls
        log = read_jsonl(tmp_path / clip / "log.jsonl")
        assert all(x["ratio"] != 1.0 for x in log)
    assert (
        all(c > 0 for _, _, c in runs["1e-6"][1::2]) and read_jsonl(tmp_path / "1e-6" / "log.jsonl")[0]["clip_frac"] > 0
    )
    assert sum(c for *_, c in runs["1e-6"]) > sum(c for *_, c in runs["1.0"])
    calls.clear()  # sum_first: one ratio per sample from its 2 timesteps' mean log-ratio, its log p_old fixed alike
    sum_first = ("--method=awm", "--eval_every=100", "--lr=0.05", "--steps=2", "--train_timesteps=2")
    run(sd3_path, tmp_path / "sum_first", *sum_first, "--grad_steps_per_batch=2", "--awm_loss_type=sum_first")
    assert [r == 1.0 for _, r, _ in calls] == [True, False, True, False]


def test_awm_off_policy_rolls_out_and_takes_log_p_old_from_the_ema(sd3_path, tmp_path, monkeypatch):
    """--awm_off_policy: every rollout runs with the EMA swapped in, and rho != 1 from the first minibatch once the
    EMA differs from the policy: from the second batch on (decay min(0.3 n, 0.3) after n updates); on the first the
    EMA is the initial policy itself, rho = 1 exactly. On-policy with one step per batch: rho = 1 throughout."""
    import contextlib

    calls, inside, in_rollout = awm_ratio_calls(monkeypatch), [0], []
    real_swap, real_rollout = tf.PolicyCopy.swapped_in, tf.rollout

    @contextlib.contextmanager
    def swap(self):
        inside[0] += 1
        with real_swap(self):
            yield
        inside[0] -= 1

    monkeypatch.setattr(tf.PolicyCopy, "swapped_in", swap)
    monkeypatch.setattr(tf, "rollout", lambda *a, **k: in_rollout.append(inside[0]) or real_rollout(*a, **k))
    common = ("--method=awm", "--eval_every=100", "--lr=0.05", "--steps=3", "--ema_decay_rate=0.3")
    run(sd3_path, tmp_path / "off", *common, "--awm_off_policy=true", "--train_timesteps=1")  # one loss per batch
    assert in_rollout == [1, 1, 1] and calls[0][1] == 1.0 and all(abs(r - 1) > 1e-6 for _, r, _ in calls[1:])
    assert all(dt == torch.float64 for dt, _, _ in calls)
    calls.clear(), in_rollout.clear()
    run(sd3_path, tmp_path / "on", *common)
    assert in_rollout == [0, 0, 0] and all(r == 1.0 for _, r, _ in calls)


@pytest.mark.parametrize(
    "mode",
    [
        ("--method=awm", "--grad_steps_per_batch=2", "--awm_off_policy=true", "--sa_noise_level=0.4"),
        ("--method=nft", "--grad_steps_per_batch=2"),
        ("--method=dpo", "--grad_steps_per_batch=2"),
    ],
    ids=["awm-sa_solver-off_policy", "nft-dpm2", "dpo-euler"],
)
def test_resume_is_exact_with_the_official_samplers_and_minibatches(sd3_path, tmp_path, mode):
    """Checkpoints fall on rollout-batch boundaries (after the batch's N optimiser steps and the EMA update): 4 steps
    in one go == 2, stop, --resume=latest to 4, in the LoRA weights and in every logged value, bit for bit (CPU)."""
    common = (*mode, "--checkpoint_every=2", "--eval_every=100", "--ema_decay_rate=0.3", "--lr=0.01")
    run(sd3_path, tmp_path / "full", *common, "--steps=4")
    run(sd3_path, tmp_path / "split", *common, "--steps=2")
    run(sd3_path, tmp_path / "split", *common, "--steps=4", "--resume=latest")
    full, split = lora_tensors(tmp_path / "full"), lora_tensors(tmp_path / "split")
    assert full.keys() == split.keys() and all(torch.equal(full[k], split[k]) for k in full)
    logs = [read_jsonl(tmp_path / name / "log.jsonl") for name in ("full", "split")]
    for line in logs[0] + logs[1]:
        line.pop("step_time")
    assert logs[0] == logs[1] and [x["step"] for x in logs[1]] == [1, 2, 3, 4]


def test_identity_leaves_out_added_keys_at_their_old_values():
    """A checkpoint written before sampler, grad_steps_per_batch, ... existed resumes when they hold the values that
    code ran with (Euler, the first-90 % subset, one optimiser step, ...): the identity is then the one it wrote."""
    old = dict(sampler="euler", awm_timesteps="subset", decay_lag=1, pretrained_model_name_or_path="x")
    old.update(dpo_t_law="sigmoid", dpo_t_shared=False)
    identity = tf.run_identity(tf.make_config(old))
    assert not set(tf.KEYS_ADDED_SINCE) & set(identity) and identity["sample_steps"] == 10
    official = tf.run_identity(tf.make_config({"pretrained_model_name_or_path": "x"}))
    assert official["sampler"] == "dpm2" and official["awm_timesteps"] == "discrete" and official["decay_lag"] == 0
    assert official["dpo_t_law"] == "flow_factory" and official["dpo_t_shared"] is True


def short_digits_runs(root):
    """Three steps of each method with the digits preset (Euler rollouts, one optimiser step per batch) on a random
    tiny reference of the testbed's design, rewarded by brightness (no classifier to train): per method the step
    losses, gradient norms, norm ratios and rewards, and the last eval's rewards and norm ratio."""
    from diffusers import SD3Transformer2DModel

    from experiments import digits_testbed as digits

    root = Path(root)
    torch.manual_seed(0)
    SD3Transformer2DModel(**digits.TRANSFORMER_CONFIG).save_pretrained(root / "ref" / "transformer")
    digits.LabelEncoder().save_pretrained(root / "ref")
    (root / "eval.txt").write_text("3\n7\n")  # 2 eval images: fewer than 10, so no judge to train
    result = {}
    for method in tf.METHODS:
        out = root / method
        sizes = ("--steps=3", "--prompts_per_step=2", "--group_size=4", "--train_batch_size=4", "--eval_seeds=1")
        digits.main(
            [
                f"--pretrained_model_name_or_path={root / 'ref'}",
                "--reward=test_train_full:brightness_reward",
                f"--eval_prompts={root / 'eval.txt'}",
                *sizes,
                "--eval_every=100",
                "--checkpoint_every=100",
                f"--method={method}",
                f"--out_dir={out}",
            ]
        )
        log, evals = read_jsonl(out / "log.jsonl"), read_jsonl(out / "evals.jsonl")
        result[method] = {k: [x[k] for x in log] for k in ("loss", "grad_norm", "norm_ratio", "reward_mean")}
        result[method]["eval"] = [evals[-1][k] for k in ("reward_full", "reward_few", "norm_ratio")]
    return result


DIGITS_BEFORE = {  # short_digits_runs at b4ad0e6: per method, steps 1-3 and the step-3 eval
    "nft": {
        "loss": [5.190250900056626, 4.865003400378758, 4.74445472823249],
        "grad_norm": [0.017184976488351822, 0.027529118582606316, 0.022383078932762146],
        "norm_ratio": [1.0000000000000002, 0.9969967703024545, 0.9930371774567498],
        "reward_mean": [-0.07208844274282455, -0.10219217836856842, -0.14819927513599396],
        "eval": [-0.09459786117076874, -0.09269126504659653, 0.995189368724823],
    },
    "awm": {
        "loss": [2.0954757928848267e-09, 1.659739636838964e-07, 1.8704305770889107e-08],
        "grad_norm": [0.0031527753453701735, 0.0036619575694203377, 0.0032031775917857885],
        "norm_ratio": [1.0, 0.9970473696788152, 0.9937426497538886],
        "reward_mean": [-0.07208844274282455, -0.10272909700870514, -0.14942951500415802],
        "eval": [-0.09617535024881363, -0.09428896009922028, 0.9945946931838989],
    },
    "dpo": {
        "loss": [0.6931471824645996, 0.06908155977725983, 0.0003467855276539922],
        "grad_norm": [85.28462219238281, 10.988565444946289, 0.0754290372133255],
        "norm_ratio": [1.0, 0.9988361597061157, 0.989520788192749],
        "reward_mean": [-0.07208844274282455, -0.1023770123720169, -0.14847329258918762],
        "eval": [-0.09588511288166046, -0.09412029385566711, 0.9950593709945679],
    },
}


# The tolerances of DIGITS_BEFORE. Another CPU runs the same float32 operations in another order (SIMD width: SSE,
# AVX2, AVX-512, NEON; GEMM blocking: MKL, oneDNN, OpenBLAS), so a result moves by its float32 resolution times the
# factor by which the computation amplifies rounding; each tolerance is that product. Measured against the recording
# CPU on an AMD EPYC (AVX-512), also with ATen's scalar kernels (ATEN_CPU_CAPABILITY=default) and with MKL's
# compatible code path instead of oneDNN (MKL_CBWR=COMPATIBLE MKL_DEBUG_CPU_TYPE=5, torch.backends.mkldnn off):
ULP = 2.0**-23  # float32 spacing at 1: every logged value is a float32 result
# norm ratios, NFT's loss, DPO's step-1 loss (log 2): sums of one sign or ratios of them, no cancellation, so a
# kernel's summation order moves them by a few ulps (measured: at most 1.2e-7, 1 ulp)
WELL_CONDITIONED = 8 * ULP  # 9.5e-7, relative
# rewards (brightness: the mean pixel, -0.07 to -0.15 here, of pixels clamped to [-1, 1]) cancel: compared to 8 ulps
# of the size of their terms, 1 (measured: at most 3.0e-8)
REWARD = 8 * ULP  # 9.5e-7, absolute
# gradient norms: a sum over samples of gradients weighted by advantages of both signs (DPO: winner minus loser), so
# they cancel in part and carry a few times the rounding of their terms (measured: at most 4.5e-7, 4 ulps)
GRADIENT = 32 * ULP  # 3.8e-6
# AWM's loss at rho = 1 (one optimiser step per batch) is mean(-A') plus the KL and guard terms; here each micro-batch
# is one group of 4 (train_batch_size = group_size), whose advantages sum to 0 in float64, so that mean is rounding:
# A' = A / adv_clip rounded twice to float32 (2u|A'| each) and 4 terms summed in float32 (3u sum|A'|) give at most
# 5u max|A'| in any order, u = 2^-24. Advantages are normalised by the std of all N = 8 rewards, so a deviation from
# its group's mean (n = 4) is at most sqrt(N (n-1)/n) = sqrt(6) stds: max|A'| <= sqrt(6)/5. (Measured: the term is
# -1.2e-9 to 3.3e-9 across the configurations above, the loss at most 3.3e-9 from the pinned one; the bound holds on
# every CPU.)
AWM_POLICY_ROUNDING = 5 * 2.0**-24 * math.sqrt(6) / 5  # 1.5e-7, as large as AWM's loss itself: that loss says little
# DPO after its first update: z = -(beta/2) [(e_w - e_ref_w) - (e_l - e_ref_l)], differences of per-sample MSEs e that
# agree to ~1e-3 (here e = 2-3: the random tiny reference leaves ||eps - x0||^2/D), scaled by beta/2 = 1000. With
# each e to 8 ulps (e <= 4): |dz| <= 1000 * 4 * 8 ULP * 4. The loss mean softplus(-z) and the gradient (a factor
# sigma(-z)) move by at most |dz| relative to themselves. (Measured: 2.2e-4 on the EPYC against the recording CPU,
# which the old rel 1e-6 failed: the check stopped at AWM's loss before it reached DPO.)
DPO_MARGIN = 1000 * 4 * 8 * ULP * 4  # 0.015


def digits_tolerance(method, key, step):
    """(rel, abs) at which DIGITS_BEFORE[method][key][step] compares (eval: reward full, reward few, norm ratio)."""
    rel = GRADIENT if key == "grad_norm" else WELL_CONDITIONED
    if key == "reward_mean" or (key == "eval" and step < 2):
        return 0.0, REWARD
    if method == "awm" and key == "loss":
        return rel, AWM_POLICY_ROUNDING
    if method == "dpo" and key in ("loss", "grad_norm") and step > 0:  # step 1: z = 0 exactly (the LoRA starts at 0)
        return rel + DPO_MARGIN, 0.0
    return rel, 0.0


@pytest.mark.experiment
def test_the_digits_preset_trains_as_before(tmp_path):
    """The digits tables were run with Euler rollouts and one optimiser step per batch: short_digits_runs gives the
    numbers it gave at revision b4ad0e6, before the samplers and minibatches were wired in (equal bit for bit on the
    machine that recorded them; elsewhere to each number's float32 rounding, digits_tolerance)."""
    got = short_digits_runs(tmp_path)
    for method, before in DIGITS_BEFORE.items():
        for key, values in before.items():
            for step, (value, pinned) in enumerate(zip(got[method][key], values)):
                rel, abs_ = digits_tolerance(method, key, step)
                assert value == pytest.approx(pinned, rel=rel, abs=abs_), (method, key, step)


def lora_tensors(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "lora" / "pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize("method", ["nft", "dpo"])
def test_resume_reproduces_the_uninterrupted_run(sd3_path, tmp_path, method):
    """4 steps in one go == 2 steps, stop, --resume=latest to 4: the same LoRA weights, bit for bit (CPU)."""
    common = (f"--method={method}", "--checkpoint_every=2", "--eval_every=100")
    run(sd3_path, tmp_path / "full", *common, "--steps=4")
    run(sd3_path, tmp_path / "split", *common, "--steps=2")
    assert sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir()) == ["checkpoint-0000002"]
    run(sd3_path, tmp_path / "split", *common, "--steps=4", "--resume=latest")
    full, split = lora_tensors(tmp_path / "full"), lora_tensors(tmp_path / "split")
    assert full.keys() == split.keys() and len(full) > 0
    for k in full:
        assert torch.equal(full[k], split[k]), k
    ckpt = tmp_path / "split" / "checkpoints" / "checkpoint-0000004"
    assert {"trainable.safetensors", "optimizer.bin", "scheduler.bin", "COMPLETE"} <= {p.name for p in ckpt.iterdir()}
    assert not (ckpt / "model.safetensors").exists()  # the frozen transformer is not copied into checkpoints


def test_drift_alarm_fires_at_the_right_eval_and_stops_with_a_loadable_checkpoint(sd3_path, tmp_path, capsys):
    """A first run measures the ratio at each eval; a threshold between its smallest and largest must fire at the
    first eval above it, print one alarm line, save that step's checkpoint, export the LoRA and stop there; the
    checkpoint then resumes."""
    common = ("--method=nft", "--guard=false", "--eval_every=1", "--checkpoint_every=10", "--steps=3")
    run(sd3_path, tmp_path / "probe", *common)
    probe = read_jsonl(tmp_path / "probe" / "evals.jsonl")[1:]  # steps 1-3 (step 0 is the reference)
    values = [e["norm_ratio_max"] for e in probe]
    assert all(e["drift_alarm"] is False for e in probe) and max(values) > min(values)
    threshold = (min(values) + max(values)) / 2
    stop = next(e["step"] for e in probe if e["norm_ratio_max"] > threshold)
    capsys.readouterr()
    m = run(sd3_path, tmp_path / "stop", *common, f"--drift_alarm={threshold!r}", "--drift_stop=true")
    evals = read_jsonl(tmp_path / "stop" / "evals.jsonl")
    assert m["steps"] == stop and [e["step"] for e in evals][-1] == stop
    assert [e["drift_alarm"] for e in evals[1:]] == [e["norm_ratio_max"] > threshold for e in evals[1:]]
    assert f"DRIFT ALARM at step {stop}:" in capsys.readouterr().out
    ckpt = tmp_path / "stop" / "checkpoints" / f"checkpoint-{stop:07d}"
    assert (ckpt / "COMPLETE").is_file() and (tmp_path / "stop" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    resumed = run(sd3_path, tmp_path / "stop", *common, "--resume=latest")  # the alarm keys are not the identity
    assert resumed["steps"] == 3


def test_drift_stop_needs_a_threshold():
    with pytest.raises(ValueError, match="drift_stop: expected --drift_alarm=<ratio> > 0"):
        tf.make_config({"drift_stop": True, "pretrained_model_name_or_path": "x"})
    with pytest.raises(ValueError, match="drift_alarm: expected a finite number >= 0"):
        tf.make_config({"drift_alarm": -1.0, "pretrained_model_name_or_path": "x"})


def test_killed_save_never_leaves_a_checkpoint_that_loads_wrong(sd3_path, tmp_path, monkeypatch):
    """A crash after accelerate wrote the state but before the rename leaves a temp folder only; --resume=latest
    skips it (and a folder without COMPLETE) and lands exactly on the uninterrupted run's weights."""
    common = ("--method=awm", "--eval_every=100", "--checkpoint_every=1", "--checkpoints_keep=5")
    run(sd3_path, tmp_path / "full", *common, "--steps=4")
    real_fsync, calls = checkpoints._fsync_tree, []

    def crash_at_step_3(path):
        calls.append(path)
        if Path(path).name == ".tmp-checkpoint-0000003":
            raise KeyboardInterrupt("killed mid-save")
        return real_fsync(path)

    monkeypatch.setattr(checkpoints, "_fsync_tree", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(sd3_path, tmp_path / "split", *common, "--steps=4")
    monkeypatch.setattr(checkpoints, "_fsync_tree", real_fsync)
    root = tmp_path / "split" / "checkpoints"
    assert (root / ".tmp-checkpoint-0000003").is_dir() and not (root / "checkpoint-0000003").exists()
    (root / "checkpoint-0000009").mkdir()  # a half-written folder under a final name: no COMPLETE, never loaded
    assert [p.name for p in sorted(tf.complete_checkpoints(root))] == ["checkpoint-0000001", "checkpoint-0000002"]
    run(sd3_path, tmp_path / "split", *common, "--steps=4", "--resume=latest")
    full, split = lora_tensors(tmp_path / "full"), lora_tensors(tmp_path / "split")
    assert all(torch.equal(full[k], split[k]) for k in full)
    assert not (root / ".tmp-checkpoint-0000003").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(sd3_path, tmp_path, monkeypatch):
    real, calls = ng.nft_loss, []

    def nan_on_step_2(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) > 2 else loss), stats  # smoke: 2 train timesteps per step

    monkeypatch.setattr(ng, "nft_loss", nan_on_step_2)
    with pytest.raises(SystemExit) as e:
        run(sd3_path, tmp_path, "--method=nft", "--steps=3", "--eval_every=100")
    assert "step 2: loss is nan" in str(e.value) and "checkpoint-0000001" in str(e.value)
    root = tmp_path / "checkpoints"
    assert [p.name for p in tf.complete_checkpoints(root)] == ["checkpoint-0000001"]
    monkeypatch.setattr(ng, "nft_loss", real)
    m = run(sd3_path, tmp_path, "--method=nft", "--steps=2", "--eval_every=100", "--resume=latest")
    assert m["steps"] == 2


def test_help_lists_the_defaults_of_the_preset_that_runs(capsys, tmp_path):
    """`python -m experiments.digits_testbed --help` (train_full's parser with the digits preset),
    `python train_full.py --preset=flux --help` and a --config file naming flux show that preset's values; a plain
    --help shows sd3's, and so does a --config file that names no preset or cannot be read."""
    from experiments import digits_testbed

    (tmp_path / "flux.json").write_text('{"preset": "flux", "lr": 0.001}')
    (tmp_path / "plain.json").write_text('{"lr": 0.001}')
    flux, sd3 = (dict(adapters.registered(name).defaults, preset=name) for name in ("flux", "sd3"))
    for argv, preset, shown in (
        (["--help"], "digits", dict(digits_testbed.PRESET, preset="digits")),
        (["--preset=flux", "--help"], "sd3", flux),
        (["--config", str(tmp_path / "flux.json"), "--help"], "sd3", flux),
        ([f"--config={tmp_path / 'plain.json'}", "--help"], "sd3", sd3),
        ([f"--config={tmp_path / 'missing.json'}", "--help"], "sd3", sd3),
        (["--help"], "sd3", sd3),
    ):
        with pytest.raises(SystemExit) as done:
            tf.parse_args(argv, preset=preset)
        printed = capsys.readouterr().out
        assert done.value.code == 0 and f"The defaults below are the {shown['preset']} preset's." in printed
        for key, value in shown.items():
            assert f"  --{key}={value}  " in printed, (argv, key)


def test_bad_arguments_fail_fast_with_clear_messages(tmp_path, monkeypatch):
    import time

    with pytest.raises(ValueError, match="--lora_rnak=4.*expected --smoke or --key=value"):
        tf.parse_args(["--preset=sd3", "--lora_rnak=4"])
    with pytest.raises(ValueError, match="pretrained_model_name_or_path: required"):
        tf.parse_args(["--preset=sd3"])
    with pytest.raises(ValueError, match="group_size"):
        tf.parse_args(["--preset=sd3", "--pretrained_model_name_or_path=x", "--group_size=1"])
    monkeypatch.delitem(adapters.ADAPTERS, "digits", raising=False)  # as in a fresh `python train_full.py`
    with pytest.raises(
        cli.UsageError,
        match=r"preset: expected one of \['flux', 'sd3'\], got 'digits'; .*`python -m experiments.digits_testbed`",
    ):
        tf.main(["--preset=digits", "--smoke"])
    jpeg = ["--reward=jpeg"]  # the model folder is checked last: the default reward's (offline) error would come first
    for path, match in (
        (tmp_path / "nothing_here", "no folder"),
        (tmp_path, "has no model_index.json"),
        ("nobody-xyz/no-such-model", "cannot reach"),
    ):
        t0 = time.time()
        with pytest.raises(ValueError, match=f"pretrained_model_name_or_path: .*{match}.*pass"):
            tf.main(["--preset=flux", f"--pretrained_model_name_or_path={path}", f"--out_dir={tmp_path / 'o'}", *jpeg])
        assert time.time() - t0 < 15
    with pytest.raises(ValueError, match="train_prompts: expected a text file"):
        tf.read_prompts("train_prompts", str(tmp_path / "missing.txt"), adapters.registered("sd3").prompts)


def test_exported_lora_loads_with_load_lora_weights(sd3_path, tmp_path):
    """pipe.load_lora_weights(out/lora) gives the trained policy's velocity (rank and alpha included)."""
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file

    run(sd3_path, tmp_path, "--method=dpo", "--eval_every=100", "--lr=0.05")
    cfg = tf.parse_args(["--preset=sd3", "--smoke", f"--pretrained_model_name_or_path={sd3_path}"])
    ad = adapters.SD3Adapter(cfg, sd3_path, torch.device("cpu"), torch.float32)
    from peft import LoraConfig

    ad.transformer.add_adapter(
        LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=cfg.lora_targets.split(","))
    )
    params = dict(ad.transformer.named_parameters())
    trained = load_file(str(tmp_path / "checkpoints" / "checkpoint-0000002" / "trainable.safetensors"))
    with torch.no_grad():
        for n, v in trained.items():
            params[n].copy_(v)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_path)
    x = torch.randn(2, *ad.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        cond = ad.encode(["a red cat", "a dog"])
        v_base = ad.velocity(pipe.transformer, x, t, cond)
        pipe.load_lora_weights(str(tmp_path / "lora"))
        v_loaded, v_trained = ad.velocity(pipe.transformer, x, t, cond), ad.velocity(ad.transformer, x, t, cond)
    # the same LoRA by two routes on one CPU (diffusers' loader vs peft): float32 reordering of O(1) velocities
    torch.testing.assert_close(v_loaded, v_trained, rtol=1e-5, atol=1e-6)
    assert (v_loaded - v_base).abs().max() > 1e-4  # the LoRA did something


def test_the_reference_is_the_adapter_switched_off_as_diffusers_does_it(sd3_path):
    """Base.reference() (its own switch over the LoRA layers, found once) gives the velocity of diffusers'
    disable_adapters(), leaves the policy and its trainable flags as they were, also when the forward raises; a
    module without LoRA layers is refused."""
    cfg = tf.parse_args(["--preset=sd3", "--smoke", f"--pretrained_model_name_or_path={sd3_path}"])
    ad = adapters.SD3Adapter(cfg, sd3_path, torch.device("cpu"), torch.float32)
    adapters.make_trainable(cfg, ad.transformer, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for name, p in ad.transformer.named_parameters():
            if "lora_B" in name:  # peft starts B at 0 (policy = reference): a policy that differs
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))
    base = adapters.Base(ad.transformer)
    x = torch.randn(2, *ad.latent_shape, generator=torch.Generator().manual_seed(0))
    t, cond = torch.tensor([0.3, 0.8]), ad.encode(["a red cat", "a dog"])
    trainable = {name for name, p in ad.transformer.named_parameters() if p.requires_grad}

    def velocity():
        with torch.no_grad():
            return ad.velocity(base.module, x, t, cond)

    v_policy = velocity()
    ad.transformer.disable_adapters()
    v_diffusers = velocity()
    ad.transformer.enable_adapters()
    with base.reference():
        v_ref = velocity()
        assert not any(p.requires_grad for p in ad.transformer.parameters())
    assert torch.equal(v_ref, v_diffusers) and (v_ref - v_policy).abs().max() > 1e-3
    assert torch.equal(velocity(), v_policy) and len(base.lora_layers) > 0
    with pytest.raises(RuntimeError, match="inside"), base.reference():
        raise RuntimeError("inside")
    assert torch.equal(velocity(), v_policy)
    assert {name for name, p in ad.transformer.named_parameters() if p.requires_grad} == trainable
    with pytest.raises(ValueError, match="no LoRA layer"), adapters.Base(torch.nn.Linear(2, 2)).reference():
        pass


def brightness_reward(images, prompts):
    """A user reward for --reward=module:function: mean brightness, (B,)."""
    assert images.ndim == 4 and len(prompts) == len(images)
    return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    clip_tok, _ = tokenizers()
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(clip_tok),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    path = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(config).save_pretrained(path)
    clip_tok.save_pretrained(path)
    return str(path)


def test_jpeg_reward_is_flow_grpos_compressibility():
    """flow_grpo's jpeg_compressibility on the same pictures: [0, 1] images to uint8 by round and clamp, Pillow's
    JPEG at quality 95, minus the size in kB; RGB and one-channel, noisy and smooth."""
    import io

    import numpy as np
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    noisy = torch.rand(3, 3, 32, 24, generator=gen)
    smooth = torch.nn.functional.interpolate(torch.rand(2, 1, 4, 4, generator=gen), size=(16, 16), mode="bilinear")
    for images01 in (noisy, smooth):
        u8 = (images01 * 255).round().clamp(0, 255).to(torch.uint8).numpy().transpose(0, 2, 3, 1)
        expected = []
        for image in u8:
            buffer = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(image.squeeze(-1) if image.shape[-1] == 1 else image)).save(
                buffer, format="JPEG", quality=95
            )
            expected.append(-buffer.tell() / 1000)
        assert rewards.jpeg_reward(images01 * 2 - 1, [""] * len(u8)).tolist() == torch.tensor(expected).tolist()


def test_pickscore_is_clip_logit_scale_times_cosine(tiny_clip):
    """The reward equals CLIPModel's own logits_per_image on the same preprocessed pixels, and it runs in training."""
    from transformers import CLIPModel

    score = rewards.PickScore(tiny_clip, "cpu")
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = ["a red cat", "a blue car", "a dog"]
    x = torch.nn.functional.interpolate((images + 1) / 2, size=(32, 32), mode="bicubic", antialias=True).clamp(0, 1)
    x = (x - torch.tensor(score.MEAN)[:, None, None]) / torch.tensor(score.STD)[:, None, None]
    tok = score.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = CLIPModel.from_pretrained(tiny_clip)(
            input_ids=tok.input_ids, attention_mask=tok.attention_mask, pixel_values=x
        ).logits_per_image
    # the same CLIP logits by two routes on one CPU (PickScore's features and cosine, CLIPModel's logits_per_image):
    # float32 reordering of logits up to the logit scale (~14)
    torch.testing.assert_close(score(images, prompts), logits.diagonal(), rtol=1e-5, atol=1e-5)


def test_rewards_cfg_and_full_finetune_in_training(sd3_path, tiny_clip, tmp_path):
    m = run(sd3_path, tmp_path / "pick", "--reward=pickscore", f"--pickscore_model={tiny_clip}", "--cfg_scale=3.0")
    assert math.isfinite(m["last_step"]["reward_mean"]) and m["last_step"]["reward_std"] > 0
    m = run(
        sd3_path,
        tmp_path / "user",
        "--reward=test_train_full:brightness_reward",
        "--method=awm",
        "--full_finetune=true",
        "--lr=1e-3",
    )
    assert math.isfinite(m["last_step"]["loss"]) and (tmp_path / "user" / "transformer" / "config.json").is_file()
    assert m["last_step"]["norm_ratio"] != 1.0  # the first update moved the fully trainable transformer
    with pytest.raises(ValueError, match="reward: expected"):
        run(sd3_path, tmp_path / "bad", "--reward=not_a_reward")


def test_guard_weight_per_method():
    """NFT and AWM add lam·hinge; DPO adds lam·|β|/2·hinge, the factor its own loss reaches the errors through."""
    gen = torch.Generator().manual_seed(0)
    v, v_ref = torch.randn(4, 3, 8, 8, generator=gen) * 1.2, torch.randn(4, 3, 8, 8, generator=gen)
    hinge = ng.normguard_penalty(v, v_ref, lam=1.0)[0]
    assert hinge > 0
    for method, beta, factor in (
        ("nft", 2000.0, 0.5),
        ("awm", 2000.0, 0.5),
        ("dpo", 2000.0, 500.0),
        ("dpo", -40.0, 10.0),
    ):
        cfg = tf.Config(method=method, lam=0.5, dpo_beta=beta)
        torch.testing.assert_close(tf.guard_terms(cfg, v, v_ref)[0], factor * hinge)
    off = tf.guard_terms(tf.Config(guard=False), v, v_ref)
    assert off[0] == 0 and off[1]["hinge"] == hinge  # guard off: the statistics only, for the log


def test_recipes_sit_between_the_preset_and_the_command_line():
    """A recipe's official values replace the preset's; --smoke's sizes and the command line replace the recipe's."""
    path = dict(pretrained_model_name_or_path="owner/model")
    cfg = tf.make_config({"recipe": "nft_ocr", "reward": "jpeg", **path})
    assert (cfg.method, cfg.nft_beta, cfg.nft_decay_type, cfg.kl_weight, cfg.sample_steps) == ("nft", 0.1, 2, 1e-4, 10)
    cfg = tf.make_config({"recipe": "awm_geneval", "reward": "jpeg", "kl_weight": 5e-3, **path}, smoke=True)
    assert (cfg.method, cfg.kl_weight, cfg.sample_steps, cfg.awm_ema_weight) == ("awm", 5e-3, 3, 1.0)
    official = {"awm_pickscore": 1e-4, "awm_geneval": 1e-3, "awm_ocr": 3e-3, "nft_pickscore": 1e-4}
    betas = {"nft_ocr": 0.1, "nft_multi_reward": 0.1, "nft_pickscore": 1.0, "nft_geneval": 1.0, "nft_hpsv2": 1.0}
    for name in recipes.RECIPES:  # each is a valid config, at full size and at --smoke's
        for smoke in (False, True):
            cfg = tf.make_config({"recipe": name, "reward": "jpeg", **path}, smoke=smoke)
        assert cfg.kl_weight == official.get(name, 1e-4) and cfg.method == name.split("_")[0]
        assert cfg.method == "awm" or cfg.nft_beta == betas[name]
    assert tf.make_config({"recipe": "awm_pickscore", **path}).reward == "pickscore"
    with pytest.raises(ValueError, match=r"^reward: the nft_ocr recipe's ocr reward is not built in"):
        tf.make_config({"recipe": "nft_ocr", **path})
    with pytest.raises(ValueError, match=r"^recipe: expected one of \['awm_geneval'"):
        tf.make_config({"recipe": "nft_jpeg", **path})


def test_old_policy_decay_is_the_official_schedule():
    """DiffusionNFT's return_decay (decay types 0, 1, 2) and AWM's linear EMA decay, at n optimiser steps so far."""
    d = lambda n, **kw: recipes.old_policy_decay(tf.Config(**kw), n)
    assert [d(n, nft_decay_type=0) for n in (1, 100, 10_000)] == [0.0] * 3
    # Python floats are IEEE-754 doubles on every CPU: rate * n rounds the same everywhere, within 1e-15 of the decimal
    assert [d(n) for n in (1, 250, 500, 501, 10_000)] == pytest.approx([0.001, 0.25, 0.5, 0.5, 0.5], abs=1e-15)
    type_2 = [d(n, nft_decay_type=2) for n in (1, 74, 75, 76, 175, 208, 209, 10_000)]
    assert type_2 == pytest.approx([0, 0, 0, 0.0075, 0.75, 0.9975, 0.999, 0.999], abs=1e-15)
    awm = [d(n, method="awm") for n in (1, 100, 300, 301)]
    assert awm == pytest.approx([0.001, 0.1, 0.3, 0.3], abs=1e-15)
    assert d(1, decay_lag=1) == 0.0 and d(77, nft_decay_type=2, decay_lag=1) == d(76, nft_decay_type=2)


def test_awm_sum_first_and_elbo_reach_the_loss(sd3_path, tmp_path, monkeypatch, capsys):
    """--awm_loss_type=sum_first puts each sample's train timesteps into one loss call (rows timestep-major), so a
    micro-batch of train_batch_size rows holds train_batch_size // T samples (at least one)."""
    calls, real = [], ng.awm_loss

    def recorded(v, v_old, v_ref, target, t, advantages, **kw):
        calls.append((v.shape[0], t.tolist(), advantages.tolist(), kw))
        return real(v, v_old, v_ref, target, t, advantages, **kw)

    monkeypatch.setattr(tf.ng, "awm_loss", recorded)
    args = ("--method=awm", "--awm_loss_type=sum_first", "--awm_kl_weighting=elbo", "--train_batch_size=1")
    m = run(sd3_path, tmp_path, *args)
    assert m["steps"] == 2 and all(math.isfinite(m["last_step"][k]) for k in ("loss", "kl_ref", "kl_ema"))
    assert "| 4 micro-batch losses" in capsys.readouterr().out  # 4 samples, each at its 2 timesteps, one call each
    assert len(calls) == 8  # 2 steps x 4 calls
    for rows, t, adv, kw in calls:
        assert rows == 2 and kw["timesteps_per_sample"] == 2 and t[0] != t[1] and adv[0] == adv[1]
        assert (kw["loss_type"], kw["kl_weighting"], kw["ema_weight"]) == ("sum_first", "elbo", 1.0)


def test_digits_preset(digits_cache, tmp_path):
    """The 8x8-digit SD3 transformer of experiments/digits_testbed.py (pixel space, label "prompts", classifier
    reward, quality judges), registered on import and run as `python -m experiments.digits_testbed --smoke ...`
    runs it (the session's reference)."""
    from experiments import digits_testbed as digits

    cache, path = digits_cache
    m = digits.main(
        [
            "--smoke",
            f"--pretrained_model_name_or_path={path}",
            f"--cache_dir={cache}",
            f"--out_dir={tmp_path}",
            "--method=dpo",
            "--eval_seeds=1",
        ]
    )
    assert json.loads((tmp_path / "config.json").read_text())["config"]["preset"] == "digits"
    ev = m["eval"]
    assert m["steps"] == 2 and 0 <= ev["reward_full"] <= 1 and 0 <= ev["judge_acc_full"] <= 1
    assert {"fd_few", "disc_acc_few"} <= set(ev)


def test_two_processes(sd3_path, tmp_path):
    """The multi-process path (torchrun, as `accelerate launch` starts it; gloo on CPU): rewards gathered for the
    advantages, no_sync accumulation, the collective non-finite check, save_state from every process."""
    import subprocess
    import sys

    repo = Path(tf.__file__).resolve().parent
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        str(repo / "train_full.py"),
        "--preset=sd3",
        "--smoke",
        f"--pretrained_model_name_or_path={sd3_path}",
        "--reward=jpeg",
        "--method=nft",
        f"--out_dir={tmp_path}",
        "--eval_every=100",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "x 2 process(es)" in res.stdout and "4 rollouts per process, 8 in all" in res.stdout
    lines = [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    ckpt = tmp_path / "checkpoints" / "checkpoint-0000002"
    assert {"random_states_0.pkl", "random_states_1.pkl", "COMPLETE"} <= {p.name for p in ckpt.iterdir()}
    assert len(lora_tensors(tmp_path)) > 0


def test_bench_guard_adds_no_forward():
    """bench_train_full's exact part: with the guard on, each method runs the same network forwards as without."""
    from bench import bench_train_full as bench

    cfg, _ = bench.parse_args(["--smoke", "--threads=1"])
    for method in tf.METHODS:
        off, on = bench.measure(cfg, method, False), bench.measure(cfg, method, True)
        assert (
            on["forwards_per_step"]
            == off["forwards_per_step"]
            == ({"grad": 1, "no_grad": 1} if method == "dpo" else {"grad": 1, "no_grad": 2})
        )
        assert on["saved_for_backward_bytes"] > off["saved_for_backward_bytes"] > 0  # the hinge's norms: tiny, not 0


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one mixed-precision setting per process (AcceleratorState) and refuses another: forgotten
    before the test, as in a fresh process, and after it, so the next test on this worker starts clean. (accelerate's
    own tests reset it the same way.)"""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_gpu_defaults_bf16_and_gradient_checkpointing(sd3_path, flux_path, tmp_path, fresh_accelerator_state, capsys):
    """The GPU path: bf16 autocast over bf16 frozen weights (LoRA in fp32), gradient checkpointing, CFG, for SD3 and
    FLUX."""
    for preset, path in (("sd3", sd3_path), ("flux", flux_path)):
        m = run(
            path,
            tmp_path / preset,
            "--method=dpo",
            "--reward=jpeg",
            "--mixed_precision=bf16",
            "--gradient_checkpointing=true",
            "--cfg_scale=2",
            preset=preset,
        )
        assert math.isfinite(m["last_step"]["loss"]) and math.isfinite(m["eval"]["norm_ratio"]), preset
    assert capsys.readouterr().out.count("| bf16 |") == 2


# ---------------------------------------------------------------------------------------------------------------
# what a crash, a kill, a bad setting and a resume leave behind


def read_jsonl(path):
    """Strict JSON lines: a bare NaN/Infinity fails the parse."""

    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return [json.loads(s, parse_constant=refuse) for s in Path(path).read_text().splitlines()]


def test_a_reused_out_dir_is_refused_and_overwrite_clears_it(sd3_path, tmp_path):
    run(sd3_path, tmp_path, "--eval_every=100")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(cli.UsageError, match=r"out_dir: .* holds checkpoints .*checkpoint-0000002.*--overwrite=true"):
        run(sd3_path, tmp_path, "--eval_every=100", "--method=dpo", "--overwrite=false")  # --smoke's default: true
    m = run(sd3_path, tmp_path, "--eval_every=100", "--method=dpo", "--overwrite=true", "--checkpoint_every=2")
    assert m["steps"] == 2 and [x["step"] for x in read_jsonl(tmp_path / "log.jsonl")] == [1, 2]
    assert json.loads((tmp_path / "config.json").read_text())["config"]["method"] == "dpo"
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only what the trainer writes is removed
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-0000002"]  # the old 1 is gone
    m = run(sd3_path, tmp_path, "--method=dpo", "--overwrite=true", "--resume=latest", "--steps=3")
    assert m["steps"] == 3 and (tmp_path / "checkpoints" / "checkpoint-0000002").is_dir()  # a resume removes nothing


@pytest.mark.parametrize("setting", ["--lr=1e39", "--weight_decay=1e300"])
def test_an_update_to_non_finite_weights_stops_before_any_save(sd3_path, tmp_path, setting):
    """A huge (finite) lr or weight_decay makes the first update overflow (torch refuses the step) or its weights
    Inf/NaN: the run stops at step 1, and no checkpoint exists to hold them."""
    with pytest.raises(
        SystemExit, match="step 1: the update (overflowed|made the weights non-finite).*checkpoint: None"
    ):
        run(sd3_path, tmp_path, setting, "--eval_every=100")
    assert not list((tmp_path / "checkpoints").glob("*checkpoint-*")) and not (tmp_path / "lora").exists()


def test_lr_inf_at_step_2_keeps_the_finite_checkpoint_the_last_good_one(sd3_path, tmp_path, monkeypatch):
    """lr turned to inf after step 1 (the config refuses inf itself, so it is set on the optimiser): the run stops
    at step 2 before saving, checkpoint 1 is named, holds finite weights, and the run resumes from it."""
    from safetensors.torch import load_file

    real, calls = torch.optim.AdamW.step, []

    def inf_lr_at_step_2(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            self.param_groups[0]["lr"] = math.inf
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", inf_lr_at_step_2)
    with pytest.raises(SystemExit, match=r"step 2: the update made .*last good checkpoint: .*checkpoint-0000001"):
        run(sd3_path, tmp_path, "--steps=3", "--eval_every=100")
    monkeypatch.setattr(torch.optim.AdamW, "step", real)
    assert [p.name for p in tf.complete_checkpoints(tmp_path / "checkpoints")] == ["checkpoint-0000001"]
    saved = load_file(str(tmp_path / "checkpoints" / "checkpoint-0000001" / "trainable.safetensors"))
    assert all(bool(v.isfinite().all()) for v in saved.values())
    assert run(sd3_path, tmp_path, "--steps=3", "--eval_every=100", "--resume=latest")["steps"] == 3


def test_resume_refuses_another_config_naming_the_keys(sd3_path, tmp_path):
    run(sd3_path, tmp_path, "--eval_every=100")
    with pytest.raises(cli.UsageError, match=r"resume: .*checkpoint-0000002 was written under another config") as e:
        run(sd3_path, tmp_path, "--resume=latest", "--lr=0.1", "--seed=3", "--lora_rank=8", "--method=dpo")
    for diff in ("lora_rank 4 -> 8", "lr 0.0003 -> 0.1", "method 'nft' -> 'dpo'", "seed 0 -> 3"):
        assert diff in str(e.value)
    assert "eval_every" not in str(e.value)
    with pytest.raises(
        cli.UsageError, match=r"resume: .* holds checkpoints after checkpoint-0000001 \(checkpoint-0000002\)"
    ):
        run(sd3_path, tmp_path, f"--resume={tmp_path / 'checkpoints' / 'checkpoint-0000001'}")
    m = run(sd3_path, tmp_path, "--resume=latest", "--steps=3", "--eval_every=3", "--checkpoint_every=5")
    assert m["steps"] == 3  # how far, how often to evaluate and checkpoint: not the run's identity


def nan_reward(images, prompts):
    return torch.full((len(images),), math.nan)


def matrix_reward(images, prompts):
    return images.mean(dim=(1, 2))  # (B, W): the wrong shape


def test_a_nan_reward_writes_strict_json_and_a_wrong_shape_is_named(sd3_path, tmp_path):
    with pytest.raises(SystemExit, match="step 1: the reward returned NaN/Inf"):
        run(sd3_path, tmp_path / "nan", "--reward=test_train_full:nan_reward")
    (ev,) = read_jsonl(tmp_path / "nan" / "evals.jsonl")  # the step-0 eval, written before the first step
    assert ev["step"] == 0 and ev["reward_full"] is None and ev["reward_few"] is None
    with pytest.raises(ValueError, match=r"reward: test_train_full:matrix_reward returned \(4, 16\) for 4 images"):
        run(sd3_path, tmp_path / "shape", "--reward=test_train_full:matrix_reward")


BAD_SETTINGS = [  # (arguments, what the one-line error must start with)
    (["--resolution=18"], "resolution: expected a multiple of 4"),
    (["--train_timesteps=9"], "train_timesteps: expected <= 3"),
    (["--reward=no_such_module_xyz:fn"], "reward: cannot load"),
    (["--reward=math:pi"], "reward: expected 'math:pi' to be a function"),
    (["--reward=pickscore", "--pickscore_model=/no/such/clip"], "pickscore_model: no folder"),
    (["--resume=latest"], "resume: expected 'latest' with a complete checkpoint"),
    (["--resume=/no/such/checkpoint"], "resume: expected"),
    (["--awm_weighting=cubic"], "awm_weighting: expected one of"),
    (["--profile_bins=0"], "profile_bins: expected an int >= 1"),
    (["--max_sequence_length=0"], "max_sequence_length: expected an int >= 1"),
    (["--max_sequence_length=600"], "max_sequence_length: expected an int in 1..512"),
    (["--lora_targets=to_q,to_qq"], "lora_targets: ['to_qq'] name no module"),
    (["--lora_targets=to_q,"], "lora_targets: expected comma-separated"),
    (["--preset=flux"], "preset: flux loads a FluxPipeline, "),
    (["--lora_alpha=0"], "lora_alpha: expected an int >= 1"),
    (["--lora_alpha=-8"], "lora_alpha: expected an int >= 1"),
    (["--ema_decay_rate=-0.1"], "ema_decay_rate: expected a finite number >= 0"),
    (["--awm_loss_type=sum"], "awm_loss_type: expected one of ('exp_first', 'sum_first')"),
    (["--awm_kl_weighting=ELBO"], "awm_kl_weighting: expected one of ('uniform', 'elbo')"),
    (["--nft_decay_type=3"], "nft_decay_type: expected one of (0, 1, 2)"),
    (["--decay_lag=-1"], "decay_lag: expected a finite number >= 0"),
    (["--recipe=nft_jpeg"], "recipe: expected one of"),
    (["--recipe=awm_ocr", "--reward="], "reward: the awm_ocr recipe's ocr reward is not built in"),
    (["--warmup_steps=-1"], "warmup_steps: expected a finite number >= 0"),
    (["--out_dir="], "out_dir: expected a folder"),
    *[([f"--{k}=inf"], f"{k}: expected a finite number") for k in ("lr", "kl_weight", "weight_decay", "lam")],
    *[([f"--{k}=inf"], f"{k}: expected a finite number") for k in ("tolerance", "nft_beta", "adv_clip", "cfg_scale")],
    (["--lr=nan"], "lr: expected a finite number > 0"),
    (["--dpo_beta=0"], "dpo_beta: expected a finite number != 0"),
    (["--shift=0"], "shift: expected a finite number > 0"),
    (["--flux_guidance=-inf"], "flux_guidance: expected a finite number"),
    (["--method=dpo", "--train_timesteps=2"], "train_timesteps: DPO trains each pair at one t"),
    (["--shift=-1"], "shift: expected a finite number > 0"),
    (["--lr=1e-3", "--lr=1e-4"], "--lr: given twice"),
    (["--sampler=rk4"], "sampler: expected one of ('euler', 'dpm2', 'sa_solver'), got 'rk4'"),
    (["--awm_timesteps=all"], "awm_timesteps: expected one of ('discrete', 'discrete_wo_init', 'subset')"),
    (["--grad_steps_per_batch=0"], "grad_steps_per_batch: expected an int >= 1"),
    (["--grad_steps_per_batch=3"], "grad_steps_per_batch: expected a divisor of 4, the rollout batch per process"),
    (["--method=dpo", "--grad_steps_per_batch=4"], "grad_steps_per_batch: expected a divisor of 2"),
    (["--sa_noise_level=-0.1"], "sa_noise_level: expected a finite number >= 0"),
    (["--sa_noise_level=nan"], "sa_noise_level: expected a finite number >= 0"),
    (["--awm_clip_range=0"], "awm_clip_range: expected a finite number > 0"),
    (["--awm_off_policy=true"], "awm_off_policy: expected false with method=nft"),
    (["--method=awm", "--sample_steps=2"], "sample_steps: the SA-Solver's grid (AWM's edit) needs K >= 3, got 2"),
    (
        ["--method=awm", "--sampler=euler", "--sample_steps=2", "--awm_timesteps=discrete_wo_init"],
        "sample_steps: AWM's discrete_wo_init trains on grid indices 1..int(0.9K)-1, so it needs K >= 3",
    ),
    (["--method=awm", "--train_timesteps=3"], "train_timesteps: expected <= 2, the awm pool of sample_steps=3"),
]


@pytest.mark.parametrize("args, message", BAD_SETTINGS, ids=[" ".join(a) for a, _ in BAD_SETTINGS])
def test_each_bad_setting_fails_within_seconds_before_the_model_loads(sd3_path, tmp_path, monkeypatch, args, message):
    import time

    def never(*a, **k):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(tf, "Run", never)
    monkeypatch.setattr(adapters.SD3Adapter, "__init__", never)
    given = {a.split("=")[0] for a in args}
    defaults = dict(preset="sd3", out_dir=tmp_path / "out", reward="jpeg", pretrained_model_name_or_path=sd3_path)
    base = [f"--{k}={v}" for k, v in defaults.items() if f"--{k}" not in given]
    t0 = time.time()
    with pytest.raises(cli.UsageError) as e:
        tf.main([*base, "--smoke", *args])
    assert time.time() - t0 < 5 and str(e.value).startswith(message), str(e.value)


def test_logs_are_exact_across_a_kill_and_resume(sd3_path, tmp_path, monkeypatch):
    """Killed during the step-2 eval (after checkpoint 2), then killed after logging step 3 (a line cut short too):
    two resumes later, log.jsonl and evals.jsonl equal the uninterrupted run's, each step once, the lost eval redone."""
    common = ("--steps=4", "--checkpoint_every=2", "--eval_every=2")
    run(sd3_path, tmp_path / "full", *common)
    real_eval, real_log = tf.Run.evaluate, tf.Run.log_step

    def killed_in_eval_2(self, step):
        if step == 2:
            raise KeyboardInterrupt("killed during the eval")
        return real_eval(self, step)

    def killed_after_step_3(self, step, *args):
        real_log(self, step, *args)
        if step + 1 == 3:
            self.log.write('{"step": 4, "rew')  # a kill mid-write
            self.log.flush()
            raise KeyboardInterrupt("killed after logging step 3")

    out = tmp_path / "split"
    monkeypatch.setattr(tf.Run, "evaluate", killed_in_eval_2)
    with pytest.raises(KeyboardInterrupt):
        run(sd3_path, out, *common)
    monkeypatch.setattr(tf.Run, "evaluate", real_eval)
    monkeypatch.setattr(tf.Run, "log_step", killed_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(sd3_path, out, *common, "--resume=latest")
    assert [e["step"] for e in read_jsonl(out / "evals.jsonl")] == [0, 2]  # the lost eval, redone on resume
    monkeypatch.setattr(tf.Run, "log_step", real_log)
    m = run(sd3_path, out, *common, "--resume=latest")
    for name in ("log.jsonl", "evals.jsonl"):
        full, split = read_jsonl(tmp_path / "full" / name), read_jsonl(out / name)
        for line in full + split:
            line.pop("step_time", None)
        assert split == full, name
    assert [x["step"] for x in read_jsonl(out / "log.jsonl")] == [1, 2, 3, 4] and m["steps"] == 4
