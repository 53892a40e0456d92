"""Rollout samplers of the official RL recipes for flow-matching models, as pure torch functions.

DiffusionNFT (arXiv 2509.16117) rolls out with a deterministic second-order multistep solver ("dpm2"),
Advantage Weighted Matching (AWM, arXiv 2509.25050) with a stochastic SA-Solver (arXiv 2309.05019). Both are
written here in the flow-matching convention of normguard.py, next to its first-order Euler sampler, with one
signature so that a trainer can pick a sampler by name from SAMPLERS:

    sampler(velocity_fn, noise, timesteps, return_trajectory=False) -> x at timesteps[-1]

Convention: x_t = (1 - t)·x0 + t·ε, t = 1 is noise, v = ε - x0; velocity_fn(x, t) -> v with x (B, ...) and
t (B,) in [0, 1] (a diffusers transformer wants 1000·t); timesteps is a strictly decreasing (K + 1,) grid in
[0, 1]. In the notation of DPM-Solver, α_t = 1 - t, σ_t = t, λ_t = log(α_t / σ_t) (-∞ at t = 1, +∞ at t = 0),
and the data prediction is x̂(x, t) = x - t·v(x, t). Each sampler calls velocity_fn K times.

Grids: the official pipelines sample on diffusers' SD3 sigmas, sd3_pipeline_timesteps(K) (NFT: K = 10), and
AWM edits that grid before its SA-Solver, sa_solver_timesteps(sd3_pipeline_timesteps(14)).
Precision: the state is carried in float32 (float64 if noise is float64), step coefficients are computed in
float64 from the grid, velocity_fn sees x and t in noise's dtype, and the result comes back in noise's dtype.
Checks: a bad argument raises ValueError (TypeError for a wrong type) whose message starts with its name.
"""

import math
import numbers

import torch

import normguard

SD3_SHIFT = 3.0  # SD3/SD3.5 scheduler shift at 512-1024 px
SD3_TRAIN_STEPS = 1000  # diffusers' num_train_timesteps: the smallest training sigma is shift(1 / 1000)


# --------------------------------------------------------------------------------------------------------------
# grids


def _shift(t, shift):
    return shift * t / (1 + (shift - 1) * t)


def sd3_pipeline_timesteps(num_steps, shift=SD3_SHIFT, device=None):
    """The sigmas diffusers' SD3 pipeline samples on: FlowMatchEulerDiscreteScheduler(shift).set_timesteps(K).

        u_k = linspace(1, σ_min, K),  σ_min = shift(1 / 1000),  t_k = shift(u_k) = s·u_k / (1 + (s - 1)·u_k),  t_K = 0

    Unlike normguard.flow_timesteps (u_k = 1 - k / K), the last non-zero point is shift(σ_min) ≈ 0.0089 for s = 3,
    whatever K: the final step is tiny. Both NFT's and AWM's official rollouts start from this grid.
    num_steps: K >= 1; shift: s > 0. Returns (K + 1,) float32.
    """
    if not (isinstance(num_steps, int) and num_steps >= 1):
        raise ValueError(f"num_steps: expected an int >= 1, got {num_steps!r}")
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift: expected a finite number > 0, got {shift}")
    sigma_min = _shift(1.0 / SD3_TRAIN_STEPS, shift)
    u = torch.linspace(1.0, sigma_min, num_steps, dtype=torch.float64)
    t = torch.cat([_shift(u, shift), torch.zeros(1, dtype=torch.float64)])
    return t.to(device=device, dtype=torch.float32)


def sa_solver_timesteps(timesteps):
    """AWM's edit of the pipeline grid before its SA-Solver: t_0 <- 1 - 1e-3 and t_{K-1} <- t_{K-2} / 2.

    The first keeps λ finite at the start (the model is then called at t = 0.999 on pure noise); the second
    replaces the tiny last step of sd3_pipeline_timesteps (t_{K-1} ≈ 0.0089) by a halving. timesteps: (K + 1,)
    strictly decreasing in [0, 1] with K >= 3, ending at 0. Returns a new tensor of the same dtype and device.
    """
    grid = _grid(timesteps)
    if len(grid) < 4 or grid[-1] != 0:
        raise ValueError(f"timesteps: expected K >= 3 steps ending at t = 0, got {grid}")
    edited = timesteps.clone()
    edited[0] = 1 - 1e-3
    edited[-2] = edited[-3] / 2
    _grid(edited)
    return edited


# --------------------------------------------------------------------------------------------------------------
# shared plumbing: checks, model calls, λ


