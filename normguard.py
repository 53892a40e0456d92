"""NormGuard: a one-sided penalty on velocity-norm inflation in RL post-training of flow matching.

Reference implementation of the NormGuard hinge (arXiv 2606.27771) and of the three velocity-local
base losses it is added to: DiffusionNFT (arXiv 2509.16117), Advantage Weighted Matching (AWM,
arXiv 2509.25050) and Diffusion-DPO in velocity form (arXiv 2311.12908). It imports only torch and
the standard library, so this one file can be copied into any trainer.

Convention (diffusers' FlowMatchEulerDiscreteScheduler, SD3/SD3.5/FLUX), used by every function:
    x_t = (1 - t) * x0 + t * eps,  eps ~ N(0, I),  t in [0, 1],  t = 1 is pure noise
    velocity target u = eps - x0; a diffusers transformer is called with timestep TIMESTEP_SCALE * t
    sampling runs t: 1 -> 0 with Euler steps x <- x + (t_next - t) * v; clean estimate x_t - t * v
Shapes: B is the batch; "..." is any number of non-batch dims: (B, D), (B, C, H, W) latents,
(B, C, F, H, W) video latents, (B, N, D) tokens.

Dtypes, one rule for every function: tensor arguments must be floating point (an integer or bool
tensor raises TypeError). The first tensor argument sets the computing dtype: float64 if it is
float64, float32 otherwise (bf16, fp16, fp32). Every tensor argument (and a velocity_fn's output)
is cast to it before any arithmetic, so mixed bf16/fp32 arguments give the float32 answer for
their values. Losses, statistics, norms and ratios come back in it. Functions that return a
tensor shaped like their first tensor argument (forward_process, euler_sample, rescale_to_reference)
round that result once to the argument's own dtype (euler_sample: each step's state, as diffusers'
scheduler does), and raise if it overflows that dtype. group_advantages computes in float64, as
the official stat tracker does, and returns the same dtype as the rest.

Checks: every public function raises ValueError (TypeError for a wrong type) whose message starts
with the argument's name and says what was expected: shapes, finite values, t in [0, 1], the
ranges of its hyperparameters, and results that would overflow their dtype. Types, shapes and
hyperparameters are checked in Python and cost nothing on the device. Tensor values are checked
with one host sync per call, through small per-sample quantities the function computes anyway; on
a GPU that sync waits for the queued work. `with value_checks(False):` skips them in a hot loop;
under torch.compile and on meta or fake tensors they are skipped always (a compiled graph cannot
raise on a value without a sync; meta and fake tensors have none), so run a step eagerly first.
Statistics are detached 0-dim tensors: calling .item() on them is the only other sync a loop needs
to log.
"""

import contextlib
import contextvars
import math
import numbers

import torch
import torch.nn.functional as F

TIMESTEP_SCALE = 1000.0  # diffusers' SD3/FLUX transformers take timestep = 1000 * t
UNIT = (0.0, 1.0)  # the range of t
NONNEGATIVE = (0.0, math.inf)


# --------------------------------------------------------------------------------------------------
# input checks: an error names the argument and what it expected


def _tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype} (call .float())")


def _check(batch, per_sample=None):
    """Types and shapes only (no device sync).

    batch: name -> (B, ...) tensors of one shape; per_sample: name -> (B,) tensors.
    """
    per_sample = per_sample or {}
    for name, x in {**batch, **per_sample}.items():
        _tensor(name, x)
    (ref_name, ref), *rest = batch.items()
    if ref.ndim < 2 or ref.shape[0] == 0:
        raise ValueError(
            f"{ref_name}: expected shape (B, ...) with B >= 1 and a non-batch dim, "
            f"got {tuple(ref.shape)}"
        )
    for name, x in rest:
        if x.shape != ref.shape:
            raise ValueError(
                f"{name}: expected the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}"
            )
    for name, x in per_sample.items():
        if x.shape != (ref.shape[0],):
            raise ValueError(
                f"{name}: expected shape (B,) = ({ref.shape[0]},), got {tuple(x.shape)}"
            )


# value_checks() switches it per thread and asyncio task: one thread's hot loop leaves another's on
_VALUE_CHECKS = contextvars.ContextVar("normguard_value_checks", default=True)


@contextlib.contextmanager
def value_checks(enabled):
    """Switch the value checks (NaN/Inf, ranges, overflow) on or off inside a with-block.

        with normguard.value_checks(False):   # a hot loop whose inputs were checked once
            loss, stats = normguard.nft_loss(...)

    On by default. Each checked call syncs the host once (on a GPU it waits for the queued work);
    switched off, a bad input gives NaN/Inf or a wrong answer instead of an error. Types, shapes
    and hyperparameters are checked either way. Under torch.compile and on meta or fake tensors the
    value checks are skipped whatever this says. The switch holds for the calling thread (or asyncio
    task) only.
    """
    token = _VALUE_CHECKS.set(bool(enabled))
    try:
        yield
    finally:
        _VALUE_CHECKS.reset(token)


def _values_unchecked(tensors):
    """Whether to skip reading values: switched off, inside torch.compile (a host sync would break
    the graph or stall it), or on tensors without values (the meta device, and the fake tensors
    that shape inference and deferred init trace with)."""
    return (
        torch.compiler.is_compiling()
        or not _VALUE_CHECKS.get()
        or any(
            x.device.type == "meta" or isinstance(x, torch._subclasses.FakeTensor) for x in tensors
        )
    )


