"""RL fine-tuning of diffusers flow models (SD3/SD3.5, FLUX.1) with DiffusionNFT, AWM or Diffusion-DPO + NormGuard.

    accelerate launch train_full.py --preset=sd3 \\
        --pretrained_model_name_or_path=stabilityai/stable-diffusion-3.5-medium \\
        --train_prompts=prompts.txt --eval_prompts=eval.txt --method=nft --guard=true --out_dir=runs/sd35_nft
    accelerate launch train_full.py --preset=flux --pretrained_model_name_or_path=black-forest-labs/FLUX.1-dev
    python train_full.py --help            # every key with its default and what it does
Other model families register an adapter and a preset from their own file (register_adapter) and start this trainer
from there with the same keys: the 8x8-digit CPU testbed runs as `python -m experiments.digits_testbed --smoke`.

What happens, top to bottom:
1. config: one commented dataclass; presets fill model-specific defaults; `--key=value` overrides, unknown keys fail;
   every value, the model folder, the reward, the prompts and out_dir/--resume checked before any weight loads.
2. model: the pipeline loaded by its diffusers class; prompts encoded by the pipeline's own encode_prompt; a peft
   LoRA on the transformer. The frozen reference velocity is the same transformer with the adapter disabled; the
   old/EMA policy NFT and AWM need is a copy of the trainable (LoRA) tensors swapped in for a no-grad forward.
   Model differences (latent packing, timestep scale, guidance embedding, sigmas) live in trainer/adapters.py, the
   rewards (pickscore, jpeg, registered, module:function) in trainer/rewards.py.
3. loop: rollouts in groups of `group_size` per prompt by the method's official sampler on its grid
   (trainer/rollouts.py: NFT dpm2, AWM SA-Solver, DPO Euler), rewards, group advantages, then the base loss
   (ng.nft_loss / ng.awm_loss / ng.dpo_loss) + ng.normguard_penalty on fresh forward-process points at the method's
   own train timesteps; grad_steps_per_batch optimiser steps per rollout batch, AWM's log p_old from before the first
   of them.
4. eval (trainer/evaluation.py; at step 0, the reference, then every eval_every steps): reward at the full and few-step
   Euler samplers on fixed prompts and seeds, the norm-ratio profile along the policy's own trajectories, a grid.
5. save: atomic checkpoints (trainer/checkpoints.py: trainable weights, optimiser, LR schedule, RNG, step, old/EMA
   policy, the run identity --resume must match), the LoRA in the diffusers format
   (`pipe.load_lora_weights(out_dir + "/lora")`), config and metrics, each written temp + rename; a non-finite
   update, or one beyond WEIGHT_NORM_BOUND, stops before any save, and the stop line names the last good checkpoint.
Every base loss here evaluates the reference velocity at the training points already (their KL terms and DPO's
implicit reward need it), so the guard reuses that forward: it costs no extra network evaluation.
"""

import contextlib
import dataclasses
import functools
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import normguard as ng
from trainer import cli, evaluation, recipes
from trainer.adapters import Base, export_lora, make_trainable, registered
from trainer.checkpoints import (
    Counter,
    PolicyCopy,
    check_out_dir,
    check_run_folder,
    checkpoint_step,
    clear_run,
    complete_checkpoints,
    identity_hash,
    register_trainable_only_hooks,
    reject_checkpoint,
    replace_dir,
    save_checkpoint,
    trainable_params,
    truncate_jsonl,
)
from trainer.rewards import build_reward, check_reward, eval_reward_names
from trainer.rollouts import (
    OFFICIAL,
    SAMPLERS,
    check_timesteps,
    dpo_train_t,
    rollout,
    rollout_grid,
    train_timestep_plan,
)
from trainer.sample import how_to_load

METHODS = ("nft", "awm", "dpo")


