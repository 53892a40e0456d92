"""NormGuard on a 2D flow: RL inflates the velocity norm, and the one-sided hinge stops it — or the toy says not.

    python toy_2d.py                       # the default run: ~13 s on a 2-core CPU
    python toy_2d.py --smoke               # ~1 s, for tests
    python toy_2d.py --sweep               # how the picture changes with training length and lambda (~75 s)
    python toy_2d.py --rl_steps=800 --out_dir=runs/toy_2d_800   # twice the training: the drift hurts quality

What happens, top to bottom:
1. the world: a ring of Gaussians whose density is known in closed form (the "true image distribution"), and a
   classifier-style reward, P(target modes | x). Like a learned reward model it grows more confident the farther
   x moves from the other modes, also off the data's support: a policy can raise it by overshooting.
2. the model: a small velocity MLP, pretrained by flow matching in the diffusers convention, frozen as reference.
3. RL: every (method, variant, seed) — DiffusionNFT, AWM, Diffusion-DPO, each without and with the NormGuard
   hinge — starts from the reference and trains on-policy with group advantages, every loss from normguard.py.
   All 30 models run as one batched ensemble (model s computes exactly VelocityMLP with its own weights).
4. evaluation: the norm ratio ‖v_θ‖/‖v_ref‖ along each policy's own sampling trajectories (overall and per t),
   reward and quality at full and few Euler steps, the inference-time rescale baseline, the checkpoint curves
   and the adjoint diagnostic; then evidence.py judges each claim of the paper by a fixed rule.
Quality is what the reward cannot see: mean log-density under the true ring, the fraction of samples on its
support, and the sliced Wasserstein distance to the ideal reward-tilted distribution p(x)·exp(r(x)/τ)/Z.
"""

import copy
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import cli
import evidence as E
import normguard as ng

METHODS = ("nft", "awm", "dpo")
VARIANTS = E.VARIANTS  # "none": the base loss alone, "guard": base loss + NormGuard hinge
QUALITY = E.Quality("logp", "log p", higher_is_better=True)


@dataclass
class Config:
    # the world: a ring of Gaussians (its log-density is the quality judge) and the reward proxy
    n_modes: int = 8
    radius: float = 2.0
    mode_std: float = 0.2
    # every other mode: moving mass between neighbours needs no longer paths, so a legitimate reward gain does not
    # by itself require larger velocities; overshooting a target mode outward still raises the classifier's confidence
    target_modes: str = "0,2,4,6"  # comma-separated mode indices; mode k sits at angle 2*pi*k/n_modes
    reward_width: float = (
        0.6  # softmax of -|x - mu_k|^2/(2 width^2) over modes: wider than mode_std, so confident off the support too
    )
    tilt_temp: float = 0.1  # tau of the ideal KL-regularised target p(x)*exp(r(x)/tau)/Z (quality view 3)
    # reference velocity MLP v(x_t, t): input x_t and a sinusoidal embedding of the model timestep 1000*t
    hidden: int = 64
    depth: int = 3  # hidden layers
    temb_dim: int = 16
    pretrain_steps: int = 1500
    pretrain_batch: int = 512
    pretrain_lr: float = 3e-3
    ref_seed: int = 0  # the reference is pretrained once with this seed, shared by every RL run
    # RL: on-policy rollouts in groups, one Adam step per rollout batch
    methods: str = "nft,awm,dpo"
    seeds: int = 5  # RL seeds per (method, variant); seed s uses the same rollout noise in both variants
    seed: int = 1  # first RL seed
    rl_steps: int = 400
    groups: int = 8  # "prompts" per step (the toy is unconditional: a group is G samples from one noise batch)
    group_size: int = 8
    rl_lr: float = 5e-5  # NFT and AWM: with rl_steps=400 their un-guarded runs land near the paper's 5-15 % drift
    dpo_lr: float = 2e-3  # DPO does not move at rl_lr (a noisy pairwise signal); 2e-3 lands it at ~10 % too
    sample_steps: int = 10  # Euler steps of the rollout sampler and of the full-step evaluation
    nft_beta: float = 1.0
    dpo_beta: float = 2000.0
    kl_weight: float = 1e-4  # NFT's and AWM's KL-to-reference weight (the official 1e-4)
    # NormGuard: ng.normguard_penalty per sample, squared. The margin departs from the core's default (relative):
    # in 2D the reference velocity nearly vanishes where the ring's modes pull x_t equally (|v_ref| < 0.07 for 10 %
    # of training points at t = 0.7), and the relative hinge's gradient, 2·lam·(|v| - |v_ref|) / |v_ref|^2, explodes
    # there. Image latents, with 10^4-10^5 dims, have no such points. --margin=relative runs the core's default.
    margin: str = "absolute"  # absolute: |v| - |v_ref|; relative: |v|/|v_ref| - 1
    power: int = 2  # 2: squared hinge, 1: plain hinge
    dpo_guard: str = "both"  # which DPO branch the hinge sees: both (the core's README default), winner or loser
    lam: float = 0.1  # DPO's guard uses lam * dpo_beta / 2: its loss gradient carries that factor while z is small
    # evaluation
    eval_samples: int = 1000
    few_steps: int = 3  # Euler steps of the few-step evaluation
    eval_every: int = 40  # RL steps between checkpoint evaluations (early-stopping control, curves)
    ckpt_samples: int = 256
    profile_bins: int = 10  # bins of t for the norm ratio profile
    adjoint_samples: int = 256
    sw_projections: int = 64
    eval_seed: int = 1234
    out_dir: str = "runs/toy_2d"
    plot: bool = True
    threads: int = 1  # torch intra-op threads: these ops are tiny, so extra threads only add sync cost