def _check_values(inputs, derived=None, ranges=None, explain=None, rules=None):
    """Raise ValueError naming the input that holds NaN/Inf or leaves its range; one host sync.

    derived: small per-sample results the caller computes anyway (norms, errors). Sums propagate
    NaN and Inf, so they are finite exactly when the inputs are (barring an overflow), and checking
    them replaces a pass over every input; only on failure are the inputs scanned to name the
    culprit. ranges: name -> (low, high), closed. rules: message -> 0-dim bool tensor, a relation
    the inputs must satisfy (the message starts with the argument's name). explain: called when
    the inputs are fine but a derived value is not (an overflow); returns the message, or None for
    the generic one.
    """
    if _values_unchecked(inputs.values()):
        return
    ranges, rules = ranges or {}, rules or {}
    tensors = derived if derived is not None else list(inputs.values())
    flags = [torch.isfinite(x).all() for x in tensors]
    flags += [((inputs[n] >= lo) & (inputs[n] <= hi)).all() for n, (lo, hi) in ranges.items()]
    if bool(torch.stack(flags + list(rules.values())).all()):
        return
    for name, x in inputs.items():
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name}: expected finite values, got NaN or Inf")
    for name, (lo, hi) in ranges.items():
        x = inputs[name]
        if not bool(((x >= lo) & (x <= hi)).all()):
            want = f"in [{lo:g}, {hi:g}]" if hi < math.inf else f">= {lo:g}"
            raise ValueError(
                f"{name}: expected values {want}, got min {x.min().item():.4g}, "
                f"max {x.max().item():.4g}"
            )
    for message, holds in rules.items():
        if not bool(holds):
            raise ValueError(message)
    message = explain() if explain is not None else None
    raise ValueError(
        message
        or f"{', '.join(inputs)}: finite, but a reduction over them overflowed; rescale them"
    )


def _real(name, value):
    """A finite Python real number (bool is not one); TypeError / ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    return value


def _positive(name, value, allow_zero=False):
    if not (_real(name, value) > 0 or (allow_zero and value == 0)):
        raise ValueError(
            f"{name}: expected a number {'>= 0' if allow_zero else '> 0'}, got {value}"
        )


def _integer(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name}: expected an int >= {minimum}, got {type(value).__name__} {value!r}"
        )
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")


def _choice(name, value, options):
    if isinstance(value, bool):  # True == 1: a bool would pass for power=1
        raise TypeError(f"{name}: expected one of {options}, got bool {value}")
    if value not in options:
        raise ValueError(f"{name}: expected one of {options}, got {value!r}")


def _callable(name, fn):
    if not callable(fn):
        raise TypeError(
            f"{name}: expected a callable (a function or a module), got {type(fn).__name__}"
        )


def _on_device(name, x, device):
    """x moved to `device`; a ValueError naming `name` for a device torch cannot parse or reach."""
    try:
        device = device if device is None else torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"{name}: expected a torch device such as 'cpu', 'cuda' or 'cuda:0', got {device!r}"
        ) from None
    try:
        return x.to(device=device)
    except (RuntimeError, AssertionError) as e:
        raise ValueError(f"{name}: {device} is not available here ({e})") from None


def _overflow(names, what, dtype):
    """The message for a result that overflows its dtype although the inputs are finite."""
    return (
        f"{names}: finite, but {what} overflows {dtype} (largest finite value "
        f"{torch.finfo(dtype).max:.4g}); pass them in a wider dtype or scale them down"
    )


def _beta_overflow(beta, at_one, what, dtype):
    """The message when a loss overflows on finite inputs and would not at β = 1: β's fault."""
    if not bool(torch.isfinite(at_one).all()):
        return None
    return (
        f"beta: expected a β for which {what} is finite in {dtype} (it is at β = 1), got {beta:g}"
    )


def _stats(**named):
    """Detached 0-dim statistics, stacked into one buffer of their own.

    Under torch.compile, inductor returns one tensor object for outputs it finds equal (λ·hinge at
    λ = 1 and the hinge statistic), so detaching the statistic detached the loss: the compiled step
    trained without it. A stack of two or more is always a new buffer.
    """
    return dict(zip(named, torch.stack([x.detach() for x in named.values()]).unbind()))


