"""Oracles for normguard.py: closed forms, float64 per-sample loops written from the official formulas
of each base loss, finite differences, and the diffusers scheduler for the convention."""

import ast
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import normguard as ng

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(6, 5), (6, 3, 4, 4), (6, 7, 3)]  # (B, D), (B, C, H, W), (B, N, D)


def rand(shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def batch(shape, seed=0):
    """Velocities, clean samples, noise, times and advantages for one random batch in float64."""
    B = shape[0]
    x0, noise = rand(shape, seed), rand(shape, seed + 1)
    t = torch.rand(B, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64) * 0.9 + 0.05
    x_t, u = ng.forward_process(x0, noise, t)
    return dict(
        v=u + 0.3 * rand(shape, seed + 3),
        v_old=u + 0.3 * rand(shape, seed + 4),
        v_ref=u + 0.3 * rand(shape, seed + 5),
        x0=x0,
        noise=noise,
        t=t,
        x_t=x_t,
        u=u,
        adv=rand((B,), seed + 6) * 3,
    )


# ---------------------------------------------------------------------------------------------------------------
# the convention


def test_forward_process_endpoints_and_target_is_the_time_derivative():
    x0, noise = rand((3, 4), 0), rand((3, 4), 1)
    x_0, u = ng.forward_process(x0, noise, torch.zeros(3, dtype=torch.float64))
    x_1, _ = ng.forward_process(x0, noise, torch.ones(3, dtype=torch.float64))
    assert torch.equal(x_0, x0) and torch.equal(x_1, noise) and torch.equal(u, noise - x0)
    h, t = 1e-6, torch.full((3,), 0.4, dtype=torch.float64)
    derivative = (ng.forward_process(x0, noise, t + h)[0] - ng.forward_process(x0, noise, t - h)[0]) / (2 * h)
    torch.testing.assert_close(derivative, u)


def test_convention_matches_diffusers_flow_match_scheduler():
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    steps, shift = 8, 3.0
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))  # what the SD3 pipeline passes
    grid = ng.flow_timesteps(steps, shift)
    torch.testing.assert_close(grid, scheduler.sigmas.float())
    torch.testing.assert_close(scheduler.timesteps, ng.TIMESTEP_SCALE * grid[:-1])
    x0, noise, v = rand((2, 4, 3, 3), 0).float(), rand((2, 4, 3, 3), 1).float(), rand((2, 4, 3, 3), 2).float()
    x_t, _ = ng.forward_process(x0, noise, grid[2].expand(2))
    torch.testing.assert_close(x_t, scheduler.scale_noise(x0, scheduler.timesteps[2:3], noise))
    ours = ng.euler_sample(lambda x, t: v, x_t, grid[2:4])
    scheduler._step_index = 2
    theirs = scheduler.step(v, scheduler.timesteps[2], x_t).prev_sample
    torch.testing.assert_close(ours, theirs)


def test_euler_with_the_true_straight_path_velocity_lands_on_x0():
    x0, noise = rand((4, 2), 0), rand((4, 2), 1)
    x, states, velocities = ng.euler_sample(
        lambda x, t: noise - x0, noise, ng.flow_timesteps(5, 3.0).double(), return_trajectory=True
    )
    torch.testing.assert_close(x, x0)
    assert states.shape == velocities.shape == (5, 4, 2) and torch.equal(states[0], noise)


# ---------------------------------------------------------------------------------------------------------------
# the hinge


