"""Oracles for trainer/samplers.py: closed-form flows (Gaussian data, a point mass), the convergence order measured
as the steps halve, and diffusers' own schedulers (DPM-Solver++, UniPC, SA-Solver) run on the same sigmas, model outputs
and noise."""

import math

import pytest
import torch

import normguard as ng
from trainer import samplers as S

MU, STD = 0.7, 0.5  # the Gaussian data N(MU, STD²·I) whose flow is known in closed form


def gaussian_velocity(x, t):
    """Exact velocity E[ε - x0 | x_t] for x0 ~ N(MU, STD²·I): v = -MU + (t - (1 - t)·STD²) / s_t²·(x - (1 - t)·MU),
    with s_t² = (1 - t)²·STD² + t² the variance of x_t. Affine in x."""
    t = t.reshape(-1, *([1] * (x.ndim - 1)))
    var = (1 - t) ** 2 * STD**2 + t**2
    return -MU + (t - (1 - t) * STD**2) / var * (x - (1 - t) * MU)


def gaussian_flow(x, t_from, t_to):
    """The ODE solution of gaussian_velocity: x_t = (1 - t)·MU + s_t·z along each trajectory."""
    s = lambda t: math.sqrt((1 - t) ** 2 * STD**2 + t**2)
    return (1 - t_to) * MU + s(t_to) / s(t_from) * (x - (1 - t_from) * MU)


def linear_velocity(seed=0, dim=4):
    """A random velocity field affine in x and in t (no closed form needed: the schedulers are the oracle)."""
    g = torch.Generator().manual_seed(seed)
    w0, w1 = (0.5 * torch.randn(dim, dim, generator=g, dtype=torch.float64) for _ in range(2))
    b0, b1 = (torch.randn(dim, generator=g, dtype=torch.float64) for _ in range(2))
    return lambda x, t: x @ w0.T + t[:, None] * (x @ w1.T) + b0 + t[:, None] * b1