def _acc(x):
    """The dtype reductions run in: float64 stays, everything else (bf16, fp16, fp32) is float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_sample_mean(x):
    return x.mean(dim=tuple(range(1, x.ndim)))


def _bcast(t, x):
    """(B,) -> (B, 1, ..., 1) so that t multiplies a (B, ...) tensor sample by sample."""
    return t.reshape(-1, *([1] * (x.ndim - 1)))


# --------------------------------------------------------------------------------------------------
# the convention: forward process, sampling grid, Euler sampler


def forward_process(x0, noise, t):
    """Noise clean samples: x_t = (1 - t)·x0 + t·ε, with velocity target u = ε - x0.

    x0, noise: (B, ...); t: (B,) in [0, 1]. Computed in the dtype rule's dtype (float32 for a bf16
    or fp16 x0, so each result is rounded once) and returned as (x_t, u), both (B, ...) in x0's
    dtype. A u that overflows x0's dtype (fp16: |ε - x0| > 65504) raises.
    """
    _check({"x0": x0, "noise": noise}, {"t": t})
    dt = _acc(x0)
    x0_dt, noise_dt, tb = x0.to(dt), noise.to(dt), _bcast(t.to(dt), x0)
    x_t = ((1 - tb) * x0_dt + tb * noise_dt).to(x0.dtype)
    u = (noise_dt - x0_dt).to(x0.dtype)
    _check_values(
        {"x0": x0, "noise": noise, "t": t},
        derived=[x_t, u],
        ranges={"t": UNIT},
        explain=lambda: _overflow("x0, noise", "x_t or u = noise - x0", x0.dtype),
    )
    return x_t, u


def flow_timesteps(num_steps, shift=1.0, device=None):
    """Sampling grid 1 = t_0 > t_1 > ... > t_K = 0: uniform in t, then SD3's shift.

        t' = s·t / (1 + (s - 1)·t),  computed as  t / (t + (1 - t) / s)  in float64

    The second form is the same function, stays in [0, 1] for every s > 0 and is exact at both
    ends; the first overflows (s·t) or divides by zero (1 + (s - 1)·t) at extreme shifts.
    num_steps: K >= 1; shift: s > 0 (3.0 for SD3 at 512-1024 px, 1.0 leaves the grid uniform);
    device: where to put it (None: the CPU). Returns (K + 1,) float32.
    """
    _integer("num_steps", num_steps)
    _positive("shift", shift)
    # float32 points, widened: shift=1 returns them unchanged, other shifts are correctly rounded
    t = torch.linspace(1.0, 0.0, num_steps + 1).double()
    return _on_device("device", (t / (t + (1 - t) / shift)).float(), device)


def _check_grid(timesteps):
    """A strictly decreasing (K + 1,) grid in [0, 1]; one host sync (often a CPU one)."""
    _tensor("timesteps", timesteps)
    if timesteps.ndim != 1 or timesteps.numel() < 2:
        raise ValueError(
            f"timesteps: expected a (K + 1,) tensor with K >= 1, got shape {tuple(timesteps.shape)}"
        )
    if _values_unchecked([timesteps]):
        return
    inside = ((timesteps >= 0) & (timesteps <= 1)).all()
    decreasing = (timesteps[1:] < timesteps[:-1]).all()
    if bool(inside & decreasing):
        return
    if not bool(inside):
        raise ValueError(
            f"timesteps: expected values in [0, 1] (t = 1 is noise), got min "
            f"{timesteps.min().item():.4g}, max {timesteps.max().item():.4g}; a diffusers "
            f"scheduler's timesteps are TIMESTEP_SCALE·t: pass its sigmas"
        )
    raise ValueError(f"timesteps: expected a strictly decreasing grid, got {timesteps.tolist()}")


def _velocity(velocity_fn, x, t, step):
    """velocity_fn(x, t), which must be a tensor of x's very shape: a (1, ...) velocity would
    broadcast over the batch into an answer for another model."""
    v = velocity_fn(x, t)
    if not isinstance(v, torch.Tensor) or v.shape != x.shape:
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(
            f"velocity_fn: expected a velocity of x's shape {tuple(x.shape)}, got {got} "
            f"at step {step}"
        )
    return v


def euler_sample(velocity_fn, noise, timesteps, return_trajectory=False):
    """Integrate dx/dt = v(x, t) from noise at timesteps[0] with Euler steps.

        x <- x + (t_{k+1} - t_k)·v(x, t_k)

    velocity_fn(x, t) -> v of x's shape: x (B, ...), t (B,) in [0, 1] (a diffusers model wants
    TIMESTEP_SCALE * t). noise: (B, ...); timesteps: (K + 1,) strictly decreasing in [0, 1],
    e.g. flow_timesteps(K). Each step is computed in the dtype rule's dtype and its state rounded
    to noise's dtype. Returns x at timesteps[-1] in noise's dtype; with return_trajectory,
    also the states the K steps started from and their velocities, each (K, B, ...), for drift
    monitoring along the policy's own trajectories. A velocity of another shape raises at once; a
    NaN or Inf velocity raises at the end (it leaves the sample non-finite for good).
    """
    _callable("velocity_fn", velocity_fn)
    _check({"noise": noise})
    _check_grid(timesteps)
    timesteps = timesteps.to(noise.device)
    x, states, velocities, dt = noise, [], [], _acc(noise)
    for k, (t_cur, t_next) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        v = _velocity(velocity_fn, x, t_cur.expand(x.shape[0]).to(x.dtype), k)
        if return_trajectory:
            states.append(x)
            velocities.append(v)
        x = (x.to(dt) + (t_next - t_cur).to(dt) * v.to(dt)).to(noise.dtype)
    _check_values(
        {"noise": noise},
        derived=[x],
        explain=lambda: (
            f"velocity_fn: expected finite velocities; the sample became NaN or Inf (a non-finite "
            f"velocity, or a state beyond {noise.dtype}'s range)"
        ),
    )
    return (x, torch.stack(states), torch.stack(velocities)) if return_trajectory else x


# --------------------------------------------------------------------------------------------------
# norms: the drift monitor, the inference-time rescale baseline, the NormGuard hinge


def _channel_dim(v, channel_dim):
    """The channel dim of v for per-token norms, as an index in 1..ndim-1 (never the batch dim)."""
    if channel_dim is None:
        return 1 if v.ndim >= 4 else v.ndim - 1  # (B, C, H, W), (B, C, F, H, W); (B, N, D), (B, D)
    if isinstance(channel_dim, bool) or not isinstance(channel_dim, numbers.Integral):
        raise TypeError(f"channel_dim: expected an int or None, got {type(channel_dim).__name__}")
    if not -v.ndim <= channel_dim < v.ndim or channel_dim % v.ndim == 0:
        raise ValueError(
            f"channel_dim: expected a non-batch dim of the {v.ndim}-D velocity (1 to {v.ndim - 1}, "
            f"or -{v.ndim - 1} to -1), got {channel_dim}"
        )
    return channel_dim % v.ndim


def _norm(v, granularity="sample", channel_dim=None, dtype=None):
    """velocity_norm without the value check, in `dtype` (default: v's reduction dtype)."""
    _choice("granularity", granularity, ("sample", "token"))
    v = v.to(dtype or _acc(v))
    if granularity == "sample":
        return torch.linalg.vector_norm(v.flatten(1), dim=1)
    c = _channel_dim(v, channel_dim)
    return torch.linalg.vector_norm(v.movedim(c, -1).reshape(v.shape[0], -1, v.shape[c]), dim=-1)


def velocity_norm(v, granularity="sample", channel_dim=None):
    """L2 norm of a velocity, per sample over all non-batch dims, or per token over the channel dim.

    v: (B, ...). granularity="sample" -> (B,); "token" -> (B, T), where the channel dim is
    channel_dim (any dim but the batch dim) or, by default, dim 1 for (B, C, H, W) latents and
    (B, C, F, H, W) video latents, and the last dim for (B, N, D) tokens ((B, D): T = 1).
    Computed in float32 (float64 stays): bf16 squares lose too many bits summed over 10^5 elements.
    """
    _check({"v": v})
    n = _norm(v, granularity, channel_dim)
    _check_values({"v": v}, derived=[n])
    return n


def norm_ratio(v, v_ref, granularity="sample", channel_dim=None, eps=1e-6):
    """Drift monitor ‖v_θ‖ / max(‖v_ref‖, eps), detached: (B,) per sample, (B, T) per token

    v, v_ref: (B, ...) velocities at the same (x_t, t, c); eps > 0. 1.0 means no drift; RL runs
    drift to 1.05-1.15.
    """
    _check({"v": v, "v_ref": v_ref})
    _positive("eps", eps)
    dt = _acc(v)
    n = _norm(v.detach(), granularity, channel_dim, dt)
    n_ref = _norm(v_ref.detach(), granularity, channel_dim, dt)
    _check_values({"v": v, "v_ref": v_ref}, derived=[n, n_ref])
    return n / n_ref.clamp_min(eps)


def _mean_norm_ratio(v, v_ref, dtype, eps=1e-6):
    v, v_ref = v.detach(), v_ref.detach()
    return (_norm(v, dtype=dtype) / _norm(v_ref, dtype=dtype).clamp_min(eps)).mean()


def norm_ratio_profile(ratio, t, num_bins=10):
    """Mean norm ratio per bin of t: bins [i/n, (i+1)/n) for i < n-1, the last one closed at t = 1.

    ratio: (B,) or (B, T) (averaged over tokens first); t: (B,) in [0, 1]; num_bins: int >= 1.
    Returns (means, counts), both (num_bins,); a bin with no sample has mean NaN (no data, not an
    error). Sums run in float32 (float64 stays): a bf16 sum stops growing at 256 values of ~1.
    """
    _tensor("ratio", ratio)
    _tensor("t", t)
    _integer("num_bins", num_bins)
    if ratio.ndim == 0 or ratio.shape[0] == 0:
        raise ValueError(
            f"ratio: expected shape (B,) or (B, T) with B >= 1, got {tuple(ratio.shape)}"
        )
    if t.shape != (ratio.shape[0],):
        raise ValueError(f"t: expected shape (B,) = ({ratio.shape[0]},), got {tuple(t.shape)}")
    ratio = ratio.detach().to(_acc(ratio))
    ratio = ratio.reshape(ratio.shape[0], -1).mean(1) if ratio.ndim > 1 else ratio
    _check_values({"ratio": ratio, "t": t}, ranges={"t": UNIT})
    bins = (t.detach().to(_acc(t)) * num_bins).long().clamp(0, num_bins - 1)  # t's own precision
    # index_add_, not bincount: its output size is known before the values (torch.compile, meta)
    counts = torch.zeros(num_bins, dtype=torch.long, device=bins.device)
    counts.index_add_(0, bins, torch.ones_like(bins))
    sums = torch.zeros(num_bins, dtype=ratio.dtype, device=ratio.device).index_add_(0, bins, ratio)
    return sums / counts.to(ratio.dtype), counts  # 0 / 0 = NaN marks an empty bin


def rescale_to_reference(v, v_ref, eps=1e-12):
    """The inference-time baseline the paper rejects: v <- v·‖v_ref‖ / ‖v‖ per sample.

    v, v_ref: (B, ...); eps > 0. Needs a reference forward at every sampling step. The product is
    formed in float32 (float64 stays), so a bf16/fp16 v whose scale exceeds its range stays finite.
    Returns (B, ...) in v's dtype, direction kept; a result that overflows v's dtype raises.
    """
    _check({"v": v, "v_ref": v_ref})
    _positive("eps", eps)
    dt = _acc(v)
    norm, norm_ref = _norm(v, dtype=dt), _norm(v_ref, dtype=dt)
    out = (v.to(dt) * _bcast(norm_ref / norm.clamp_min(eps), v)).to(v.dtype)
    _check_values(
        {"v": v, "v_ref": v_ref},
        derived=[norm, norm_ref, out],
        explain=lambda: _overflow("v, v_ref", "a norm or v·‖v_ref‖/‖v‖", v.dtype),
    )
    return out


def normguard_penalty(
    v,
    v_ref,
    *,
    lam=1.0,
    granularity="sample",
    margin="relative",
    power=2,
    tolerance=0.0,
    channel_dim=None,
    eps=1e-6,
):
    """NormGuard hinge: penalise ‖v_θ‖ only where it exceeds ‖v_ref‖ (same x_t, t, c).

        excess = ‖v_θ‖/max(‖v_ref‖, eps) - 1   (margin="relative", default)
               = ‖v_θ‖ - ‖v_ref‖                (margin="absolute")
        penalty = lam · mean_units( relu(excess - tolerance) ** power ),  units = samples or tokens

    Add it to any velocity-local base loss: loss = base + penalty; it never pushes a norm up.
    v_ref is detached here whatever the caller passes. Where active, the gradient w.r.t. v_θ is a
    positive multiple of v_θ/‖v_θ‖: it shrinks the magnitude and leaves the direction alone,
    unlike the symmetric KL terms of NFT/AWM that pull the whole vector to v_ref.

    Defaults are our reading (the paper's exact form is not public): per sample, because the drift
    the paper reports is a per-step norm; relative, so that lam carries over between resolutions,
    latent channels and timesteps (‖v‖ grows with sqrt(dims)); squared, so the force fades to
    zero at the boundary and a model that barely exceeds the reference is barely touched. power=1
    gives the plain hinge. In a few dims ‖v_ref‖ can come close to 0, where the relative hinge's
    gradient (∝ 1/‖v_ref‖) blows up: use margin="absolute" there.

    v, v_ref: (B, ...); lam >= 0; power: the int 1 or 2; tolerance >= 0 (in units of the margin);
    eps > 0; granularity and channel_dim as in velocity_norm.
    Returns (penalty, stats): penalty a 0-dim tensor in the dtype rule's dtype; stats holds detached
    "hinge" (unweighted mean), "active_frac" (fraction of units with excess > tolerance) and
    "norm_ratio".
    """
    _check({"v": v, "v_ref": v_ref})
    _positive("lam", lam, allow_zero=True)
    _positive("tolerance", tolerance, allow_zero=True)
    _positive("eps", eps)
    _choice("margin", margin, ("relative", "absolute"))
    _choice("power", power, (1, 2))
    dt = _acc(v)
    norm = _norm(v, granularity, channel_dim, dt)
    norm_ref = _norm(v_ref.detach(), granularity, channel_dim, dt)
    _check_values({"v": v, "v_ref": v_ref}, derived=[norm.detach(), norm_ref])
    ratio = norm / norm_ref.clamp_min(eps)
    excess = ratio - 1 if margin == "relative" else norm - norm_ref
    hinge = F.relu(excess - tolerance) ** power
    penalty = hinge.mean()
    stats = _stats(
        hinge=penalty, active_frac=(excess > tolerance).to(dt).mean(), norm_ratio=ratio.mean()
    )
    return lam * penalty, stats


# --------------------------------------------------------------------------------------------------
# advantages and the three base losses


def group_advantages(rewards, group_size, std_scope="global", eps=1e-4):
    """Group-normalised advantages A = (r - mean_group(r)) / (std(r) + eps), population std.

    rewards: (N,) finite, N a multiple of group_size (an int >= 1), each group (the samples of one
    prompt) contiguous. std_scope: "global" (std over the whole batch, NFT's default) or "group".
    eps > 0. Computed in float64 like the official stat tracker (float32 on MPS, which has no
    float64); a constant group gets exactly A = 0. Returns (N,) in float32 (float64 stays).
    """
    _tensor("rewards", rewards)
    if rewards.ndim != 1 or rewards.numel() == 0:
        raise ValueError(f"rewards: expected a non-empty (N,) tensor, got {tuple(rewards.shape)}")
    _integer("group_size", group_size)
    if rewards.numel() % group_size:
        raise ValueError(
            f"group_size: expected a divisor of N = {rewards.numel()}, got {group_size}"
        )
    _choice("std_scope", std_scope, ("global", "group"))
    _positive("eps", eps)
    _check_values({"rewards": rewards})
    wide = torch.float32 if rewards.device.type == "mps" else torch.float64
    r = rewards.to(wide).reshape(-1, group_size)
    constant = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)
    centred = (r - r.mean(dim=1, keepdim=True)).masked_fill(constant, 0.0)  # mean may round off r
    if std_scope == "global":
        std = r.std(unbiased=False)
    else:
        std = r.std(dim=1, unbiased=False, keepdim=True)
    return (centred / (std + eps)).reshape(-1).to(_acc(rewards))