SMOKE = dict(pretrain_steps=100, rl_steps=6, seeds=2, groups=2, group_size=4, eval_samples=200, ckpt_samples=100)
SMOKE.update(eval_every=3, adjoint_samples=32, sample_steps=4, few_steps=2, out_dir="runs/toy_2d_smoke")
FLAGS = {"smoke": f"tiny sizes, for tests ({SMOKE})", "sweep": "training length x0.5-2, then lam/4 and 4 lam"}


def check_config(cfg):
    """A ValueError naming the first key whose value the run cannot use, and what it expects."""
    targets = [int(k) for k in cfg.target_modes.split(",") if k.isdigit()]
    rules = [
        ("methods", all(m in METHODS for m in cfg.methods.split(",")), f"a comma-separated subset of {METHODS}"),
        (
            "target_modes",
            len(set(targets)) == len(cfg.target_modes.split(",")) < cfg.n_modes > max(targets, default=0),
            f"distinct indices in [0, {cfg.n_modes}) leaving a non-target mode",
        ),
        ("margin", cfg.margin in ("relative", "absolute"), "relative or absolute"),
        ("power", cfg.power in (1, 2), "1 or 2"),
        ("dpo_guard", cfg.dpo_guard in ("both", "winner", "loser"), "both, winner or loser"),
        ("group_size", cfg.group_size >= 2 and cfg.group_size % 2 == 0, "an even int >= 2 (DPO pairs best and worst)"),
        ("lam", cfg.lam >= 0, "a number >= 0"),
    ]
    counts = ("seeds", "rl_steps", "groups", "sample_steps", "few_steps", "eval_every", "pretrain_steps")
    rules += [(k, getattr(cfg, k) >= 1, "an int >= 1") for k in counts]
    scales = ("rl_lr", "dpo_lr", "pretrain_lr", "reward_width", "tilt_temp", "mode_std")
    rules += [(k, getattr(cfg, k) > 0, "a number > 0") for k in scales]
    for key, ok, expected in rules:
        if not ok:
            raise ValueError(f"{key}: expected {expected}, got {getattr(cfg, key)!r}")


def parse_args(argv):
    """(Config, sweep?) from --key=value overrides and the --smoke and --sweep flags (cli.py)."""
    (overrides,), flags = cli.parse(argv, [Config], flags=FLAGS, doc=__doc__)
    cfg = Config(**{**(SMOKE if "smoke" in flags else {}), **overrides})
    cli.checked(check_config, cfg)
    return cfg, "sweep" in flags


# ---------------------------------------------------------------------------------------------------------------
# the world: data, reward and quality, all in closed form


def mode_centers(cfg):
    angle = 2 * math.pi * torch.arange(cfg.n_modes) / cfg.n_modes
    return cfg.radius * torch.stack([angle.cos(), angle.sin()], 1)


def sample_data(cfg, n, generator):
    k = torch.randint(cfg.n_modes, (n,), generator=generator)
    return mode_centers(cfg)[k] + cfg.mode_std * torch.randn(n, 2, generator=generator)


def log_density(cfg, x):
    """log p(x) of the ring, x (..., 2) -> (...)."""
    sq = ((x[..., None, :] - mode_centers(cfg)) ** 2).sum(-1)
    return (
        torch.logsumexp(-sq / (2 * cfg.mode_std**2), -1)
        - math.log(cfg.n_modes)
        - math.log(2 * math.pi * cfg.mode_std**2)
    )


def reward(cfg, x):
    """Classifier-style proxy: P(target modes | x) = sum_{k in T} softmax_k(-|x - mu_k|^2 / (2 w^2)), in [0, 1].

    Logit differences are linear in x, so the confidence keeps rising as x moves away from the other modes,
    on the support or not: the proxy can be hacked by overshooting. x (..., 2) -> (...).
    """
    targets = [int(k) for k in cfg.target_modes.split(",")]
    logits = -((x[..., None, :] - mode_centers(cfg)) ** 2).sum(-1) / (2 * cfg.reward_width**2)
    return torch.logsumexp(logits[..., targets], -1).sub(torch.logsumexp(logits, -1)).exp()


