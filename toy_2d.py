"""NormGuard on a 2D flow: RL inflates the velocity norm, and the one-sided hinge stops it — or the toy says not.

    python toy_2d.py                       # the default run: ~13 s on a 2-core CPU
    python toy_2d.py --smoke               # ~1 s, for tests
    python toy_2d.py --sweep               # how the picture changes with training length and lambda (~75 s)
    python toy_2d.py --rl_steps=800 --out_dir=runs/toy_2d_800   # twice the training: the drift hurts quality

What happens, top to bottom:
1. data: a ring of Gaussians whose density is known in closed form (the "true image distribution").
2. reference: a small velocity MLP pretrained by flow matching in the diffusers convention (normguard.py), frozen.
3. reward: a classifier-style proxy, P(target modes | x) from a softmax over the modes' distance logits. Like a
   learned reward model it grows more confident the farther x moves away from the other modes, also off the
   data's support, so a policy can raise it by overshooting — the reward hacking the paper's judge would see.
4. RL: every (method, variant, seed) model — DiffusionNFT, AWM, Diffusion-DPO, each with and without the
   NormGuard hinge — is trained at once as one batched ensemble (weights with a leading model dim, applied with
   baddbmm), on-policy, with group advantages, every loss from normguard.py.
5. evaluation: the norm ratio ‖v_θ‖/‖v_ref‖ along each policy's own sampling trajectories (overall and per t),
   reward and quality at full and few Euler steps, the inference-time rescale baseline, an early-stopping
   control, and the adjoint diagnostic; a results table, one verdict per claim, a figure and a metrics JSON.
Quality is what the reward cannot see: mean log-density under the true ring, the fraction of samples on its
support, and the sliced Wasserstein distance to the ideal reward-tilted distribution p(x)·exp(r(x)/τ)/Z.
"""
import dataclasses
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import normguard as ng

METHODS = ("nft", "awm", "dpo")
VARIANTS = ("none", "guard")  # un-guarded base loss, base loss + NormGuard hinge


@dataclass
class Config:
    # data: a ring of Gaussians (the true distribution; its log-density is the quality judge)
    n_modes: int = 8
    radius: float = 2.0
    mode_std: float = 0.2
    # reward proxy: P(target modes | x) under a softmax of -|x - mu_k|^2 / (2 width^2) over the modes
    # every other mode: moving mass between neighbours needs no longer paths, so a legitimate reward gain does not
    # by itself require larger velocities; overshooting a target mode outward still raises the classifier's confidence
    target_modes: str = "0,2,4,6"  # comma-separated mode indices; mode k sits at angle 2*pi*k/n_modes
    reward_width: float = 0.6  # wider than mode_std: a soft classifier, confident off the support too
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
    few_steps: int = 3
    eval_every: int = 40  # RL steps between checkpoint evaluations (early-stopping control, curves)
    ckpt_samples: int = 256
    profile_bins: int = 10
    adjoint_samples: int = 256
    sw_projections: int = 64
    eval_seed: int = 1234
    out_dir: str = "runs/toy_2d"
    plot: bool = True
    threads: int = 1  # torch intra-op threads: these ops are tiny, so extra threads only add sync cost


SMOKE = dict(pretrain_steps=100, rl_steps=6, seeds=2, groups=2, group_size=4, eval_samples=200, ckpt_samples=100,
             eval_every=3, adjoint_samples=32, sample_steps=4, few_steps=2, out_dir="runs/toy_2d_smoke")


