"""train_full's evaluation of the policy: the reward at the full and the few-step sampler on fixed prompts and noise,
the drift monitor (‖v_θ‖/‖v_ref‖ per t bin along the policy's own full-step trajectories, and its alarm), and the
model family's image metrics, and held-out rewards (--eval_rewards: scored, never trained on). Train_full records
the result in evals.jsonl and an image grid, and `publish` sends it to the tracker --report_to names (checked before
the model loads by `check_tracker`): the scalars, one scalar per t bin of the norm-ratio profile, the grid.

Evaluation samples with Euler steps on the model's sigmas (sample_steps and few_steps of them) whatever sampler the
rollouts use (rollouts.py): evaluations of runs that roll out with different samplers stay comparable, the
few-step sampler is the plain one whose robustness the paper's claim (4b) is about, and the norm-ratio profile is
read at the grid's own points. The official recipes evaluate with their pipelines at 40 steps.
"""

import importlib.util
import re

import torch

import normguard as ng
from trainer.rollouts import guided_velocity

EVAL_SEED_OFFSET = 12345  # the eval noise: seed + this, the same at every eval of a run


@torch.no_grad()
def measure(cfg, adapter, base, prompts, score, accelerator, held_out=None):
    """({"reward_full", "norm_ratio", "profile", "reward_few", "norm_ratio_max", "drift_alarm", the held-out rewards
    as reward_<name>_full, reward_<name>_few, and the adapter's image metrics as <name>_full, <name>_few}, the
    full-step images (N, C, H, W) in [-1, 1] on the CPU).

    cfg: train_full's Config; base: its Base (base.module is the policy, base.reference() the frozen reference);
    prompts: N prompts, one image each; score(images, prompts) -> (N,) rewards; held_out: {name: fn(images,
    prompts) -> (N,)}, rewards the run does not train on. The policy is sampled with the rollouts' classifier-free
    guidance; the drift alarm fires when the overall ratio or any t bin's exceeds cfg.drift_alarm (drift
    concentrates at the noise end, see docs/digits.md)."""
    bs, result, device, held_out = cfg.train_batch_size, {}, accelerator.device, held_out or {}
    generator = torch.Generator().manual_seed(cfg.seed + EVAL_SEED_OFFSET)
    noise = torch.randn(len(prompts), *adapter.latent_shape, generator=generator).to(device)
    for name, k in (("full", cfg.sample_steps), ("few", cfg.few_steps)):
        sigmas, ratios, ts, images, rewards = adapter.sigmas(k), [], [], [], []
        scores = {other: [] for other in held_out}
        for i in range(0, len(prompts), bs):
            cond, part = adapter.encode(prompts[i : i + bs]), prompts[i : i + bs]
            null = adapter.null_cond(len(part)) if cfg.cfg_scale != 1 else None
            velocity = traced_velocity(cfg, adapter, base, cond, null, ratios if name == "full" else None, ts)
            with accelerator.autocast():
                x0 = ng.euler_sample(velocity, noise[i : i + bs], sigmas.to(noise.dtype))
            images.append(adapter.decode(x0).cpu())
            rewards.append(score(images[-1].to(x0.device), part).cpu())
            for other, fn in held_out.items():
                scores[other].append(held_out_score(other, fn, images[-1].to(x0.device), part))
        images = torch.cat(images)
        result[f"reward_{name}"] = torch.cat(rewards).mean().item()
        result.update({f"reward_{metric_name(o)}_{name}": torch.cat(s).mean().item() for o, s in scores.items()})
        if name == "full":
            full_images = images
            means, counts = ng.norm_ratio_profile(torch.cat(ratios), torch.cat(ts).clamp(0, 1), cfg.profile_bins)
            result["norm_ratio"] = torch.cat(ratios).mean().item()
            result["profile"] = [None if c == 0 else round(m, 5) for m, c in zip(means.tolist(), counts.tolist())]
        result.update({f"{key}_{name}": v for key, v in adapter.image_metrics(images, prompts).items()})
    result["norm_ratio_max"] = max([result["norm_ratio"]] + [m for m in result["profile"] if m is not None])
    result["drift_alarm"] = bool(cfg.drift_alarm) and result["norm_ratio_max"] > cfg.drift_alarm
    return result, full_images


def metric_name(reward):
    """The reward's name as a metric key: `jpeg` -> jpeg, `my_module:score` -> my_module_score."""
    return re.sub(r"\W+", "_", reward).strip("_")


def held_out_score(name, fn, images, prompts):
    """A held-out reward's (B,) scores on the CPU, or a ValueError saying what it returned."""
    r = fn(images, prompts)
    if not torch.is_tensor(r) or r.shape != (len(images),):
        got = tuple(r.shape) if torch.is_tensor(r) else type(r).__name__
        raise ValueError(f"eval_rewards: {name} returned {got} for {len(images)} images; expected ({len(images)},)")
    return r.detach().float().cpu()


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


TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}  # what accelerate imports


def check_tracker(report_to):
    """Before the model loads: the package of the tracker --report_to names is installed (accelerate would only
    warn and log nothing); a ValueError naming the key otherwise."""
    if report_to and not any(importlib.util.find_spec(p) for p in TRACKER_PACKAGES[report_to]):
        extra = " (the trainer extra has it: pip install -e '.[trainer]')" if report_to == "tensorboard" else ""
        raise ValueError(f"report_to: {report_to} is not installed; pip install {report_to}{extra}, or --report_to=")


def publish(accelerator, step, record, grid):
    """An eval to the trackers (none without --report_to): its scalars as eval/<key>, the norm-ratio profile as one
    scalar per t bin (eval/norm_ratio_by_t/<t from>-<t to>, t = 1 the noise end), the image grid (3, H, W) in
    [0, 1] as eval/grid."""
    if not accelerator.trackers:
        return
    scalars = {f"eval/{k}": float(v) for k, v in record.items() if k != "profile" and v is not None}
    n = len(record["profile"])
    for i, m in enumerate(record["profile"]):
        if m is not None:
            scalars[f"eval/norm_ratio_by_t/{i / n:.2f}-{(i + 1) / n:.2f}"] = m
    accelerator.log(scalars, step=step)
    for tracker in accelerator.trackers:
        tracker.log_images({"eval/grid": grid[None]}, step=step)