def on_support(cfg, x):
    """1 where x lies within 3 mode_std of some mode center. x (..., 2) -> (...) float."""
    nearest = torch.cdist(x.reshape(-1, 2), mode_centers(cfg)).min(-1).values
    return (nearest < 3 * cfg.mode_std).float().reshape(x.shape[:-1])


def sample_tilted(cfg, n, generator):
    """The ideal KL-regularised RL target p(x)·exp(r(x)/τ)/Z, by importance resampling from the ring."""
    pool = sample_data(cfg, 20 * n, generator)
    weights = torch.exp((reward(cfg, pool) - 1) / cfg.tilt_temp)
    return pool[torch.multinomial(weights, n, replacement=True, generator=generator)]


def sliced_wasserstein(x, y, directions):
    """SW2 between equal-size point sets: x (..., n, 2), y (n, 2), directions (P, 2) -> (...)."""
    px, py = (x @ directions.T).sort(-2).values, (y @ directions.T).sort(-2).values
    return ((px - py) ** 2).mean((-2, -1)).sqrt()


# ---------------------------------------------------------------------------------------------------------------
# the model: one velocity MLP, and S of them run as one batched call


def time_embedding(t, dim):
    """Sinusoidal embedding of the diffusers model timestep TIMESTEP_SCALE·t. t (...) -> (..., dim)."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, dtype=t.dtype) / (dim // 2))
    args = (ng.TIMESTEP_SCALE * t)[..., None] * freqs
    return torch.cat([args.sin(), args.cos()], -1)


class VelocityMLP(nn.Module):
    """v(x_t, t): x (N, 2), t (N,) -> (N, 2). An MLP with SiLU on [x_t, time_embedding(t)]."""

    def __init__(self, cfg):
        super().__init__()
        dims = [2 + cfg.temb_dim] + [cfg.hidden] * cfg.depth + [2]
        self.temb_dim = cfg.temb_dim
        self.layers = nn.ModuleList(nn.Linear(d_in, d_out) for d_in, d_out in zip(dims[:-1], dims[1:]))

    def forward(self, x, t):
        h = torch.cat([x, time_embedding(t, self.temb_dim)], -1)
        for layer in self.layers[:-1]:
            h = F.silu(layer(h))
        return self.layers[-1](h)


class Ensemble(nn.Module):
    """S VelocityMLPs in one module: layer i's weights stacked to (S, in, out), biases to (S, 1, out).

    forward(x (S', N, 2), t (S', N), models) -> (S', N, 2): row s is VelocityMLP.forward of model s (one baddbmm
    per layer does the S matmuls at once; tests/test_toy.py checks it against a loop over VelocityMLP). `models`
    picks S' of the models: a slice (a view: gradients reach only those) or an index tensor (a copy, to evaluate).
    Adam is elementwise, so the models train independently. The init is nn.Linear's: uniform ±1/sqrt(fan_in).
    """

    def __init__(self, cfg, num_models=1):
        super().__init__()
        dims = [2 + cfg.temb_dim] + [cfg.hidden] * cfg.depth + [2]
        self.cfg = cfg
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            bound = 1 / math.sqrt(d_in)
            self.weights.append(nn.Parameter(torch.empty(num_models, d_in, d_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_models, 1, d_out).uniform_(-bound, bound)))

    def forward(self, x, t, models=slice(None)):
        h = torch.cat([x, time_embedding(t, self.cfg.temb_dim)], -1)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b[models], h, w[models])  # h @ w + b, model by model
            h = F.silu(h) if i < len(self.weights) - 1 else h
        return h

    def replicate(self, num_models):
        """An ensemble of num_models copies of model 0 (every RL run starts from the reference)."""
        clone = copy.deepcopy(self)
        clone.weights = nn.ParameterList([nn.Parameter(w[:1].detach().repeat(num_models, 1, 1)) for w in self.weights])
        clone.biases = nn.ParameterList([nn.Parameter(b[:1].detach().repeat(num_models, 1, 1)) for b in self.biases])
        return clone

    @torch.no_grad()
    def model(self, s):
        """Model s as a frozen VelocityMLP."""
        single = VelocityMLP(self.cfg).requires_grad_(False)
        for layer, w, b in zip(single.layers, self.weights, self.biases):
            layer.weight.copy_(w[s].T)
            layer.bias.copy_(b[s, 0])
        return single


def velocity_fn(model, models=slice(None)):
    """Adapt the ensemble to ng.euler_sample: x (S, N, 2) with t (S,) one time per model."""
    return lambda x, t: model(x, t[:, None].expand(x.shape[:2]), models)


def reference_fn(ref):
    """The frozen reference applied to any (..., 2) batch at times t (...)."""
    return lambda x, t: ref(x.reshape(1, -1, 2), t.reshape(1, -1)).reshape(x.shape)


def make_reference(cfg):
    """Pretrain the reference velocity MLP by flow matching (diffusers convention). Returns (model, final loss)."""
    gen = torch.Generator().manual_seed(cfg.ref_seed)
    torch.manual_seed(cfg.ref_seed)
    ref = Ensemble(cfg, 1)
    opt = torch.optim.Adam(ref.parameters(), lr=cfg.pretrain_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.pretrain_steps)
    ema = None
    for _ in range(cfg.pretrain_steps):
        x0 = sample_data(cfg, cfg.pretrain_batch, gen)
        noise, t = torch.randn(x0.shape, generator=gen), torch.rand(cfg.pretrain_batch, generator=gen)
        x_t, u = ng.forward_process(x0, noise, t)
        loss = F.mse_loss(ref(x_t[None], t[None])[0], u)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
    return ref.requires_grad_(False), ema


# ---------------------------------------------------------------------------------------------------------------
# RL: one step of every (method, variant, seed) model


def layout(cfg):
    """Model index -> (method, variant, seed index): a contiguous block of 2·seeds models per method."""
    return [(m, v, s) for m in cfg.methods.split(",") for v in VARIANTS for s in range(cfg.seeds)]


def block(cfg, method):
    """The slice of the ensemble holding a method's models: seeds un-guarded, then seeds guarded."""
    i = cfg.methods.split(",").index(method) * 2 * cfg.seeds
    return slice(i, i + 2 * cfg.seeds)


