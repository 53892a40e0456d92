"""Bad and edge inputs of normguard.py, one table: each row is a valid call with one thing changed.

BAD rows: (function, modifier of the valid kwargs, exception type, message regex). Every message
starts with the name of the argument at fault. RIGHT rows: edge inputs whose fix is to compute the
right answer; each carries its own oracle (a float32/float64 recomputation, a closed form, or the
plain formula where that is finite).
"""

import math

import pytest
import torch

import normguard as ng

B = 4


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def valid(fn):
    """A call of `fn` that succeeds: small float32 tensors, every argument in range."""
    v, v_ref, v_old, u = (rand(B, 3, 4, 4, seed=s) for s in range(4))
    x0, noise = rand(B, 3, 4, 4, seed=4), rand(B, 3, 4, 4, seed=5)
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    adv = torch.tensor([1.5, -0.5, 0.0, 3.0])
    calls = {
        "forward_process": dict(x0=x0, noise=noise, t=t),
        "flow_timesteps": dict(num_steps=4, shift=3.0),
        "euler_sample": dict(velocity_fn=lambda x, t: -x, noise=noise, timesteps=ng.flow_timesteps(4)),
        "velocity_norm": dict(v=v),
        "norm_ratio": dict(v=v, v_ref=v_ref),
        "norm_ratio_profile": dict(ratio=torch.rand(B) + 0.5, t=t),
        "rescale_to_reference": dict(v=v, v_ref=v_ref),
        "normguard_penalty": dict(v=v, v_ref=v_ref),
        "group_advantages": dict(rewards=rand(8, seed=6), group_size=4),
        "nft_loss": dict(v=v, v_old=v_old, v_ref=v_ref, x_t=noise, x0=x0, t=t, advantages=adv),
        "awm_time_weight": dict(err=rand(B, seed=7).abs(), t=t),
        "awm_loss": dict(v=v, v_old=v_old, v_ref=v_ref, target=u, t=t, advantages=adv),
        "awm_kl_weight": dict(t=t, kl_weighting="elbo"),
        "dpo_loss": dict(v_w=v, v_l=v_old, v_ref_w=v_ref, v_ref_l=u, target_w=x0, target_l=noise),
        "velocity_scale_sensitivity": dict(
            velocity_fn=lambda x, t: -x,
            reward_fn=lambda x: x.flatten(1).sum(1),
            noise=noise,
            timesteps=ng.flow_timesteps(4),
        ),
    }
    return calls[fn]


def set_(**changes):
    return lambda kw: {**kw, **changes}


def poke(name, value, index=(0,)):
    """The valid tensor `name` with one entry replaced by `value`."""

    def modify(kw):
        x = kw[name].clone()
        x[index] = value
        return {**kw, name: x}

    return modify


def cast(name, dtype):
    return lambda kw: {**kw, name: kw[name].to(dtype)}


def awm_gap(adv_value, weighting="uniform"):
    """v_old so far from the target that log p~ - log p~_old is ~400 (uniform weighting)."""

    def modify(kw):
        return {
            **kw,
            "v_old": kw["target"] + 20.0,
            "v": kw["target"] + 0.1 * kw["v"],
            "advantages": torch.full((B,), adv_value),
            "weighting": weighting,
        }

    return modify


def overflowing(value, dtype):
    """forward_process at finite x0 = value, noise = -value, where u = noise - x0 = -2·value overflows."""
    full = lambda x: torch.full((B, 3), x, dtype=dtype)
    return lambda kw: {**kw, "x0": full(value), "noise": full(-value)}


def fp16_rescale_overflow(kw):
    v = torch.zeros(2, 64, dtype=torch.float16)
    v[:, 0] = 6e4  # ‖v‖ = 6e4, and ‖v_ref‖ = 8·2e4 = 1.6e5: the rescaled entry 1.6e5 is beyond fp16's 65504
    return {"v": v, "v_ref": torch.full((2, 64), 2e4, dtype=torch.float16)}


def elbo_at(t_value):
    return lambda kw: {**poke("t", t_value)(kw), "kl_weighting": "elbo"}