@dataclass
class Config:
    # model: a diffusers pipeline folder or hub id (sd3: StableDiffusion3Pipeline, flux: FluxPipeline)
    preset: str = "sd3"  # sd3 | flux | a preset another file registered (register_adapter)
    pretrained_model_name_or_path: str = ""  # a folder or hub id (a registered preset may build its own if empty)
    resolution: int = 512
    max_sequence_length: int = 256  # T5 tokens of the prompt encoders (the pipeline default; a --recipe sets 128)
    # prompts: text files, one prompt per line; empty = the preset's built-in list
    train_prompts: str = ""
    eval_prompts: str = ""
    # trainable: LoRA on the transformer (rank/alpha as DiffusionNFT's official r=32, alpha=64), or everything
    full_finetune: bool = False  # costs a frozen copy of the transformer (reference), for NFT/AWM a 2nd (old/EMA)
    lora_rank: int = 32
    lora_alpha: int = 64
    lora_targets: str = "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out"
    # rollouts: groups of group_size samples per prompt, by the method's official sampler on its grid (rollouts.py)
    prompts_per_step: int = 2  # per process
    group_size: int = 24  # DiffusionNFT's official 24 images per prompt
    sample_steps: int = 0  # rollout sampler steps K; 0 = the method's official: nft 10, awm 14, dpo 10
    sampler: str = ""  # euler | dpm2 | sa_solver; "" = the method's official: nft dpm2, awm sa_solver, dpo euler
    sa_noise_level: float = 0.0  # SA-Solver's tau on 0.3 <= t <= 0.9 (AWM: 0.0 PickScore, 0.4 GenEval and OCR)
    cfg_scale: float = 1.0  # classifier-free guidance of the rollouts (1.0 = off, NFT's official setting)
    flux_guidance: float = 3.5  # FLUX-dev's embedded guidance value (ignored by models without guidance_embeds)
    shift: float = 1.0  # the sampling grid's shift for models without a scheduler (sd3/flux take the scheduler's)
    # reward: pickscore | jpeg | a registered reward | module:function (fn(images (B,3,H,W) in [-1,1], prompts) -> (B,))
    reward: str = "pickscore"
    pickscore_model: str = "yuvalkirstain/PickScore_v1"  # a CLIPModel folder or hub id (tokenizer included)
    # method and its base-loss settings (defaults: the official configs)
    method: str = "nft"  # nft | awm | dpo
    train_timesteps: int = 0  # per sample and step; 0 = the method's recipe: nft K-1, awm 6, dpo 1
    awm_timesteps: str = "discrete"  # AWM's strata from t_0: discrete | from t_1: discrete_wo_init | subset
    nft_beta: float = 1.0
    kl_weight: float = 1e-4  # NFT's KL weight, AWM's ref_weight
    adv_clip: float = 5.0
    awm_weighting: str = "ghuber"
    awm_ema_weight: float = 1.0  # AWM's pull towards its EMA policy (official 1.0; 0 skips that forward)
    awm_loss_type: str = "exp_first"  # exp_first: a ratio per (sample, t) (official) | sum_first: one per sample
    awm_kl_weighting: str = "uniform"  # AWM's KL terms: uniform (official) | elbo (divided by 2 sigma_t^2)
    # old/EMA policy per rollout batch: old <- d old + (1 - d) theta, d at n optimiser steps so far (recipes.py):
    nft_decay_type: int = 1  # NFT 0: d = 0 | 1: min(0.001 n, 0.5) | 2: 0 until n = 75, then min(0.0075 (n - 75), 0.999)
    ema_decay_rate: float = 0.001  # AWM: d = min(rate * n, 0.3)
    decay_lag: int = 0  # d at n - decay_lag (official 0; the digits preset keeps 1, the schedule its runs have used)
    recipe: str = ""  # "" | an official per-reward recipe of trainer/recipes.py (nft_ocr, awm_geneval, ...): see --help
    dpo_beta: float = 2000.0
    dpo_t_law: str = "flow_factory"  # DPO's train t: flow_factory 1 - .99 clamp(sigmoid(n), .01, 1 - 1e-6) | sigmoid
    dpo_t_shared: bool = True  # one DPO t per micro-batch of pairs (Flow-Factory) | false: one per pair
    # NormGuard (ng.normguard_penalty): zero unless |v_theta| > |v_ref|; loss = base + penalty
    guard: bool = True
    lam: float = 1.0  # DPO: the hinge's weight is lam * abs(dpo_beta) / 2, the factor its own loss carries
    margin: str = "relative"
    power: int = 2
    granularity: str = "sample"  # sample | token (token = one latent pixel, all channels)
    tolerance: float = 0.0
    dpo_guard: str = "both"  # which DPO branch is guarded: both (mean of the two) | winner | loser
    # optimisation: grad_steps_per_batch AdamW steps per rollout batch, gradients accumulated over micro-batches and
    # train timesteps; each step is one rollout batch (steps, checkpoints and evals count rollout batches)
    steps: int = 300
    grad_steps_per_batch: int = 1  # the rollout batch split into this many minibatches, one AdamW step each (NFT OCR 2)
    awm_off_policy: bool = False  # AWM: rollouts and log p_old from the EMA policy (the official off_policy mode)
    awm_clip_range: float = 1.0  # AWM's clip c of rho to [1 - c, 1 + c] (official 1; rho != 1 from a batch's 2nd step)
    lr: float = 3e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 0  # optimiser steps of linear LR warmup
    max_grad_norm: float = 1.0
    train_batch_size: int = 8  # samples per forward (DPO: pairs); the rollout batch is split into these
    mixed_precision: str = "bf16"  # no | fp16 | bf16 (accelerate); frozen weights are stored in this dtype
    gradient_checkpointing: bool = True
    seed: int = 0
    # eval and logging
    eval_every: int = 50
    eval_seeds: int = 2  # images per eval prompt, fixed noise
    few_steps: int = 4  # the few-step eval sampler
    profile_bins: int = 10
    drift_alarm: float = 0.0  # warn when an eval's norm ratio, overall or in any t bin, exceeds this (0 = off)
    drift_stop: bool = False  # at the first drift alarm: save a checkpoint, export, and stop
    report_to: str = ""  # "" | tensorboard | wandb: the scalars, each eval's grid and per-t norm-ratio profile
    eval_rewards: str = ""  # held-out rewards scored on the eval images, never trained on: names or module:function
    # outputs
    out_dir: str = "runs/train_full"
    checkpoint_every: int = 50
    checkpoints_keep: int = 2
    resume: str = ""  # "" | latest | a checkpoint folder (its run identity must match this config's)
    overwrite: bool = False  # a fresh run into an out_dir holding checkpoints removes them (a resume removes nothing)
    cache_dir: str = ""  # where a registered preset caches what it builds ("" = its own default)