def test_hinge_closed_forms_for_every_option():
    v = torch.tensor([[3.0, 4.0], [1.0, 0.0]], requires_grad=True)  # norms 5, 1
    v_ref = torch.tensor([[0.0, 4.0], [0.0, 2.0]])  # norms 4, 2: only sample 0 is active
    cases = {  # (margin, power, tolerance) -> expected mean over the batch
        ("relative", 2, 0.0): 0.25**2 / 2,
        ("relative", 1, 0.0): 0.25 / 2,
        ("absolute", 2, 0.0): 1.0 / 2,
        ("absolute", 1, 0.0): 1.0 / 2,
        ("relative", 2, 0.1): 0.15**2 / 2,
        ("absolute", 1, 0.5): 0.5 / 2,
        ("relative", 1, 0.3): 0.0,
    }
    for (margin, power, tolerance), expected in cases.items():
        penalty, stats = ng.normguard_penalty(v, v_ref, lam=3.0, margin=margin, power=power, tolerance=tolerance)
        assert penalty.item() == pytest.approx(3.0 * expected), (margin, power, tolerance)
        assert stats["hinge"].item() == pytest.approx(expected)
        assert stats["active_frac"].item() == (0.5 if expected > 0 else 0.0)
        assert stats["norm_ratio"].item() == pytest.approx((5 / 4 + 1 / 2) / 2)


def test_token_hinge_takes_norms_over_the_channel_dim():
    v, v_ref = rand((2, 3, 4, 5), 0), rand((2, 3, 4, 5), 1)  # (B, C, H, W): channels are dim 1
    penalty, _ = ng.normguard_penalty(v, v_ref, granularity="token", margin="absolute", power=1)
    pixels = [(b, i, j) for b in range(2) for i in range(4) for j in range(5)]
    expected = [max(v[b, :, i, j].norm() - v_ref[b, :, i, j].norm(), 0) for b, i, j in pixels]
    assert penalty.item() == pytest.approx(sum(expected) / len(expected))
    v, v_ref = rand((2, 6, 3), 2), rand((2, 6, 3), 3)  # (B, N, D): channels are the last dim
    penalty, _ = ng.normguard_penalty(v, v_ref, granularity="token")
    expected = [max(v[b, n].norm() / v_ref[b, n].norm() - 1, 0) ** 2 for b in range(2) for n in range(6)]
    assert penalty.item() == pytest.approx(sum(expected) / len(expected))


@pytest.mark.parametrize("margin", ["relative", "absolute"])
@pytest.mark.parametrize("power", [1, 2])
def test_hinge_is_zero_with_zero_gradient_below_the_reference(margin, power):
    v_ref = rand((5, 3, 2, 2), 0)
    v = (0.9 * v_ref.clone()).requires_grad_(True)  # every norm 10% below the reference
    penalty, stats = ng.normguard_penalty(v, v_ref, margin=margin, power=power)
    penalty.backward()
    assert penalty.item() == 0 and stats["active_frac"].item() == 0
    assert torch.count_nonzero(v.grad) == 0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("margin", ["relative", "absolute"])
def test_hinge_gradient_is_parallel_to_v_and_never_reaches_v_ref(shape, margin):
    v_ref = rand(shape, 0).requires_grad_(True)
    v = (1.2 * rand(shape, 1)).requires_grad_(True)
    penalty, stats = ng.normguard_penalty(v, v_ref, margin=margin)
    penalty.backward()
    assert v_ref.grad is None
    active = ng.norm_ratio(v, v_ref) > 1
    assert 0 < stats["active_frac"].item() == pytest.approx(active.double().mean().item())
    for b in range(shape[0]):
        g, direction = v.grad[b].flatten(), v[b].detach().flatten()
        if active[b]:
            cos = torch.dot(g, direction) / (g.norm() * direction.norm())
            assert cos.item() == pytest.approx(1.0, abs=1e-12)  # shrinks the magnitude, keeps the direction
        else:
            assert torch.count_nonzero(g) == 0


@pytest.mark.parametrize("margin", ["relative", "absolute"])
@pytest.mark.parametrize("granularity", ["sample", "token"])
def test_hinge_gradcheck_float64(margin, granularity):
    v_ref = rand((3, 4, 5), 0)
    v = v_ref * torch.tensor([1.3, 0.6, 1.1], dtype=torch.float64)[:, None, None] + 0.05 * rand((3, 4, 5), 1)
    v.requires_grad_(True)
    torch.autograd.gradcheck(
        lambda x: ng.normguard_penalty(x, v_ref, margin=margin, granularity=granularity, power=2)[0], (v,)
    )