NAN, INF = float("nan"), float("inf")
diffusers_grid = ng.TIMESTEP_SCALE * ng.flow_timesteps(4)  # a scheduler's .timesteps, not its sigmas

BAD = [
    # parameters: eps NaN or 0
    ("normguard_penalty", set_(eps=NAN), ValueError, r"^eps: expected a finite number"),
    ("normguard_penalty", set_(eps=0.0), ValueError, r"^eps: expected a number > 0"),
    ("norm_ratio", set_(eps=0.0), ValueError, r"^eps:"),
    ("norm_ratio", set_(eps=NAN), ValueError, r"^eps:"),
    ("rescale_to_reference", set_(eps=0.0), ValueError, r"^eps:"),
    ("group_advantages", set_(eps=NAN), ValueError, r"^eps:"),
    ("group_advantages", set_(eps=0.0), ValueError, r"^eps:"),
    # parameters: ±Inf advantages (clipping would have hidden them)
    ("nft_loss", poke("advantages", INF), ValueError, r"^advantages: expected finite"),
    ("awm_loss", poke("advantages", -INF), ValueError, r"^advantages: expected finite"),
    ("awm_loss", poke("advantages", NAN), ValueError, r"^advantages: expected finite"),
    # parameters: bools are not ints
    ("normguard_penalty", set_(power=True), TypeError, r"^power: expected one of \(1, 2\)"),
    ("flow_timesteps", set_(num_steps=True), TypeError, r"^num_steps: expected an int"),
    ("group_advantages", set_(group_size=True), TypeError, r"^group_size: expected an int"),
    ("awm_loss", set_(power=True), TypeError, r"^power: expected a real number"),
    ("normguard_penalty", set_(lam=False), TypeError, r"^lam:"),
    # parameters: a str or None hyperparameter
    ("normguard_penalty", set_(lam="0.1"), TypeError, r"^lam: expected a real number, got str"),
    ("awm_loss", set_(clip_range=None), TypeError, r"^clip_range: expected a real number"),
    ("awm_loss", set_(ema_weight=None), TypeError, r"^ema_weight:"),
    ("nft_loss", set_(kl_weight="1e-4"), TypeError, r"^kl_weight:"),
    ("dpo_loss", set_(beta="2000"), TypeError, r"^beta: expected a real number"),
    ("flow_timesteps", set_(shift=None), TypeError, r"^shift:"),
    ("flow_timesteps", set_(num_steps=4.0), TypeError, r"^num_steps:"),
    ("normguard_penalty", set_(tolerance=torch.tensor(0.1)), TypeError, r"^tolerance:"),
    # ranges: shift, num_steps
    ("flow_timesteps", set_(shift=0.0), ValueError, r"^shift: expected a number > 0"),
    ("flow_timesteps", set_(shift=-3.0), ValueError, r"^shift:"),
    ("flow_timesteps", set_(shift=INF), ValueError, r"^shift: expected a finite number"),
    ("flow_timesteps", set_(num_steps=0), ValueError, r"^num_steps: expected an int >= 1"),
    # euler_sample: timesteps outside [0, 1] (a 1000-scale grid), and what velocity_fn returns
    ("euler_sample", set_(timesteps=diffusers_grid), ValueError, r"^timesteps: .*\[0, 1\].*sigmas"),
    ("euler_sample", set_(timesteps=torch.tensor([1.0, -0.1])), ValueError, r"^timesteps: .*\[0, 1\]"),
    ("euler_sample", set_(timesteps=torch.tensor([0.0, 1.0])), ValueError, r"^timesteps: .*decreasing"),
    ("euler_sample", set_(timesteps=torch.tensor([1, 0])), TypeError, r"^timesteps: .*floating"),
    ("euler_sample", set_(timesteps=[1.0, 0.0]), TypeError, r"^timesteps: expected a torch.Tensor"),
    ("euler_sample", set_(velocity_fn=lambda x, t: x * NAN), ValueError, r"^velocity_fn: .*finite"),
    (
        "euler_sample",
        set_(velocity_fn=lambda x, t: t[:, None, None, None]),
        ValueError,
        r"^velocity_fn: expected a velocity of x's shape \(4, 3, 4, 4\), got \(4, 1, 1, 1\) at step 0",
    ),
    ("euler_sample", set_(velocity_fn=lambda x, t: None), ValueError, r"^velocity_fn: .*NoneType"),
    ("euler_sample", poke("noise", INF), ValueError, r"^noise: expected finite"),
    # integer and bool tensors
    ("forward_process", set_(t=torch.tensor([0, 1, 0, 1])), TypeError, r"^t: expected a floating"),
    ("rescale_to_reference", lambda kw: {**kw, "v": (kw["v"] * 10).long()}, TypeError, r"^v: .*int64"),
    ("group_advantages", lambda kw: {**kw, "rewards": kw["rewards"] > 0}, TypeError, r"^rewards:"),
    ("normguard_penalty", set_(v=[[1.0, 2.0]]), TypeError, r"^v: expected a torch.Tensor, got list"),
    # awm_time_weight
    ("awm_time_weight", poke("err", -0.5), ValueError, r"^err: expected values >= 0"),
    (
        "awm_time_weight",
        lambda kw: {**kw, "t": kw["t"][:, None]},
        ValueError,
        r"^t: expected the shape of err \(4,\), got \(4, 1\)",
    ),
    ("awm_time_weight", poke("t", 1.5), ValueError, r"^t: expected values in \[0, 1\]"),
    ("awm_time_weight", set_(power=0.0), ValueError, r"^power:"),
    # AWM's options: loss_type, its row layout and advantages, the KL weighting and its t > 0
    ("awm_loss", set_(loss_type="sum"), ValueError, r"^loss_type: expected one of \('exp_first', 'sum_first'\)"),
    ("awm_loss", set_(kl_weighting="ELBO"), ValueError, r"^kl_weighting: expected one of \('uniform', 'elbo'\)"),
    ("awm_loss", set_(timesteps_per_sample=3), ValueError, r"^timesteps_per_sample: expected a divisor of B = 4"),
    ("awm_loss", set_(timesteps_per_sample=True), TypeError, r"^timesteps_per_sample: expected an int"),
    ("awm_loss", set_(timesteps_per_sample=0), ValueError, r"^timesteps_per_sample: expected an int >= 1"),
    (
        "awm_loss",
        set_(loss_type="sum_first", timesteps_per_sample=2),  # advantages 1.5, -0.5 | 0.0, 3.0
        ValueError,
        r"^advantages: expected the same value on the timesteps_per_sample rows of a sample",
    ),
    ("awm_loss", lambda kw: {**poke("t", 0.0)(kw), "kl_weighting": "elbo"}, ValueError, r"^t: .*>= .*'elbo'"),
    ("awm_kl_weight", poke("t", 0.0), ValueError, r"^t: expected values >= 1.175e-38 with kl_weighting='elbo'"),
    ("awm_kl_weight", poke("t", 1.5), ValueError, r"^t: expected values in \[0, 1\]"),
    ("awm_kl_weight", poke("t", NAN), ValueError, r"^t: expected finite"),
    ("awm_kl_weight", set_(kl_weighting="ELBO"), ValueError, r"^kl_weighting:"),
    ("awm_kl_weight", lambda kw: {**kw, "t": kw["t"][:, None]}, ValueError, r"^t: expected a non-empty \(B,\)"),
    # velocity_norm's channel dim
    ("velocity_norm", set_(granularity="token", channel_dim=0), ValueError, r"^channel_dim: .*non-batch"),
    ("velocity_norm", set_(granularity="token", channel_dim=-4), ValueError, r"^channel_dim:"),
    ("velocity_norm", set_(granularity="token", channel_dim=4), ValueError, r"^channel_dim:"),
    ("velocity_norm", set_(granularity="token", channel_dim=True), TypeError, r"^channel_dim:"),
    ("velocity_norm", poke("v", NAN), ValueError, r"^v: expected finite"),
    ("velocity_norm", lambda kw: {**kw, "v": kw["v"].flatten()}, ValueError, r"^v: expected shape"),
    ("normguard_penalty", set_(granularity="token", channel_dim=0), ValueError, r"^channel_dim:"),
    # norm_ratio_profile's num_bins and its tensors
    ("norm_ratio_profile", set_(num_bins=0), ValueError, r"^num_bins: expected an int >= 1"),
    ("norm_ratio_profile", set_(num_bins=-3), ValueError, r"^num_bins:"),
    ("norm_ratio_profile", set_(num_bins=2.5), TypeError, r"^num_bins: expected an int"),
    ("norm_ratio_profile", poke("t", 1.01), ValueError, r"^t: expected values in \[0, 1\]"),
    ("norm_ratio_profile", poke("ratio", NAN), ValueError, r"^ratio: expected finite"),
    ("norm_ratio_profile", lambda kw: {**kw, "t": kw["t"][:2]}, ValueError, r"^t: expected shape"),
    # AWM: a log-ratio past float32's exp range where A < 0 is a true overflow of the loss
    (
        "awm_loss",
        awm_gap(-2.0),
        ValueError,
        r"^v, v_old: log p~ - log p~_old reaches 400 on a sample with A < 0",
    ),
    # results that overflow their dtype although every input is finite (they returned Inf)
    ("forward_process", overflowing(6e4, torch.float16), ValueError, r"^x0, noise: finite, but .* torch.float16"),
    ("forward_process", overflowing(3e38, torch.float32), ValueError, r"^x0, noise: finite, but .* torch.float32"),
    ("rescale_to_reference", fp16_rescale_overflow, ValueError, r"^v, v_ref: finite, but .* overflows torch.float16"),
    (
        "euler_sample",
        lambda kw: {**kw, "noise": kw["noise"].half(), "velocity_fn": lambda x, t: 1e5 * torch.ones_like(x)},
        ValueError,
        r"^velocity_fn: expected finite velocities; .* beyond torch.float16's range",
    ),
    ("awm_kl_weight", poke("t", 1e-45), ValueError, r"^t: expected values >= 1.175e-38 with kl_weighting='elbo'"),
    ("awm_loss", elbo_at(1e-40), ValueError, r"^t: expected values >= 1.175e-38 with kl_weighting='elbo'"),
    # β so large (or small) that the loss overflows, named as β's fault: the same inputs are finite at β = 1
    ("nft_loss", set_(beta=1e30), ValueError, r"^beta: expected a β for which NFT's policy term is finite"),
    ("nft_loss", set_(beta=1e300), ValueError, r"^beta: expected a β for which NFT's policy term is finite"),
    ("nft_loss", set_(beta=1e-300), ValueError, r"^beta: expected a β for which NFT's policy term is finite"),
    ("dpo_loss", set_(beta=1e300), ValueError, r"^beta: expected a β for which the logit z is finite"),
    ("dpo_loss", set_(beta=-1e300), ValueError, r"^beta: expected a β for which the logit z is finite"),
    # callables and devices
    ("euler_sample", set_(velocity_fn=None), TypeError, r"^velocity_fn: expected a callable"),
    ("velocity_scale_sensitivity", set_(velocity_fn="model"), TypeError, r"^velocity_fn: expected a callable"),
    ("velocity_scale_sensitivity", set_(reward_fn=None), TypeError, r"^reward_fn: expected a callable"),
    ("flow_timesteps", set_(device="nope"), ValueError, r"^device: expected a torch device such as 'cpu'"),
    # a (1, ...) velocity would broadcast over the batch under the diagnostic's (1 + α) scaling
    (
        "velocity_scale_sensitivity",
        set_(velocity_fn=lambda x, t: -x[:1]),
        ValueError,
        r"^velocity_fn: expected a velocity of x's shape \(4, 3, 4, 4\), got \(1, 3, 4, 4\) at step 0",
    ),
    # the reward in the sensitivity diagnostic
    (
        "velocity_scale_sensitivity",
        set_(reward_fn=lambda x: x.flatten(1).sum(1).detach()),
        ValueError,
        r"^reward_fn: expected rewards differentiable in x",
    ),
    (
        "velocity_scale_sensitivity",
        set_(reward_fn=lambda x: x.flatten(1).sum(1) * NAN),
        ValueError,
        r"^reward_fn: expected finite",
    ),
    ("velocity_scale_sensitivity", set_(reward_fn=lambda x: x.sum()), ValueError, r"^reward_fn: expected \(B,\)"),
]