def nft_loss(v, v_old, v_ref, x_t, x0, t, advantages, *, beta=1.0, adv_clip=5.0, kl_weight=1e-4):
    """DiffusionNFT loss (arXiv 2509.16117) on forward-process points x_t of clean rollouts x0.

        v+ = β·v_θ + (1 - β)·v_old,  v- = (1 + β)·v_old - β·v_θ     (implicit policies)
        p = clip(clip(A, ±A_max) / A_max / 2 + 1/2, 0, 1)             (optimality probability)
        x0± = x_t - t·v±,  w± = sg(mean_dims |x0± - x0|) clamped >= 1e-5,
        ℓ± = mean_dims (x0± - x0)² / w±
        L  = mean_B[ A_max·(p·ℓ+ + (1 - p)·ℓ-) / β ]
             + kl_weight·mean_B mean_dims (v_θ - v_ref)²

    v, v_old, v_ref, x_t, x0: (B, ...); t: (B,) in [0, 1]; advantages: (B,) finite. v_old (the
    EMA "old" policy) and v_ref (frozen base model) are detached here. beta > 0; adv_clip > 0;
    kl_weight >= 0. Returns (loss, stats) with detached "policy", "kl" and "norm_ratio"
    (mean ‖v_θ‖/‖v_ref‖).
    """
    batch = {"v": v, "v_old": v_old, "v_ref": v_ref, "x_t": x_t, "x0": x0}
    per_sample = {"t": t, "advantages": advantages}
    _check(batch, per_sample)
    _positive("beta", beta)
    _positive("adv_clip", adv_clip)
    _positive("kl_weight", kl_weight, allow_zero=True)
    dt = _acc(v)
    v, v_old, v_ref = v.to(dt), v_old.detach().to(dt), v_ref.detach().to(dt)
    x_t, x0, tb = x_t.to(dt), x0.to(dt), _bcast(t.to(dt), v)
    p = (advantages.to(dt).clamp(-adv_clip, adv_clip) / adv_clip / 2 + 0.5).clamp(0, 1)

    def adaptive_x0_loss(v_implicit):
        err = x_t - tb * v_implicit - x0
        weight = _per_sample_mean(err.detach().abs()).clamp_min(1e-5)  # stop-gradient: the scale
        return _per_sample_mean(err**2) / weight

    def policy_term(b):
        positive = adaptive_x0_loss(b * v + (1 - b) * v_old)
        negative = adaptive_x0_loss((1 + b) * v_old - b * v)
        return adv_clip * (p * positive + (1 - p) * negative) / b

    policy_per_sample = policy_term(beta)
    kl_per_sample = _per_sample_mean((v - v_ref) ** 2)
    _check_values(
        {**batch, **per_sample},
        # the raw advantages, not p: clipping would hide an Inf
        derived=[policy_per_sample.detach(), kl_per_sample.detach(), advantages],
        ranges={"t": UNIT},
        explain=lambda: _beta_overflow(beta, policy_term(1.0), "NFT's policy term", dt),
    )
    policy, kl = policy_per_sample.mean(), kl_per_sample.mean()
    stats = _stats(policy=policy, kl=kl, norm_ratio=_mean_norm_ratio(v, v_ref, dt))
    return policy + kl_weight * kl, stats