def test_relative_hinge_with_a_zero_reference_norm_stays_finite():
    v = rand((2, 3), 0).requires_grad_(True)
    penalty, stats = ng.normguard_penalty(v, torch.zeros(2, 3, dtype=torch.float64))
    penalty.backward()
    assert math.isfinite(penalty.item()) and torch.isfinite(v.grad).all() and math.isfinite(stats["norm_ratio"].item())


def test_hinge_composes_additively_with_a_base_loss():
    d = batch((6, 5))
    v = d["v"].clone().requires_grad_(True)
    base, _ = ng.awm_loss(v, d["v_old"], d["v_ref"], d["u"], d["t"], d["adv"])
    penalty, _ = ng.normguard_penalty(v, d["v_ref"], lam=0.5)
    (grad_sum,) = torch.autograd.grad(base + penalty, v, retain_graph=True)
    (grad_base,) = torch.autograd.grad(base, v, retain_graph=True)
    (grad_pen,) = torch.autograd.grad(penalty, v)
    torch.testing.assert_close(grad_sum, grad_base + grad_pen)


# ---------------------------------------------------------------------------------------------------------------
# the base losses against float64 per-sample loops written from the formulas


def nft_reference(d, beta, adv_clip, kl_weight):
    total, B = 0.0, d["v"].shape[0]
    kl = 0.0
    for i in range(B):
        v, v_old, v_ref, x_t, x0, t = (d[k][i] for k in ("v", "v_old", "v_ref", "x_t", "x0", "t"))
        a = min(max(d["adv"][i].item(), -adv_clip), adv_clip)
        p = min(max(a / adv_clip / 2 + 0.5, 0.0), 1.0)
        terms = []
        for v_implicit in (beta * v + (1 - beta) * v_old, (1 + beta) * v_old - beta * v):
            err = x_t - t * v_implicit - x0
            weight = max(err.abs().sum().item() / err.numel(), 1e-5)
            terms.append((err**2).sum() / err.numel() / weight)
        total = total + adv_clip * (p * terms[0] + (1 - p) * terms[1]) / beta
        kl = kl + ((v - v_ref) ** 2).sum() / v.numel()
    return total / B + kl_weight * kl / B


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_nft_loss_matches_the_per_sample_loop(shape, beta):
    d = batch(shape)
    loss, stats = ng.nft_loss(
        d["v"], d["v_old"], d["v_ref"], d["x_t"], d["x0"], d["t"], d["adv"], beta=beta, kl_weight=1e-2
    )
    assert loss.item() == pytest.approx(nft_reference(d, beta, 5.0, 1e-2).item(), rel=1e-12)
    assert stats["norm_ratio"].item() == pytest.approx(ng.norm_ratio(d["v"], d["v_ref"]).mean().item())


def awm_weight_reference(err, t, weighting, p=0.25):
    return {
        "uniform": err,
        "t": t * err,
        "t2": t * t * err,
        "huber": t * ((err + 1e-10) ** 0.5 - 1e-5),
        "ghuber": t / p * ((err + 1e-10) ** p - 1e-10**p),
    }[weighting]


def awm_reference(d, v, weighting, clip_range, adv_clip, ref_weight, ema_weight, v_ema):
    B, total = v.shape[0], 0.0
    for i in range(B):
        t = d["t"][i].item()
        err = ((v[i] - d["u"][i]) ** 2).mean()
        err_old = ((d["v_old"][i] - d["u"][i]) ** 2).mean().item()
        ratio = torch.exp(-awm_weight_reference(err, t, weighting) + awm_weight_reference(err_old, t, weighting))
        a = min(max(d["adv"][i].item(), -adv_clip), adv_clip) / adv_clip
        total = total + torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_range, 1 + clip_range))
        total = total + ref_weight * ((v[i] - d["v_ref"][i]) ** 2).mean() + ema_weight * ((v[i] - v_ema[i]) ** 2).mean()
    return total / B


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weighting", ["uniform", "t", "t2", "huber", "ghuber"])
def test_awm_loss_matches_the_per_sample_loop(shape, weighting):
    d = batch(shape)
    v_ema = d["u"] + 0.2 * rand(shape, 9)
    loss, _ = ng.awm_loss(
        d["v"],
        d["v_old"],
        d["v_ref"],
        d["u"],
        d["t"],
        d["adv"],
        weighting=weighting,
        clip_range=0.2,
        ref_weight=1e-2,
        v_ema=v_ema,
        ema_weight=0.5,
    )
    expected = awm_reference(d, d["v"], weighting, 0.2, 5.0, 1e-2, 0.5, v_ema)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)