def row_id(row):
    return f"{row[0]}-{row[3][1:].split(':')[0]}-{BAD.index(row)}"


@pytest.mark.parametrize("fn", sorted({row[0] for row in BAD} | {"dpo_loss"}))
def test_the_unmodified_call_is_valid(fn):
    getattr(ng, fn)(**valid(fn))


@pytest.mark.parametrize("fn, modify, error, message", BAD, ids=[row_id(r) for r in BAD])
def test_bad_input_fails_loudly_naming_the_argument(fn, modify, error, message):
    with pytest.raises(error, match=message):
        getattr(ng, fn)(**modify(valid(fn)))


# --------------------------------------------------------------------------------------------------
# edge inputs where the fix is the right answer: (function, modifier, oracle(result, kwargs))


def bf16_profile(kw):
    ratio = torch.full((4096,), 1.05, dtype=torch.bfloat16)  # one bin holds all 4096 values
    return {"ratio": ratio, "t": torch.full((4096,), 0.5), "num_bins": 2}


def check_bf16_profile(out, kw):
    means, counts = out
    assert counts.tolist() == [0, 4096] and means.dtype == torch.float32
    assert means[1].item() == kw["ratio"][0].float().item()  # 1.046875, the bf16 value; was 0.125


def fp16_rescale(kw):
    v = torch.full((2, 64), 1e-5, dtype=torch.float16)  # norm 8e-5
    v_ref = torch.full((2, 64), 1.0, dtype=torch.float16)  # norm 8: the scale 1e5 overflows fp16
    return {"v": v, "v_ref": v_ref}