def parse_args(argv):
    """--key=value overrides of Config, plus --smoke (tiny preset) and --sweep (the length/lambda sweep)."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    overrides, smoke, sweep = {}, False, False
    for arg in argv:
        if arg == "--smoke":
            smoke = True
            continue
        if arg == "--sweep":
            sweep = True
            continue
        key, eq, value = arg[2:].partition("=")
        if not arg.startswith("--") or not eq or key not in fields:
            raise ValueError(f"argument {arg!r}: expected --smoke, --sweep or --key=value with key one of "
                             f"{sorted(fields)}")
        kind = type(getattr(Config, key))
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--{key}: expected true or false, got {value!r}")
            overrides[key] = value.lower() in ("true", "1")
        else:
            try:
                overrides[key] = kind(value)
            except ValueError:
                raise ValueError(f"--{key}: expected a {kind.__name__}, got {value!r}") from None
    cfg = Config(**{**(SMOKE if smoke else {}), **overrides})
    check_config(cfg)
    return cfg, sweep


def check_config(cfg):
    for m in cfg.methods.split(","):
        if m not in METHODS:
            raise ValueError(f"methods: expected a comma-separated subset of {METHODS}, got {cfg.methods!r}")
    try:
        targets = [int(k) for k in cfg.target_modes.split(",")]
    except ValueError:
        targets = []
    if (not targets or any(not 0 <= k < cfg.n_modes for k in targets) or len(set(targets)) != len(targets)
            or len(targets) == cfg.n_modes):
        raise ValueError(f"target_modes: expected distinct indices in [0, {cfg.n_modes}) leaving a non-target mode, "
                         f"got {cfg.target_modes!r}")
    if cfg.margin not in ("relative", "absolute") or cfg.power not in (1, 2):
        raise ValueError(f"margin, power: expected relative or absolute and 1 or 2, got {cfg.margin!r}, {cfg.power!r}")
    if cfg.dpo_guard not in ("both", "winner", "loser"):
        raise ValueError(f"dpo_guard: expected both, winner or loser, got {cfg.dpo_guard!r}")
    if cfg.group_size < 2 or cfg.group_size % 2:
        raise ValueError(f"group_size: expected an even int >= 2 (DPO pairs best and worst), got {cfg.group_size}")
    for name in ("seeds", "rl_steps", "groups", "sample_steps", "few_steps", "eval_every", "pretrain_steps"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {getattr(cfg, name)}")
    for name in ("rl_lr", "dpo_lr", "pretrain_lr", "lam", "reward_width", "tilt_temp", "mode_std"):
        if not (getattr(cfg, name) >= 0 if name == "lam" else getattr(cfg, name) > 0):
            bound = ">= 0" if name == "lam" else "> 0"
            raise ValueError(f"{name}: expected a number {bound}, got {getattr(cfg, name)}")


# ---------------------------------------------------------------------------------------------------------------
# data, reward and quality: everything about the 2D world is closed form


def mode_centers(cfg):
    angle = 2 * math.pi * torch.arange(cfg.n_modes) / cfg.n_modes
    return cfg.radius * torch.stack([angle.cos(), angle.sin()], 1)


def sample_data(cfg, n, generator):
    k = torch.randint(cfg.n_modes, (n,), generator=generator)
    return mode_centers(cfg)[k] + cfg.mode_std * torch.randn(n, 2, generator=generator)


def log_density(cfg, x):
    """log p(x) of the ring, x (..., 2) -> (...)."""
    sq = ((x[..., None, :] - mode_centers(cfg)) ** 2).sum(-1)
    return (torch.logsumexp(-sq / (2 * cfg.mode_std**2), -1) - math.log(cfg.n_modes)
            - math.log(2 * math.pi * cfg.mode_std**2))


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
# model: S independent velocity MLPs evaluated at once


def time_embedding(t, dim):
    """Sinusoidal embedding of the diffusers model timestep TIMESTEP_SCALE·t. t (...) -> (..., dim)."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, dtype=t.dtype) / (dim // 2))
    args = (ng.TIMESTEP_SCALE * t)[..., None] * freqs
    return torch.cat([args.sin(), args.cos()], -1)


class EnsembleMLP(nn.Module):
    """S velocity MLPs v(x_t, t) with weights (S, in, out): one baddbmm per layer trains every run at once.

    forward(x (S', N, 2), t (S', N), models) -> (S', N, 2); `models` picks S' models: a slice (a view, so
    gradients reach only those models) or an index tensor (a copy, for evaluation). Adam is elementwise, so the
    models stay independent.
    """

    def __init__(self, num_models, cfg):
        super().__init__()
        dims = [2 + cfg.temb_dim] + [cfg.hidden] * cfg.depth + [2]
        self.temb_dim = cfg.temb_dim
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            bound = 1 / math.sqrt(d_in)  # nn.Linear's default init
            self.weights.append(nn.Parameter(torch.empty(num_models, d_in, d_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_models, 1, d_out).uniform_(-bound, bound)))

    def forward(self, x, t, models=slice(None)):
        h = torch.cat([x, time_embedding(t, self.temb_dim)], -1)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b[models], h, w[models])
            if i < len(self.weights) - 1:
                h = F.silu(h)
        return h

    def replicate(self, num_models):
        """An ensemble of num_models copies of model 0 (every RL run starts from the reference)."""
        clone = EnsembleMLP.__new__(EnsembleMLP)
        nn.Module.__init__(clone)
        clone.temb_dim = self.temb_dim
        clone.weights = nn.ParameterList([nn.Parameter(w[:1].detach().repeat(num_models, 1, 1)) for w in self.weights])
        clone.biases = nn.ParameterList([nn.Parameter(b[:1].detach().repeat(num_models, 1, 1)) for b in self.biases])
        return clone


def velocity_fn(model, models=slice(None)):
    """Adapt the ensemble to ng.euler_sample: x (S, N, 2) with t (S,) one time per model."""
    return lambda x, t: model(x, t[:, None].expand(x.shape[:2]), models)


def reference_fn(ref):
    """The frozen reference applied to any (..., 2) batch at times t (...)."""
    def v_ref(x, t):
        return ref(x.reshape(1, -1, 2), t.reshape(1, -1)).reshape(x.shape)
    return v_ref


def make_reference(cfg):
    """Pretrain the reference velocity MLP by flow matching (diffusers convention). Returns (model, final loss)."""
    gen = torch.Generator().manual_seed(cfg.ref_seed)
    torch.manual_seed(cfg.ref_seed)
    ref = EnsembleMLP(1, cfg)
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
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref, ema


# ---------------------------------------------------------------------------------------------------------------
# RL: every (method, variant, seed) at once


def layout(cfg):
    """Model index -> (method, variant, seed index): a contiguous block of 2·seeds models per method."""
    methods = cfg.methods.split(",")
    return [(m, v, s) for m in methods for v in VARIANTS for s in range(cfg.seeds)]


def block(cfg, method, variant=None):
    """The slice of the ensemble holding a method's models (or only one variant of them)."""
    i = cfg.methods.split(",").index(method) * 2 * cfg.seeds
    if variant is None:
        return slice(i, i + 2 * cfg.seeds)
    j = i + VARIANTS.index(variant) * cfg.seeds
    return slice(j, j + cfg.seeds)