SMOKE = dict(steps=2, prompts_per_step=2, group_size=2, sample_steps=3, few_steps=1, train_batch_size=4)
SMOKE.update(eval_every=2, eval_seeds=1, checkpoint_every=1, lora_rank=4, lora_alpha=8, mixed_precision="no")
SMOKE.update(gradient_checkpointing=False, out_dir="runs/train_full_smoke", overwrite=True)  # throwaway runs
FLAGS = {"smoke": "tiny sizes (2 steps, 2x2 rollouts, LoRA r=4), each run replacing the last; tests, a first try"}
# The diffusers training scripts' names (train_dreambooth_lora_sd3.py) for keys that mean the same here. steps and
# checkpoint_every count rollout batches: their optimiser steps while grad_steps_per_batch = 1.
ALIASES = dict(output_dir="out_dir", learning_rate="lr", max_train_steps="steps", rank="lora_rank")
ALIASES.update(checkpointing_steps="checkpoint_every", checkpoints_total_limit="checkpoints_keep")
ALIASES.update(resume_from_checkpoint="resume", lr_warmup_steps="warmup_steps", adam_weight_decay="weight_decay")
ALIASES.update(lora_layers="lora_targets")
NOT_HERE = {  # their names that mean something else here, with what to use
    "gradient_accumulation_steps": "each optimiser step accumulates the gradients of all its micro-batches (of "
    "--train_batch_size samples) already; --grad_steps_per_batch splits a rollout batch into several steps",
    "validation_prompt": "--eval_prompts takes a text file, one prompt per line",
    "validation_epochs": "--eval_every counts steps",
    "num_train_epochs": "no dataset is cycled: --steps counts rollout batches",
    "lr_scheduler": "the learning rate is constant after --warmup_steps of linear warmup",
    "logging_dir": "--report_to's logs go into --out_dir",
}
CHOICES = dict(method=METHODS, margin=("relative", "absolute"), power=(1, 2), granularity=("sample", "token"))
CHOICES.update(sampler=SAMPLERS, awm_timesteps=("discrete", "discrete_wo_init", "subset"))
CHOICES.update(dpo_guard=("both", "winner", "loser"), mixed_precision=("no", "fp16", "bf16"))
CHOICES.update(report_to=("", "tensorboard", "wandb"), awm_weighting=("uniform", "t", "t2", "huber", "ghuber"))
CHOICES.update(awm_loss_type=("exp_first", "sum_first"), awm_kl_weighting=("uniform", "elbo"), nft_decay_type=(0, 1, 2))
CHOICES.update(dpo_t_law=("flow_factory", "sigmoid"))
AT_LEAST_1 = "steps prompts_per_step group_size sample_steps few_steps train_batch_size eval_every eval_seeds"
AT_LEAST_1 += " checkpoint_every checkpoints_keep lora_rank lora_alpha resolution profile_bins max_sequence_length"
AT_LEAST_1 += " grad_steps_per_batch"
MAX_SEED = 2**31 - 1
RANGES = [  # (keys, test, what a value must be)
    (AT_LEAST_1, lambda v: v >= 1, "an int >= 1"),
    ("sa_noise_level", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    ("awm_clip_range", lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    ("lr cfg_scale nft_beta adv_clip max_grad_norm shift", lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    (
        "lam kl_weight awm_ema_weight tolerance weight_decay ema_decay_rate warmup_steps drift_alarm decay_lag",
        lambda v: math.isfinite(v) and v >= 0,
        "a finite number >= 0",
    ),
    ("dpo_beta", lambda v: math.isfinite(v) and v != 0, "a finite number != 0 (0: a constant DPO loss)"),
    ("flux_guidance", math.isfinite, "a finite number"),
    ("seed", lambda v: 0 <= v <= MAX_SEED, f"an int in 0..{MAX_SEED}"),  # step_generator's seeds then fit 64 bits
]
# The run identity: every key that changes what a step computes. Not in it: where outputs go, how often to
# evaluate, log and checkpoint, how far to train (steps), the eval sizes, gradient checkpointing (the same math).
NOT_IDENTITY = "out_dir resume overwrite steps eval_every eval_seeds few_steps eval_prompts profile_bins report_to"
NOT_IDENTITY += " drift_alarm drift_stop recipe"  # a recipe's values are keys of their own
NOT_IDENTITY += " checkpoint_every checkpoints_keep cache_dir gradient_checkpointing eval_rewards"
# Keys added after checkpoints were written without them, at the values under which those runs computed the same:
# left out of the identity there, so such checkpoints still resume (experiments/digits.py reuses runs by the same rule)
KEYS_ADDED_SINCE = dict(awm_loss_type="exp_first", awm_kl_weighting="uniform", nft_decay_type=1, decay_lag=1, recipe="")
KEYS_ADDED_SINCE.update(sampler="euler", awm_timesteps="subset", sa_noise_level=0.0)
KEYS_ADDED_SINCE.update(grad_steps_per_batch=1, awm_off_policy=False, awm_clip_range=1.0, eval_rewards="")
KEYS_ADDED_SINCE.update(dpo_t_law="sigmoid", dpo_t_shared=False)


def parse_args(argv, preset="sd3"):
    """Config from the command line (--key=value, --key value, bare booleans, --config=<file>, the diffusers names
    of ALIASES) and `--smoke` on top of `preset` (unless --preset or the file names one); `--help` lists that
    preset's defaults."""
    name = named_preset(argv, preset)
    doc = f"{__doc__.rstrip()}\n\nThe defaults below are the {name} preset's."
    shown = {**registered(name).defaults, "preset": name}
    kw = dict(flags=FLAGS, doc=doc, defaults=shown, aliases=ALIASES, notes=NOT_HERE)
    (overrides,), flags = cli.parse(argv, [Config], **kw)
    name = overrides.get("preset", name)  # a --config file may name it
    return family_config(registered(name), {**overrides, "preset": name}, smoke="smoke" in flags)


def named_preset(argv, preset):
    """The preset the command line names (--preset=x or --preset x), else, with --help, the one its --config file
    names (a run takes that from the parsed file), else `preset`: what --help shows the defaults of. A file that
    cannot be read names none here; parsing says why."""
    named = argv_value(argv, "preset")
    config = argv_value(argv, "config")
    if named is None and config is not None and ("--help" in argv or "-h" in argv):
        try:
            named = cli.read_config_file(config).get("preset")
        except cli.UsageError:
            pass
    return named if isinstance(named, str) and named else preset


def argv_value(argv, key):
    """The value of --key=value or --key value in argv, or None."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{key}="):
            return arg.partition("=")[2]
        if arg == f"--{key}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def make_config(overrides, smoke=False, preset="sd3"):
    """The config of `overrides` ({Config key: value}) on top of `preset`, unless they name their own."""
    name = overrides.get("preset", preset)
    return family_config(registered(name), {**overrides, "preset": name}, smoke)


def family_config(family, overrides, smoke):
    """The family's defaults < the recipe's < (smoke) SMOKE and the family's smoke sizes < `overrides`; checked."""
    recipe = recipes.settings(overrides.get("recipe", ""))
    cfg = Config(**{**family.defaults, **recipe, **({**SMOKE, **family.smoke_sizes} if smoke else {}), **overrides})
    if cfg.method in OFFICIAL:  # "" and 0: the method's official sampler and step count (rollouts.OFFICIAL)
        sampler, steps = OFFICIAL[cfg.method]
        cfg.sampler, cfg.sample_steps = cfg.sampler or sampler, cfg.sample_steps or steps
    check_config(cfg, family)
    return cfg


def check_config(cfg, family):
    """A ValueError naming the key and what it expects, for the first bad value of cfg (no file is read)."""
    for name, options in CHOICES.items():
        if getattr(cfg, name) not in options:
            raise ValueError(f"{name}: expected one of {options}, got {getattr(cfg, name)!r}")
    for names, test, what in RANGES:
        for name in names.split():
            if not test(getattr(cfg, name)):
                raise ValueError(f"{name}: expected {what}, got {getattr(cfg, name)}")
    if cfg.group_size < 2:
        raise ValueError(f"group_size: expected >= 2 (advantages compare samples of one prompt), got {cfg.group_size}")
    if cfg.drift_stop and not cfg.drift_alarm:
        raise ValueError("drift_stop: expected --drift_alarm=<ratio> > 0 with it (the ratio that stops the run)")
    if not cfg.out_dir.strip():
        raise ValueError("out_dir: expected a folder for the run's outputs, got ''")
    if not all(t.strip() for t in cfg.lora_targets.split(",")):
        raise ValueError(f"lora_targets: expected comma-separated module names, got {cfg.lora_targets!r}")
    check_timesteps(cfg)
    recipes.check(cfg)
    check_update_plan(cfg)
    family.adapter.check(cfg)


def check_update_plan(cfg):
    """The split of a rollout batch into grad_steps_per_batch minibatches (DPO: of its pairs) and AWM's off-policy."""
    units = cfg.prompts_per_step * (1 if cfg.method == "dpo" else cfg.group_size)  # DPO: one pair per prompt
    if units % cfg.grad_steps_per_batch:
        raise ValueError(
            f"grad_steps_per_batch: expected a divisor of {units}, the rollout batch per process (DPO: its pairs), "
            f"got {cfg.grad_steps_per_batch}"
        )
    if cfg.awm_off_policy and cfg.method != "awm":
        raise ValueError(f"awm_off_policy: expected false with method={cfg.method} (it is AWM's mode)")


def run_identity(cfg):
    """{key: value} of the config keys that define what the run trains (all but NOT_IDENTITY and KEYS_ADDED_SINCE's
    keys at their values there)."""
    kept = lambda k, v: k not in NOT_IDENTITY.split() and (k, v) not in KEYS_ADDED_SINCE.items()
    return {k: v for k, v in dataclasses.asdict(cfg).items() if kept(k, v)}


# ---------------------------------------------------------------------------------------------------------------
# the losses of one rollout batch, one micro-batch each


def guard_terms(cfg, v, v_ref):
    """(penalty, stats): the hinge when guard is on; when off, its statistics only (no gradient), for the log.

    DPO's weight is lam·dpo_beta/2: its loss reaches the errors through the factor β/2 (1000 at the official β),
    so a plain lam would leave the guard a thousand times weaker than under NFT and AWM."""
    kw = dict(granularity=cfg.granularity, margin=cfg.margin, power=cfg.power, tolerance=cfg.tolerance)
    if cfg.guard:
        lam = cfg.lam * abs(cfg.dpo_beta) / 2 if cfg.method == "dpo" else cfg.lam
        return ng.normguard_penalty(v, v_ref, lam=lam, **kw)
    with torch.no_grad():
        _, stats = ng.normguard_penalty(v.detach(), v_ref, lam=0.0, **kw)
    return torch.zeros((), device=v.device), stats


def minibatches(cfg, batch, sigmas, gen):
    """The losses of one rollout batch: grad_steps_per_batch lists of them, one list per optimiser step, each loss
    `fn(cfg, adapter, model, base, old) -> (loss, stats)` with its t and noise drawn here, in the order of the losses.

    The one place where DPO and the sample methods differ in what they train on: NFT and AWM train every rollout
    sample at each of the method's train timesteps (one plan per minibatch); DPO trains one (best, worst) pair per
    prompt group, at the t of rollouts.dpo_train_t (by default Flow-Factory's: one per micro-batch of pairs). With
    more than one minibatch the samples (DPO: pairs) are shuffled first, as the official code does. A micro-batch
    holds at most train_batch_size samples (DPO: pairs)."""
    x0, cond, bs, n = batch.x0, batch.cond, cfg.train_batch_size, cfg.grad_steps_per_batch
    units = cfg.prompts_per_step if cfg.method == "dpo" else len(x0)
    order = (torch.randperm(units, generator=gen) if n > 1 else torch.arange(units)).to(x0.device)
    draw = lambda i, n_t=1: torch.randn((n_t * len(i), *x0.shape[1:]), generator=gen)  # CPU: all devices alike
    losses = []
    if cfg.method == "dpo":
        groups = batch.rewards.view(cfg.prompts_per_step, cfg.group_size)
        first = torch.arange(cfg.prompts_per_step, device=x0.device) * cfg.group_size
        best, worst = first + groups.argmax(1), first + groups.argmin(1)
        pair_cond = lambda w: {k: torch.cat([v[w], v[w]]) for k, v in cond.items()}  # one prompt per group
        for minibatch in order.chunk(n):
            losses.append([])
            for w, lo in zip(best[minibatch].split(bs), worst[minibatch].split(bs)):
                t = dpo_train_t(cfg, len(w), gen)
                kw = dict(x_w=x0[w], x_l=x0[lo], cond=pair_cond(w), t=t, eps=draw(w))
                losses[-1].append(functools.partial(pair_loss, **kw))
        return losses
    part = lambda i: dict(x0=x0[i], cond={k: v[i] for k, v in cond.items()}, adv=batch.adv[i])
    for minibatch in order.chunk(n):
        plan, size = train_timestep_plan(cfg, sigmas, gen), bs
        if cfg.method == "awm" and cfg.awm_loss_type == "sum_first":  # a sample's ratio needs all its timesteps at once
            plan, size = [plan], max(1, bs // len(plan))  # so a forward still holds about train_batch_size rows
        chunks = minibatch.split(size)
        losses.append(
            [functools.partial(sample_loss, **part(i), t_value=t, eps=draw(i, t.numel())) for t in plan for i in chunks]
        )
    return losses


def training_rows(x0, cond, adv, t_value, eps):
    """The forward-process rows of one loss: samples x0 (B, C, H, W) with cond and advantages adv (B,) at each of
    t_value's n train timesteps (n = 1, or AWM sum_first's T: n·B rows, timestep-major), noise eps (n·B, C, H, W).
    Returns (x0, cond, adv, t) repeated to the rows, x_t and u."""
    n, t = t_value.numel(), t_value.repeat_interleave(len(x0)).to(x0.device)
    x0, adv, cond = torch.cat([x0] * n), adv.repeat(n), {k: torch.cat([v] * n) for k, v in cond.items()}
    return (x0, cond, adv, t, *ng.forward_process(x0, eps.to(x0.device, x0.dtype), t))


def sample_loss(cfg, adapter, model, base, old, x0, cond, adv, t_value, eps, v_old=None):
    """NFT or AWM + guard on samples x0 (B, C, H, W), advantages adv (B,), at one t_value or (AWM sum_first) at T,
    noise eps; v_old: AWM's pre-update (off-policy: EMA) velocity at the same rows, or None (v detached: ratio 1)."""
    x0, cond, adv, t, x_t, u = training_rows(x0, cond, adv, t_value, eps)
    with torch.no_grad():  # before the policy forward: swapping the old weights in writes to the parameters
        with base.reference():
            v_ref = adapter.velocity(base.module, x_t, t, cond)
        v_extra = None
        if old is not None:
            with old.swapped_in():
                v_extra = adapter.velocity(base.module, x_t, t, cond)
    v = adapter.velocity(model, x_t, t, cond)
    if cfg.method == "nft":
        kw = dict(beta=cfg.nft_beta, adv_clip=cfg.adv_clip, kl_weight=cfg.kl_weight)
        loss, stats = ng.nft_loss(v, v_extra, v_ref, x_t, x0, t, adv, **kw)
    else:  # before the batch's first update the pre-update policy is v itself, detached (ratio 1, no forward)
        kw = dict(weighting=cfg.awm_weighting, adv_clip=cfg.adv_clip, ref_weight=cfg.kl_weight, v_ema=v_extra)
        kw.update(ema_weight=cfg.awm_ema_weight, loss_type=cfg.awm_loss_type, kl_weighting=cfg.awm_kl_weighting)
        kw.update(clip_range=cfg.awm_clip_range, timesteps_per_sample=t_value.numel())
        v64 = v.double() if cfg.grad_steps_per_batch > 1 or cfg.awm_off_policy else v  # rho != 1: float64, as AWM
        loss, stats = ng.awm_loss(v64, v64.detach() if v_old is None else v_old, v_ref, u, t, adv, **kw)
    penalty, g = guard_terms(cfg, v, v_ref)
    return loss + penalty, {**stats, "hinge": g["hinge"], "active_frac": g["active_frac"], "guard": penalty.detach()}


def pair_loss(cfg, adapter, model, base, old, x_w, x_l, cond, t, eps):
    """Diffusion-DPO + guard on winner/loser pairs (B, C, H, W) sharing noise eps and the t (B,) of dpo_train_t."""
    t, eps = t.to(x_w.device), eps.to(x_w.device, x_w.dtype)  # eps: shared by winner and loser
    (xt_w, u_w), (xt_l, u_l) = ng.forward_process(x_w, eps, t), ng.forward_process(x_l, eps, t)
    xt, tt = torch.cat([xt_w, xt_l]), torch.cat([t, t])
    with torch.no_grad(), base.reference():
        v_ref = adapter.velocity(base.module, xt, tt, cond)
    v = adapter.velocity(model, xt, tt, cond)
    (v_w, v_l), (r_w, r_l) = v.chunk(2), v_ref.chunk(2)
    loss, stats = ng.dpo_loss(v_w, v_l, r_w, r_l, u_w, u_l, beta=cfg.dpo_beta)
    if cfg.dpo_guard == "both":
        (p_w, s_w), (p_l, s_l) = guard_terms(cfg, v_w, r_w), guard_terms(cfg, v_l, r_l)
        penalty, g = (p_w + p_l) / 2, {k: (s_w[k] + s_l[k]) / 2 for k in s_w}
    else:
        penalty, g = guard_terms(cfg, v_w, r_w) if cfg.dpo_guard == "winner" else guard_terms(cfg, v_l, r_l)
    return loss + penalty, {**stats, "hinge": g["hinge"], "active_frac": g["active_frac"], "guard": penalty.detach()}


# An optimiser step that multiplies the trainable weights' norm by more than this destroyed them, finite or not: a
# LoRA's norm (its A, gaussian at init) moves by ~lr·r relative per step, a full fine-tune's far less; 10x takes lr
# ~0.3 at r = 32. Such an update stops the run before the counter, the old/EMA copy or a checkpoint sees it.
WEIGHT_NORM_BOUND = 10.0


def weight_norm(params):
    """The L2 norm of all `params` together, as a float (inf or nan when some weight is)."""
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.detach().double()) for p in params])))


