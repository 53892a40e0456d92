"""train_full's evaluation of the policy: the reward at the full and the few-step sampler on fixed prompts and noise,
the drift monitor (‖v_θ‖/‖v_ref‖ per t bin along the policy's own full-step trajectories, and its alarm), and the
model family's image metrics. Train_full records the result (evals.jsonl, the tracker, an image grid).

Evaluation samples with Euler steps on the model's sigmas (sample_steps and few_steps of them) whatever sampler the
rollouts use (rollouts.py): evaluations of runs that roll out with different samplers stay comparable, the
few-step sampler is the plain one whose robustness the paper's claim (4b) is about, and the norm-ratio profile is
read at the grid's own points. The official recipes evaluate with their pipelines at 40 steps.
"""

import torch

import normguard as ng
from trainer.rollouts import guided_velocity

EVAL_SEED_OFFSET = 12345  # the eval noise: seed + this, the same at every eval of a run


@torch.no_grad()
def measure(cfg, adapter, base, prompts, score, accelerator):
    """({"reward_full", "norm_ratio", "profile", "reward_few", "norm_ratio_max", "drift_alarm", and the adapter's
    image metrics as <name>_full, <name>_few}, the full-step images (N, C, H, W) in [-1, 1] on the CPU).

    cfg: train_full's Config; base: its Base (base.module is the policy, base.reference() the frozen reference);
    prompts: N prompts, one image each; score(images, prompts) -> (N,) rewards. The policy is sampled with the
    rollouts' classifier-free guidance; the drift alarm fires when the overall ratio or any t bin's exceeds
    cfg.drift_alarm (drift concentrates at the noise end, see docs/digits.md)."""
    bs, result, device = cfg.train_batch_size, {}, accelerator.device
    generator = torch.Generator().manual_seed(cfg.seed + EVAL_SEED_OFFSET)
    noise = torch.randn(len(prompts), *adapter.latent_shape, generator=generator).to(device)
    for name, k in (("full", cfg.sample_steps), ("few", cfg.few_steps)):
        sigmas, ratios, ts, images, rewards = adapter.sigmas(k), [], [], [], []
        for i in range(0, len(prompts), bs):
            cond, part = adapter.encode(prompts[i : i + bs]), prompts[i : i + bs]
            null = adapter.null_cond(len(part)) if cfg.cfg_scale != 1 else None
            velocity = traced_velocity(cfg, adapter, base, cond, null, ratios if name == "full" else None, ts)
            with accelerator.autocast():
                x0 = ng.euler_sample(velocity, noise[i : i + bs], sigmas.to(noise.dtype))
            images.append(adapter.decode(x0).cpu())
            rewards.append(score(images[-1].to(x0.device), part).cpu())
        images = torch.cat(images)
        result[f"reward_{name}"] = torch.cat(rewards).mean().item()
        if name == "full":
            full_images = images
            means, counts = ng.norm_ratio_profile(torch.cat(ratios), torch.cat(ts).clamp(0, 1), cfg.profile_bins)
            result["norm_ratio"] = torch.cat(ratios).mean().item()
            result["profile"] = [None if c == 0 else round(m, 5) for m, c in zip(means.tolist(), counts.tolist())]
        result.update({f"{key}_{name}": v for key, v in adapter.image_metrics(images, prompts).items()})
    result["norm_ratio_max"] = max([result["norm_ratio"]] + [m for m in result["profile"] if m is not None])
    result["drift_alarm"] = bool(cfg.drift_alarm) and result["norm_ratio_max"] > cfg.drift_alarm
    return result, full_images


def traced_velocity(cfg, adapter, base, cond, null, ratios, ts):
    """The policy's sampling velocity; with `ratios` a list, it also records ‖v_θ‖/‖v_ref‖ and t at each call:
    the drift along the policy's own trajectory."""

    def velocity(x, t):
        v = guided_velocity(adapter, base.module, x, t, cond, null, cfg.cfg_scale)
        if ratios is not None:
            with base.reference():
                v_ref = guided_velocity(adapter, base.module, x, t, cond, null, cfg.cfg_scale)
            ratios.append(ng.norm_ratio(v, v_ref))
            ts.append(t.float())
        return v

    return velocity