def _time_weight(err, t, weighting, power):
    if weighting == "uniform":
        return err
    if weighting == "t":
        return t * err
    if weighting == "t2":
        return t**2 * err
    if weighting == "huber":
        return t * (torch.sqrt(err + 1e-10) - 1e-5)
    return t / power * ((err + 1e-10) ** power - 1e-10**power)


def awm_time_weight(err, t, weighting="ghuber", power=0.25):
    """AWM's weighting w(ℓ, t) of the per-sample flow-matching error ℓ; log p~ = -w.

        "uniform": ℓ    "t": t·ℓ    "t2": t²·ℓ    "huber": t·(sqrt(ℓ + 1e-10) - 1e-5)
        "ghuber":  (t / p)·((ℓ + 1e-10)^p - 1e-10^p),  p = power > 0 (official configs: 0.25)

    err: (B,) >= 0; t: (B,) in [0, 1], the same shape. Returns (B,).
    """
    _tensor("err", err)
    _tensor("t", t)
    if err.ndim != 1 or err.numel() == 0:
        raise ValueError(f"err: expected a non-empty (B,) tensor, got {tuple(err.shape)}")
    if t.shape != err.shape:
        raise ValueError(f"t: expected the shape of err {tuple(err.shape)}, got {tuple(t.shape)}")
    _choice("weighting", weighting, ("uniform", "t", "t2", "huber", "ghuber"))
    _positive("power", power)
    dt = _acc(err)
    err, t_dt = err.to(dt), t.to(dt)
    w = _time_weight(err, t_dt, weighting, power)
    _check_values(
        {"err": err, "t": t}, derived=[w.detach()], ranges={"err": NONNEGATIVE, "t": UNIT}
    )
    return w