def _grid(timesteps):
    """Check a strictly decreasing (K + 1,) grid in [0, 1] and return it as Python floats (one host sync)."""
    if not isinstance(timesteps, torch.Tensor) or not timesteps.is_floating_point():
        got = timesteps.dtype if isinstance(timesteps, torch.Tensor) else type(timesteps).__name__
        raise TypeError(f"timesteps: expected a floating-point torch.Tensor, got {got}")
    if timesteps.ndim != 1 or timesteps.numel() < 2:
        raise ValueError(f"timesteps: expected a (K + 1,) tensor with K >= 1, got shape {tuple(timesteps.shape)}")
    grid = timesteps.tolist()
    if not all(0 <= t <= 1 for t in grid):  # NaN fails this too
        raise ValueError(f"timesteps: expected values in [0, 1] (t = 1 is noise), got {grid}")
    if not all(a > b for a, b in zip(grid[:-1], grid[1:])):
        raise ValueError(f"timesteps: expected a strictly decreasing grid, got {grid}")
    return grid


def _check_noise(noise):
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        got = noise.dtype if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise TypeError(f"noise: expected a floating-point torch.Tensor, got {got}")
    if noise.ndim < 2 or noise.shape[0] == 0:
        raise ValueError(f"noise: expected shape (B, ...) with B >= 1 and a non-batch dim, got {tuple(noise.shape)}")


def _check_result(noise, x):
    """One host sync at the end: NaN or Inf anywhere along the way leaves the result non-finite for good."""
    if bool(torch.isfinite(x).all()):
        return
    if not bool(torch.isfinite(noise).all()):
        raise ValueError("noise: expected finite values, got NaN or Inf")
    raise ValueError("velocity_fn: expected finite velocities; the sample became NaN or Inf")


def _lam(t):
    """λ_t = log((1 - t) / t), with its limits -∞ at t = 1 and +∞ at t = 0."""
    if t == 1:
        return -math.inf
    if t == 0:
        return math.inf
    return math.log1p(-t) - math.log(t)


class _Model:
    """Calls velocity_fn in noise's dtype, checks the shape, returns x̂ = x - t·v in the state's dtype, and keeps
    the evaluated states and velocities when the caller wants the trajectory."""

    def __init__(self, velocity_fn, noise, keep):
        self.fn, self.dtype, self.keep = velocity_fn, noise.dtype, keep
        self.states, self.velocities, self.calls = [], [], 0

    def data_prediction(self, x, t):
        x_in = x.to(self.dtype)
        v = self.fn(x_in, torch.full((x.shape[0],), t, dtype=self.dtype, device=x.device))
        if not isinstance(v, torch.Tensor) or v.shape != x.shape:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(
                f"velocity_fn: expected a velocity of x's shape {tuple(x.shape)}, got {got} at call {self.calls} "
                f"(t = {t:.4g})"
            )
        self.calls += 1
        if self.keep:
            self.states.append(x_in)
            self.velocities.append(v)
        return x - t * v.to(x.dtype)

    def result(self, noise, x):
        _check_result(noise, x)
        x = x.to(noise.dtype)
        return (x, torch.stack(self.states), torch.stack(self.velocities)) if self.keep else x


def _device(generator, x):
    return x.device if generator is None else generator.device


def _state_dtype(noise):
    return torch.float64 if noise.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------------------
# DiffusionNFT's "dpm2": DPM-Solver++(2M), data prediction, first-order first and last steps