def check_fp16_rescale(out, kw):
    expected = ng.rescale_to_reference(kw["v"].float(), kw["v_ref"].float())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, rtol=1e-3, atol=0)


def plain_awm_policy_float64(kw):
    """The plain formula mean_B max(-A'ρ, -A'·clip(ρ)) in float64, where exp(400) is finite."""
    d = {k: kw[k].double() for k in ("v", "v_old", "target", "t", "advantages")}
    err = ((d["v"] - d["target"]) ** 2).mean((1, 2, 3))
    err_old = ((d["v_old"] - d["target"]) ** 2).mean((1, 2, 3))
    ratio = torch.exp(err_old - err)  # uniform weighting: log p~ = -err
    a = d["advantages"].clamp(-5, 5) / 5
    return torch.maximum(-a * ratio, -a * ratio.clamp(0.0, 2.0)).mean()


def check_awm_gap(out, kw):
    loss, stats = out
    kl = ((kw["v"] - kw["v_ref"]) ** 2).mean((1, 2, 3)).mean()
    assert torch.isfinite(loss) and stats["ratio"].item() == math.inf  # ρ = e^400 really is Inf
    assert loss.item() == pytest.approx((plain_awm_policy_float64(kw) + 1e-4 * kl).item(), rel=1e-6)
    v = kw["v"].clone().requires_grad_(True)  # the clip is active: only the KL term has a gradient
    (grad,) = torch.autograd.grad(ng.awm_loss(**{**kw, "v": v})[0], v)
    (expected,) = torch.autograd.grad(1e-4 * ((v - kw["v_ref"]) ** 2).mean((1, 2, 3)).mean(), v)
    torch.testing.assert_close(grad, expected)