@pytest.mark.parametrize("weighting", ["uniform", "ghuber"])
def test_awm_policy_gradient_at_ratio_one_is_advantage_weighted_matching(weighting):
    d = batch((6, 3, 4, 4))
    v = d["v"].clone().requires_grad_(True)
    loss, stats = ng.awm_loss(v, v.detach(), d["v_ref"], d["u"], d["t"], d["adv"], weighting=weighting, ref_weight=0.0)
    (grad,) = torch.autograd.grad(loss, v)
    assert stats["ratio"].item() == 1.0
    errors = ((v - d["u"]) ** 2).mean(dim=(1, 2, 3))
    weighted = (d["adv"].clamp(-5, 5) / 5 * ng.awm_time_weight(errors, d["t"], weighting)).mean()
    (expected,) = torch.autograd.grad(weighted, v)
    torch.testing.assert_close(grad, expected)


def elbo_weight_reference(t):
    """1 / (2·σ_t²), σ_t = 0.7·sqrt(t / (1 - min(t, 0.99))), for a Python float t."""
    sigma = 0.7 * math.sqrt(t / (1 - min(t, 0.99)))
    return 1 / (2 * sigma**2)


def test_awm_kl_weight_closed_forms():
    t = torch.tensor([0.5, 1.0, 0.995, 0.1, 0.0], dtype=torch.float64)
    # σ² = 0.49·t / (1 - min(t, 0.99)): 0.49, 49, 0.49·0.995/0.01 = 48.755, 0.49/9; uniform: 1 even at t = 0
    expected = torch.tensor([1 / 0.98, 1 / 98, 1 / 97.51, 9 / 0.98], dtype=torch.float64)
    torch.testing.assert_close(ng.awm_kl_weight(t[:4], "elbo"), expected, rtol=1e-14, atol=0)
    assert torch.equal(ng.awm_kl_weight(t), torch.ones(5, dtype=torch.float64))


def awm_sum_first_reference(d, v, T, weighting, clip_range, adv_clip, ref_weight, kl_weighting, ema_weight, v_ema):
    """The official sum_first loss written per sample: rows j·N + i hold sample i at its j-th timestep."""
    B = v.shape[0]
    N, policy, kl = B // T, 0.0, 0.0
    for i in range(N):
        gaps = []
        for j in range(T):
            r = j * N + i
            t = d["t"][r].item()
            err, err_old = ((v[r] - d["u"][r]) ** 2).mean(), ((d["v_old"][r] - d["u"][r]) ** 2).mean().item()
            gaps.append(-awm_weight_reference(err, t, weighting) + awm_weight_reference(err_old, t, weighting))
        ratio = torch.exp(sum(gaps) / T)
        a = min(max(d["adv"][i].item(), -adv_clip), adv_clip) / adv_clip
        policy = policy + torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_range, 1 + clip_range))
    for r in range(B):
        k = elbo_weight_reference(d["t"][r].item()) if kl_weighting == "elbo" else 1.0
        kl = kl + k * (ref_weight * ((v[r] - d["v_ref"][r]) ** 2).mean() + ema_weight * ((v[r] - v_ema[r]) ** 2).mean())
    return policy / N + kl / B


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kl_weighting", ["uniform", "elbo"])
@pytest.mark.parametrize("T", [1, 3])
def test_awm_sum_first_and_elbo_match_the_per_sample_loop(shape, kl_weighting, T):
    d = batch(shape)
    d["adv"] = d["adv"][: shape[0] // T].repeat(T)  # each sample's advantage on each of its T rows
    v_ema = d["u"] + 0.2 * rand(shape, 9)
    kw = dict(clip_range=0.2, ref_weight=1e-2, v_ema=v_ema, ema_weight=0.5, kl_weighting=kl_weighting)
    loss, stats = ng.awm_loss(
        d["v"], d["v_old"], d["v_ref"], d["u"], d["t"], d["adv"], loss_type="sum_first", timesteps_per_sample=T, **kw
    )
    expected = awm_sum_first_reference(d, d["v"], T, "ghuber", 0.2, 5.0, 1e-2, kl_weighting, 0.5, v_ema)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    exp_first, _ = ng.awm_loss(d["v"], d["v_old"], d["v_ref"], d["u"], d["t"], d["adv"], **kw)
    if T == 1:  # one row per sample: the two orders are the same loss
        assert loss.item() == exp_first.item()
    else:  # the KL terms are the same; the policy terms are not
        assert loss.item() != pytest.approx(exp_first.item(), rel=1e-6)


def test_awm_sum_first_gradient_at_ratio_one_equals_exp_firsts():
    d = batch((6, 3, 4, 4))
    d["adv"] = d["adv"][:3].repeat(2)
    v = d["v"].clone().requires_grad_(True)
    grads = []
    for loss_type in ("exp_first", "sum_first"):
        loss, stats = ng.awm_loss(
            v, v.detach(), d["v_ref"], d["u"], d["t"], d["adv"], loss_type=loss_type, timesteps_per_sample=2
        )
        grads.append(torch.autograd.grad(loss, v)[0])
        assert stats["ratio"].item() == 1.0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-15)


