# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Put NormGuard in your trainer
#
# The shortest honest path from `normguard.py` to your own RL loop. We build a tiny diffusers
# `SD3Transformer2DModel` (the class SD3/SD3.5 use) from a constructor config, put a peft LoRA on its attention
# projections, and train it with one base loss from `normguard.py` (AWM) plus the NormGuard hinge. The frozen
# reference velocity comes from **the same model with the adapter disabled** — no second copy of the weights.
#
# What you add to a loop that already trains a LoRA with NFT, AWM or DPO is five lines (section 2). Everything else
# here is scaffolding to make the loop run on a CPU in seconds: random weights stand in for a pretrained
# checkpoint, random tensors for text embeddings, and a deliberately hackable reward for a real one.

# %%
import os
import sys
import time
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import torch

# the notebook runs from notebooks/ (Jupyter) or from the repo root (the test suite): find normguard.py either way
ROOT = next((p for p in (Path.cwd(), *Path.cwd().parents) if (p / "normguard.py").exists()), None)
if ROOT is None:
    raise FileNotFoundError(f"normguard.py not found in {Path.cwd()} or above: start Jupyter inside the checkout")
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing comes from a model hub: the model is built from a config

from diffusers import SD3Transformer2DModel
from peft import LoraConfig, get_peft_model

import normguard as ng  # NormGuard (1/5): the only import; normguard.py needs nothing but torch

OUT = Path(os.environ.get("NORMGUARD_NOTEBOOK_OUT", ROOT / "outputs" / "notebooks")) / "put_normguard_in_your_trainer"
OUT.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(1)  # the model is tiny: a second thread only adds sync cost, and stalls on a busy CPU
print(f"torch {torch.__version__}, matplotlib backend {matplotlib.get_backend()}, figures go to {OUT}")

# %% [markdown]
# ## 1. A tiny SD3 transformer with a LoRA
#
# Same class as SD3.5-Medium, shrunk: 2 blocks instead of 24, 4 latent channels on an 8×8 grid instead of 16 on
# 64×64. The LoRA targets the attention projections of both streams, as DiffusionNFT's and AWM's official configs
# do (they use r = 32, α = 64; r = 8 is plenty here). `get_peft_model` wraps the model so that
# `model.disable_adapter()` is a context manager giving back the base model: that *is* the frozen reference.

# %%
PROMPTS, GROUP = 2, 8  # 2 "prompts", 8 samples each: batch 16, advantages normalised within each prompt group
SAMPLER_STEPS = 4  # rollouts only need to be samples of the policy; few steps keep them cheap
LATENT = (4, 8, 8)


def build_policy():
    """Base transformer (stand-in for a pretrained checkpoint) + a fresh LoRA; same seed, same weights each call."""
    torch.manual_seed(0)
    base = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=16,
        pos_embed_max_size=8,
    )
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        init_lora_weights="gaussian",
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"],
    )
    return get_peft_model(base, lora)


gen = torch.Generator().manual_seed(1)
text = torch.randn(PROMPTS, 6, 32, generator=gen).repeat_interleave(GROUP, 0)  # stand-in prompt embeddings
pooled = torch.randn(PROMPTS, 16, generator=gen).repeat_interleave(GROUP, 0)


def velocity(model, x, t):
    """v_θ(x_t, t, c) in the diffusers convention: the transformer takes timestep 1000·t."""
    return model(
        hidden_states=x, timestep=ng.TIMESTEP_SCALE * t, encoder_hidden_states=text, pooled_projections=pooled
    ).sample


model = build_policy()
model.print_trainable_parameters()

# peft initialises LoRA's B matrix to zero, so before any update the policy *is* the reference: ratio exactly 1
x = torch.randn(PROMPTS * GROUP, *LATENT, generator=gen)
t = torch.rand(PROMPTS * GROUP, generator=gen)
with torch.no_grad():
    v = velocity(model, x, t)
    with model.disable_adapter():
        v_ref = velocity(model, x, t)
print(
    f"at init: max |v - v_ref| = {(v - v_ref).abs().max().item():.1e}, "
    f"mean ||v||/||v_ref|| = {ng.norm_ratio(v, v_ref).mean().item():.4f}"
)
assert torch.equal(v, v_ref)