AWM_KL_WEIGHTINGS = ("uniform", "elbo")


def _kl_weight(t, kl_weighting):
    if kl_weighting == "uniform":
        return torch.ones_like(t)
    sigma = 0.7 * torch.sqrt(t / (1 - t.clamp(max=0.99)))  # the official std_dev_t
    return 1 / (2 * sigma**2)


def _elbo_rule(t, kl_weighting):
    """The rule that keeps the "elbo" weight finite, for t in the dtype it is computed in: σ_t = 0
    at t = 0, and below the dtype's smallest normal number 1/(2σ_t²) overflows (k < 1.02 / t)."""
    if kl_weighting != "elbo":
        return {}
    tiny = torch.finfo(t.dtype).tiny
    message = (
        f"t: expected values >= {tiny:.4g} with kl_weighting='elbo' ({t.dtype}'s smallest normal "
        f"number: below it σ_t² underflows and 1/(2σ_t²) overflows; σ_t = 0 at t = 0)"
    )
    return {message: (t >= tiny).all()}


def awm_kl_weight(t, kl_weighting="uniform"):
    """AWM's weight k(t) of a KL term mean_dims (v_θ - v')², per row: 1 or 1 / (2·σ_t²).

        "uniform": k = 1 (every official config)
        "elbo":    k = 1 / (2·σ_t²),  σ_t = 0.7·sqrt(t / (1 - min(t, 0.99)))

    σ_t is the noise std at t of Flow-GRPO's SDE sampler at noise level 0.7 (the official code's
    std_dev_t), so "elbo" is the Gaussian KL form |Δv|²/(2σ²): it weighs rows near the noise end
    less (σ_1 = 7) and rows near the data end more (σ_t -> 0 as t -> 0).
    t: (B,) in [0, 1]; for "elbo" at least the dtype's smallest normal number (float32: 1.2e-38),
    below which k overflows. Returns (B,) in the dtype rule's dtype.
    """
    _tensor("t", t)
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(f"t: expected a non-empty (B,) tensor, got {tuple(t.shape)}")
    _choice("kl_weighting", kl_weighting, AWM_KL_WEIGHTINGS)
    t_dt = t.to(_acc(t))
    k = _kl_weight(t_dt, kl_weighting)
    _check_values({"t": t}, ranges={"t": UNIT}, rules=_elbo_rule(t_dt, kl_weighting))
    return k


def _awm_overflow(gap, adv, dt):
    """The message when AWM's loss overflows: only a large log-ratio at A < 0 can do that."""
    if not bool((adv < 0).any()) or bool(torch.isfinite(gap.exp()[adv < 0]).all()):
        return None
    return (
        f"v, v_old: log p~ - log p~_old reaches {gap[adv < 0].max().item():.4g} on a sample with "
        f"A < 0, where the loss is |A|·exp(gap) and exceeds {dt}'s range: v is far off-policy "
        f"from v_old (lower the learning rate, or refresh v_old more often)"
    )


def _check_awm_options(
    weighting,
    power,
    clip_range,
    adv_clip,
    ref_weight,
    ema_weight,
    kl_weighting,
    loss_type,
    timesteps_per_sample,
):
    """awm_loss's keyword arguments, each checked against what its docstring allows."""
    _choice("weighting", weighting, ("uniform", "t", "t2", "huber", "ghuber"))
    for name, value in (("power", power), ("clip_range", clip_range), ("adv_clip", adv_clip)):
        _positive(name, value)
    _positive("ref_weight", ref_weight, allow_zero=True)
    _positive("ema_weight", ema_weight, allow_zero=True)
    _choice("kl_weighting", kl_weighting, AWM_KL_WEIGHTINGS)
    _choice("loss_type", loss_type, ("exp_first", "sum_first"))
    _integer("timesteps_per_sample", timesteps_per_sample)


def _one_ratio_per_sample(gap, adv, advantages, n, rules):
    """loss_type="sum_first": a sample's log-ratio is the mean over its n rows (timestep-major:
    row j·N + i), and its rows must carry one advantage (a rule added to `rules`)."""
    by_row = advantages.view(n, -1)
    message = "advantages: expected the same value on the timesteps_per_sample rows of a sample"
    rules[f"{message} (rows j·N + i, loss_type='sum_first')"] = (by_row == by_row[:1]).all()
    return gap.view(n, -1).mean(0), adv.view(n, -1)[0]