def test_awm_ema_term_is_on_with_weight_one_when_v_ema_is_given():
    """ema_weight defaults to 1 (every official config); without v_ema there is no EMA term."""
    d = batch((6, 5))
    v_ema = d["u"] + 0.2 * rand((6, 5), 9)
    args = (d["v"], d["v_old"], d["v_ref"], d["u"], d["t"], d["adv"])
    with_default, stats = ng.awm_loss(*args, v_ema=v_ema)
    assert with_default.item() == ng.awm_loss(*args, v_ema=v_ema, ema_weight=1.0)[0].item()
    without = ng.awm_loss(*args)[0]
    assert with_default.item() == pytest.approx(without.item() + stats["kl_ema"].item(), rel=1e-12)
    assert stats["kl_ema"] > 0 and ng.awm_loss(*args)[1]["kl_ema"] == 0


def dpo_reference(v_w, v_l, r_w, r_l, u_w, u_l, beta):
    total = 0.0
    for i in range(v_w.shape[0]):

        def err(a, b, i=i):
            return ((a[i] - b[i]) ** 2).mean()

        z = -beta / 2 * ((err(v_w, u_w) - err(r_w, u_w)) - (err(v_l, u_l) - err(r_l, u_l)))
        total = total + math.log1p(math.exp(-z.item()))
    return total / v_w.shape[0]


@pytest.mark.parametrize("shape", SHAPES)
def test_dpo_loss_matches_the_per_sample_loop_and_the_swap_symmetry(shape):
    d, e = batch(shape, 0), batch(shape, 10)
    args = (d["v"], e["v"], d["v_ref"], e["v_ref"], d["u"], e["u"])
    loss, stats = ng.dpo_loss(*args, beta=20.0)
    assert loss.item() == pytest.approx(dpo_reference(*args, 20.0), rel=1e-10)
    swapped, _ = ng.dpo_loss(e["v"], d["v"], e["v_ref"], d["v_ref"], e["u"], d["u"], beta=-20.0)
    assert swapped.item() == pytest.approx(loss.item(), rel=1e-12)
    assert 0 <= stats["accuracy"].item() <= 1


def test_group_advantages_against_a_loop_and_constant_groups():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0], dtype=torch.float64)
    adv = ng.group_advantages(rewards, 3)
    std = rewards.std(unbiased=False).item()
    expected = [(1 - 2) / (std + 1e-4), 0.0, (3 - 2) / (std + 1e-4), 0.0, 0.0, 0.0]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float64))
    per_group = ng.group_advantages(rewards, 3, std_scope="group")
    assert per_group[0].item() == pytest.approx(-1 / (math.sqrt(2 / 3) + 1e-4))
    assert torch.count_nonzero(per_group[3:]) == 0
    assert torch.count_nonzero(ng.group_advantages(torch.full((8,), 0.7), 4)) == 0