class Stopped(RuntimeError):
    """A run stopped by a fault (its message says what happened and names the last good checkpoint)."""


class NonFiniteLoss(Stopped):
    pass


# ---------------------------------------------------------------------------------------------------------------
# the run: setup, resume, then per step rollouts, update, log, checkpoint, eval


def train(cfg):
    """Run cfg; returns the final metrics dict (also written to out_dir/metrics.json). accelerate's state is
    process-wide: runs in one process must share mixed_precision."""
    family = cli.checked(registered, cfg.preset)  # the model family, looked up once for the whole run
    path, ckpt = cli.checked(preflight, cfg, family)  # before the model loads: errors in seconds
    run = Run(cfg, family, path)
    try:
        run.resume(ckpt)
        if run.main and run.eval_missing(run.counter.step):  # step 0: the reference, the baseline of every eval;
            run.evaluate(run.counter.step)  # after a resume: the checkpoint's eval, when a crash came before it
        train_steps(run, cfg)
        return run.finish()
    except cli.WriteError as e:  # a full disk, a folder gone read-only: the file is named, and where to resume
        raise Stopped(f"{e}; {run.good()}") from None


def train_steps(run, cfg):
    """The loop from the run's step to cfg.steps: rollouts, update, log, checkpoint, eval (a drift stop ends it)."""
    from tqdm import tqdm

    bar = tqdm(range(run.counter.step, cfg.steps), initial=run.counter.step, total=cfg.steps, disable=not run.main)
    for step in bar:
        t0 = time.time()
        batch = run.rollouts(step)
        stats = run.update(batch, step)
        run.log_step(step, batch, stats, time.time() - t0)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            run.checkpoint(step + 1)
        if run.main and run.eval_due(step + 1):
            run.evaluate(step + 1)
        run.accelerator.wait_for_everyone()
        if cfg.drift_stop and run.drift_alarmed(step + 1):  # a clean stop: this step's checkpoint, then the export
            run.checkpoint(step + 1)
            break