def check_awm_at_a_finite_gap(out, kw):
    """Below the cap nothing changes: the same value as the plain formula, to float32 rounding."""
    loss, _ = out
    kl = ((kw["v"] - kw["v_ref"]) ** 2).mean((1, 2, 3)).mean()
    assert loss.item() == pytest.approx((plain_awm_policy_float64(kw) + 1e-4 * kl).item(), rel=1e-5)


def constant_groups(kw):
    return {"rewards": torch.full((48,), 0.7), "group_size": 24}  # float32 mean of 24 x 0.7 rounds


def check_exact_zero(out, kw):
    assert out.dtype == torch.float32 and torch.count_nonzero(out) == 0


def mixed(**dtypes):
    return lambda kw: {**kw, **{k: kw[k].to(d) for k, d in dtypes.items()}}


def dtype_is(dtype, pick=lambda out: out):
    def check(out, kw):
        assert pick(out).dtype == dtype

    return check


def all_float32(out, kw):
    loss, stats = out
    assert loss.dtype == torch.float32 and all(s.dtype == torch.float32 for s in stats.values())


def extreme_shift(shift):
    return set_(num_steps=8, shift=shift)


def check_grid(out, kw):
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out[0].item() == 1.0 and out[-1].item() == 0.0 and ((out >= 0) & (out <= 1)).all()
    assert (out[1:] <= out[:-1]).all()