def method_loss(cfg, method, policy, old, ref, x0, rewards, gen):
    """The summed per-model loss of one method's block (base loss, + hinge on the guarded half) and its stats.

    x0, rewards: (M, N, 2), (M, N) rollouts of the block's M = 2·seeds models. The core's losses are batch
    means of per-sample terms, so flattening the model dim into the batch and multiplying by the number of
    models gives the sum of the per-model losses: each model receives exactly its own gradient.
    """
    sl = block(cfg, method)
    M, N = rewards.shape
    G = cfg.group_size
    if method == "dpo":
        # pairs: the best and the worst sample of every group; G/2 draws of (t, eps) per pair keep N rows per model
        r = rewards.reshape(M, -1, G)
        idx_w, idx_l = r.argmax(-1), r.argmin(-1)
        xg = x0.reshape(M, -1, G, 2)
        x_w = torch.gather(xg, 2, idx_w[..., None, None].expand(-1, -1, 1, 2)).squeeze(2).repeat_interleave(G // 2, 1)
        x_l = torch.gather(xg, 2, idx_l[..., None, None].expand(-1, -1, 1, 2)).squeeze(2).repeat_interleave(G // 2, 1)
        n = x_w.shape[1]
        noise = torch.randn(M, n, 2, generator=gen)
        t = torch.sigmoid(torch.randn(M, n, generator=gen))  # logit-normal t, as in Diffusion-DPO for flows
        xt_w, u_w = ng.forward_process(x_w.reshape(-1, 2), noise.reshape(-1, 2), t.reshape(-1))
        xt_l, u_l = ng.forward_process(x_l.reshape(-1, 2), noise.reshape(-1, 2), t.reshape(-1))
        v = policy(torch.cat([xt_w.reshape(M, n, 2), xt_l.reshape(M, n, 2)], 1), t.repeat(1, 2), sl)
        v_w, v_l = v[:, :n].reshape(-1, 2), v[:, n:].reshape(-1, 2)
        with torch.no_grad():
            v_ref_w, v_ref_l = ref(xt_w[None], t.reshape(1, -1))[0], ref(xt_l[None], t.reshape(1, -1))[0]
        base, stats = ng.dpo_loss(v_w, v_l, v_ref_w, v_ref_l, u_w, u_l, beta=cfg.dpo_beta)
        half = cfg.seeds * n  # rows of the guarded half
        lam = cfg.lam * cfg.dpo_beta / 2
        guard_w = ng.normguard_penalty(v_w[half:], v_ref_w[half:], lam=lam, margin=cfg.margin, power=cfg.power)[0]
        guard_l = ng.normguard_penalty(v_l[half:], v_ref_l[half:], lam=lam, margin=cfg.margin, power=cfg.power)[0]
        guard = {"both": (guard_w + guard_l) / 2, "winner": guard_w, "loser": guard_l}[cfg.dpo_guard]
        return M * base + cfg.seeds * guard, stats
    adv = torch.stack([ng.group_advantages(r, G) for r in rewards])  # std over each model's own batch
    grid = ng.flow_timesteps(cfg.sample_steps)[:-1]  # train on the sampler's own timesteps, as DiffusionNFT does
    t = grid[torch.randint(len(grid), (M, N), generator=gen)]
    noise = torch.randn(M, N, 2, generator=gen)
    x_t, u = ng.forward_process(x0.reshape(-1, 2), noise.reshape(-1, 2), t.reshape(-1))
    v = policy(x_t.reshape(M, N, 2), t, sl).reshape(-1, 2)
    with torch.no_grad():
        v_ref = ref(x_t[None], t.reshape(1, -1))[0]
        v_old = old(x_t.reshape(M, N, 2), t, sl).reshape(-1, 2) if method == "nft" else v.detach()
    if method == "nft":
        base, stats = ng.nft_loss(v, v_old, v_ref, x_t, x0.reshape(-1, 2), t.reshape(-1), adv.reshape(-1),
                                  beta=cfg.nft_beta, kl_weight=cfg.kl_weight)
    else:  # AWM: one update per rollout batch, so the pre-update policy is v itself (rho = 1)
        base, stats = ng.awm_loss(v, v_old, v_ref, u, t.reshape(-1), adv.reshape(-1), ref_weight=cfg.kl_weight)
    half = cfg.seeds * N
    guard = ng.normguard_penalty(v[half:], v_ref[half:], lam=cfg.lam, margin=cfg.margin, power=cfg.power)[0]
    return M * base + cfg.seeds * guard, stats


@torch.no_grad()
def quick_eval(cfg, policy, ref, noise):
    """Reward, log-density and mean norm ratio of every model on shared noise: the checkpoint curves. (S,) each."""
    x, states, vels = ng.euler_sample(velocity_fn(policy), noise, ng.flow_timesteps(cfg.sample_steps), True)
    ratio = trajectory_ratio(cfg, ref, states, vels)
    return reward(cfg, x).mean(1), log_density(cfg, x).mean(1), ratio.mean((0, 2))


def trajectory_ratio(cfg, ref, states, vels):
    """‖v_θ‖/‖v_ref‖ at the policy's own states: states, vels (K, S, N, 2) -> (K, S, N)."""
    K = states.shape[0]
    t = ng.flow_timesteps(K)[:-1][:, None, None].expand(states.shape[:3])
    v_ref = reference_fn(ref)(states, t)
    return ng.norm_ratio(vels.reshape(-1, 2), v_ref.reshape(-1, 2)).reshape(states.shape[:3])


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
    """RL fine-tune the whole ensemble from the reference. Returns (policy, history of checkpoint curves)."""
    runs = layout(cfg)
    S, N = len(runs), cfg.groups * cfg.group_size
    gen = torch.Generator().manual_seed(cfg.seed)
    seed_gens = [torch.Generator().manual_seed(1000 * (cfg.seed + s)) for s in range(cfg.seeds)]
    seed_of = torch.tensor([s for _, _, s in runs])
    policy, old = ref.replicate(S), ref.replicate(S)
    for p in old.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.rl_lr)
    lr_scale = torch.tensor([cfg.dpo_lr / cfg.rl_lr if m == "dpo" else 1.0 for m, _, _ in runs])
    ckpt_noise = torch.randn(cfg.ckpt_samples, 2, generator=torch.Generator().manual_seed(cfg.eval_seed + 1))
    ckpt_noise = ckpt_noise.expand(S, -1, -1)
    history = {"step": [], "reward": [], "logp": [], "ratio": []}
    grid = ng.flow_timesteps(cfg.sample_steps)

    def checkpoint(step):
        r, lp, ratio = quick_eval(cfg, policy, ref, ckpt_noise)
        for key, val in zip(("step", "reward", "logp", "ratio"), (step, r.tolist(), lp.tolist(), ratio.tolist())):
            history[key].append(val)

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
            l, stats = method_loss(cfg, method, policy, old, ref, x0[sl], rewards[sl], gen)
            loss = loss + l
            logs.append(f"{method} nr {stats['norm_ratio'].item():.3f}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        adam_step_per_model_lr(opt, policy, lr_scale)
        # NFT's old policy: an EMA of theta, decay min(0.001·step, 0.5), updated once per rollout batch
        decay = min(0.001 * step, 0.5)
        with torch.no_grad():
            for p_old, p in zip(old.parameters(), policy.parameters()):
                p_old.lerp_(p, 1 - decay)
        if step % cfg.eval_every == 0 or step == cfg.rl_steps:
            checkpoint(step)
            bar.set_postfix_str(f"reward {rewards.mean().item():.3f} | " + " | ".join(logs))
    return policy, history


# ---------------------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(cfg, policy, ref):
    """Every final metric per model, as tensors with a leading model dim S (see layout)."""
    S = len(layout(cfg))
    gen = torch.Generator().manual_seed(cfg.eval_seed)
    noise = torch.randn(cfg.eval_samples, 2, generator=gen).expand(S, -1, -1)
    ideal = sample_tilted(cfg, cfg.eval_samples, gen)
    directions = F.normalize(torch.randn(cfg.sw_projections, 2, generator=gen), dim=1)
    v_ref = reference_fn(ref)

    unguarded = torch.tensor([i for i, (_, v, _) in enumerate(layout(cfg)) if v == "none"])

    def rescaled(x, t):  # the baseline only concerns the un-guarded models
        v = velocity_fn(policy, unguarded)(x, t)
        v_r = v_ref(x, t[:, None].expand(x.shape[:2]))
        return ng.rescale_to_reference(v.reshape(-1, 2), v_r.reshape(-1, 2)).reshape(v.shape)

    def scores(x):
        return {"reward": reward(cfg, x).mean(-1), "logp": log_density(cfg, x).mean(-1),
                "support": on_support(cfg, x).mean(-1), "sw": sliced_wasserstein(x, ideal, directions)}

    out = {}
    x, states, vels = ng.euler_sample(velocity_fn(policy), noise, ng.flow_timesteps(cfg.sample_steps), True)
    ratio = trajectory_ratio(cfg, ref, states, vels)  # (K, S, N)
    t_steps = ng.flow_timesteps(cfg.sample_steps)[:-1]
    out["full"] = scores(x)
    out["full"]["ratio"] = ratio.mean((0, 2))
    out["profile"] = torch.stack([ng.norm_ratio_profile(ratio[:, s].reshape(-1), t_steps.repeat_interleave(
        ratio.shape[2]), cfg.profile_bins)[0] for s in range(S)])
    out["samples"] = x[:, :600]
    x_few, st_few, v_few = ng.euler_sample(velocity_fn(policy), noise, ng.flow_timesteps(cfg.few_steps), True)
    out["few"] = scores(x_few)
    out["few"]["ratio"] = trajectory_ratio(cfg, ref, st_few, v_few).mean((0, 2))
    out["rescale"], out["rescale_few"] = {}, {}
    for key, steps in (("rescale", cfg.sample_steps), ("rescale_few", cfg.few_steps)):
        for name, val in scores(ng.euler_sample(rescaled, noise[unguarded], ng.flow_timesteps(steps))).items():
            out[key][name] = torch.full((S,), float("nan")).index_put_((unguarded,), val)
    ref_fn = lambda x, t: v_ref(x, t[:, None].expand(x.shape[:2]))
    x_ref = ng.euler_sample(ref_fn, noise[:1], ng.flow_timesteps(cfg.sample_steps))
    x_ref_few = ng.euler_sample(ref_fn, noise[:1], ng.flow_timesteps(cfg.few_steps))
    out["reference"] = {"full": {k: v[0] for k, v in scores(x_ref).items()},
                        "few": {k: v[0] for k, v in scores(x_ref_few).items()}, "samples": x_ref[0, :600]}
    out["ideal"] = {k: v for k, v in scores(ideal[None]).items()}
    out["ideal"]["samples"] = ideal[:600]
    return out


def adjoint_diagnostic(cfg, policy, ref):
    """dR/dα_k for v_k -> (1 + α_k)·v_k on every un-guarded model and the reference (ng.velocity_scale_sensitivity).

    Returns per model: mean and std over samples of the uniform scaling Σ_k dR/dα_k, the fraction of samples
    where it is positive, and the per-step means and stds. The reference is the last row.
    """
    gen = torch.Generator().manual_seed(cfg.eval_seed + 2)
    idx = [i for i, (_, v, _) in enumerate(layout(cfg)) if v == "none"]
    n = cfg.adjoint_samples
    weights = [torch.cat([w.detach()[idx], r.detach()]) for w, r in zip(policy.weights, ref.weights)]
    biases = [torch.cat([b.detach()[idx], r.detach()]) for b, r in zip(policy.biases, ref.biases)]
    model = ref.replicate(len(idx) + 1)
    with torch.no_grad():
        for p, w in zip(list(model.weights) + list(model.biases), weights + biases):
            p.copy_(w)
    M = len(idx) + 1
    noise = torch.randn(n, 2, generator=gen).repeat(M, 1)  # flat (M·n, 2): one α per sample, as the diagnostic needs

    def v_flat(x, t):
        return model(x.reshape(M, n, 2), t.reshape(M, n)).reshape(-1, 2)

    grid = ng.flow_timesteps(cfg.sample_steps)
    grad, _ = ng.velocity_scale_sensitivity(v_flat, lambda x: reward(cfg, x), noise, grid)
    grad = grad.reshape(M, n, -1)
    total = grad.sum(-1)
    return {"total_mean": total.mean(1), "total_std": total.std(1, unbiased=False),
            "frac_positive": (total > 0).float().mean(1), "step_mean": grad.mean(1),
            "step_std": grad.std(1, unbiased=False)}


def early_stopping_control(cfg, history):
    """Quality of the guarded run vs the un-guarded run's own checkpoints at the guarded run's reward.

    For each (method, seed): walk the un-guarded checkpoints until the first one whose reward reaches the guarded
    run's final reward, and interpolate log-density there. delta = guarded log p - matched un-guarded log p
    (> 0: the guard is better than stopping the un-guarded run early). If the un-guarded run never reaches that
    reward, no early stop matches it: delta is NaN and the case is counted in `unreached`.
    """
    runs = layout(cfg)
    rew, logp = torch.tensor(history["reward"]), torch.tensor(history["logp"])  # (C, S)
    out = {}
    for method in cfg.methods.split(","):
        deltas, unreached = [], 0
        for s in range(cfg.seeds):
            i_none, i_guard = runs.index((method, "none", s)), runs.index((method, "guard", s))
            target, q_guard = rew[-1, i_guard], logp[-1, i_guard]
            curve_r, curve_q = rew[:, i_none], logp[:, i_none]
            hit = (curve_r >= target).nonzero()
            if len(hit) == 0:
                unreached += 1
                deltas.append(float("nan"))
                continue
            c = hit[0, 0].item()
            if c == 0:
                q = curve_q[0]
            else:
                w = (target - curve_r[c - 1]) / (curve_r[c] - curve_r[c - 1])
                q = curve_q[c - 1] + w * (curve_q[c] - curve_q[c - 1])
            deltas.append((q_guard - q).item())
        out[method] = {"delta_logp": deltas, "unreached": unreached}
    return out


# ---------------------------------------------------------------------------------------------------------------
# summary: table, verdicts


def mean_std(x):
    x = torch.as_tensor(x, dtype=torch.float64)
    x = x[~x.isnan()]
    if len(x) == 0:
        return float("nan"), float("nan")
    return x.mean().item(), (x.std(unbiased=True).item() if len(x) > 1 else 0.0)


def summarise(cfg, ev, adj, control):
    """Per (method, variant): mean and std over seeds of every metric, plus the per-seed values."""
    runs = layout(cfg)
    table = {}
    for method in cfg.methods.split(","):
        table[method] = {}
        for variant in VARIANTS:
            idx = [i for i, (m, v, _) in enumerate(runs) if m == method and v == variant]
            row = {}
            for phase in ("full", "few") + (("rescale", "rescale_few") if variant == "none" else ()):
                for key, val in ev[phase].items():
                    row[f"{phase}_{key}"] = val[idx].tolist()
            row["profile"] = ev["profile"][idx].mean(0).tolist()
            table[method][variant] = row
        j = [i for i, (m, v, _) in enumerate([r for r in runs if r[1] == "none"]) if m == method]
        table[method]["adjoint"] = {k: v[j].tolist() for k, v in adj.items()}
    return table


def verdicts(cfg, table, ref_metrics, control, adj_ref):
    """One line per claim of the paper: reproduced or not, with the numbers it rests on.

    Each rule is fixed here, before looking at any result, and uses the seed spread: a difference counts only if
    its paired mean exceeds two standard errors.
    """
    methods = cfg.methods.split(",")

    def sig_pos(d):  # paired differences over seeds: mean > 2 standard errors
        m, s = mean_std(d)
        return m > 2 * s / math.sqrt(max(len(d), 1)) if not math.isnan(m) else False

    def diff(a, b):
        return [x - y for x, y in zip(a, b)]

    # a method whose un-guarded run gained no reward did not learn: it cannot test any claim, so it is set apart
    r0 = ref_metrics["full"]["reward"]
    gains = {m: [x - r0 for x in table[m]["none"]["full_reward"]] for m in methods}
    skipped = [m for m in methods if not (mean_std(gains[m])[0] > 0.01 and sig_pos(gains[m]))]
    methods = [m for m in methods if m not in skipped]
    note = "".join(f"; {m} not tested (un-guarded reward gain {mean_std(gains[m])[0]:+.3f}: it did not learn)"
                   for m in skipped)
    lines, flags = [], {"not_tested": skipped}
    # (1) RL inflates the norm: the un-guarded norm ratio along the policy's own trajectories is above 1
    parts, ok = [], []
    for m in methods:
        r = table[m]["none"]["full_ratio"]
        ok.append(sig_pos([x - 1 for x in r]))
        parts.append(f"{m} {mean_std(r)[0]:.3f}±{mean_std(r)[1]:.3f}")
    flags["1"] = dict(zip(methods, ok))
    lines.append(f"(1) RL inflates the velocity norm: {verdict_word(ok)} — un-guarded ‖v_θ‖/‖v_ref‖ "
                 + ", ".join(parts) + " (1.000 = no drift; paper: 1.05-1.15)" + note)
    # (2) rescaling at inference does not help: it loses reward or quality against the guarded model
    parts, ok = [], []
    for m in methods:
        dr = diff(table[m]["guard"]["full_reward"], table[m]["none"]["rescale_reward"])
        dq = diff(table[m]["guard"]["full_logp"], table[m]["none"]["rescale_logp"])
        ok.append(sig_pos(dr) or sig_pos(dq))
        parts.append(f"{m} guard−rescaled: reward {mean_std(dr)[0]:+.3f}, log p {mean_std(dq)[0]:+.3f}")
    flags["2"] = dict(zip(methods, ok))
    lines.append(f"(2) inference-time rescale does not help: {verdict_word(ok)} — " + "; ".join(parts) + note)
    # (3) no coherent first-order magnitude signal: |mean dR/dα| < 0.5·std across samples
    parts, ok = [], []
    for m in methods:
        a = table[m]["adjoint"]
        snr = [abs(mu) / sd for mu, sd in zip(a["total_mean"], a["total_std"])]
        ok.append(all(x < 0.5 for x in snr))
        parts.append(f"{m} |mean|/std {mean_std(snr)[0]:.2f}, positive {mean_std(a['frac_positive'])[0]:.0%}")
    flags["3"] = dict(zip(methods, ok))
    lines.append(f"(3) no coherent first-order magnitude signal: {verdict_word(ok)} — " + "; ".join(parts)
                 + f"; reference |mean|/std {abs(adj_ref['total_mean']) / adj_ref['total_std']:.2f} (rule: < 0.5)"
                 + note)
    # (4) the guard keeps most of the reward gain (>= 70 %) and improves quality; (4b) more so at few steps
    parts, ok, ok_few = [], [], []
    for m in methods:
        g, n = table[m]["guard"], table[m]["none"]
        gain_n = mean_std(n["full_reward"])[0] - ref_metrics["full"]["reward"]
        gain_g = mean_std(g["full_reward"])[0] - ref_metrics["full"]["reward"]
        kept = gain_g / gain_n if gain_n > 0 else float("nan")
        dq_full, dq_few = diff(g["full_logp"], n["full_logp"]), diff(g["few_logp"], n["few_logp"])
        ok.append(gain_n > 0 and kept >= 0.7 and sig_pos(dq_full))
        ok_few.append(ok[-1] and sig_pos(diff(dq_few, dq_full)))
        parts.append(f"{m} reward gain kept {kept:.0%}, Δlog p {mean_std(dq_full)[0]:+.2f} "
                     f"(at {cfg.few_steps} steps {mean_std(dq_few)[0]:+.2f})")
    flags["4"], flags["4_few"] = dict(zip(methods, ok)), dict(zip(methods, ok_few))
    lines.append(f"(4) guard keeps reward and improves quality: {verdict_word(ok)}; more so at few steps: "
                 f"{verdict_word(ok_few)} — " + "; ".join(parts) + note)
    # (5) not early stopping: the guarded run beats the un-guarded run's checkpoints at matched reward
    parts, ok = [], []
    for m in methods:
        d, unreached = control[m]["delta_logp"], control[m]["unreached"]
        defined = [x for x in d if not math.isnan(x)]
        ok.append((len(defined) == 0 and unreached > 0) or (sig_pos(defined) if len(defined) > 1 else
                                                            (len(defined) == 1 and defined[0] > 0)))
        parts.append(f"{m} Δlog p at matched reward {mean_std(d)[0]:+.2f} ({len(defined)} matched, "
                     f"{unreached} never reached)")
    flags["5"] = dict(zip(methods, ok))
    lines.append(f"(5) not an early-stopping effect: {verdict_word(ok)} — " + "; ".join(parts) + note)
    return lines, flags


def verdict_word(ok):
    if not ok:
        return "NOT TESTED"
    return "REPRODUCED" if all(ok) else ("PARTLY reproduced" if any(ok) else "NOT reproduced")


def format_table(cfg, table, ref_metrics):
    fmt = lambda x, p=3: "{:.{p}f}±{:.{p}f}".format(*mean_std(x), p=p)
    head = (f"{'run':<11}{'norm ratio':>14}{'reward':>14}{'log p':>14}{'support':>14}{'SW→tilted':>14}"
            f"{'reward@' + str(cfg.few_steps):>14}{'log p@' + str(cfg.few_steps):>14}")
    rows = [head, "-" * len(head)]
    rf, rw = ref_metrics["full"], ref_metrics["few"]
    rows.append(f"{'reference':<11}{'1.000':>14}{rf['reward']:>14.3f}{rf['logp']:>14.3f}{rf['support']:>14.3f}"
                f"{rf['sw']:>14.3f}{rw['reward']:>14.3f}{rw['logp']:>14.3f}")
    for m in cfg.methods.split(","):
        for v in VARIANTS:
            r = table[m][v]
            rows.append(f"{m + ('+guard' if v == 'guard' else ''):<11}{fmt(r['full_ratio']):>14}"
                        f"{fmt(r['full_reward']):>14}{fmt(r['full_logp'], 2):>14}{fmt(r['full_support']):>14}"
                        f"{fmt(r['full_sw']):>14}{fmt(r['few_reward']):>14}{fmt(r['few_logp'], 2):>14}")
        r = table[m]["none"]
        rows.append(f"{m + ' rescl':<11}{'1.000':>14}{fmt(r['rescale_reward']):>14}{fmt(r['rescale_logp'], 2):>14}"
                    f"{fmt(r['rescale_support']):>14}{fmt(r['rescale_sw']):>14}{fmt(r['rescale_few_reward']):>14}"
                    f"{fmt(r['rescale_few_logp'], 2):>14}")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------------------
# the figure


def plot(cfg, metrics, ev, history, path):
    """Samples per variant over the true density, norm ratio vs t, reward–quality trade-off, drift over training."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = layout(cfg)
    methods = cfg.methods.split(",")
    colors = {"nft": "tab:blue", "awm": "tab:orange", "dpo": "tab:green"}
    lim = cfg.radius + 1.6
    g = torch.linspace(-lim, lim, 200)
    gx, gy = torch.meshgrid(g, g, indexing="xy")
    dens = log_density(cfg, torch.stack([gx, gy], -1)).exp()
    targets = mode_centers(cfg)[[int(k) for k in cfg.target_modes.split(",")]]
    panels = [("reference", ev["reference"]["samples"]), ("ideal tilted p·e^{r/τ}", ev["ideal"]["samples"])]
    for m in methods:
        for v in VARIANTS:
            title = f"{m}{' + NormGuard' if v == 'guard' else ''} (seed {cfg.seed})"
            panels.append((title, ev["samples"][runs.index((m, v, 0))]))
    ncol = 4
    nrow = math.ceil(len(panels) / ncol) + 1
    fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 4 * nrow))
    for ax, (title, x) in zip(axes.flat, panels):
        ax.contourf(gx, gy, dens, levels=12, cmap="Greys")
        ax.scatter(x[:, 0], x[:, 1], s=2, c="tab:red", alpha=0.5)
        ax.scatter(targets[:, 0], targets[:, 1], marker="*", s=120, c="gold", edgecolors="k", zorder=3)
        ax.set(title=title, xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xticks=[], yticks=[])
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    ax_t, ax_steps, ax_rq, ax_tr = axes[-1]
    for ax in axes[-1]:
        ax.axis("on")
    label = lambda m, v: f"{m}{'+guard' if v == 'guard' else ''}"
    centers = (torch.arange(cfg.profile_bins) + 0.5) / cfg.profile_bins
    table = metrics["table"]
    steps = history["step"]
    rew, logp, ratio = (torch.tensor(history[k]) for k in ("reward", "logp", "ratio"))
    for m in methods:
        for v, ls in zip(VARIANTS, ("-", "--")):
            prof = torch.tensor(table[m][v]["profile"])
            keep = ~prof.isnan()
            ax_t.plot(centers[keep], prof[keep], ls, c=colors[m], label=label(m, v))
            idx = [runs.index((m, v, s)) for s in range(cfg.seeds)]
            ax_steps.plot(steps, ratio[:, idx].mean(1), ls, c=colors[m], marker=".", label=label(m, v))
            ax_tr.plot(rew[:, idx].mean(1), logp[:, idx].mean(1), ls, c=colors[m], marker=".", label=label(m, v))
    for ax in (ax_t, ax_steps):
        ax.axhline(1, c="k", lw=0.8)
    ax_t.set(xlabel="t (1 = noise)", ylabel="‖v_θ‖/‖v_ref‖ on own trajectory",
             title="norm ratio vs t (end of RL)")
    ax_t.legend(fontsize=7)
    ax_steps.set(xlabel="RL step", ylabel="‖v_θ‖/‖v_ref‖ (mean over t)", title="norm ratio during RL")
    # filled markers: the full step count; hollow: few steps (Euler's few-step error moves every point down)
    for phase, fill in (("full", True), ("few", False)):
        ref = metrics["reference"][phase]
        ax_rq.scatter([ref["reward"]], [ref["logp"]], marker="s", s=30, c="k" if fill else "none", edgecolors="k",
                      label="reference" if fill else None)
        for m in methods:
            for v, mk in zip(VARIANTS, ("o", "^")):
                r = table[m][v]
                ax_rq.scatter(r[f"{phase}_reward"], r[f"{phase}_logp"], marker=mk, s=18,
                              c=colors[m] if fill else "none", edgecolors=colors[m],
                              label=label(m, v) if fill else None)
            resc = "rescale" if phase == "full" else "rescale_few"
            ax_rq.scatter(table[m]["none"][f"{resc}_reward"], table[m]["none"][f"{resc}_logp"], c=colors[m],
                          marker="x" if fill else "+", s=18, label=f"{m} rescaled" if fill else None)
    ax_rq.set(xlabel="reward (proxy)", ylabel="mean log p (true density)",
              title=f"reward vs quality: {cfg.sample_steps} steps (filled), {cfg.few_steps} (hollow)")
    ax_rq.legend(fontsize=6, ncol=2)
    ax_tr.set(xlabel="reward", ylabel="mean log p", title=f"training path (every {cfg.eval_every} steps)")
    ax_tr.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# run


def run(cfg, progress=True, out_dir=None):
    """The whole experiment in memory. Returns the metrics dict (also written to out_dir when given)."""
    t0 = time.time()
    torch.manual_seed(cfg.ref_seed)
    ref, pre_loss = make_reference(cfg)
    t_pre = time.time() - t0
    policy, history = train(cfg, ref, progress)
    t_rl = time.time() - t0 - t_pre
    ev = evaluate(cfg, policy, ref)
    adj = adjoint_diagnostic(cfg, policy, ref)
    control = early_stopping_control(cfg, history)
    adj_models = {k: v[:-1] for k, v in adj.items()}
    adj_ref = {k: v[-1].tolist() for k, v in adj.items()}
    table = summarise(cfg, ev, adj_models, control)
    scalar = lambda d: {k: v.item() for k, v in d.items() if k != "samples"}
    ref_metrics = {"full": scalar(ev["reference"]["full"]), "few": scalar(ev["reference"]["few"])}
    lines, flags = verdicts(cfg, table, ref_metrics, control, adj_ref)
    metrics = {"config": dataclasses.asdict(cfg), "pretrain_loss": pre_loss, "reference": ref_metrics,
               "ideal_tilted": scalar(ev["ideal"]), "table": table, "control": control, "adjoint_reference": adj_ref,
               "history": history, "verdicts": lines, "verdict_flags": flags,
               "wall_time_s": {"pretrain": t_pre, "rl": t_rl, "total": time.time() - t0}}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if cfg.plot:
            plot(cfg, metrics, ev, history, out / "toy_2d.png")
        metrics["wall_time_s"]["total_with_plot"] = time.time() - t0
        (out / "config.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "command": sys.argv,
                                                     "git_revision": git_revision()}, indent=2))
        (out / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=1))
    return metrics


def json_safe(obj):
    """NaN (an empty t bin, an unmatched early-stopping control) -> null, so the file is strict JSON."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def git_revision():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def sweep(cfg):
    """Training length (x0.5, 1, 1.5, 2) at lam, then lam/4 and 4·lam at twice the length, where the guard has
    something to repair. Each setting is a full run; one line per setting: per method the un-guarded / guarded
    norm ratio, reward and log-density (means over seeds). Writes sweep.json to out_dir."""
    methods = cfg.methods.split(",")
    settings = [(int(cfg.rl_steps * f), cfg.lam) for f in (0.5, 1, 1.5, 2)]
    settings += [(cfg.rl_steps * 2, cfg.lam / 4), (cfg.rl_steps * 2, cfg.lam * 4)]
    print(f"{'steps':>5} {'lam':>6} | "
          + " | ".join(f"{m + ': ratio':>14} {'reward':>11} {'log p':>11}" for m in methods))
    print(f"{'':>12} | " + " | ".join(f"{'none/guard':>14} {'none/guard':>11} {'none/guard':>11}" for _ in methods))
    rows = []
    for rl_steps, lam in settings:
        m = run(dataclasses.replace(cfg, rl_steps=rl_steps, lam=lam, plot=False), progress=False)
        cells = []
        for meth in methods:
            n, g = m["table"][meth]["none"], m["table"][meth]["guard"]
            pair = lambda key, p: f"{mean_std(n[key])[0]:.{p}f}/{mean_std(g[key])[0]:.{p}f}"
            cells.append(f"{pair('full_ratio', 2):>14} {pair('full_reward', 3):>11} {pair('full_logp', 2):>11}")
        print(f"{rl_steps:>5} {lam:>6.3g} | " + " | ".join(cells), flush=True)
        rows.append({"rl_steps": rl_steps, "lam": lam, "table": m["table"], "reference": m["reference"],
                     "verdicts": m["verdicts"]})
    r = rows[0]["reference"]["full"]
    print(f"reference: reward {r['reward']:.3f}, log p {r['logp']:.2f}")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(json_safe(rows), indent=1))


def main(argv=None):
    cfg, do_sweep = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(cfg.threads)
    n_models = len(layout(cfg))
    print(f"device cpu | float32 | {torch.get_num_threads()} thread(s) | {n_models} models trained at once "
          f"({cfg.methods} x {VARIANTS} x {cfg.seeds} seeds) | {cfg.groups}x{cfg.group_size} rollouts/step | "
          f"{cfg.rl_steps} RL steps | lr {cfg.rl_lr:g} (dpo {cfg.dpo_lr:g}) | lam {cfg.lam}, {cfg.margin} margin | "
          f"{cfg.sample_steps} and {cfg.few_steps} Euler steps")
    if do_sweep:
        sweep(cfg)
        return
    metrics = run(cfg, out_dir=cfg.out_dir)
    ideal = metrics["ideal_tilted"]
    print(f"pretrain loss {metrics['pretrain_loss']:.3f} | ideal tilted: reward {ideal['reward']:.3f} "
          f"log p {ideal['logp']:.3f}")
    print(format_table(cfg, metrics["table"], metrics["reference"]))
    print("\n".join(metrics["verdicts"]))
    w = metrics["wall_time_s"]
    print(f"wall time {w['total']:.1f} s (pretrain {w['pretrain']:.1f} s, RL {w['rl']:.1f} s) | "
          f"outputs in {cfg.out_dir}")


if __name__ == "__main__":
    main()