def preflight(cfg, family):
    """Every check, all before any weight loads, those that need no model first: the config, the reward, the prompt
    files, out_dir (writable) against --resume and --overwrite, then the model folder the family resolves against
    the family (pipeline class, resolution, lora_targets). Returns (model folder, the checkpoint to resume or None:
    a fresh run); a ValueError naming the key otherwise."""
    check_config(cfg, family)
    check_reward(cfg)
    eval_reward_names(cfg)
    evaluation.check_tracker(cfg.report_to)
    read_prompts("train_prompts", cfg.train_prompts, family.prompts)
    read_prompts("eval_prompts", cfg.eval_prompts, family.prompts)
    check_out_dir(cfg.out_dir)
    ckpt = check_run_folder(Path(cfg.out_dir) / "checkpoints", cfg.resume, cfg.overwrite, run_identity(cfg))
    if ckpt is not None and checkpoint_step(ckpt) > cfg.steps:  # it would "finish" at once, its config saying less
        raise ValueError(
            f"steps: expected >= {checkpoint_step(ckpt)}, the step of {ckpt} that --resume continues, got {cfg.steps}"
        )
    # last: a hub id may take seconds to answer, a testbed may build its model, lora_targets reads the model's config
    path = family.adapter.resolve_path(cfg)
    family.adapter.check_model(cfg, path)
    return path, ckpt


@dataclass
class Rollouts:
    x0: torch.Tensor  # (B, C, H, W) this process's samples, groups of group_size contiguous
    cond: dict  # their conditioning, batched
    rewards: torch.Tensor  # (B,) this process's rewards
    adv: torch.Tensor  # (B,) group advantages
    all_rewards: torch.Tensor  # every process's rewards, for the log