# ---------------------------------------------------------------------------------------------------------------
# precision: low-precision inputs give the float32 result of the same values


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_reduce_in_float32(dtype):
    d = batch((4, 16, 32, 32))
    d["v_big"] = 1.1 * d["v"]
    d = {k: (x.to(dtype) if x.ndim > 1 else x.float()) for k, x in d.items()}
    full = {k: x.float() for k, x in d.items()}
    for fn in (
        lambda d: ng.normguard_penalty(d["v_big"], d["v_ref"]),
        lambda d: ng.nft_loss(d["v"], d["v_old"], d["v_ref"], d["x_t"], d["x0"], d["t"], d["adv"]),
        lambda d: ng.awm_loss(d["v"], d["v_old"], d["v_ref"], d["u"], d["t"], d["adv"]),
        lambda d: ng.dpo_loss(d["v"], d["v_old"], d["v_ref"], d["v_ref"], d["u"], d["u"], beta=50.0),
    ):
        low, low_stats = fn(d)
        high, _ = fn(full)
        assert low.dtype == torch.float32 and all(s.dtype == torch.float32 for s in low_stats.values())
        torch.testing.assert_close(low, high, rtol=1e-5, atol=1e-6)
    assert ng.velocity_norm(d["v"]).dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------
# monitor, rescale, adjoint


def test_norm_ratio_profile_bins_by_t_and_marks_empty_bins():
    ratio = torch.tensor([1.0, 2.0, 3.0, 4.0])
    means, counts = ng.norm_ratio_profile(ratio, torch.tensor([0.05, 0.1, 0.95, 1.0]), num_bins=4)
    assert counts.tolist() == [2, 0, 0, 2]
    assert means[0].item() == 1.5 and means[3].item() == 3.5 and means[1:3].isnan().all()


def test_rescale_to_reference_matches_norms_and_keeps_direction():
    v, v_ref = rand((3, 2, 4), 0), rand((3, 2, 4), 1)
    out = ng.rescale_to_reference(v, v_ref)
    torch.testing.assert_close(ng.velocity_norm(out), ng.velocity_norm(v_ref))
    torch.testing.assert_close(out / ng.velocity_norm(out)[:, None, None], v / ng.velocity_norm(v)[:, None, None])