def hinge(cfg, v, v_ref, lam):
    """The NormGuard penalty on the guarded half of a block's flattened rows (the un-guarded half comes first)."""
    half = len(v) // 2
    return ng.normguard_penalty(v[half:], v_ref[half:], lam=lam, margin=cfg.margin, power=cfg.power)[0]


def dpo_loss(cfg, policy, ref, sl, x0, rewards, gen):
    """Diffusion-DPO on the best vs the worst sample of every group; the guard sees both branches by default.

    The core's losses are batch means of per-sample terms, so flattening the model dim into the batch and
    multiplying by the number of models gives the sum of the per-model losses: each model gets its own gradient.
    """
    M, G = rewards.shape[0], cfg.group_size
    r, xg = rewards.reshape(M, -1, G), x0.reshape(M, -1, G, 2)
    pick = lambda idx: torch.gather(xg, 2, idx[..., None, None].expand(-1, -1, 1, 2)).squeeze(2)
    x_w, x_l = pick(r.argmax(-1)).repeat_interleave(G // 2, 1), pick(r.argmin(-1)).repeat_interleave(G // 2, 1)
    n = x_w.shape[1]  # G/2 draws of (t, eps) per pair keep N rows per model
    noise = torch.randn(M, n, 2, generator=gen)
    t = torch.sigmoid(torch.randn(M, n, generator=gen))  # logit-normal t, as in Diffusion-DPO for flows
    xt_w, u_w = ng.forward_process(x_w.reshape(-1, 2), noise.reshape(-1, 2), t.reshape(-1))
    xt_l, u_l = ng.forward_process(x_l.reshape(-1, 2), noise.reshape(-1, 2), t.reshape(-1))
    v = policy(torch.cat([xt_w.reshape(M, n, 2), xt_l.reshape(M, n, 2)], 1), t.repeat(1, 2), sl)
    v_w, v_l = v[:, :n].reshape(-1, 2), v[:, n:].reshape(-1, 2)
    with torch.no_grad():
        v_ref_w, v_ref_l = ref(xt_w[None], t.reshape(1, -1))[0], ref(xt_l[None], t.reshape(1, -1))[0]
    base, stats = ng.dpo_loss(v_w, v_l, v_ref_w, v_ref_l, u_w, u_l, beta=cfg.dpo_beta)
    lam = cfg.lam * cfg.dpo_beta / 2
    guard_w, guard_l = hinge(cfg, v_w, v_ref_w, lam), hinge(cfg, v_l, v_ref_l, lam)
    guard = {"both": (guard_w + guard_l) / 2, "winner": guard_w, "loser": guard_l}[cfg.dpo_guard]
    return M * base + cfg.seeds * guard, stats


def nft_or_awm_loss(cfg, method, policy, old, ref, sl, x0, rewards, gen):
    """DiffusionNFT or AWM with group advantages, on the sampler's own timesteps (as DiffusionNFT trains)."""
    M, N = rewards.shape
    adv = torch.stack([ng.group_advantages(r, cfg.group_size) for r in rewards])  # each model's own batch
    grid = ng.flow_timesteps(cfg.sample_steps)[:-1]
    t = grid[torch.randint(len(grid), (M, N), generator=gen)]
    noise = torch.randn(M, N, 2, generator=gen)
    x_t, u = ng.forward_process(x0.reshape(-1, 2), noise.reshape(-1, 2), t.reshape(-1))
    v = policy(x_t.reshape(M, N, 2), t, sl).reshape(-1, 2)
    with torch.no_grad():
        v_ref = ref(x_t[None], t.reshape(1, -1))[0]
        v_old = old(x_t.reshape(M, N, 2), t, sl).reshape(-1, 2) if method == "nft" else v.detach()
    if method == "nft":
        base, stats = ng.nft_loss(
            v,
            v_old,
            v_ref,
            x_t,
            x0.reshape(-1, 2),
            t.reshape(-1),
            adv.reshape(-1),
            beta=cfg.nft_beta,
            kl_weight=cfg.kl_weight,
        )
    else:  # one update per rollout batch: the pre-update policy is v itself (rho = 1)
        base, stats = ng.awm_loss(v, v_old, v_ref, u, t.reshape(-1), adv.reshape(-1), ref_weight=cfg.kl_weight)
    return M * base + cfg.seeds * hinge(cfg, v, v_ref, cfg.lam), stats


def adam_step_per_model_lr(opt, model, lr_scale):
    """opt.step() with model s's update multiplied by lr_scale[s]: a per-model learning rate in one optimiser.

    Exact for Adam without weight decay: its moments do not depend on lr and its update is lr·m̂/(sqrt(v̂) + eps).
    lr_scale: (S,) for an ensemble whose parameters all carry the model dim first.
    """
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    with torch.no_grad():
        for p, p0 in zip(model.parameters(), before):
            p.copy_(p0 + (p - p0) * lr_scale.view(-1, *[1] * (p.ndim - 1)))


def train(cfg, ref, progress=True):
    """RL fine-tune every (method, variant, seed) from the reference. Returns (ensemble, checkpoint curves).

    Curves, one per model in layout order: {"step", "reward", "logp", "ratio": a value per checkpoint}, each
    checkpoint on the same fixed noise.
    """
    runs = layout(cfg)
    S, N = len(runs), cfg.groups * cfg.group_size
    gen = torch.Generator().manual_seed(cfg.seed)
    seed_gens = [torch.Generator().manual_seed(1000 * (cfg.seed + s)) for s in range(cfg.seeds)]
    seed_of = torch.tensor([s for _, _, s in runs])
    policy, old = ref.replicate(S), ref.replicate(S).requires_grad_(False)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.rl_lr)
    lr_scale = torch.tensor([cfg.dpo_lr / cfg.rl_lr if m == "dpo" else 1.0 for m, _, _ in runs])
    ckpt_noise = torch.randn(cfg.ckpt_samples, 2, generator=torch.Generator().manual_seed(cfg.eval_seed + 1))
    curves = [{"step": [], "reward": [], "logp": [], "ratio": []} for _ in runs]
    grid = ng.flow_timesteps(cfg.sample_steps)

    def checkpoint(step):
        with torch.no_grad():
            x, states, vels = ng.euler_sample(velocity_fn(policy), ckpt_noise.expand(S, -1, -1), grid, True)
            ratio = trajectory_ratio(ref, states, vels)
        values = {"reward": reward(cfg, x).mean(1), "logp": log_density(cfg, x).mean(1), "ratio": ratio.mean((0, 2))}
        for i, curve in enumerate(curves):
            curve["step"].append(step)
            for key, val in values.items():
                curve[key].append(val[i].item())

    checkpoint(0)
    bar = tqdm(range(1, cfg.rl_steps + 1), desc="rl", disable=not progress, leave=False)
    for step in bar:
        # rollouts: seed s draws the same noise for every method and both variants (paired comparisons)
        noise = torch.stack([torch.randn(N, 2, generator=g) for g in seed_gens])[seed_of]
        with torch.no_grad():
            x0 = ng.euler_sample(velocity_fn(policy), noise, grid)
            rewards = reward(cfg, x0)
        loss, logs = 0.0, []
        for method in cfg.methods.split(","):
            sl = block(cfg, method)
            if method == "dpo":
                loss_m, stats = dpo_loss(cfg, policy, ref, sl, x0[sl], rewards[sl], gen)
            else:
                loss_m, stats = nft_or_awm_loss(cfg, method, policy, old, ref, sl, x0[sl], rewards[sl], gen)
            loss = loss + loss_m
            logs.append(f"{method} nr {stats['norm_ratio'].item():.3f}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        adam_step_per_model_lr(opt, policy, lr_scale)
        with torch.no_grad():  # NFT's old policy: an EMA of theta, decay min(0.001·step, 0.5), once per batch
            for p_old, p in zip(old.parameters(), policy.parameters()):
                p_old.lerp_(p, 1 - min(0.001 * step, 0.5))
        if step % cfg.eval_every == 0 or step == cfg.rl_steps:
            checkpoint(step)
            bar.set_postfix_str(f"reward {rewards.mean().item():.3f} | " + " | ".join(logs))
    return policy, curves


# ---------------------------------------------------------------------------------------------------------------
# evaluation: sampling, the norm ratio along the policy's own trajectories, quality, the adjoint diagnostic


def trajectory_ratio(ref, states, vels):
    """‖v_θ‖/‖v_ref‖ at the policy's own states: states, vels (K, S, N, 2) -> (K, S, N)."""
    t = ng.flow_timesteps(states.shape[0])[:-1][:, None, None].expand(states.shape[:3])
    v_ref = reference_fn(ref)(states, t)
    return ng.norm_ratio(vels.reshape(-1, 2), v_ref.reshape(-1, 2)).reshape(states.shape[:3])


@torch.no_grad()
def evaluate(cfg, policy, ref):
    """Final metrics of every model on the same noise, at the full and the few-step sampler.

    Returns (one evaluation per model in layout order, as evidence.py reads them; the reference's; the samples
    {"models": (S, 600, 2), "reference", "ideal"}; the ideal tilted sample's scores).
    """
    runs = layout(cfg)
    gen = torch.Generator().manual_seed(cfg.eval_seed)
    noise = torch.randn(cfg.eval_samples, 2, generator=gen).expand(len(runs), -1, -1)
    ideal = sample_tilted(cfg, cfg.eval_samples, gen)
    directions = F.normalize(torch.randn(cfg.sw_projections, 2, generator=gen), dim=1)
    unguarded = [i for i, (_, v, _) in enumerate(runs) if v == "none"]
    v_ref = lambda x, t: reference_fn(ref)(x, t[:, None].expand(x.shape[:2]))

    def rescaled(x, t):  # the inference-time baseline, on the un-guarded models only
        v = velocity_fn(policy, unguarded)(x, t)
        return ng.rescale_to_reference(v.reshape(-1, 2), v_ref(x, t).reshape(-1, 2)).reshape(v.shape)

    def scores(x):  # x (M, n, 2) -> one dict of floats per model
        s = {
            "reward": reward(cfg, x).mean(-1),
            "logp": log_density(cfg, x).mean(-1),
            "support": on_support(cfg, x).mean(-1),
            "sw": sliced_wasserstein(x, ideal, directions),
        }
        return [dict(zip(s, row)) for row in zip(*(v.tolist() for v in s.values()))]

    evals, reference = [{} for _ in runs], {}
    for phase, steps in (("full", cfg.sample_steps), ("few", cfg.few_steps)):
        grid = ng.flow_timesteps(steps)
        x, states, vels = ng.euler_sample(velocity_fn(policy), noise, grid, True)
        ratio = trajectory_ratio(ref, states, vels)  # (K, S, N)
        for ev, score, r in zip(evals, scores(x), ratio.mean((0, 2)).tolist()):
            ev[phase] = {**score, "ratio": r}
        for i, score in zip(unguarded, scores(ng.euler_sample(rescaled, noise[unguarded], grid))):
            evals[i]["rescale" if phase == "full" else "rescale_few"] = score
        x_ref = ng.euler_sample(v_ref, noise[:1], grid)
        reference[phase] = {"ratio": 1.0, **scores(x_ref)[0]}  # the reference against itself: ratio 1
        if phase == "full":
            t = grid[:-1].repeat_interleave(ratio.shape[2])
            for s, ev in enumerate(evals):
                ev["profile"] = ng.norm_ratio_profile(ratio[:, s].reshape(-1), t, cfg.profile_bins)[0].tolist()
            samples = {"models": x[:, :600], "reference": x_ref[0, :600], "ideal": ideal[:600]}
    return evals, reference, samples, scores(ideal[None])[0]


def adjoint_diagnostic(cfg, policy, ref):
    """dR/dα_k for v_k -> (1 + α_k)·v_k of every un-guarded model and the reference (ng.velocity_scale_sensitivity).

    Returns (per model in layout order: a dict for an un-guarded one, None for a guarded one; the reference's
    dict): mean and std over samples of the uniform scaling Σ_k dR/dα_k, the fraction of samples where it is
    positive, and the per-step means and stds.
    """
    gen = torch.Generator().manual_seed(cfg.eval_seed + 2)
    idx = [i for i, (_, v, _) in enumerate(layout(cfg)) if v == "none"]
    M, n = len(idx) + 1, cfg.adjoint_samples
    model = ref.replicate(M)
    with torch.no_grad():
        for p, w, r in zip(model.parameters(), policy.parameters(), ref.parameters()):
            p.copy_(torch.cat([w.detach()[idx], r.detach()]))
    noise = torch.randn(n, 2, generator=gen).repeat(M, 1)  # flat (M·n, 2): one α per sample, as the diagnostic needs
    v_flat = lambda x, t: model(x.reshape(M, n, 2), t.reshape(M, n)).reshape(-1, 2)
    grid = ng.flow_timesteps(cfg.sample_steps)
    grad = ng.velocity_scale_sensitivity(v_flat, lambda x: reward(cfg, x), noise, grid)[0].reshape(M, n, -1)
    total = grad.sum(-1)
    stats = {
        "total_mean": total.mean(1),
        "total_std": total.std(1, unbiased=False),
        "frac_positive": (total > 0).float().mean(1),
        "step_mean": grad.mean(1),
        "step_std": grad.std(1, unbiased=False),
    }
    rows = [{k: v[j].tolist() for k, v in stats.items()} for j in range(M)]
    return [rows[idx.index(i)] if i in idx else None for i in range(len(layout(cfg)))], rows[-1]


# ---------------------------------------------------------------------------------------------------------------
# the experiment: train, evaluate, judge, save


def by_run(cfg, per_model):
    """{method: {variant: [per_model[i] for each seed]}} from a list in layout order."""
    runs = layout(cfg)
    return {
        m: {v: [per_model[runs.index((m, v, s))] for s in range(cfg.seeds)] for v in VARIANTS}
        for m in cfg.methods.split(",")
    }


def columns(cfg):
    """The results table's columns (evidence.format_table)."""
    few = cfg.few_steps
    return [
        E.Column("full", "ratio", "norm ratio"),
        E.Column("full", "reward", "reward"),
        E.Column("full", "logp", "log p", 2, 3),
        E.Column("full", "support", "support"),
        E.Column("full", "sw", "SW→tilted"),
        E.Column("few", "reward", f"reward@{few}"),
        E.Column("few", "logp", f"log p@{few}", 2, 3),
    ]


def run(cfg, progress=True, out_dir=None):
    """The whole experiment in memory; with out_dir, also config.json, metrics.json and the figure there.

    Returns {"metrics": everything measured (JSON-able; runs, histories and adjoint as evidence.py reads them),
    "reference": the reference as a VelocityMLP, "models": {method: {variant: [VelocityMLP per seed]}},
    "samples": {"models": (S, 600, 2) in layout order, "reference", "ideal"}}.
    """
    t0 = time.time()
    ref, pre_loss = make_reference(cfg)
    t_pre = time.time() - t0
    policy, curves = train(cfg, ref, progress)
    t_rl = time.time() - t0 - t_pre
    per_model, reference, samples, ideal = evaluate(cfg, policy, ref)
    adj_models, adj_ref = adjoint_diagnostic(cfg, policy, ref)
    runs, histories = by_run(cfg, per_model), by_run(cfg, curves)
    adjoint = {m: variants["none"] for m, variants in by_run(cfg, adj_models).items()}
    pairs = {m: zip(histories[m]["none"], histories[m]["guard"]) for m in runs}
    control = {m: [E.early_stopping_control(none, guard, QUALITY) for none, guard in pairs[m]] for m in runs}
    lines, flags = E.verdicts(runs, reference, adjoint, adj_ref, control, QUALITY, cfg.few_steps)
    metrics = {
        "config": dataclasses.asdict(cfg),
        "pretrain_loss": pre_loss,
        "reference": reference,
        "ideal_tilted": ideal,
        "runs": runs,
        "adjoint": adjoint,
        "adjoint_reference": adj_ref,
        "early_stopping_delta_logp": control,
        "histories": histories,
        "table": E.format_table(runs, reference, columns(cfg)),
        "verdicts": lines,
        "verdict_flags": flags,
        "wall_time_s": {"pretrain": t_pre, "rl": t_rl, "total": time.time() - t0},
    }
    models = by_run(cfg, [policy.model(i) for i in range(len(per_model))])
    result = {"metrics": metrics, "reference": ref.model(0), "models": models, "samples": samples}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if cfg.plot:
            plot(cfg, result, out / "toy_2d.png")
        metrics["wall_time_s"]["total_with_plot"] = time.time() - t0
        config = {"config": dataclasses.asdict(cfg), "command": sys.argv, "git_revision": E.git_revision()}
        E.write_json(out / "config.json", config, indent=2)
        E.write_json(out / "metrics.json", metrics)
    return result


def plot(cfg, result, path):
    """Samples (seed 0) over the true density; norm ratio vs t and during RL; reward vs quality; training paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics, samples = result["metrics"], result["samples"]
    lim = cfg.radius + 1.6
    g = torch.linspace(-lim, lim, 200)
    gx, gy = torch.meshgrid(g, g, indexing="xy")
    density = log_density(cfg, torch.stack([gx, gy], -1)).exp()
    targets = mode_centers(cfg)[[int(k) for k in cfg.target_modes.split(",")]]
    panels = [("reference", samples["reference"]), ("ideal tilted p·e^{r/τ}", samples["ideal"])]
    for i, (m, v, s) in enumerate(layout(cfg)):
        if s == 0:
            panels.append((f"{m}{' + NormGuard' if v == 'guard' else ''} (seed {cfg.seed})", samples["models"][i]))
    ncol = 4
    fig, axes = plt.subplots(
        math.ceil(len(panels) / ncol) + 1, ncol, figsize=(16, 4 * (math.ceil(len(panels) / ncol) + 1))
    )
    for ax, (title, x) in zip(axes.flat, panels):
        ax.contourf(gx, gy, density, levels=12, cmap="Greys")
        ax.scatter(x[:, 0], x[:, 1], s=2, c="tab:red", alpha=0.5)
        ax.scatter(targets[:, 0], targets[:, 1], marker="*", s=120, c="gold", edgecolors="k", zorder=3)
        ax.set(title=title, xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xticks=[], yticks=[])
    for ax in list(axes.flat)[len(panels) : -ncol]:
        ax.axis("off")
    ax_t, ax_steps, ax_rq, ax_tr = axes[-1]
    E.plot_profile(ax_t, metrics["runs"], cfg.profile_bins)
    E.plot_curves(ax_steps, metrics["histories"], "step", "ratio")
    ax_steps.axhline(1, c="k", lw=0.8)
    ax_steps.set(xlabel="RL step", ylabel="‖v_θ‖/‖v_ref‖ (mean over t)", title="norm ratio during RL")
    # filled markers: the full step count; hollow: few steps (Euler's few-step error moves every point down)
    E.plot_reward_quality(ax_rq, metrics["runs"], metrics["reference"], QUALITY, (cfg.sample_steps, cfg.few_steps))
    E.plot_curves(ax_tr, metrics["histories"], "reward", "logp")
    ax_tr.set(xlabel="reward", ylabel="mean log p", title=f"training path (every {cfg.eval_every} steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep(cfg):
    """Training length (x0.5, 1, 1.5, 2) at lam, then lam/4 and 4·lam at twice the length, where the guard has
    something to repair. Each setting is a full run; one line per setting: per method the un-guarded / guarded
    norm ratio, reward and log-density (means over seeds). Writes sweep.json to out_dir."""
    methods = cfg.methods.split(",")
    settings = [(int(cfg.rl_steps * f), cfg.lam) for f in (0.5, 1, 1.5, 2)]
    settings += [(cfg.rl_steps * 2, cfg.lam / 4), (cfg.rl_steps * 2, cfg.lam * 4)]
    print(
        f"{'steps':>5} {'lam':>6} | " + " | ".join(f"{m + ': ratio':>14} {'reward':>11} {'log p':>11}" for m in methods)
    )
    print(f"{'':>12} | " + " | ".join(f"{'none/guard':>14} {'none/guard':>11} {'none/guard':>11}" for _ in methods))

    def pair(runs, m, key, digits):  # un-guarded/guarded, means over seeds
        return "/".join(f"{E.mean_std(E.collect(runs, m, v, 'full', key))[0]:.{digits}f}" for v in VARIANTS)

    rows = []
    for rl_steps, lam in settings:
        metrics = run(dataclasses.replace(cfg, rl_steps=rl_steps, lam=lam, plot=False), progress=False)["metrics"]
        runs = metrics["runs"]
        cells = [
            f"{pair(runs, m, 'ratio', 2):>14} {pair(runs, m, 'reward', 3):>11} {pair(runs, m, 'logp', 2):>11}"
            for m in methods
        ]
        print(f"{rl_steps:>5} {lam:>6.3g} | " + " | ".join(cells), flush=True)
        rows.append({"rl_steps": rl_steps, "lam": lam, **{k: metrics[k] for k in ("runs", "reference", "verdicts")}})
    r = rows[0]["reference"]["full"]
    print(f"reference: reward {r['reward']:.3f}, log p {r['logp']:.2f}")
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    E.write_json(Path(cfg.out_dir) / "sweep.json", rows)


def main(argv):
    cfg, do_sweep = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    print(
        f"device cpu | float32 | {torch.get_num_threads()} thread(s) | {len(layout(cfg))} models trained at once "
        f"({cfg.methods} x {VARIANTS} x {cfg.seeds} seeds) | {cfg.groups}x{cfg.group_size} rollouts/step | "
        f"{cfg.rl_steps} RL steps | lr {cfg.rl_lr:g} (dpo {cfg.dpo_lr:g}) | lam {cfg.lam}, {cfg.margin} margin | "
        f"{cfg.sample_steps} and {cfg.few_steps} Euler steps"
    )
    if do_sweep:
        return sweep(cfg)
    metrics = run(cfg, out_dir=cfg.out_dir)["metrics"]
    ideal, w = metrics["ideal_tilted"], metrics["wall_time_s"]
    print(
        f"pretrain loss {metrics['pretrain_loss']:.3f} | ideal tilted: reward {ideal['reward']:.3f} "
        f"log p {ideal['logp']:.3f}"
    )
    print(metrics["table"])
    print("\n".join(metrics["verdicts"]))
    print(
        f"wall time {w['total']:.1f} s (pretrain {w['pretrain']:.1f} s, RL {w['rl']:.1f} s) | outputs in {cfg.out_dir}"
    )


if __name__ == "__main__":
    cli.run(main)