class Run:
    """One training run: setup in __init__, then the loop's steps as methods (train() calls them in order)."""

    def __init__(self, cfg, family, path):
        """Accelerator, model (LoRA through peft, or full fine-tuning), optimiser, old/EMA policy, reward, prompts."""
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.cfg, self.out_dir, self.model_path = cfg, Path(cfg.out_dir), path
        self.ckpt_root = self.out_dir / "checkpoints"
        self.last_good, self.log, self.evals, self.last_step = None, None, [], {}  # see resume, evaluate, log_step
        self.train_prompts = read_prompts("train_prompts", cfg.train_prompts, family.prompts)
        self.eval_prompts = read_prompts("eval_prompts", cfg.eval_prompts, family.prompts)
        project, trackers = ProjectConfiguration(project_dir=str(self.out_dir)), cfg.report_to or None
        kw = dict(project_config=project, step_scheduler_with_optimizer=False)
        acc = Accelerator(mixed_precision=cfg.mixed_precision, log_with=trackers, **kw)
        check_launch(acc.num_processes)
        self.accelerator, self.main, device = acc, acc.is_main_process, acc.device
        if cfg.overwrite and not cfg.resume and self.main:  # preflight allowed it; before anything is written
            print(f"overwrite: removed {clear_run(self.out_dir) or 'nothing'} from {self.out_dir}")
        acc.wait_for_everyone()
        weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
        torch.manual_seed(cfg.seed)
        self.adapter = family.adapter(cfg, path, device, weight_dtype)
        frozen_copy = make_trainable(cfg, self.adapter.transformer, device, weight_dtype)
        self.params = trainable_params(self.adapter.transformer)
        opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
        register_trainable_only_hooks(acc)
        self.model, self.opt, self.sched = acc.prepare(self.adapter.transformer, opt, sched)
        self.base = Base(acc.unwrap_model(self.model), frozen_copy)  # no-grad forwards skip the DDP wrapper
        self.old = None  # NFT's old / AWM's EMA policy
        if cfg.method == "nft" or (cfg.method == "awm" and (cfg.awm_ema_weight > 0 or cfg.awm_off_policy)):
            self.old = PolicyCopy(trainable_params(self.base.module))
        self.counter = Counter()
        for state in (self.counter, self.old):
            if state is not None:
                acc.register_for_checkpointing(state)
        self.reward_fn = build_reward(cfg, device)
        self.held_out = {name: build_reward(cfg, device, name) for name in eval_reward_names(cfg)}
        self.sigmas = self.adapter.sigmas(cfg.sample_steps)  # the model's grid: train timesteps are its points
        self.grid = rollout_grid(cfg.sampler, self.sigmas)  # the grid the rollout sampler runs on
        self.report()
        if cfg.report_to:
            acc.init_trackers("normguard", config=dataclasses.asdict(cfg))

    def report(self):
        """The derived quantities and invariants, before step 1; the resolved config next to the outputs."""
        cfg, acc, sigmas = self.cfg, self.accelerator, self.sigmas
        n_proc, per_proc = acc.num_processes, cfg.prompts_per_step * cfg.group_size
        dummy = Rollouts(torch.zeros(per_proc, 1), {}, torch.zeros(per_proc), torch.zeros(per_proc), None)
        n_loss = [len(m) for m in minibatches(cfg, dummy, sigmas, torch.Generator().manual_seed(0))]
        assert per_proc % cfg.group_size == 0 and len(sigmas) == cfg.sample_steps + 1 and float(sigmas[-1]) == 0.0
        assert len(self.params) > 0 and all(p.dtype == torch.float32 for p in self.params)
        if not self.main:
            return
        (self.out_dir / "eval").mkdir(parents=True, exist_ok=True)
        saved = dict(config=dataclasses.asdict(cfg), identity=identity_hash(run_identity(cfg)), command=sys.argv)
        saved.update(git_revision=cli.git_revision(), model_path=self.model_path)
        cli.write_atomic(self.out_dir / "config.json", cli.dumps(saved, indent=1))
        trainable = "full" if cfg.full_finetune else f"LoRA r={cfg.lora_rank}"
        guard = f"on: lam {cfg.lam}, {cfg.margin}" if cfg.guard else "off"
        n_params, grid = sum(p.numel() for p in self.params) / 1e6, [round(s, 4) for s in self.grid.tolist()]
        policy = "the EMA policy (off-policy)" if cfg.awm_off_policy else "the policy"
        print(
            f"device {acc.device} x {n_proc} process(es) | {cfg.mixed_precision} | preset {cfg.preset} | latents "
            f"{tuple(self.adapter.latent_shape)} | trainable {n_params:.3f} M ({trainable}) | {cfg.method}, guard "
            f"{guard}\nper step: {cfg.prompts_per_step} prompts x {cfg.group_size} = {per_proc} rollouts per process, "
            f"{per_proc * n_proc} in all, from {policy} | {cfg.sampler} sampler, {cfg.sample_steps} steps on {grid} "
            f"| {n_loss[0]} micro-batch losses (train timesteps x micro-batches of <= {cfg.train_batch_size} samples; "
            f"DPO: pairs) accumulated into each of {len(n_loss)} optimiser step(s) | {cfg.steps} steps"
        )

    def resume(self, ckpt):
        """Load the checkpoint preflight chose (None: a fresh run); open the logs: a fresh run starts them anew, a
        resumed one cuts them back to its step (the steps after it are redone: each is logged once) and appends."""
        if ckpt is not None:
            self.accelerator.load_state(str(ckpt))
            if self.main:
                print(f"resumed from {ckpt} at step {self.counter.step}")
        if self.main:
            self.last_good = max(complete_checkpoints(self.ckpt_root), default=None)
            log, evals = (self.out_dir / "log.jsonl", self.out_dir / "evals.jsonl")
            if ckpt is None:
                cli.write_atomic(log, "")
                cli.write_atomic(evals, "")
            self.last_step = (truncate_jsonl(log, self.counter.step) or [{}])[-1]
            self.evals = truncate_jsonl(evals, self.counter.step)
            self.log = open(log, "a")

    def eval_due(self, step):
        return step == 0 or step % self.cfg.eval_every == 0 or step == self.cfg.steps

    def eval_missing(self, step):
        return self.eval_due(step) and step not in {e["step"] for e in self.evals}

    def rollouts(self, step):
        """Samples of this step's prompts (no grad) by cfg.sampler from the policy (off-policy AWM: its EMA), their
        rewards and group advantages."""
        cfg, acc, adapter, bs = self.cfg, self.accelerator, self.adapter, self.cfg.train_batch_size
        rank, per_proc = acc.process_index, cfg.prompts_per_step * cfg.group_size
        gen = step_generator(cfg, step, rank, 0)
        idx = torch.randint(len(self.train_prompts), (cfg.prompts_per_step,), generator=gen)
        prompts = [self.train_prompts[i] for i in idx.tolist() for _ in range(cfg.group_size)]
        noise = torch.randn(per_proc, *adapter.latent_shape, generator=gen).to(acc.device)
        self.model.eval()
        x0s, conds, rewards, sde = [], [], [], step_generator(cfg, step, rank, 2)  # sde: the SA-Solver's noise
        policy, broken = self.old.swapped_in() if cfg.awm_off_policy else contextlib.nullcontext(), False
        with torch.no_grad(), acc.autocast(), policy:
            for i in range(0, per_proc, bs):
                cond, part = adapter.encode(prompts[i : i + bs]), prompts[i : i + bs]
                x0 = self.sample(cond, noise[i : i + bs], sde)
                x0s.append(x0.float())
                conds.append(cond)
                if bool(torch.isfinite(x0).all()):
                    rewards.append(self.score(adapter.decode(x0), part))
                else:  # no reward is asked to judge NaN images: the check below stops every process
                    rewards.append(torch.full((len(part),), math.nan, device=acc.device))
                    broken = True
        rewards = torch.cat(rewards)
        all_rewards = acc.gather(rewards)
        if not bool(torch.isfinite(all_rewards).all()):
            raise self.nonfinite_rollouts(step, broken)
        adv = ng.group_advantages(all_rewards, cfg.group_size)[rank * per_proc : (rank + 1) * per_proc]
        cond = {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
        return Rollouts(torch.cat(x0s), cond, rewards, adv.to(acc.device), all_rewards)

    def sample(self, cond, noise, sde):
        """The rollout sampler's x0 from `noise` (NaN where the policy's velocities were not finite)."""
        cfg, adapter = self.cfg, self.adapter
        null = adapter.null_cond(len(noise)) if cfg.cfg_scale != 1 else None
        kw = dict(sampler=cfg.sampler, generator=sde, noise_level=cfg.sa_noise_level)
        try:
            return rollout(adapter, self.base.module, cond, noise, self.grid, cfg.cfg_scale, null, **kw)
        except ValueError as e:  # the samplers' own check names a non-finite velocity
            if "finite" not in str(e):
                raise
            return torch.full_like(noise, math.nan)

    def nonfinite_rollouts(self, step, broken):
        """The stop of a step whose rewards are NaN/Inf. When the policy's samples were (on any process), the
        weights after the last update are broken though finite: a checkpoint of them is moved out of --resume's
        reach (renamed rejected-...) and the one before it named."""
        acc = self.accelerator
        if acc.reduce(torch.tensor([float(broken)], device=acc.device), "sum").item() == 0:
            return NonFiniteLoss(f"step {step + 1}: the reward returned NaN/Inf; stopped, {self.good()}")
        rejected = ""
        if self.main and self.last_good is not None and checkpoint_step(self.last_good) == step:
            rejected = f"; {self.last_good.name} holds them: moved to {reject_checkpoint(self.last_good).name}"
            self.last_good = max(complete_checkpoints(self.ckpt_root), default=None)
        return NonFiniteLoss(
            f"step {step + 1}: the policy's rollouts are NaN/Inf: the weights after step {step} are finite but broken"
            f"{rejected}; stopped, {self.good()}"
        )

    def score(self, images, prompts):
        """The reward of images (B, C, H, W): (B,) float, or a ValueError saying what the reward returned."""
        r = self.reward_fn(images, prompts)
        if not torch.is_tensor(r) or r.shape != (len(images),):
            got = tuple(r.shape) if torch.is_tensor(r) else type(r).__name__
            raise ValueError(
                f"reward: {self.cfg.reward} returned {got} for {len(images)} images; expected ({len(images)},)"
            )
        return r.float()

    def update(self, batch, step):
        """The rollout batch's grad_steps_per_batch optimiser steps, one per minibatch, then the old/EMA policy's
        update; returns the statistics averaged over the minibatches."""
        cfg, acc = self.cfg, self.accelerator
        self.model.train()
        gen = step_generator(cfg, step, acc.process_index, 1)
        parts, stats = self.old_velocities(minibatches(cfg, batch, self.sigmas, gen)), {}
        for j, losses in enumerate(parts):
            for k, v in self.optimizer_step(losses, step, j).items():
                stats[k] = stats.get(k, 0.0) + v / len(parts)
        if self.old is not None:  # NFT's old policy / AWM's EMA, once per rollout batch: n optimiser steps so far
            self.old.update(recipes.old_policy_decay(cfg, (step + 1) * cfg.grad_steps_per_batch))
        self.counter.step = step + 1
        return stats

    def old_velocities(self, parts):
        """AWM: the pre-update velocity v_old of each loss after the first optimiser step (off-policy: of every
        loss, from the EMA policy), at the loss's own x_t and t, all before the first update; the losses form
        log p_old from it in float64, as the official code does. Other methods and one on-policy step: as given."""
        cfg, acc = self.cfg, self.accelerator
        if cfg.method != "awm" or (len(parts) == 1 and not cfg.awm_off_policy):
            return parts
        policy = self.old.swapped_in() if cfg.awm_off_policy else contextlib.nullcontext()
        with torch.no_grad(), acc.autocast(), policy:
            for losses in parts[0 if cfg.awm_off_policy else 1 :]:
                for i, fn in enumerate(losses):
                    _, cond, _, t, x_t, _ = training_rows(
                        **{k: fn.keywords[k] for k in ("x0", "cond", "adv", "t_value", "eps")}
                    )
                    losses[i] = functools.partial(fn, v_old=self.adapter.velocity(self.base.module, x_t, t, cond))
        return parts

    def optimizer_step(self, losses, step, j):
        """One optimiser step: base loss + guard over a minibatch's micro-batches, gradients accumulated, then AdamW."""
        cfg, acc, sums, bad = self.cfg, self.accelerator, {}, ""
        for i, loss_fn in enumerate(losses):
            sync = contextlib.nullcontext() if i == len(losses) - 1 else acc.no_sync(self.model)
            with sync, acc.autocast():
                try:
                    loss, stats = loss_fn(cfg, self.adapter, self.model, self.base, self.old)
                    if not bool(torch.isfinite(loss)):
                        bad = bad or f"loss is {loss.item()}"
                except ValueError as e:  # normguard's input checks name a NaN/Inf velocity or target
                    if "finite" not in str(e):
                        raise
                    loss, stats, bad = sum(p.sum() for p in self.params) * 0, {}, bad or str(e)
                # every process still runs backward: a process that stopped alone would hang the others' all-reduce
                acc.backward(loss / len(losses))
            for k, v in {"loss": loss.detach(), **stats}.items():
                sums[k] = sums.get(k, 0.0) + float(v) / len(losses)
        if acc.reduce(torch.tensor([float(bool(bad))], device=acc.device), "sum").item() > 0:
            bad, which = bad or "non-finite loss on another process", f" {j + 1} of {cfg.grad_steps_per_batch}"
            which = which if cfg.grad_steps_per_batch > 1 else ""
            raise NonFiniteLoss(f"step {step + 1}: {bad}; stopped before the update{which}, {self.good()}")
        grad_norm = self.step_optimizer(step)
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return {**sums, "grad_norm": float(grad_norm)}

    def step_optimizer(self, step):
        """Clip, step, check: non-finite gradients stop the run before the step, non-finite weights right after it,
        before the old/EMA copy, the counter or a checkpoint sees them. Returns the gradient norm."""
        cfg, where = self.cfg, f"step {step + 1}"
        # the norm of the all-reduced gradients, the same on every process: every process stops here together
        grad_norm = self.accelerator.clip_grad_norm_(self.params, cfg.max_grad_norm)
        if not math.isfinite(grad_norm):
            raise NonFiniteLoss(f"{where}: gradient norm {float(grad_norm)}; stopped before the update, {self.good()}")
        before = weight_norm(self.params)
        try:
            self.opt.step()
        except RuntimeError as e:  # torch refuses a step size beyond float32's range (e.g. lr 1e39)
            if "overflow" not in str(e):
                raise
            raise NonFiniteLoss(
                f"{where}: the update overflowed ({e}); stopped before any save, {self.good()}"
            ) from None
        after = weight_norm(self.params)
        if not math.isfinite(after):  # e.g. a huge weight_decay
            raise NonFiniteLoss(
                f"{where}: the update made the weights non-finite; stopped before any save, {self.good()}"
            )
        if after > WEIGHT_NORM_BOUND * before:  # finite but destroyed (e.g. lr 1e30: |w| ~ 1e30)
            raise NonFiniteLoss(
                f"{where}: the update took the trainable weights' norm from {before:.4g} to {after:.4g}, beyond "
                f"{WEIGHT_NORM_BOUND:g}x in one optimiser step; stopped before any save, {self.good()}"
            )
        return grad_norm

    def good(self):
        """Where to resume from: every checkpoint holds finite weights (the update is checked before any save)."""
        return f"last good checkpoint: {self.last_good}"

    def log_step(self, step, batch, stats, seconds):
        """One fixed-format line per step (the reward process-averaged) to the terminal, log.jsonl and trackers."""
        from tqdm import tqdm

        r = batch.all_rewards
        line = {"step": step + 1, "reward_mean": r.mean().item(), "reward_std": r.std().item(), **stats}
        line.update(lr=self.sched.get_last_lr()[0], step_time=seconds)
        self.last_step = line
        if self.main:
            skip = ("loss", "norm_ratio", "active_frac", "hinge", "grad_norm")
            extra = " ".join(f"{k} {v:.4g}" for k, v in stats.items() if k not in skip)
            tqdm.write(
                f"step {step + 1:6d} | reward {line['reward_mean']:.4f} +- {line['reward_std']:.4f} | loss "
                f"{line['loss']:.5f} ({extra}) | hinge {line['hinge']:.3g} active {line['active_frac']:.3f} | "
                f"norm ratio {line['norm_ratio']:.4f} | {line['step_time']:.2f} s"
            )
            append(self.log, line)
        self.accelerator.log(line, step=step + 1)

    def evaluate(self, step):
        """evaluation.measure at `step` (reward at the full and few-step samplers, the norm-ratio profile along the
        policy's own trajectories, the drift alarm, the adapter's image metrics), an image grid; appended to
        evals.jsonl and logged. Runs on the main process."""
        from torchvision.utils import make_grid, save_image

        cfg, acc = self.cfg, self.accelerator
        self.model.eval()
        prompts = [p for p in self.eval_prompts for _ in range(cfg.eval_seeds)]
        result, images = evaluation.measure(cfg, self.adapter, self.base, prompts, self.score, acc, self.held_out)
        grid = make_grid((images + 1) / 2, nrow=cfg.eval_seeds * 4)
        file = self.out_dir / "eval" / f"grid_{step:07d}.png"
        try:
            save_image(grid, file)
        except OSError as e:
            raise cli.write_error(file, e) from None
        if result["drift_alarm"]:
            print(f"DRIFT ALARM at step {step}: norm ratio {result['norm_ratio_max']:.4f} > {cfg.drift_alarm}")
        profile = " ".join("  -  " if m is None else f"{m:.3f}" for m in result["profile"])
        print(
            f"eval {step:6d} | reward full {result['reward_full']:.4f} few {result['reward_few']:.4f} | norm ratio "
            f"{result['norm_ratio']:.4f} | per t bin (0 -> 1): {profile}"
        )
        self.evals.append({"step": step, **result})
        evaluation.publish(acc, step, self.evals[-1], grid)
        with open(self.out_dir / "evals.jsonl", "a") as f:
            append(f, self.evals[-1])

    def checkpoint(self, step):
        """Save the checkpoint of `step` (once: a second call for the same step keeps the first)."""
        if self.last_good is None or checkpoint_step(self.last_good) != step:
            identity = run_identity(self.cfg)
            self.last_good = save_checkpoint(
                self.accelerator, self.ckpt_root, step, self.cfg.checkpoints_keep, identity
            )

    def drift_alarmed(self, step):
        """Whether the eval at `step` raised the drift alarm: the main process decides, every process agrees."""
        from accelerate.utils import broadcast_object_list

        last = self.evals[-1] if self.main and self.evals else {}
        return broadcast_object_list([last.get("step") == step and bool(last.get("drift_alarm"))])[0]

    def finish(self):
        """The LoRA export and metrics.json (main process); returns the metrics."""
        metrics = {
            "steps": self.counter.step,
            "last_step": self.last_step,
            "eval": self.evals[-1] if self.evals else None,
        }
        if self.main:
            self.export()
            print(how_to_load(self.cfg, self.adapter, self.out_dir))
            cli.write_atomic(self.out_dir / "metrics.json", cli.dumps(metrics, indent=1))
            self.log.close()
        self.accelerator.end_training()
        return metrics

    def export(self):
        """The LoRA (full fine-tuning: the transformer) written into a temp folder, then renamed into place."""
        tmp, name = self.out_dir / ".tmp-export", "transformer" if self.cfg.full_finetune else "lora"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            export_lora(self.cfg, self.adapter, self.base.module, tmp)
            replace_dir(tmp / name, self.out_dir / name)
        except OSError as e:
            raise cli.write_error(self.out_dir / name, e) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def append(file, record):
    """One JSON line appended to the open log `file`, flushed; a failed write (a full disk) names the file."""
    try:
        file.write(cli.dumps(record) + "\n")
        file.flush()
    except OSError as e:
        raise cli.write_error(file.name, e) from None


LAUNCHER_SIZES = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")  # what launchers set


def check_launch(n_processes):
    """Stop before anything is written when the launcher (torchrun, accelerate launch, mpirun) started more
    processes than accelerate joined into one run: each would train alone into the same out_dir."""
    launched = max(int(os.environ.get(name) or 1) for name in LAUNCHER_SIZES)
    if launched > n_processes:
        raise cli.UsageError(
            f"the launcher started {launched} processes but accelerate sees {n_processes}: each would train alone "
            "into the same out_dir. On CPUs launch with ACCELERATE_USE_CPU=1 set (torchrun or accelerate launch "
            "--multi_gpu); on GPUs check that each process sees its GPU (docs/train_full.md#several-gpus)"
        )


def read_prompts(key, path, defaults):
    """The prompts of the file at `path` (one a line, UTF-8), or the family's built-in `defaults` when path is "";
    a ValueError naming `key` and the file otherwise."""
    if not path:
        return list(defaults)
    if not os.path.isfile(path):
        raise ValueError(f"{key}: expected a text file with one prompt per line, got {path!r}")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{key}: {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at {e.start})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{key}: {path} holds no prompts (expected one per line)")
    return prompts


def step_generator(cfg, step, rank, stream):
    """A generator seeded by (seed, step, process, stream): rollouts and train noise do not depend on RNG history,
    so a resumed run draws exactly what the uninterrupted run drew."""
    return torch.Generator().manual_seed(((cfg.seed * 1_000_003 + step) * 1009 + rank) * 7 + stream)


def main(argv=None, preset="sd3"):
    """The command line; `preset` applies when --preset is not given (a testbed's script passes its own)."""
    cfg = cli.checked(parse_args, sys.argv[1:] if argv is None else argv, preset)
    try:
        return train(cfg)
    except (Stopped, cli.WriteError) as e:  # WriteError: before the run's first step, no checkpoint to name yet
        sys.exit(f"stopped: {e}")


if __name__ == "__main__":
    cli.run(main)