def awm_loss(
    v,
    v_old,
    v_ref,
    target,
    t,
    advantages,
    *,
    weighting="ghuber",
    power=0.25,
    clip_range=1.0,
    adv_clip=5.0,
    ref_weight=1e-4,
    v_ema=None,
    ema_weight=1.0,
    kl_weighting="uniform",
    loss_type="exp_first",
    timesteps_per_sample=1,
):
    """Advantage Weighted Matching loss (arXiv 2509.25050), one row per (sample, train timestep).

        ℓ = mean_dims (v - u)²,  log p~ = -w(ℓ, t)  (awm_time_weight)
        ρ = exp(log p~_θ - log p~_old),  A' = clip(A, ±A_max) / A_max  (in [-1, 1])
        L = mean_units[ max(-A'·ρ, -A'·clip(ρ, 1 - c, 1 + c)) ]
            + ref_weight·mean_B[ k(t)·mean_dims (v_θ - v_ref)² ]
            + ema_weight·mean_B[ k(t)·mean_dims (v_θ - v_ema)² ]    (when v_ema is given)

    loss_type: "exp_first" (every official config) forms ρ per row: units = rows. "sum_first"
    averages log p~_θ - log p~_old over a sample's T = timesteps_per_sample rows first: one ρ per
    sample, units = samples. Its rows are laid out timestep-major, B = T·N: row j·N + i is sample
    i at its j-th train timestep, and the T rows of a sample carry the same advantage. At ρ = 1
    (v_old = v_θ before the update) both give the gradient of mean_B[A'·w(ℓ, t)].
    k(t) = awm_kl_weight(t, kl_weighting): "uniform" (1, every official config) or "elbo"
    (1 / (2σ_t²)), for both KL terms (the official code has a switch per term).
    Overflow: for A' >= 0 the policy term is -A'·min(ρ, 1 + c), constant once ρ > 1 + c, so the
    exponent is capped just above log(1 + c) there: same value and gradient, and no exp overflow
    (nor 0·inf = NaN at A' = 0) however far v is from v_old. For A' < 0 it is |A'|·max(ρ, 1 - c),
    unbounded in ρ: a log-ratio beyond ~88 (float32) makes the true loss overflow, which raises.
    Precision: the official code forms log p~ and ρ in float64; here they are float32 unless v is
    float64 (pass float64 to match it exactly; MPS has no float64). Measured against float64 on
    SD3-sized latents (8, 16, 64, 64), ghuber weighting, log-ratios up to 0.08 (a few optimiser
    steps): relative error at most 3e-7 for ρ, 3e-6 for the loss, 4e-7 for the gradient (largest
    entry); bf16 inputs add only the bf16 gradient's own rounding (3e-3).
    v, v_old, v_ref, target (= u = ε - x0), v_ema: (B, ...); t: (B,) in [0, 1] (> 0 for "elbo");
    advantages: (B,) finite. v_old, v_ref, v_ema are detached. weighting, power as in
    awm_time_weight; clip_range c > 0; adv_clip > 0; ref_weight >= 0; ema_weight >= 0 weighs the
    EMA term, which is there only when v_ema is given (official ema_beta: 1); timesteps_per_sample
    an int dividing B. Returns (loss, stats) with detached "policy", "kl_ref", "kl_ema" (both
    weighted by k(t)), "ratio" (mean ρ over units, Inf when ρ overflows), "clip_frac",
    "norm_ratio".
    """
    options = (weighting, power, clip_range, adv_clip, ref_weight, ema_weight, kl_weighting)
    _check_awm_options(*options, loss_type, timesteps_per_sample)
    batch = {"v": v, "v_old": v_old, "v_ref": v_ref, "target": target}
    if v_ema is not None:
        batch["v_ema"] = v_ema
    per_sample = {"t": t, "advantages": advantages}
    _check(batch, per_sample)
    rows = v.shape[0]
    if rows % timesteps_per_sample:
        raise ValueError(
            f"timesteps_per_sample: expected a divisor of B = {rows}, got {timesteps_per_sample}"
        )
    dt = _acc(v)
    v, target, t_dt = v.to(dt), target.to(dt), t.to(dt)
    log_p = -_time_weight(_per_sample_mean((v - target) ** 2), t_dt, weighting, power)
    err_old = _per_sample_mean((v_old.detach().to(dt) - target) ** 2)
    log_p_old = -_time_weight(err_old, t_dt, weighting, power)
    k = _kl_weight(t_dt, kl_weighting)
    kl_ref = k * _per_sample_mean((v - v_ref.detach().to(dt)) ** 2)
    kl_ema = torch.zeros_like(kl_ref)
    if v_ema is not None:
        kl_ema = k * _per_sample_mean((v - v_ema.detach().to(dt)) ** 2)
    adv = advantages.to(dt).clamp(-adv_clip, adv_clip) / adv_clip
    gap = log_p - log_p_old
    rules = _elbo_rule(t_dt, kl_weighting)
    if loss_type == "sum_first":
        gap, adv = _one_ratio_per_sample(gap, adv, advantages, timesteps_per_sample, rules)
    capped = torch.where(adv >= 0, gap.clamp(max=math.log1p(clip_range) + 1.0), gap)
    ratio = torch.exp(capped)
    policy = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
    derived = [log_p.detach(), log_p_old, policy.detach(), kl_ref.detach(), kl_ema.detach()]
    _check_values(
        {**batch, **per_sample},
        derived=derived + [advantages],  # the raw advantages: clipping would hide an Inf
        ranges={"t": UNIT},
        rules=rules,
        explain=lambda: _awm_overflow(gap.detach(), adv, dt),
    )
    kl_ref, kl_ema = kl_ref.mean(), kl_ema.mean()
    true_ratio = gap.detach().exp()
    stats = _stats(
        policy=policy,
        kl_ref=kl_ref,
        kl_ema=kl_ema,
        ratio=true_ratio.mean(),
        clip_frac=((true_ratio - 1).abs() > clip_range).to(dt).mean(),
        norm_ratio=_mean_norm_ratio(v, v_ref, dt),
    )
    return policy + ref_weight * kl_ref + ema_weight * kl_ema, stats