def test_adjoint_sensitivity_matches_finite_differences_on_a_linear_model():
    A = torch.tensor([[-0.8, 0.3], [0.2, -1.1]], dtype=torch.float64)

    def velocity(x, t):
        return x @ A.T + t[:, None] * torch.tensor([0.5, -0.2], dtype=torch.float64)

    def reward(x):
        return torch.sin(x[:, 0]) + x[:, 1] ** 2

    noise, grid = rand((4, 2), 0), ng.flow_timesteps(5, 2.0).double()
    grad, stats = ng.velocity_scale_sensitivity(velocity, reward, noise, grid)

    def reward_with(alpha):
        x = noise
        for k in range(5):
            x = x + (grid[k + 1] - grid[k]) * (1 + alpha[:, k : k + 1]) * velocity(x, grid[k].expand(4))
        return reward(x)

    h = 1e-6
    for k in range(5):
        bump = torch.zeros(4, 5, dtype=torch.float64)
        bump[:, k] = h
        finite_difference = (reward_with(bump) - reward_with(-bump)) / (2 * h)
        torch.testing.assert_close(grad[:, k], finite_difference, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(stats["mean"], grad.mean(0))
    torch.testing.assert_close(stats["total_mean"], grad.sum(1).mean())


# ---------------------------------------------------------------------------------------------------------------
# packaging and bad input


def test_core_imports_only_torch_and_stdlib_and_works_copied_alone(tmp_path):
    tree = ast.parse((ROOT / "normguard.py").read_text())
    top_level = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    top_level |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert top_level - set(sys.stdlib_module_names) == {"torch"}
    shutil.copy(ROOT / "normguard.py", tmp_path / "normguard.py")
    blocked = [
        "diffusers",
        "transformers",
        "peft",
        "accelerate",
        "tqdm",
        "matplotlib",
        "sklearn",
        "torchvision",
        "safetensors",
        "huggingface_hub",
        "PIL",
        "scipy",
    ]
    script = (
        "import sys\n"
        f"class Block:\n    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {blocked!r}: raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, normguard as ng\n"
        "v = torch.randn(2, 3, requires_grad=True)\n"
        "p, s = ng.normguard_penalty(v * 2, v.detach())\n"
        "p.backward()\n"
        "print('ok', round(s['norm_ratio'].item(), 6))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", "2.0"]


def test_core_keeps_to_100_columns_and_imports_only_torch_and_stdlib():
    source = (ROOT / "normguard.py").read_text()
    too_long = [(i, len(line)) for i, line in enumerate(source.splitlines(), 1) if len(line) > 100]
    assert too_long == [], f"(line, columns) over 100: {too_long}"
    tree = ast.parse(source)
    imported = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert imported - set(sys.stdlib_module_names) == {"torch"}


def test_bad_inputs_raise_value_errors_that_name_the_argument():
    d = batch((4, 3))
    nan = d["v"].clone()
    nan[1, 2] = float("nan")
    inf = d["v_ref"].clone()
    inf[0, 0] = float("inf")
    cases = [
        (lambda: ng.normguard_penalty(d["v"], d["v_ref"][:, :2]), "v_ref"),
        (lambda: ng.normguard_penalty(nan, d["v_ref"]), "v"),
        (lambda: ng.normguard_penalty(d["v"], inf), "v_ref"),
        (lambda: ng.normguard_penalty(d["v"][:0], d["v_ref"][:0]), "v"),
        (lambda: ng.normguard_penalty(d["v"], d["v_ref"], lam=-0.1), "lam"),
        (lambda: ng.normguard_penalty(d["v"], d["v_ref"], power=3), "power"),
        (lambda: ng.normguard_penalty(d["v"], d["v_ref"], margin="ratio"), "margin"),
        (lambda: ng.normguard_penalty(d["v"], d["v_ref"], granularity="patch"), "granularity"),
        (lambda: ng.group_advantages(torch.randn(10), 4), "group_size"),
        (lambda: ng.group_advantages(torch.randn(2, 4), 2), "rewards"),
        (lambda: ng.nft_loss(d["v"], d["v_old"], d["v_ref"], d["x_t"], d["x0"], d["t"], d["adv"][:3]), "advantages"),
        (lambda: ng.nft_loss(d["v"], d["v_old"], d["v_ref"], d["x_t"], d["x0"][:, :2], d["t"], d["adv"]), "x0"),
        (lambda: ng.nft_loss(d["v"], d["v_old"], d["v_ref"], d["x_t"], d["x0"], d["t"], d["adv"], beta=0.0), "beta"),
        (lambda: ng.nft_loss(d["v"], d["v_old"], d["v_ref"], d["x_t"], d["x0"], d["t"] + 1, d["adv"]), "t"),
        (lambda: ng.awm_loss(d["v"], d["v_old"], d["v_ref"], d["u"], d["t"], d["adv"], loss_type="sum"), "loss_type"),
        (lambda: ng.awm_loss(d["v"], d["v_old"], d["v_ref"], d["u"], d["t"], d["adv"], weighting="sqrt"), "weighting"),
        (lambda: ng.dpo_loss(d["v"], d["v"], d["v_ref"], d["v_ref"], d["u"], d["u"], beta=0.0), "beta"),
        (lambda: ng.dpo_loss(d["v"], d["v"][:2], d["v_ref"], d["v_ref"], d["u"], d["u"]), "v_l"),
        (lambda: ng.flow_timesteps(0), "num_steps"),
        (lambda: ng.euler_sample(lambda x, t: x, d["v"], torch.tensor([0.0, 1.0])), "timesteps"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=rf"^{name}:"):
            call()