def video_tokens(kw):
    return {"v": rand(2, 3, 5, 4, 4), "granularity": "token"}  # (B, C, F, H, W)


def check_video_tokens(out, kw):
    expected = kw["v"].movedim(1, -1).reshape(2, -1, 3).norm(dim=-1)  # over C, per (f, h, w)
    torch.testing.assert_close(out, expected)


def check_sensitivity_in_inference_mode(out, kw):
    with torch.inference_mode():
        grad, stats = ng.velocity_scale_sensitivity(**kw)
    torch.testing.assert_close(grad, out[0])
    torch.testing.assert_close(stats["total_mean"], out[1]["total_mean"])


def check_forward_process_int_free(out, kw):
    x_t, u = out
    assert x_t.dtype == u.dtype == torch.float32
    torch.testing.assert_close(u, kw["noise"].float() - kw["x0"])


def mixed_bf16_forward_process(kw):
    return {**kw, "x0": kw["x0"].bfloat16()}  # noise stays float32: the case that was 1.3 % off


def one_bf16_rounding_of_the_float64_answer(out, kw):
    """Computed in float32 and rounded once to bf16: within one bf16 ulp (2^-8 relative) of the float64 answer,
    entry by entry, u included (noise - x0 cancels; rounding noise to bf16 first cost 1.3 %)."""
    x0, noise, t = kw["x0"].double(), kw["noise"].double(), kw["t"].double()[:, None, None, None]
    for got, exact in zip(out, ((1 - t) * x0 + t * noise, noise - x0)):
        assert got.dtype == torch.bfloat16
        assert ((got.double() - exact).abs() <= 2**-8 * exact.abs()).all()


def bf16_euler(kw):
    return {**kw, "noise": kw["noise"].bfloat16(), "velocity_fn": lambda x, t: -x * (1 + t[:, None, None, None])}


def euler_steps_in_float32_rounded_to_bf16(out, kw):
    x, grid = kw["noise"], kw["timesteps"]
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        v = kw["velocity_fn"](x, t_cur.expand(B).to(x.dtype))
        x = (x.float() + (t_next - t_cur) * v.float()).bfloat16()
    assert out.dtype == torch.bfloat16 and torch.equal(out, x)


def check_elbo_at_the_smallest_normal(out, kw):
    t = kw["t"].double()
    expected = 1 / (2 * 0.49 * t / (1 - t.clamp(max=0.99)))  # 8.7e37 at t = 1.2e-38: finite in float32
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=0)


def check_ones(out, kw):
    assert torch.equal(out, torch.ones(B))


