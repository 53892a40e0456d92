"""The trainer's rollouts and train timesteps, as the official recipes take them: which sampler runs on which grid,
at which timesteps the transformer is called, and which grid points each method trains on.

    sampler    rollout grid                                 transformer called at         official for
    euler      the model's sigmas (K + 1,)                  1000·t                        DPO (Flow-Factory's ODE)
    dpm2       the model's sigmas                           floor(1000·t), an integer     DiffusionNFT, K = 10
    sa_solver  sa_solver_timesteps(the model's sigmas)      1000·t (t_0 = 0.999)          AWM, K = 14

The model's sigmas are its pipeline's own grid (SD3: samplers.sd3_pipeline_timesteps(K) at the scheduler's shift;
FLUX: its dynamic-shift grid; adapters.py builds them). Train timesteps are points of that unedited grid, as both
official codes read them from `pipeline.scheduler.timesteps`: NFT K - 1 of its K points (t_0 = 1 included); AWM
one grid index from each of T equal strata of its first int(0.9·K) steps, never the last 10 % (`awm_timesteps`:
"discrete", AWM's PickScore configs, strata of 0 .. int(0.9·K) - 1; "discrete_wo_init", its GenEval and OCR
configs, strata of 1 .. int(0.9·K) - 1, so t_0 never), or this repo's earlier rule, "subset": a random T of the
first int(0.9·K) points (the digits tables'). DPO trains each pair at a t drawn off the grid (dpo_train_t). The
samplers themselves are samplers.py's; nothing here knows a model family (velocities come through the adapter).
"""

import torch

import normguard as ng
from trainer import samplers

SAMPLERS = ("euler", "dpm2", "sa_solver")
OFFICIAL = {"nft": ("dpm2", 10), "awm": ("sa_solver", 14), "dpo": ("euler", 10)}  # method -> (sampler, K)