def dpm2_sample(velocity_fn, noise, timesteps, return_trajectory=False):
    """DiffusionNFT's rollout sampler: deterministic multistep DPM-Solver++(2M) on the flow sigmas.

    With x̂_k = x_k - t_k·v(x_k, t_k) and h_k = λ_{t_{k+1}} - λ_{t_k}, each of the K steps is

        x_{k+1} = (t_{k+1} / t_k)·x_k + (1 - t_{k+1} / t_k)·x̃_k,
        x̃_k = x̂_k + (h_k / (2·h_{k-1}))·(x̂_k - x̂_{k-1})   for 1 <= k <= K - 2,   x̃_k = x̂_k otherwise.

    (t_{k+1} / t_k = σ_{k+1} / σ_k and 1 - t_{k+1} / t_k = α_{k+1}·(1 - e^{-h_k}): this is DPM-Solver++(2M),
    midpoint form, D1 = (x̂_k - x̂_{k-1}) / r_k with r_k = h_{k-1} / h_k.) The first step and the last one are
    first order (DDIM with η = 0, which is exactly an Euler step x_k + (t_{k+1} - t_k)·v_k in this convention);
    the last lands on t_K = 0 at x̂_{K-1}. On a grid that starts at t_0 = 1 (every official one) h_0 = +∞, so the
    second step is first order as well. Globally it is second order: on a grid that stops short of t = 0 the
    error of a smooth flow falls 4x when the steps halve; on one that reaches t = 0 (λ -> +∞, where λ-steps stop
    shrinking) it goes as h²·log(1/h), a 3.5x fall at K = 256 -> 512 (tests/test_samplers.py).

    Official code: `sample.solver = "dpm2"`, `sample.deterministic = True` in DiffusionNFT's config/nft.py; the
    solver is `dpm_step(order=2)` in flow_grpo/diffusers_patch/solver.py, driven by `run_sampling` on the SD3
    pipeline's sigmas (sd3_pipeline_timesteps(10)). That code upcasts the state to float32 and casts it back to
    the latents' dtype after every step; its pipeline calls the transformer at floor(1000·t) (a long cast),
    a detail of the model wrapper, not of this function. It equals diffusers' DPMSolverMultistepScheduler(
    algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", prediction_type="flow_prediction",
    use_flow_sigmas=True, lower_order_final=True, final_sigmas_type="zero") run on the same sigmas (diffusers
    computes the state in float32); left to build its own grid (flow_shift=3) that scheduler would instead sample
    on shift(linspace) from 0.9997 down to ≈ shift(1/K), not on the SD3 pipeline's sigmas. Equals the official solver
    (its float32 casts made float64) on a random linear velocity field, 10 steps, the SD3 shift-3 sigmas, to 2e-14
    (|x| ≈ 10) in float64, checked outside this repo.

    velocity_fn(x, t) -> v: x (B, ...), t (B,). noise: (B, ...) at timesteps[0]; timesteps: (K + 1,) strictly
    decreasing in [0, 1]. Returns x at timesteps[-1] in noise's dtype; with return_trajectory also the K states
    velocity_fn was called at and its velocities, each (K, B, ...).
    """
    _check_noise(noise)
    grid = _grid(timesteps)
    model = _Model(velocity_fn, noise, return_trajectory)
    x, x0_prev, num_steps = noise.to(_state_dtype(noise)), None, len(grid) - 1
    for k in range(num_steps):
        t, t_next = grid[k], grid[k + 1]
        x0 = model.data_prediction(x, t)
        target = x0
        if 0 < k < num_steps - 1:
            # h / h_prev -> 0 when the previous point is t = 1 (λ = -∞): the official code's D1 vanishes there too
            ratio = (_lam(t_next) - _lam(t)) / (_lam(t) - _lam(grid[k - 1]))
            target = x0 + (ratio / 2) * (x0 - x0_prev)
        x = (t_next / t) * x + (1 - t_next / t) * target
        x0_prev = x0
    return model.result(noise, x)


# --------------------------------------------------------------------------------------------------------------
# AWM's SA-Solver: stochastic Adams predictor (order 2) and corrector (order 2), PEC, data prediction


def _sa_step(s, t, tau):
    """Coefficients of one SA-Solver step from s to t (< s, > 0) with stochasticity τ, and h = λ_t - λ_s.

    x_t = a·x_s + b·x̂_s + n·ξ + (a correction term), with c = 1 + τ²:
    a = (σ_t / σ_s)·e^{-τ²h},  b = α_t·(1 - e^{-c·h}),  n = σ_t·sqrt(1 - e^{-2τ²h}).
    """
    h = _lam(t) - _lam(s)
    if tau == 0:  # written out: at s = 1 (h = +∞) the general form would meet 0·∞
        return t / s, (1 - t) * -math.expm1(-h), 0.0, h
    a = (t / s) * math.exp(-(tau**2) * h)
    b = (1 - t) * -math.expm1(-(1 + tau**2) * h)
    n = t * math.sqrt(-math.expm1(-2 * tau**2 * h))
    return a, b, n, h