# %% [markdown]
# ## 2. The five lines you add
#
# ```python
# import normguard as ng                                         # 1. torch-only, copy the file next to your trainer
# with torch.no_grad(), model.disable_adapter():                 # 2. the frozen reference: adapter off, no grad,
#     v_ref = velocity(model, x_t, t)                            # 3.    at the same x_t, t, c as v
# guard, guard_stats = ng.normguard_penalty(v, v_ref, lam=lam)   # 4. zero unless ||v|| > ||v_ref||
# loss = base + guard                                            # 5. any velocity-local base loss
# ```
#
# NFT and AWM already compute `v_ref` for their KL terms and DPO for its reference errors, so in those trainers
# lines 2–3 are already there and the guard costs no extra model forward. Below they are marked `NormGuard (k/5)`
# inside an otherwise ordinary AWM step.
#
# The step follows AWM (arXiv 2509.25050): roll out clean samples with the current policy (no grad), score them,
# normalise rewards within each prompt group, then noise the samples afresh and regress. With one gradient step per
# batch the pre-update velocity `v_old` is `v` itself, detached, so AWM's ratio ρ is 1 and its gradient is that of
# `mean[A·w(ℓ, t)]`.


# %%
def reward_fn(x0):
    """Per-sample contrast (std over all latent entries): a caricature of the saturation hacks of real rewards.

    It can only be raised by making samples bigger, i.e. by inflating the velocity: the worst case for drift,
    chosen so that drift shows within seconds on a CPU.
    """
    return x0.flatten(1).std(dim=1)


def train(lam, steps=40, lr=5e-3, log_every=10, seed=2):
    """AWM + lam·NormGuard on the tiny model; returns per-step history and the trained model."""
    model = build_policy()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)  # same rollout noise and timesteps for every lam
    grid = ng.flow_timesteps(SAMPLER_STEPS, shift=3.0)
    history = {"reward": [], "norm_ratio": [], "active_frac": []}
    for step in range(steps):
        # rollouts with the current policy, scored and normalised per prompt group
        with torch.no_grad():
            x0 = ng.euler_sample(
                lambda x, t: velocity(model, x, t), torch.randn(PROMPTS * GROUP, *LATENT, generator=gen), grid
            )
        rewards = reward_fn(x0)
        advantages = ng.group_advantages(rewards, GROUP)

        # the forward process on the rollouts: fresh noise, fresh t, target u = eps - x0
        t = 0.05 + 0.9 * torch.rand(PROMPTS * GROUP, generator=gen)
        x_t, u = ng.forward_process(x0, torch.randn(x0.shape, generator=gen), t)
        v = velocity(model, x_t, t)
        with torch.no_grad(), model.disable_adapter():  # NormGuard (2/5)
            v_ref = velocity(model, x_t, t)  # NormGuard (3/5)

        base, _ = ng.awm_loss(v, v.detach(), v_ref, u, t, advantages)
        guard, guard_stats = ng.normguard_penalty(v, v_ref, lam=lam)  # NormGuard (4/5)
        loss = base + guard  # NormGuard (5/5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

        history["reward"].append(rewards.mean().item())
        history["norm_ratio"].append(guard_stats["norm_ratio"].item())
        history["active_frac"].append(guard_stats["active_frac"].item())
        if step % log_every == 0 or step == steps - 1:
            # the drift monitor during training: per-sample ratio binned by the training t
            profile, _ = ng.norm_ratio_profile(ng.norm_ratio(v, v_ref), t, num_bins=3)
            print(
                f"lam {lam:4.1f} | step {step:4d} | reward {rewards.mean().item():.4f} | "
                f"loss {loss.item():+.2e} | hinge {guard_stats['hinge'].item():.2e} | "
                f"active {guard_stats['active_frac'].item():.2f} | ratio {guard_stats['norm_ratio'].item():.4f} | "
                f"ratio by t [0,1/3,2/3,1] {' '.join(f'{r:.3f}' for r in profile.tolist())}"
            )
    return model, history


# %% [markdown]
# ## 3. Train twice: without the guard (λ = 0) and with it (λ = 1)
#
# Same seed, same rollout noise, same optimiser; only λ differs. The log line carries the drift monitor: the mean
# ‖v_θ‖/‖v_ref‖ on this step's training points, and `ng.norm_ratio_profile` of the per-sample ratio in three bins
# of t. `active` is the fraction of samples where the hinge is on.

# %%
runs = {}
for lam in (0.0, 1.0):
    start = time.perf_counter()
    runs[lam] = train(lam)
    print(f"lam {lam}: {time.perf_counter() - start:.1f} s\n")