def guided_velocity(adapter, model, x, t, cond, null, cfg_scale):
    """The velocity the sampler integrates: conditional, or v_u + s·(v_c - v_u) against `null` when s != 1."""
    if cfg_scale == 1.0:
        return adapter.velocity(model, x, t, cond)
    both = {k: torch.cat([null[k], cond[k]]) for k in ("encoder_hidden_states", "pooled_projections")}
    v_u, v_c = adapter.velocity(model, torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
    return v_u + cfg_scale * (v_c - v_u)


def rollout_grid(sampler, sigmas):
    """The grid `sampler` runs on, from the model's sigmas (K + 1,): AWM's edit for the SA-Solver, else as given."""
    return samplers.sa_solver_timesteps(sigmas) if sampler == "sa_solver" else sigmas


def rollout(adapter, model, cond, noise, grid, cfg_scale, null, sampler="euler", generator=None, noise_level=0.0):
    """Samples x0 (B, C, H, W) from noise on grid (K + 1,) (rollout_grid), classifier-free guided when cfg_scale != 1.

    dpm2 calls the transformer at floor(1000·t) / 1000, as DiffusionNFT's SD3 pipeline does (it casts 1000·σ to an
    integer); that t goes in float64 (MPS: float32) so that an SD3 transformer sees the integer exactly. sa_solver
    draws its noise (noise_level τ on 0.3 <= t <= 0.9) from `generator`."""
    velocity = lambda x, t: guided_velocity(adapter, model, x, t, cond, null, cfg_scale)
    if sampler == "euler":
        return ng.euler_sample(velocity, noise, grid.to(noise.dtype))
    if sampler == "dpm2":
        exact = torch.float32 if noise.device.type == "mps" else torch.float64  # MPS has no float64
        floored = lambda x, t: velocity(x, torch.floor(ng.TIMESTEP_SCALE * t).to(exact) / ng.TIMESTEP_SCALE)
        return samplers.dpm2_sample(floored, noise, grid)
    return samplers.sa_solver_sample(velocity, noise, grid, noise_level=noise_level, generator=generator)


def check_timesteps(cfg):
    """The sampler's grid and the train timesteps against cfg.sample_steps: a ValueError naming the key."""
    pool, _ = timestep_pool(cfg)
    if cfg.sampler == "sa_solver" and cfg.sample_steps < 3:
        raise ValueError(f"sample_steps: the SA-Solver's grid (AWM's edit) needs K >= 3, got {cfg.sample_steps}")
    if cfg.train_timesteps < 0:
        raise ValueError(f"train_timesteps: expected >= 0 (0 = the method's recipe), got {cfg.train_timesteps}")
    if cfg.method == "nft" and cfg.sample_steps < 2 and cfg.train_timesteps == 0:
        raise ValueError("sample_steps: NFT trains on the sampler's own K-1 timesteps, so it needs K >= 2")
    if cfg.method == "awm" and pool < 1:  # only discrete_wo_init has an empty pool (K < 3)
        raise ValueError(
            f"sample_steps: AWM's discrete_wo_init trains on grid indices 1..int(0.9K)-1, so it needs K >= 3, got "
            f"{cfg.sample_steps}"
        )
    if cfg.method == "dpo" and cfg.train_timesteps > 1:
        raise ValueError(f"train_timesteps: DPO trains each pair at one t, expected 0 or 1, got {cfg.train_timesteps}")
    if cfg.method != "dpo" and cfg.train_timesteps > pool:
        raise ValueError(
            f"train_timesteps: expected <= {pool}, the {cfg.method} pool of sample_steps={cfg.sample_steps}, "
            f"got {cfg.train_timesteps}"
        )


def timestep_pool(cfg):
    """(pool size, recipe count) of the train timesteps: NFT the sampler's K points (K - 1 of them); AWM the
    indices its strata cover, 0 .. int(0.9·K) - 1 (discrete_wo_init: from 1), or ("subset") the first int(0.9·K)
    points, 6 of them, at most the pool."""
    k = cfg.sample_steps
    if cfg.method == "nft":
        return k, k - 1
    pool = max(1, int(0.9 * k)) - (cfg.awm_timesteps == "discrete_wo_init")
    return pool, min(6, pool)


def dpo_train_t(cfg, pairs, gen):
    """DPO's train t (pairs,), n ~ N(0, 1) from gen. cfg.dpo_t_law "flow_factory" (Flow-Factory's DPO trainer: a
    logit-normal over 99 % of the range, timestep_range 0.99, no shift) is t = 1 - 0.99·clamp(sigmoid(n), 0.01,
    1 - 1e-6), so t in [0.0100, 0.9901]; "sigmoid" is t = sigmoid(n), this trainer's earlier law. cfg.dpo_t_shared:
    one n for all the pairs of a micro-batch, as Flow-Factory draws one t per batch of pairs; false: one per pair."""
    n = torch.randn(1 if cfg.dpo_t_shared else pairs, generator=gen).expand(pairs)
    if cfg.dpo_t_law == "sigmoid":
        return torch.sigmoid(n)
    return 1 - 0.99 * torch.sigmoid(n).clamp(0.01, 1 - 1e-6)


def train_timestep_plan(cfg, sigmas, gen):
    """The t values (T,) every sample of a minibatch is trained at: NFT T of the grid's first K points, drawn
    without replacement; AWM "discrete" / "discrete_wo_init" one index from each of T equal strata of
    0 (1) .. int(0.9·K) - 1, the official stratified draw; "subset" T of the first int(0.9·K) points without
    replacement."""
    size, recipe = timestep_pool(cfg)
    count = cfg.train_timesteps or recipe
    if cfg.method == "awm" and cfg.awm_timesteps != "subset":
        first = int(cfg.awm_timesteps == "discrete_wo_init")  # AWM: linspace(first, int(0.9·K), T + 1), truncated
        edges = torch.linspace(first, first + size, count + 1).long()
        index = edges[:-1] + (torch.rand(count, generator=gen) * (edges[1:] - edges[:-1])).long()
        return sigmas[index.to(sigmas.device)]
    pool = sigmas[:size]
    return pool[torch.randperm(size, generator=gen)[:count].to(pool.device)]
