"""The trainer's rollouts and train timesteps: the velocity a sampler integrates, the rollout sampler, and which
points of the sampler's grid each method trains on. Nothing here knows a model family (velocities come through the
adapter).
"""

import torch

import normguard as ng


def guided_velocity(adapter, model, x, t, cond, null, cfg_scale):
    """The velocity the sampler integrates: conditional, or v_u + s·(v_c - v_u) against `null` when s != 1."""
    if cfg_scale == 1.0:
        return adapter.velocity(model, x, t, cond)
    both = {k: torch.cat([null[k], cond[k]]) for k in ("encoder_hidden_states", "pooled_projections")}
    v_u, v_c = adapter.velocity(model, torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
    return v_u + cfg_scale * (v_c - v_u)


def rollout(adapter, model, cond, noise, sigmas, cfg_scale, null):
    """Euler samples x0 (B, C, H, W) on sigmas (K + 1,), classifier-free guided when cfg_scale != 1."""
    velocity = lambda x, t: guided_velocity(adapter, model, x, t, cond, null, cfg_scale)
    return ng.euler_sample(velocity, noise, sigmas.to(noise.dtype))


def check_timesteps(cfg):
    """The train timesteps against cfg.sample_steps: a ValueError naming the key."""
    pool, _ = timestep_pool(cfg)
    if cfg.train_timesteps < 0:
        raise ValueError(f"train_timesteps: expected >= 0 (0 = the method's recipe), got {cfg.train_timesteps}")
    if cfg.method == "nft" and cfg.sample_steps < 2 and cfg.train_timesteps == 0:
        raise ValueError("sample_steps: NFT trains on the sampler's own K-1 timesteps, so it needs K >= 2")
    if cfg.method == "dpo" and cfg.train_timesteps > 1:
        raise ValueError(f"train_timesteps: DPO trains each pair at one t, expected 0 or 1, got {cfg.train_timesteps}")
    if cfg.method != "dpo" and cfg.train_timesteps > pool:
        raise ValueError(
            f"train_timesteps: expected <= {pool}, the {cfg.method} pool of sample_steps={cfg.sample_steps}, "
            f"got {cfg.train_timesteps}"
        )


def timestep_pool(cfg):
    """(pool size, recipe count) of the train timesteps: NFT the sampler's K steps (K - 1 of them), AWM the first
    90 % of them (6 of them, at most the pool)."""
    k = cfg.sample_steps
    pool = k if cfg.method == "nft" else max(1, int(0.9 * k))
    return pool, (k - 1 if cfg.method == "nft" else min(6, pool))


def train_timestep_plan(cfg, sigmas, gen):
    """The t values each sample is trained at this step (NFT, AWM): NFT the sampler's own (K - 1 of K), AWM a
    subset of the first 90 % of the sampler's steps."""
    size, recipe = timestep_pool(cfg)
    pool = sigmas[:size]
    return pool[torch.randperm(size, generator=gen)[: cfg.train_timesteps or recipe].to(pool.device)]
