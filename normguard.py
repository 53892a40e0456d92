"""NormGuard: a one-sided penalty on velocity-norm inflation in RL post-training of flow-matching models.

Reference implementation of the NormGuard hinge (arXiv 2606.27771) and of the three velocity-local base losses
it is added to: DiffusionNFT (arXiv 2509.16117), Advantage Weighted Matching (AWM, arXiv 2509.25050) and
Diffusion-DPO in velocity form (arXiv 2311.12908). It imports only torch and the standard library, so this one
file can be copied into any trainer.

Convention (diffusers' FlowMatchEulerDiscreteScheduler, SD3/SD3.5/FLUX), used by every function below:
    x_t = (1 - t) * x0 + t * eps,  eps ~ N(0, I),  t in [0, 1],  t = 1 is pure noise
    velocity target u = eps - x0; a diffusers transformer is called with timestep TIMESTEP_SCALE * t
    sampling runs t: 1 -> 0 with Euler steps x <- x + (t_next - t) * v; clean estimate x0_hat = x_t - t * v
Shapes: B is the batch; "..." is any number of non-batch dims: (B, D), (B, C, H, W) latents, (B, N, D) tokens.
Precision: norms, errors and losses are reduced in float32 (float64 inputs stay float64), whatever the input
dtype, and every loss and statistic comes back in that dtype. Statistics are detached 0-dim tensors: calling
.item() on them is the only host sync a training loop needs for logging.
"""
import math

import torch
import torch.nn.functional as F

TIMESTEP_SCALE = 1000.0  # diffusers' SD3/FLUX transformers take timestep = 1000 * t


# --------------------------------------------------------------------------------------------------------------
# input checks: every public function raises ValueError naming the argument and what it expected


def _check(batch, per_sample=None):
    """Types and shapes only (no device sync). batch: name -> (B, ...) tensors of one shape; per_sample: name -> (B,)."""
    per_sample = per_sample or {}
    (ref_name, ref), *rest = batch.items()
    for name, x in {**batch, **per_sample}.items():
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if ref.ndim < 2 or ref.shape[0] == 0:
        raise ValueError(f"{ref_name}: expected shape (B, ...) with B >= 1 and a non-batch dim, got {tuple(ref.shape)}")
    for name, x in rest:
        if x.shape != ref.shape:
            raise ValueError(f"{name}: expected the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")
    for name, x in per_sample.items():
        if x.shape != (ref.shape[0],):
            raise ValueError(f"{name}: expected shape (B,) = ({ref.shape[0]},), got {tuple(x.shape)}")


def _check_values(inputs, derived=None, unit_interval=()):
    """Raise ValueError naming the input that holds NaN/Inf, or a t outside [0, 1]; costs one host sync.

    derived: small per-sample results the caller computes anyway (norms, errors). Sums propagate NaN and Inf, so
    they are finite exactly when the inputs are (barring float32 overflow), and checking them replaces a pass over
    every input; only on failure are the inputs scanned to name the culprit.
    """
    tensors = derived if derived is not None else list(inputs.values())
    flags = [torch.isfinite(x).all() for x in tensors]
    flags += [((inputs[n] >= 0) & (inputs[n] <= 1)).all() for n in unit_interval]
    if bool(torch.stack(flags).all()):
        return
    for name, x in inputs.items():
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name}: expected finite values, got NaN or Inf")
    for name in unit_interval:
        x = inputs[name]
        if not bool(((x >= 0) & (x <= 1)).all()):
            raise ValueError(f"{name}: expected values in [0, 1] (t = 1 is noise), got min {x.min().item():.4g}, "
                             f"max {x.max().item():.4g}")
    raise ValueError(f"{', '.join(inputs)}: finite, but a float32 reduction over them overflowed; rescale them")


def _positive(name, value, allow_zero=False):
    if not (math.isfinite(value) and (value > 0 or (allow_zero and value == 0))):
        raise ValueError(f"{name}: expected a finite number {'>= 0' if allow_zero else '> 0'}, got {value}")


def _choice(name, value, options):
    if value not in options:
        raise ValueError(f"{name}: expected one of {options}, got {value!r}")