def dpo_loss(v_w, v_l, v_ref_w, v_ref_l, target_w, target_l, *, beta=2000.0):
    """Diffusion-DPO in velocity form (arXiv 2311.12908): winner w and loser l share t and ε.

        err_m^k = mean_dims (v_m(x_t^k) - u^k)²,  m in {θ, ref}, k in {w, l},  u^k = ε - x0^k
        z = -(β/2)·[(err_θ^w - err_ref^w) - (err_θ^l - err_ref^l)],   L = mean_B[ -log σ(z) ]

    All tensors (B, ...); the reference velocities are detached. beta: finite and nonzero (2000 by
    default); swapping winner and loser with β -> -β gives the same loss, so a negative β is
    accepted and prefers l. Returns (loss, stats) with detached "accuracy" (fraction of pairs with
    z > 0), "margin" (mean z) and "norm_ratio" over winners and losers.
    """
    batch = {
        "v_w": v_w,
        "v_l": v_l,
        "v_ref_w": v_ref_w,
        "v_ref_l": v_ref_l,
        "target_w": target_w,
        "target_l": target_l,
    }
    _check(batch)
    if _real("beta", beta) == 0:
        raise ValueError("beta: expected a finite nonzero number, got 0")
    dt = _acc(v_w)

    def err(v, u):
        return _per_sample_mean((v.to(dt) - u.to(dt)) ** 2)

    winner = err(v_w, target_w) - err(v_ref_w.detach(), target_w)
    loser = err(v_l, target_l) - err(v_ref_l.detach(), target_l)
    z = -beta / 2 * (winner - loser)
    _check_values(
        batch,
        derived=[z.detach()],
        explain=lambda: _beta_overflow(beta, (winner - loser) / 2, "the logit z", dt),
    )
    ratios = _mean_norm_ratio(v_w, v_ref_w, dt) + _mean_norm_ratio(v_l, v_ref_l, dt)
    stats = _stats(accuracy=(z > 0).to(dt).mean(), margin=z.mean(), norm_ratio=ratios / 2)
    return -F.logsigmoid(z).mean(), stats


# --------------------------------------------------------------------------------------------------
# the adjoint sensitivity diagnostic


def _check_rewards(rewards, batch):
    """reward_fn's answer: a (B,) tensor differentiable in x (not detached, not from .item())."""
    if not isinstance(rewards, torch.Tensor) or rewards.shape != (batch,):
        got = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"reward_fn: expected (B,) = ({batch},) rewards, got {got}")
    if not rewards.requires_grad:
        raise ValueError(
            "reward_fn: expected rewards differentiable in x, got a tensor that does not require "
            "grad (a .detach(), .item() or torch.no_grad() inside reward_fn?)"
        )


def velocity_scale_sensitivity(velocity_fn, reward_fn, noise, timesteps):
    """First-order change of a differentiable reward when step k's velocity is scaled.

        v_k -> (1 + α_k)·v_k:  dR/dα_k = (t_{k+1} - t_k)·<a_{k+1}, v_k>,
        a_{k+1} = ∂R/∂x_{k+1}

    (a_{k+1} is the adjoint, by backprop), computed for every sample and step at α = 0 by one
    backward pass through euler_sample. "No coherent first-order signal" in magnitude means these
    change sign across samples: |batch mean| small next to the std.
    velocity_fn(x, t) as in euler_sample and differentiable in x; it must treat samples
    independently (no batch statistics), since per-sample gradients are read off the gradient of
    the batch sum. reward_fn(x0) -> (B,) finite. noise: (B, ...); timesteps as in euler_sample.
    Works under torch.no_grad() and torch.inference_mode() too: it turns autograd back on.
    Returns (dR_dalpha (B, K), stats) with "mean", "std" per step (K,), and "total_mean",
    "total_std" of the uniform scaling Σ_k dR/dα_k (all steps scaled together), all in the dtype
    rule's dtype.
    """
    _callable("velocity_fn", velocity_fn)
    _callable("reward_fn", reward_fn)
    _check({"noise": noise})
    _check_grid(timesteps)
    with torch.inference_mode(False), torch.enable_grad():
        # inference tensors cannot enter a graph that is differentiated: a normal copy of each
        noise, timesteps = (x.clone() if x.is_inference() else x for x in (noise, timesteps))
        shape = (noise.shape[0], timesteps.numel() - 1)
        alpha = torch.zeros(shape, dtype=noise.dtype, device=noise.device, requires_grad=True)
        steps = iter(range(shape[1]))  # euler_sample calls velocity_fn once per step, in order

        def scaled_velocity(x, t):
            k = next(steps)  # velocity checked before scaling: (1 + α) would broadcast a (1, ...) v
            return (1 + _bcast(alpha[:, k], x)) * _velocity(velocity_fn, x, t, k)

        rewards = reward_fn(euler_sample(scaled_velocity, noise, timesteps))
        _check_rewards(rewards, noise.shape[0])
        (grad,) = torch.autograd.grad(rewards.sum(), alpha)
    grad = grad.to(_acc(noise))
    _check_values(
        {"noise": noise},
        derived=[rewards.detach(), grad],
        explain=lambda: "reward_fn: expected finite rewards and reward gradients, got NaN or Inf",
    )
    total = grad.sum(dim=1)
    stats = {
        "mean": grad.mean(0),
        "std": grad.std(0, unbiased=False),
        "total_mean": total.mean(),
        "total_std": total.std(unbiased=False),
    }
    return grad, stats