# %% [markdown]
# ## 4. The drift monitor on the policy's own trajectories
#
# Training points are forward-process noisings of the rollouts. What matters at inference is the sampler's own
# path: `euler_sample(..., return_trajectory=True)` returns the states each step started from and the policy's
# velocities there; the reference velocity at those same states (adapter off) gives the per-step norm ratio.


# %%
@torch.no_grad()
def trajectory_ratio(model, seed=123):
    """Mean ||v_θ||/||v_ref|| at each sampling step, along the policy's own trajectories: (K,), and the grid."""
    grid = ng.flow_timesteps(SAMPLER_STEPS, shift=3.0)
    noise = torch.randn(PROMPTS * GROUP, *LATENT, generator=torch.Generator().manual_seed(seed))
    x0, states, velocities = ng.euler_sample(lambda x, t: velocity(model, x, t), noise, grid, return_trajectory=True)
    ratios = []
    with model.disable_adapter():
        for k in range(SAMPLER_STEPS):
            v_ref = velocity(model, states[k], grid[k].expand(noise.shape[0]))
            ratios.append(ng.norm_ratio(velocities[k], v_ref).mean())
    return torch.stack(ratios), grid, reward_fn(x0).mean().item()


profiles = {"base": trajectory_ratio(model)}  # the untrained policy from section 1: ratio 1 by construction
profiles.update({lam: trajectory_ratio(trained) for lam, (trained, _) in runs.items()})
grid = profiles["base"][1]
print(
    f"{'step':>4} {'t':>6} "
    + " ".join(f"{f'ratio lam={name}' if name != 'base' else 'ratio base':>14}" for name in profiles)
)
for k in range(SAMPLER_STEPS):
    print(f"{k:>4} {grid[k].item():6.3f} " + " ".join(f"{prof[0][k].item():14.4f}" for prof in profiles.values()))
print("held-out reward (same noise for all): " + ", ".join(f"{name}: {prof[2]:.4f}" for name, prof in profiles.items()))

# %%
fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
for lam, (_, history) in runs.items():
    label = f"λ = {lam:g}" + (" (no guard)" if lam == 0 else " (NormGuard)")
    axes[0].plot(history["norm_ratio"], label=label)
    axes[1].plot(history["reward"], label=label)
    axes[2].plot(profiles[lam][1][:-1].numpy(), profiles[lam][0].numpy(), "o-", label=label)
axes[0].axhline(1.0, color="gray", lw=0.8, ls="--")
axes[0].set(xlabel="optimiser step", ylabel="mean ‖v_θ‖ / ‖v_ref‖", title="drift on training points")
axes[1].set(xlabel="optimiser step", ylabel="mean reward (contrast)", title="reward of the rollouts")
axes[2].axhline(1.0, color="gray", lw=0.8, ls="--")
axes[2].set(xlabel="t (1 = noise)", ylabel="mean ‖v_θ‖ / ‖v_ref‖", title="drift along sampling trajectories")
axes[2].invert_xaxis()
for ax in axes:
    ax.legend()
fig.tight_layout()
fig.savefig(OUT / "drift.png", dpi=120)
plt.show()

# %% [markdown]
# ## What this shows, and what it does not
#
# - Without the guard the velocity norm runs away from the reference, on the training points and along the
#   sampler's own trajectories — much further than the 5–15 % the paper reports for real rewards, because this
#   reward pays for nothing else. With λ = 1 the ratio stays at about 1 and the hinge is active on only part of the
#   batch: it switches itself off whenever ‖v_θ‖ ≤ ‖v_ref‖, and where it is on its gradient only shrinks the
#   magnitude of v_θ, never its direction.
# - The reward here can *only* be raised by inflating the velocity, so the guard also holds the reward flat. That
#   is the point of this caricature, not a measurement of what a real reward keeps: `toy_2d.py` and the README's
#   results answer that question.
# - For NFT, swap `ng.awm_loss(...)` for `ng.nft_loss(v, v_old, v_ref, x_t, x0, t, advantages)` with `v_old`
#   from your EMA "old" policy; for DPO, guard winner and loser alike:
#   `(ng.normguard_penalty(v_w, v_ref_w, lam=lam)[0] + ng.normguard_penalty(v_l, v_ref_l, lam=lam)[0]) / 2`.
# - The knobs of the hinge (`granularity`, `margin`, `power`, `tolerance`) and why their defaults are what they are:
#   see `ng.normguard_penalty`'s docstring and the walkthrough notebook.