def _acc(x):
    """The dtype reductions run in: float64 stays, everything else (bf16, fp16, fp32) becomes float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_sample_mean(x):
    return x.mean(dim=tuple(range(1, x.ndim)))


def _bcast(t, x):
    """(B,) -> (B, 1, ..., 1) so that t multiplies a (B, ...) tensor sample by sample."""
    return t.reshape(-1, *([1] * (x.ndim - 1)))


# --------------------------------------------------------------------------------------------------------------
# the convention: forward process, sampling grid, Euler sampler


def forward_process(x0, noise, t):
    """Noise clean samples: x_t = (1 - t)·x0 + t·ε, with velocity target u = ε - x0.

    x0, noise: (B, ...); t: (B,) in [0, 1]. Returns (x_t, u), both (B, ...) in x0's dtype.
    """
    _check({"x0": x0, "noise": noise}, {"t": t})
    _check_values({"x0": x0, "noise": noise, "t": t}, unit_interval=("t",))
    tb = _bcast(t.to(x0.dtype), x0)
    return (1 - tb) * x0 + tb * noise, noise - x0


def flow_timesteps(num_steps, shift=1.0, device=None):
    """Sampling grid 1 = t_0 > t_1 > ... > t_K = 0: uniform in t, then SD3's shift t' = s·t / (1 + (s - 1)·t).

    num_steps: K >= 1; shift: s > 0 (3.0 for SD3 at 512-1024 px, 1.0 leaves the grid uniform). Returns (K + 1,).
    """
    if not (isinstance(num_steps, int) and num_steps >= 1):
        raise ValueError(f"num_steps: expected an int >= 1, got {num_steps!r}")
    _positive("shift", shift)
    t = torch.linspace(1.0, 0.0, num_steps + 1, device=device)
    return shift * t / (1 + (shift - 1) * t)


def euler_sample(velocity_fn, noise, timesteps, return_trajectory=False):
    """Integrate dx/dt = v(x, t) with Euler steps x <- x + (t_{k+1} - t_k)·v(x, t_k) from noise at timesteps[0].

    velocity_fn(x, t) -> v: x (B, ...), t (B,) in [0, 1] (a diffusers model wants TIMESTEP_SCALE * t).
    noise: (B, ...); timesteps: (K + 1,) decreasing, e.g. flow_timesteps(K).
    Returns x at timesteps[-1]; with return_trajectory, also the states the K steps started from and their
    velocities, each (K, B, ...), for drift monitoring along the policy's own trajectories.
    """
    _check({"noise": noise})
    _check_values({"noise": noise})
    if timesteps.ndim != 1 or timesteps.numel() < 2 or not bool((timesteps[1:] < timesteps[:-1]).all()):
        raise ValueError(f"timesteps: expected a decreasing (K + 1,) tensor with K >= 1, got {timesteps.tolist()}")
    x, states, velocities = noise, [], []
    for t_cur, t_next in zip(timesteps[:-1], timesteps[1:]):
        v = velocity_fn(x, t_cur.expand(x.shape[0]).to(x.dtype))
        if return_trajectory:
            states.append(x)
            velocities.append(v)
        x = x + (t_next - t_cur).to(x.dtype) * v
    return (x, torch.stack(states), torch.stack(velocities)) if return_trajectory else x


# --------------------------------------------------------------------------------------------------------------
# norms: the drift monitor, the inference-time rescale baseline, the NormGuard hinge


def velocity_norm(v, granularity="sample", channel_dim=None):
    """L2 norm of a velocity, per sample over all non-batch dims, or per token over the channel dim.

    v: (B, ...). granularity="sample" -> (B,); "token" -> (B, T), where the channel dim is channel_dim or, by
    default, dim 1 for (B, C, H, W) latents and the last dim for (B, N, D) token sequences ((B, D): T = 1).
    Computed in float32 (float64 stays): bf16 squares lose too many bits summed over 10^5 elements.
    """
    _choice("granularity", granularity, ("sample", "token"))
    v = v.to(_acc(v))
    if granularity == "sample":
        return torch.linalg.vector_norm(v.flatten(1), dim=1)
    if channel_dim is None:
        channel_dim = 1 if v.ndim == 4 else -1
    return torch.linalg.vector_norm(v.movedim(channel_dim, -1).reshape(v.shape[0], -1, v.shape[channel_dim]), dim=-1)


def norm_ratio(v, v_ref, granularity="sample", channel_dim=None, eps=1e-6):
    """Drift monitor ‖v_θ‖ / max(‖v_ref‖, eps), detached: (B,) per sample or (B, T) per token.

    v, v_ref: (B, ...) velocities at the same (x_t, t, c). 1.0 means no drift; RL runs drift to 1.05-1.15.
    """
    _check({"v": v, "v_ref": v_ref})
    n, n_ref = velocity_norm(v.detach(), granularity, channel_dim), velocity_norm(v_ref.detach(), granularity, channel_dim)
    _check_values({"v": v, "v_ref": v_ref}, derived=[n, n_ref])
    return n / n_ref.clamp_min(eps)


def _mean_norm_ratio(v, v_ref, eps=1e-6):
    return (velocity_norm(v.detach()) / velocity_norm(v_ref.detach()).clamp_min(eps)).mean()


def norm_ratio_profile(ratio, t, num_bins=10):
    """Mean norm ratio per bin of t: bins [i/n, (i+1)/n) for i < n-1, the last one closed at t = 1.

    ratio: (B,) or (B, T) (averaged over tokens first); t: (B,) in [0, 1].
    Returns (means, counts), both (num_bins,); a bin with no sample has mean NaN (no data, not an error).
    """
    ratio = ratio.detach().reshape(ratio.shape[0], -1).mean(1) if ratio.ndim > 1 else ratio.detach()
    _check({"ratio": ratio[:, None]}, {"t": t})
    _check_values({"ratio": ratio, "t": t}, unit_interval=("t",))
    bins = (t.detach() * num_bins).long().clamp(0, num_bins - 1)
    counts = torch.bincount(bins, minlength=num_bins)
    sums = torch.zeros(num_bins, dtype=ratio.dtype, device=ratio.device).index_add_(0, bins, ratio)
    return sums / counts.to(ratio.dtype), counts  # 0 / 0 = NaN marks an empty bin


def rescale_to_reference(v, v_ref, eps=1e-12):
    """The inference-time baseline the paper rejects: v <- v·‖v_ref‖ / ‖v‖ per sample (direction kept).

    v, v_ref: (B, ...). Needs a reference forward at every sampling step. Returns (B, ...) in v's dtype.
    """
    _check({"v": v, "v_ref": v_ref})
    norm, norm_ref = velocity_norm(v), velocity_norm(v_ref)
    _check_values({"v": v, "v_ref": v_ref}, derived=[norm, norm_ref])
    scale = norm_ref / norm.clamp_min(eps)
    return v * _bcast(scale, v).to(v.dtype)


def normguard_penalty(v, v_ref, *, lam=1.0, granularity="sample", margin="relative", power=2, tolerance=0.0,
                      channel_dim=None, eps=1e-6):
    """NormGuard hinge: penalise ‖v_θ‖ only where it exceeds ‖v_ref‖ (same x_t, t, c); never push it up.

        excess = ‖v_θ‖/max(‖v_ref‖, eps) - 1   (margin="relative", default)   or   ‖v_θ‖ - ‖v_ref‖  ("absolute")
        penalty = lam · mean_units( relu(excess - tolerance) ** power ),   units = samples or tokens

    Add it to any velocity-local base loss: loss = base + penalty. v_ref is detached here whatever the caller
    passes. Where active, the gradient w.r.t. v_θ is a positive multiple of v_θ/‖v_θ‖: it shrinks the magnitude
    and leaves the direction alone, unlike the symmetric KL terms of NFT/AWM that pull the whole vector to v_ref.

    Defaults are our reading (the paper's exact form is not public): per sample, because the drift the paper
    reports is a per-step norm; relative, so that lam carries over between resolutions, latent channels and
    timesteps (‖v‖ grows with sqrt(dims)); squared, so the force fades to zero at the boundary and a model that
    barely exceeds the reference is barely touched. power=1 gives the plain hinge. In a few dims ‖v_ref‖ can come
    close to 0, where the relative hinge's gradient (∝ 1/‖v_ref‖) blows up: use margin="absolute" there.

    v, v_ref: (B, ...); lam >= 0; power in {1, 2}; tolerance >= 0 (in units of the margin).
    Returns (penalty, stats): penalty a 0-dim float32 tensor (float64 for float64 input); stats holds detached
    "hinge" (unweighted mean), "active_frac" (fraction of units with excess > tolerance) and "norm_ratio".
    """
    _check({"v": v, "v_ref": v_ref})
    _positive("lam", lam, allow_zero=True)
    _positive("tolerance", tolerance, allow_zero=True)
    _choice("margin", margin, ("relative", "absolute"))
    _choice("power", power, (1, 2))
    norm = velocity_norm(v, granularity, channel_dim)
    norm_ref = velocity_norm(v_ref.detach(), granularity, channel_dim)
    _check_values({"v": v, "v_ref": v_ref}, derived=[norm.detach(), norm_ref])
    ratio = norm / norm_ref.clamp_min(eps)
    excess = ratio - 1 if margin == "relative" else norm - norm_ref
    hinge = F.relu(excess - tolerance) ** power
    penalty = hinge.mean()
    stats = {"hinge": penalty.detach(), "active_frac": (excess > tolerance).to(norm.dtype).mean(),
             "norm_ratio": ratio.detach().mean()}
    return lam * penalty, stats


# --------------------------------------------------------------------------------------------------------------
# advantages and the three base losses


def group_advantages(rewards, group_size, std_scope="global", eps=1e-4):
    """Group-normalised advantages A = (r - mean_group(r)) / (std(r) + eps), population std.

    rewards: (N,), N a multiple of group_size, each group (the samples of one prompt) contiguous.
    std_scope: "global" (std over the whole batch, NFT's default) or "group". A constant group gives A = 0.
    Returns (N,) in float32 (float64 stays).
    """
    if not isinstance(rewards, torch.Tensor) or rewards.ndim != 1 or rewards.numel() == 0:
        raise ValueError(f"rewards: expected a non-empty (N,) tensor, got {getattr(rewards, 'shape', rewards)}")
    if not (isinstance(group_size, int) and group_size >= 1 and rewards.numel() % group_size == 0):
        raise ValueError(f"group_size: expected an int >= 1 dividing N = {rewards.numel()}, got {group_size!r}")
    _choice("std_scope", std_scope, ("global", "group"))
    _check_values({"rewards": rewards})
    r = rewards.to(_acc(rewards)).reshape(-1, group_size)
    std = r.std(unbiased=False) if std_scope == "global" else r.std(dim=1, unbiased=False, keepdim=True)
    return ((r - r.mean(dim=1, keepdim=True)) / (std + eps)).reshape(-1)


def nft_loss(v, v_old, v_ref, x_t, x0, t, advantages, *, beta=1.0, adv_clip=5.0, kl_weight=1e-4):
    """DiffusionNFT loss (arXiv 2509.16117) on forward-process points x_t of clean rollouts x0.

        v+ = β·v_θ + (1 - β)·v_old,  v- = (1 + β)·v_old - β·v_θ       (implicit positive / negative policies)
        p = clip(clip(A, ±A_max) / A_max / 2 + 1/2, 0, 1)               (optimality probability)
        x0±= x_t - t·v±,  w± = sg(mean_dims |x0± - x0|) clamped >= 1e-5,  ℓ± = mean_dims (x0± - x0)² / w±
        L  = mean_B[ A_max·(p·ℓ+ + (1 - p)·ℓ-) / β ] + kl_weight·mean_B mean_dims (v_θ - v_ref)²

    v, v_old, v_ref, x_t, x0: (B, ...); t, advantages: (B,). v_old (the EMA "old" policy) and v_ref (frozen base
    model) are detached here. beta > 0; adv_clip > 0; kl_weight >= 0.
    Returns (loss, stats) with detached "policy", "kl" and "norm_ratio" (mean ‖v_θ‖/‖v_ref‖).
    """
    batch, per_sample = {"v": v, "v_old": v_old, "v_ref": v_ref, "x_t": x_t, "x0": x0}, {"t": t, "advantages": advantages}
    _check(batch, per_sample)
    _positive("beta", beta)
    _positive("adv_clip", adv_clip)
    _positive("kl_weight", kl_weight, allow_zero=True)
    dt = _acc(v)
    v, v_old, v_ref, x_t, x0 = v.to(dt), v_old.detach().to(dt), v_ref.detach().to(dt), x_t.to(dt), x0.to(dt)
    tb = _bcast(t.to(dt), v)
    p = (advantages.to(dt).clamp(-adv_clip, adv_clip) / adv_clip / 2 + 0.5).clamp(0, 1)

    def adaptive_x0_loss(v_implicit):
        err = x_t - tb * v_implicit - x0
        weight = _per_sample_mean(err.detach().abs()).clamp_min(1e-5)  # stop-gradient: it only sets the scale
        return _per_sample_mean(err**2) / weight

    positive, negative = adaptive_x0_loss(beta * v + (1 - beta) * v_old), adaptive_x0_loss((1 + beta) * v_old - beta * v)
    kl_per_sample = _per_sample_mean((v - v_ref) ** 2)
    _check_values({**batch, **per_sample}, derived=[positive.detach(), negative.detach(), kl_per_sample.detach(), p],
                  unit_interval=("t",))
    policy = (adv_clip * (p * positive + (1 - p) * negative) / beta).mean()
    kl = kl_per_sample.mean()
    stats = {"policy": policy.detach(), "kl": kl.detach(), "norm_ratio": _mean_norm_ratio(v, v_ref)}
    return policy + kl_weight * kl, stats


def awm_time_weight(err, t, weighting="ghuber", power=0.25):
    """AWM's weighting w(ℓ, t) of the per-sample flow-matching error ℓ; log p~ = -w.

        "uniform": ℓ    "t": t·ℓ    "t2": t²·ℓ    "huber": t·(sqrt(ℓ + 1e-10) - 1e-5)
        "ghuber":  (t / p)·((ℓ + 1e-10)^p - 1e-10^p),  p = power (0.25 in the official configs)

    err: (B,) >= 0; t: (B,). Returns (B,).
    """
    _choice("weighting", weighting, ("uniform", "t", "t2", "huber", "ghuber"))
    if weighting == "uniform":
        return err
    if weighting == "t":
        return t * err
    if weighting == "t2":
        return t**2 * err
    if weighting == "huber":
        return t * (torch.sqrt(err + 1e-10) - 1e-5)
    _positive("power", power)
    return t / power * ((err + 1e-10) ** power - 1e-10**power)


def awm_loss(v, v_old, v_ref, target, t, advantages, *, weighting="ghuber", power=0.25, clip_range=1.0,
             adv_clip=5.0, ref_weight=1e-4, v_ema=None, ema_weight=0.0):
    """Advantage Weighted Matching loss (arXiv 2509.25050), one row per (sample, train timestep) ("exp_first").

        ℓ = mean_dims (v - u)²,  log p~ = -w(ℓ, t) (awm_time_weight),  ρ = exp(log p~_θ - log p~_old)
        A' = clip(A, ±A_max) / A_max                                     (in [-1, 1])
        L  = mean_B[ max(-A'·ρ, -A'·clip(ρ, 1 - c, 1 + c)) ]
             + ref_weight·mean_B mean_dims (v_θ - v_ref)² + ema_weight·mean_B mean_dims (v_θ - v_ema)²

    At ρ = 1 (v_old = v_θ before the update) the policy gradient equals that of mean_B[A'·w(ℓ, t)].
    v, v_old, v_ref, target (= u = ε - x0), v_ema: (B, ...); t, advantages: (B,). v_old, v_ref, v_ema are detached.
    Returns (loss, stats) with detached "policy", "kl_ref", "kl_ema", "ratio", "clip_frac", "norm_ratio".
    """
    batch = {"v": v, "v_old": v_old, "v_ref": v_ref, "target": target}
    if v_ema is not None:
        batch["v_ema"] = v_ema
    elif ema_weight > 0:
        raise ValueError(f"v_ema: required when ema_weight > 0 (got ema_weight={ema_weight})")
    per_sample = {"t": t, "advantages": advantages}
    _check(batch, per_sample)
    _positive("clip_range", clip_range)
    _positive("adv_clip", adv_clip)
    _positive("ref_weight", ref_weight, allow_zero=True)
    _positive("ema_weight", ema_weight, allow_zero=True)
    dt = _acc(v)
    v, target = v.to(dt), target.to(dt)
    log_p = -awm_time_weight(_per_sample_mean((v - target) ** 2), t.to(dt), weighting, power)
    log_p_old = -awm_time_weight(_per_sample_mean((v_old.detach().to(dt) - target) ** 2), t.to(dt), weighting, power)
    kl_ref = _per_sample_mean((v - v_ref.detach().to(dt)) ** 2)
    kl_ema = _per_sample_mean((v - v_ema.detach().to(dt)) ** 2) if v_ema is not None else torch.zeros_like(kl_ref)
    adv = advantages.to(dt).clamp(-adv_clip, adv_clip) / adv_clip
    _check_values({**batch, **per_sample}, derived=[log_p.detach(), log_p_old, kl_ref.detach(), kl_ema.detach(), adv],
                  unit_interval=("t",))
    ratio = torch.exp(log_p - log_p_old)
    policy = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
    kl_ref, kl_ema = kl_ref.mean(), kl_ema.mean()
    stats = {"policy": policy.detach(), "kl_ref": kl_ref.detach(), "kl_ema": kl_ema.detach(),
             "ratio": ratio.detach().mean(), "clip_frac": ((ratio.detach() - 1).abs() > clip_range).to(dt).mean(),
             "norm_ratio": _mean_norm_ratio(v, v_ref)}
    return policy + ref_weight * kl_ref + ema_weight * kl_ema, stats


def dpo_loss(v_w, v_l, v_ref_w, v_ref_l, target_w, target_l, *, beta=2000.0):
    """Diffusion-DPO in velocity form (arXiv 2311.12908): winner w and loser l noised with the same t and ε.

        err_m^k = mean_dims (v_m(x_t^k) - u^k)²,  m in {θ, ref}, k in {w, l},  u^k = ε - x0^k
        z = -(β/2)·[(err_θ^w - err_ref^w) - (err_θ^l - err_ref^l)],   L = mean_B[ -log σ(z) ]

    All tensors (B, ...); the reference velocities are detached. beta: finite and nonzero (2000 by default);
    swapping winner and loser with β -> -β gives the same loss, so a negative β is accepted and prefers l.
    Returns (loss, stats) with detached "accuracy" (fraction of pairs with z > 0), "margin" (mean z) and
    "norm_ratio" over winners and losers.
    """
    batch = {"v_w": v_w, "v_l": v_l, "v_ref_w": v_ref_w, "v_ref_l": v_ref_l, "target_w": target_w, "target_l": target_l}
    _check(batch)
    if not (math.isfinite(beta) and beta != 0):
        raise ValueError(f"beta: expected a finite nonzero number, got {beta}")
    dt = _acc(v_w)

    def err(v, u):
        return _per_sample_mean((v.to(dt) - u.to(dt)) ** 2)

    z = -beta / 2 * ((err(v_w, target_w) - err(v_ref_w.detach(), target_w))
                     - (err(v_l, target_l) - err(v_ref_l.detach(), target_l)))
    _check_values(batch, derived=[z.detach()])
    stats = {"accuracy": (z.detach() > 0).to(dt).mean(), "margin": z.detach().mean(),
             "norm_ratio": (_mean_norm_ratio(v_w, v_ref_w) + _mean_norm_ratio(v_l, v_ref_l)) / 2}
    return -F.logsigmoid(z).mean(), stats


# --------------------------------------------------------------------------------------------------------------
# the adjoint sensitivity diagnostic


def velocity_scale_sensitivity(velocity_fn, reward_fn, noise, timesteps):
    """First-order change of a differentiable reward when step k's velocity is scaled, v_k -> (1 + α_k)·v_k.

        dR/dα_k = (t_{k+1} - t_k)·<a_{k+1}, v_k>,   a_{k+1} = ∂R/∂x_{k+1}  (the adjoint, by backprop)

    computed for every sample and step at α = 0 by one backward pass through euler_sample. "No coherent
    first-order signal" in magnitude means these change sign across samples: |batch mean| small next to the std.
    velocity_fn(x, t) as in euler_sample and differentiable in x; it must treat samples independently (no
    batch statistics), since per-sample gradients are read off the gradient of the batch sum.
    reward_fn(x0) -> (B,). noise: (B, ...); timesteps: (K + 1,) decreasing.
    Returns (dR_dalpha (B, K), stats) with "mean", "std" per step (K,), and "total_mean", "total_std" of the
    uniform scaling Σ_k dR/dα_k (all steps scaled together).
    """
    alpha = torch.zeros(noise.shape[0], timesteps.numel() - 1, dtype=noise.dtype, device=noise.device,
                        requires_grad=True)
    steps = iter(range(alpha.shape[1]))  # euler_sample calls velocity_fn once per step, in order

    def scaled_velocity(x, t):
        return (1 + _bcast(alpha[:, next(steps)], x)) * velocity_fn(x, t)

    with torch.enable_grad():
        rewards = reward_fn(euler_sample(scaled_velocity, noise, timesteps))
        if rewards.shape != (noise.shape[0],):
            raise ValueError(f"reward_fn: expected (B,) = ({noise.shape[0]},) rewards, got {tuple(rewards.shape)}")
        (grad,) = torch.autograd.grad(rewards.sum(), alpha)
    total = grad.sum(dim=1)
    stats = {"mean": grad.mean(0), "std": grad.std(0, unbiased=False), "total_mean": total.mean(),
             "total_std": total.std(unbiased=False)}
    return grad, stats