def noise_like(shape=(3, 4), seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run(name, velocity_fn, noise, grid, **kwargs):
    if name == "sa_solver":
        kwargs.setdefault("noise_level", 0.0)
    return S.SAMPLERS[name](velocity_fn, noise, grid, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# closed forms


@pytest.mark.parametrize(
    "name, start, end, order",
    [
        ("euler", 0.95, 0.05, 1),
        ("dpm2", 0.95, 0.05, 2),
        ("sa_solver", 0.95, 0.0, 2),  # the SA-Solver ends at t = 0 by construction
    ],
)
def test_error_falls_at_the_solver_order_as_the_steps_halve(name, start, end, order):
    """Gaussian data: error(K) / error(2K) ≈ 2^order. Grids start below t = 1 and dpm2's ends above t = 0: at
    t -> 0 λ -> +∞ and its λ-steps stop shrinking, which costs DPM-Solver++(2M) a log factor (error ~ h²·log(1/h),
    ratio ≈ 3.5 at K = 256 on [0.95, 0]); the SA-Solver's B(h) = h form shows no such factor."""
    noise = noise_like((64, 3))
    errors = []
    for num_steps in (256, 512):
        grid = torch.linspace(start, end, num_steps + 1, dtype=torch.float64)
        x = run(name, gaussian_velocity, noise, grid)
        errors.append((x - gaussian_flow(noise, start, end)).abs().max().item())
    assert errors[0] / errors[1] == pytest.approx(2**order, rel=0.1)


@pytest.mark.parametrize("name", sorted(S.SAMPLERS))
@pytest.mark.parametrize(
    "grid",
    [
        ng.flow_timesteps(10, shift=3.0),
        S.sd3_pipeline_timesteps(10),
        S.sa_solver_timesteps(S.sd3_pipeline_timesteps(14)),
    ],
    ids=["flow-shift3", "sd3-pipeline", "awm-edited"],
)
def test_every_sampler_lands_on_a_point_mass(name, grid):
    """x0 fixed: v = (x_t - x0) / t makes x̂ = x0 at every step, so each sampler ends exactly on x0, noise or not."""
    x0, noise = noise_like(seed=2), noise_like(seed=3)
    velocity = lambda x, t: (x - x0) / t[:, None]
    kwargs = {"noise_level": 0.7, "generator": torch.Generator().manual_seed(0)} if name == "sa_solver" else {}
    x = run(name, velocity, noise, grid.double(), **kwargs)
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-12)


def test_stochastic_sa_solver_samples_the_gaussian_data():
    """With τ = 1 over the whole path the SA-Solver integrates an SDE with the flow's marginals: 20000 samples
    of N(MU, STD²) come back with mean MU and std STD (Monte Carlo std 0.0035 and 0.0025)."""
    noise = noise_like((20000, 1), seed=4)
    grid = torch.linspace(1.0, 0.0, 201, dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    x = S.sa_solver_sample(gaussian_velocity, noise, grid, noise_level=1.0, generator=gen, sde_window=(0.0, 1.0))
    assert x.mean().item() == pytest.approx(MU, abs=0.015)
    assert x.std().item() == pytest.approx(STD, abs=0.012)
    deterministic = S.sa_solver_sample(gaussian_velocity, noise, grid, noise_level=0.0)
    assert (x - deterministic).abs().mean().item() > 0.1  # the noise did move the samples


# --------------------------------------------------------------------------------------------------------------
# diffusers' schedulers on the same sigmas, model outputs and noise


def _drive(scheduler, velocity_fn, noise, grid, num_calls, before_step=None, generator=None):
    """Run a diffusers scheduler on our sigmas: timesteps are the indices 0..K-1 (distinct, so step() finds them)."""
    num_steps = len(grid) - 1
    scheduler.set_timesteps(num_steps)
    scheduler.sigmas, scheduler.timesteps = grid.clone(), torch.arange(num_steps)
    x = noise
    for i in range(num_calls):
        if before_step is not None:
            before_step(scheduler, i)
        v = velocity_fn(x, grid[i].expand(x.shape[0]))
        extra = {} if generator is None else {"generator": generator}
        x = scheduler.step(v, i, x, **extra).prev_sample
    return x


def _drive_then_denoise(scheduler, velocity_fn, noise, grid, before_step, generator=None):
    """K - 1 scheduler steps, then x̂ = x - t·v at the point the last one predicted: the official last step. (Neither
    of diffusers' two schedulers below can take it: on the step to σ = 0, λ = +∞, SASolverScheduler's coefficients
    and UniPC's bh1 ones come out NaN.)"""
    num_steps = len(grid) - 1
    x = _drive(scheduler, velocity_fn, noise, grid, num_steps - 1, before_step, generator)
    t = grid[num_steps - 1]
    return x - t * velocity_fn(x, t.expand(x.shape[0]))


@pytest.mark.parametrize(
    "grid",
    [S.sd3_pipeline_timesteps(10), ng.flow_timesteps(7, shift=3.0), torch.linspace(0.9, 0.0, 6)],
    ids=["sd3-pipeline-10", "flow-shift3-7", "from-0.9"],
)
def test_dpm2_equals_diffusers_dpmsolver_multistep(grid):
    diffusers = pytest.importorskip("diffusers")
    grid, velocity, noise = grid.double(), linear_velocity(), noise_like()
    scheduler = diffusers.DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    expected = _drive(scheduler, velocity, noise, grid, num_calls=len(grid) - 1)
    # diffusers' step casts the state to float32: agreement to float32 rounding, not float64
    torch.testing.assert_close(S.dpm2_sample(velocity, noise, grid), expected, rtol=1e-5, atol=1e-5)


AWM_GRID = S.sa_solver_timesteps(S.sd3_pipeline_timesteps(14))


@pytest.mark.parametrize("grid", [AWM_GRID, torch.linspace(0.99, 0.0, 10)], ids=["awm-edited-14", "from-0.99"])
def test_sa_solver_without_noise_is_unipc_bh1_with_a_first_order_corrector(grid):
    """τ = 0: UniP-2 predictor + UniC-1 corrector, B(h) = h. diffusers' UniPC (bh1, order 2, no corrector after
    the first step) is that, except that it corrects with the order of the preceding predictor (2 after the
    warm-up); holding its corrector at order 1 makes the two equal, whatever generator the SA-Solver holds.
    (Grids start below t = 1: there λ = -∞ and UniPC's coefficients come out NaN.)"""
    diffusers = pytest.importorskip("diffusers")
    grid, velocity, noise = grid.double(), linear_velocity(seed=3), noise_like()
    scheduler = diffusers.UniPCMultistepScheduler(
        solver_order=2,
        solver_type="bh1",
        predict_x0=True,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        lower_order_final=True,
        final_sigmas_type="zero",
        disable_corrector=[0],
    )
    hold_corrector_at_first_order = lambda scheduler, i: setattr(scheduler, "this_order", 1)
    expected = _drive_then_denoise(scheduler, velocity, noise, grid, hold_corrector_at_first_order)
    for seed in (0, 1):
        x = S.sa_solver_sample(velocity, noise, grid, noise_level=0.0, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(x, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("noise_level", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("grid", [AWM_GRID, torch.linspace(0.99, 0.0, 8)], ids=["awm-edited-14", "from-0.99"])
def test_sa_solver_equals_diffusers_sasolver_up_to_the_three_official_departures(noise_level, grid):
    """diffusers' SASolverScheduler (predictor 2, corrector 2, data prediction, flow sigmas) on the same sigmas,
    outputs and generator, with the official sampler's three departures emulated: τ at the step's target time
    (tau_func looks it up by step index), no corrector on the first step, and x̂ at the last evaluated point
    instead of a step to σ = 0."""
    diffusers = pytest.importorskip("diffusers")
    grid, velocity, noise = grid.double(), linear_velocity(seed=4), noise_like()
    lo, hi = 0.3, 0.9
    tau_at_target = [noise_level if lo <= t <= hi else 0.0 for t in grid[1:].tolist()]
    scheduler = diffusers.SASolverScheduler(
        predictor_order=2,
        corrector_order=2,
        algorithm_type="data_prediction",
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        lower_order_final=True,
        tau_func=lambda i: tau_at_target[int(i)],
    )
    no_first_corrector = lambda scheduler, i: setattr(scheduler, "last_sample", None) if i == 1 else None
    gen = torch.Generator().manual_seed(7)
    expected = _drive_then_denoise(scheduler, velocity, noise, grid, no_first_corrector, generator=gen)
    gen = torch.Generator().manual_seed(7)
    x = S.sa_solver_sample(velocity, noise, grid, noise_level=noise_level, generator=gen, sde_window=(lo, hi))
    torch.testing.assert_close(x, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("num_steps", [1, 10, 14, 28])
def test_sd3_pipeline_timesteps_are_the_sd3_schedulers_sigmas(num_steps):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(num_steps)
    torch.testing.assert_close(S.sd3_pipeline_timesteps(num_steps), scheduler.sigmas, rtol=0, atol=1e-6)


@pytest.mark.parametrize("noise_level", [0.0, 0.4])
def test_sa_solver_from_t_equal_1_takes_the_limit(noise_level):
    """λ(1) = -∞: the first step is x_1 = α_1·x̂_0 + σ_1·ξ_1 when τ_1 > 0 (the SDE forgets x_0) and the Euler step
    x_0 + (t_1 - 1)·v_0 when τ_1 = 0; ξ_1 is the generator's first draw."""
    velocity, noise, grid = linear_velocity(seed=8), noise_like(), ng.flow_timesteps(9, shift=3.0).double()
    x, states, velocities = S.sa_solver_sample(
        velocity, noise, grid, noise_level, torch.Generator().manual_seed(0), (0.0, 1.0), return_trajectory=True
    )
    t1, x0_hat = grid[1].item(), noise - velocities[0]
    xi = torch.randn(noise.shape, generator=torch.Generator().manual_seed(0), dtype=noise.dtype)
    expected = (1 - t1) * x0_hat + t1 * xi if noise_level > 0 else noise + (t1 - 1) * velocities[0]
    torch.testing.assert_close(states[1], expected, rtol=0, atol=1e-14)
    assert torch.isfinite(x).all()


def test_sa_solver_timesteps_is_awms_edit():
    grid = S.sd3_pipeline_timesteps(14)
    edited = S.sa_solver_timesteps(grid)
    assert edited[0].item() == pytest.approx(0.999)
    assert edited[-2].item() == pytest.approx(grid[-3].item() / 2)
    torch.testing.assert_close(edited[1:-2], grid[1:-2], rtol=0, atol=0)
    assert edited[-1].item() == 0 and grid[0].item() == 1  # the input is not modified


# --------------------------------------------------------------------------------------------------------------
# noise, trajectories, dtypes, the registry


def test_sa_solver_is_reproducible_with_a_generator_and_noisy_without_one():
    velocity, noise = linear_velocity(seed=5), noise_like()
    sample = lambda seed: S.sa_solver_sample(
        velocity, noise, AWM_GRID.double(), noise_level=0.4, generator=torch.Generator().manual_seed(seed)
    )
    assert torch.equal(sample(0), sample(0))
    assert (sample(0) - sample(1)).abs().max().item() > 1e-3


@pytest.mark.parametrize("name", sorted(S.SAMPLERS))
def test_trajectory_holds_the_states_and_velocities_of_each_call(name):
    velocity, noise, grid = linear_velocity(seed=6), noise_like(), AWM_GRID.double()
    x, states, velocities = run(name, velocity, noise, grid, return_trajectory=True)
    num_steps = len(grid) - 1
    assert states.shape == velocities.shape == (num_steps, *noise.shape)
    torch.testing.assert_close(states[0], noise, rtol=0, atol=0)
    for k in range(num_steps):
        torch.testing.assert_close(velocities[k], velocity(states[k], grid[k].expand(3)), rtol=0, atol=0)
    torch.testing.assert_close(x, run(name, velocity, noise, grid), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["dpm2", "sa_solver"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_velocity_fn_sees_and_the_result_keeps_the_noise_dtype(name, dtype):
    seen = set()

    def velocity(x, t):
        seen.update({x.dtype, t.dtype})
        return x.float().mul(0.5).to(x.dtype)

    x = run(name, velocity, noise_like().to(dtype), S.sd3_pipeline_timesteps(6))
    assert x.dtype == dtype and seen == {dtype}


def test_registry_reuses_the_core_euler_sampler():
    assert S.SAMPLERS["euler"] is ng.euler_sample
    assert set(S.SAMPLERS) == {"euler", "dpm2", "sa_solver"}


# --------------------------------------------------------------------------------------------------------------
# bad input: ValueError naming the argument


@pytest.mark.parametrize("name", ["dpm2", "sa_solver"])
@pytest.mark.parametrize(
    "grid, message",
    [
        (torch.tensor([1.0, 0.5, 0.6, 0.0]), "timesteps: expected a strictly decreasing"),
        (torch.tensor([1.0, 0.5, 0.5, 0.0]), "timesteps: expected a strictly decreasing"),
        (torch.tensor([1.5, 0.5, 0.2, 0.0]), r"timesteps: expected values in \[0, 1\]"),
        (torch.tensor([1.0, 0.5, -0.1]), r"timesteps: expected values in \[0, 1\]"),
        (torch.tensor([1.0, float("nan"), 0.0]), r"timesteps: expected values in \[0, 1\]"),
        (torch.tensor([[1.0, 0.0]]), r"timesteps: expected a \(K \+ 1,\) tensor"),
    ],
)
def test_bad_grids_are_refused(name, grid, message):
    with pytest.raises(ValueError, match=message):
        run(name, linear_velocity(), noise_like(), grid)


@pytest.mark.parametrize("name", ["dpm2", "sa_solver"])
def test_non_finite_or_misshapen_velocities_are_refused(name):
    grid, noise = S.sd3_pipeline_timesteps(5), noise_like().float()
    nan_late = lambda x, t: x / t[:, None] if t[0] > 0.5 else torch.full_like(x, float("nan"))
    with pytest.raises(ValueError, match="velocity_fn: expected finite velocities"):
        run(name, nan_late, noise, grid)
    with pytest.raises(ValueError, match="velocity_fn: expected a velocity of x's shape"):
        run(name, lambda x, t: x[:, :2], noise, grid)
    with pytest.raises(ValueError, match="noise: expected finite values"):
        run(name, lambda x, t: x, torch.full_like(noise, float("inf")), grid)


def test_sa_solver_refuses_its_own_bad_arguments():
    velocity, noise = linear_velocity(), noise_like()
    with pytest.raises(ValueError, match="timesteps: expected K >= 2 steps ending at t = 0"):
        S.sa_solver_sample(velocity, noise, torch.tensor([1.0, 0.5, 0.1], dtype=torch.float64))
    with pytest.raises(ValueError, match="timesteps: expected K >= 2 steps ending at t = 0"):
        S.sa_solver_sample(velocity, noise, torch.tensor([1.0, 0.0], dtype=torch.float64))
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="noise_level: expected a finite number >= 0"):
            S.sa_solver_sample(velocity, noise, AWM_GRID, noise_level=bad)
    for bad in ((0.9, 0.3), (-0.1, 0.5), (0.2,)):
        with pytest.raises(ValueError, match="sde_window: expected"):
            S.sa_solver_sample(velocity, noise, AWM_GRID, sde_window=bad)
    with pytest.raises(ValueError, match="timesteps: expected K >= 3 steps ending at t = 0"):
        S.sa_solver_timesteps(torch.tensor([1.0, 0.5, 0.0]))
    with pytest.raises(ValueError, match="num_steps: expected an int >= 1"):
        S.sd3_pipeline_timesteps(0)