RIGHT = [
    ("norm_ratio_profile", bf16_profile, check_bf16_profile),
    ("rescale_to_reference", fp16_rescale, check_fp16_rescale),
    ("awm_loss", awm_gap(2.0), check_awm_gap),  # A > 0: the clip makes the term constant
    ("awm_loss", awm_gap(0.0), check_awm_gap),  # A = 0: was 0·inf = NaN
    ("awm_loss", lambda kw: {**kw, "weighting": "uniform"}, check_awm_at_a_finite_gap),
    ("group_advantages", constant_groups, check_exact_zero),
    ("group_advantages", lambda kw: {**constant_groups(kw), "std_scope": "group"}, check_exact_zero),
    ("flow_timesteps", extreme_shift(1e-30), check_grid),
    ("flow_timesteps", extreme_shift(1e39), check_grid),  # s·t overflowed float32: NaN
    ("flow_timesteps", extreme_shift(5e-324), check_grid),
    ("flow_timesteps", extreme_shift(1.7e308), check_grid),
    ("flow_timesteps", extreme_shift(0.2), check_grid),  # t_0 came out 1 + 1.2e-7
    ("flow_timesteps", extreme_shift(0.01), check_grid),  # t_0 came out 1 + 9.5e-7
    ("velocity_norm", video_tokens, check_video_tokens),
    ("velocity_scale_sensitivity", lambda kw: kw, check_sensitivity_in_inference_mode),
    # the dtype rule: the first tensor argument sets it, the others are cast
    ("norm_ratio", mixed(v_ref=torch.float64), dtype_is(torch.float32)),
    ("norm_ratio", mixed(v=torch.float64), dtype_is(torch.float64)),
    ("normguard_penalty", mixed(v_ref=torch.float64), all_float32),
    ("awm_loss", mixed(v_old=torch.float64, v_ref=torch.float64), all_float32),
    ("nft_loss", mixed(x0=torch.float64, advantages=torch.float64), all_float32),
    ("dpo_loss", mixed(v_ref_w=torch.float64, target_l=torch.float64), all_float32),
    ("forward_process", mixed(noise=torch.float64), check_forward_process_int_free),
    ("rescale_to_reference", mixed(v=torch.bfloat16, v_ref=torch.float64), dtype_is(torch.bfloat16)),
    ("awm_time_weight", mixed(t=torch.float64), dtype_is(torch.float32)),
    ("awm_kl_weight", mixed(t=torch.float64), dtype_is(torch.float64)),
    ("awm_kl_weight", set_(kl_weighting="uniform", t=torch.zeros(B)), check_ones),  # t = 0 is fine uniform
    ("group_advantages", mixed(rewards=torch.float64), dtype_is(torch.float64)),
    ("euler_sample", set_(velocity_fn=lambda x, t: -x.double()), dtype_is(torch.float32)),
    ("forward_process", mixed_bf16_forward_process, one_bf16_rounding_of_the_float64_answer),
    ("euler_sample", bf16_euler, euler_steps_in_float32_rounded_to_bf16),
    ("awm_kl_weight", poke("t", torch.finfo(torch.float32).tiny), check_elbo_at_the_smallest_normal),
    ("norm_ratio_profile", mixed(ratio=torch.bfloat16), dtype_is(torch.float32, lambda out: out[0])),
]


@pytest.mark.parametrize("fn, modify, check", RIGHT, ids=[f"{r[0]}-{i}" for i, r in enumerate(RIGHT)])
def test_edge_input_gets_the_right_answer(fn, modify, check):
    kwargs = modify(valid(fn))
    check(getattr(ng, fn)(**kwargs), kwargs)


# --------------------------------------------------------------------------------------------------
# the checks stay on the hot path's budget: one host sync per loss call


def awm_options(kw):
    """sum_first over 2 timesteps per sample (each sample's advantage on both rows), ELBO KL weights."""
    adv = kw["advantages"][:2].repeat(2)
    return {**kw, "advantages": adv, "loss_type": "sum_first", "timesteps_per_sample": 2, "kl_weighting": "elbo"}


@pytest.mark.parametrize(
    "fn, modify",
    [(fn, lambda kw: kw) for fn in ("normguard_penalty", "nft_loss", "awm_loss", "dpo_loss")]
    + [("awm_loss", awm_options)],
)
def test_a_loss_call_syncs_with_the_host_once(fn, modify, host_syncs):
    """Every way a value reaches Python (bool, item, tolist, float) is counted during one call."""
    getattr(ng, fn)(**modify(valid(fn)))
    assert host_syncs == ["__bool__"]