def sa_solver_sample(
    velocity_fn, noise, timesteps, noise_level=0.4, generator=None, sde_window=(0.3, 0.9), return_trajectory=False
):
    """AWM's rollout sampler: SA-Solver (data prediction, predictor order 2, corrector order 2, PEC, few-step form).

    Step k (t_{k-1} -> t_k, k = 1..K-1) uses τ_k = noise_level if sde_window[0] <= t_k <= sde_window[1] else 0 (at
    the step's target time), c_k = 1 + τ_k², one fresh ξ_k ~ N(0, I) shared by predictor and corrector, and the
    coefficients a, b, n of the exact exponential-integrator step (see _sa_step); h_k = λ_{t_k} - λ_{t_{k-1}}:

        base      = a·x_{k-1} + b·x̂_{k-1} + n·ξ_k
        predictor x^p_k = base + α_{t_k}·c_k·h_k²/(2·h_{k-1})·(x̂_{k-1} - x̂_{k-2})     (k = 1: x^p_1 = base)
        evaluate  x̂_k = x^p_k - t_k·v(x^p_k, t_k)
        corrector x_k = base + α_{t_k}·c_k·(h_k / 2)·(x̂_k - x̂_{k-1})                   (k = 1: none, x_1 = x^p_1)
        last step x_K = x̂_{K-1} (t_K must be 0: the official "denoise to zero").

    Both correction terms are the Lagrange-interpolation terms of SA-Solver (Eqs. 15, 18 of arXiv 2309.05019)
    after the paper's few-step modification, which replaces the exact integral of the linear term by
    e^{cλ_t}·h²/2 (the official code's `*_few_steps` updates; an O(h³) change). With τ = 0 the sampler is the
    deterministic UniPC-type pair UniP-2 + UniC-1 with B(h) = h: the predictor differs from DPM-Solver++(2M)
    (dpm2_sample) only in B(h) = h instead of 1 - e^{-h}. t_0 = 1 is allowed (λ = -∞; the first step is then
    a = 0, b = α_{t_1}, n = σ_{t_1}: a full re-noising when τ_1 > 0); the official rollout instead moves it to
    0.999, see sa_solver_timesteps.

    Official code: `train.use_sa_solver = True` in AWM's config/dgx_awm.py; `SASolver.sample(..., predictor_order=2,
    corrector_order=2, pc_mode='PEC')` in flow_grpo/diffusers_patch/sa_solver.py, called by its
    sd3_pipeline_with_logprob.py with τ(t) = `sample.noise_level` on 0.3 <= t <= 0.9, on
    sa_solver_timesteps(sd3_pipeline_timesteps(14)). `sample.noise_level` is 0.4 in the GenEval and OCR configs,
    0.0 in the PickScore ones. `sample.sde_frac` (0.0 everywhere) is not read on this path: it only gates the
    Flow-GRPO SDE steps of the non-SA-Solver loop. The official code draws its noise with torch.randn_like (the
    global generator), here from `generator`, one (B, ...) draw per step k = 1..K-1 whatever τ_k. Differences from
    diffusers' SASolverScheduler(predictor_order=2, corrector_order=2, algorithm_type="data_prediction",
    prediction_type="flow_prediction", use_flow_sigmas=True) on the same sigmas: diffusers evaluates τ at the
    step's start, corrects the first step too, and cannot step to σ = 0 (λ = +∞; its flow sigmas end at σ_min),
    where the official code returns x̂_{K-1}; with those three emulated the two agree (tests/test_samplers.py).
    Equals the official solver on a random linear velocity field, 14 steps, the edited SD3 shift-3 sigmas and
    τ ∈ {0, 0.4, 1}, to 1e-14 (|x| ≈ 10) in float64, checked outside this repo.

    velocity_fn(x, t) -> v as in dpm2_sample; noise: (B, ...) at timesteps[0]; timesteps: (K + 1,) strictly
    decreasing in [0, 1], K >= 2, t_K = 0. noise_level: τ >= 0; generator: a torch.Generator on any device, or
    None (the global one); sde_window: (lo, hi) with 0 <= lo <= hi <= 1. Returns x at t = 0 in noise's dtype; with
    return_trajectory also the K states velocity_fn was called at (x_0, x^p_1, ..., x^p_{K-1}) and its
    velocities, each (K, B, ...).
    """
    _check_noise(noise)
    grid = _grid(timesteps)
    if len(grid) < 3 or grid[-1] != 0:
        raise ValueError(f"timesteps: expected K >= 2 steps ending at t = 0, got {grid}")
    if not (isinstance(noise_level, numbers.Real) and math.isfinite(noise_level) and noise_level >= 0):
        raise ValueError(f"noise_level: expected a finite number >= 0, got {noise_level!r}")
    if not (len(sde_window) == 2 and 0 <= sde_window[0] <= sde_window[1] <= 1):
        raise ValueError(f"sde_window: expected (lo, hi) with 0 <= lo <= hi <= 1, got {sde_window!r}")
    model = _Model(velocity_fn, noise, return_trajectory)
    x = noise.to(_state_dtype(noise))
    x0 = model.data_prediction(x, grid[0])
    x0_prev, h_prev = None, None
    for k in range(1, len(grid) - 1):
        t = grid[k]
        tau = noise_level if sde_window[0] <= t <= sde_window[1] else 0.0
        a, b, n, h = _sa_step(grid[k - 1], t, tau)
        # drawn where the generator lives (a CPU generator gives the same draws for CPU and GPU rollouts)
        xi = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=_device(generator, x)).to(x.device)
        base = a * x + b * x0 + n * xi
        weight = (1 - t) * (1 + tau**2)
        x_pred = base if x0_prev is None else base + (weight * h * h / (2 * h_prev)) * (x0 - x0_prev)
        x0_new = model.data_prediction(x_pred, t)
        x = x_pred if x0_prev is None else base + (weight * h / 2) * (x0_new - x0)
        x0_prev, x0, h_prev = x0, x0_new, h
    return model.result(noise, x0)


SAMPLERS = {"euler": normguard.euler_sample, "dpm2": dpm2_sample, "sa_solver": sa_solver_sample}
