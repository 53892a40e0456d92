"""The digits experiment: every method with and without the NormGuard hinge on the 8x8-digit testbed
(digits_testbed.py).

    python -m experiments.digits --seeds=0,1,2                       # the headline: exploration seeds
    python -m experiments.digits --frontier --ref_seed=2 --seeds=20,21,22,23,24   # confirmation + frontier
    python -m experiments.digits --reward=jpeg --methods=nft,awm     # the second reward, in runs/digits_jpeg
    python -m experiments.digits --smoke                             # seconds, for tests
    python -m experiments.digits --lam=0.5 --full_finetune=true      # any train_full key is forwarded to every run

Every RL run is `train_full.train` with the digits preset (the same loop, losses and checkpoints as on SD3/FLUX, and
what `python -m experiments.digits_testbed` runs). Per method the headline arms are "none" (the official un-guarded
loss), "guard" (+ NormGuard at lam, relative margin) and "null" (un-guarded, rewards permuted across the rollout batch
at every step: the null-reward control of claim 1); --frontier adds the families of docs/protocol.md (guard at other
lam, a stronger KL, a lower lr; early stopping and rescaling come from the official run). --reward=jpeg trains and
scores every run on JPEG compressibility instead of the digits proxy (docs/protocol.md, amendment 2 (h)); its null
control permutes the JPEG rewards, and claim 3 is not tested (JPEG size has no gradient). Each (method, arm, seed)
writes a train_full folder under out_dir/runs/; its exported LoRA is loaded back through diffusers for the final
evaluation. Runs go `jobs` at a time in spawned processes; a finished run (its result.pt) is reused when its config is
unchanged, an unfinished one is deleted and rerun. Then evidence.py's table, verdicts and frontiers, figures,
metrics.json and config.json.

One sample set per seed: every evaluation of seed s (the reference, train_full's checkpoint evaluations, the final
evaluation of every arm, the rescaled samplers) draws the same eval_samples noises and labels, train_full's eval
set for seed s, so that every point of a frontier path is measured on the same images' noise (FD depends on the
sample count) and differences are paired by seed.
"""

import contextlib
import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import normguard as ng
import train_full as tf
from experiments import digits_testbed as dg
from experiments import evidence as ev
from trainer import cli, rewards
from trainer.evaluation import EVAL_SEED_OFFSET

METHODS = ("nft", "awm", "dpo")
HEADLINE = ("none", "guard", "null")  # official un-guarded, + NormGuard, shuffled-reward control
QUALITY = ev.Quality("fd", "FD", higher_is_better=False, digits=1)
# train_full settings every run of the experiment shares, on top of its digits preset (LoRA r=8, 4 digits x 8
# samples per step, lr 1e-3, each method's official train-timestep recipe, lam 1 with the relative squared hinge)
TRAIN_DEFAULTS = dict(steps=160, sample_steps=10, few_steps=3, eval_every=20, checkpoint_every=40)
# train_full settings the experiment sets per run (or leaves at the digits 0..9 the judges expect)
PER_RUN = "preset method guard seed out_dir pretrained_model_name_or_path cache_dir eval_seeds train_prompts"
PER_RUN = tuple((PER_RUN + " eval_prompts resume reward").split())
# the drift alarm's lead (docs/train_full.md, fixed before the confirmation's official runs finished): alarm
# thresholds on train_full's norm_ratio_max (1.05 primary: the bottom of the paper's 5-15 %), against the first
# checkpoint whose FD is worse than step 0's by DRIFT_DAMAGE (about double the reference's FD of 9.5 on seed 0)
DRIFT_ALARMS = (1.05, 1.10)
DRIFT_DAMAGE = 10.0
ADJOINT_NOISE_OFFSET = 54321  # the adjoint diagnostic's noise: per seed, shared by the reference and every model
REWARDS = ("digits", "jpeg")  # the testbed's classifier proxy; JPEG compressibility (flow_grpo's), no gradient


@dataclass
class Config:
    # reference (pretrained once per seed and budget, cached; see digits.get_reference)
    cache_dir: str = dg.DEFAULT_CACHE
    pretrain_steps: int = 2000
    ref_seed: int = 0  # the reference's pretraining seed (exploration 0, confirmation 1; docs/protocol.md)
    # which runs: methods x arms x seeds; seed s draws the same rollout noise, prompts and eval set in every arm
    methods: str = "nft,awm,dpo"
    seeds: str = "0"
    dpo_lr: float = 3e-3  # DPO runs take this for train_full's lr: 2 of every 8 samples (best vs worst) teach it
    reward: str = "digits"  # one of REWARDS: what every run trains on and every evaluation scores
    # the frontier (--frontier): runs beyond the headline arms, per docs/protocol.md's digits grid
    frontier_methods: str = "nft,awm,dpo"  # the methods whose frontier runs are trained (others: headline only)
    guard_lams: str = "0.25,0.5,2"  # NFT, AWM: guarded runs at these lam, besides the headline lam
    dpo_guard_lams: str = "4"  # DPO: guarded runs at these lam, besides the headline lam
    kl_weights: str = "3e-4,1e-3,3e-3,1e-2,3e-2,1e-1"  # NFT, AWM: un-guarded runs at these kl_weight (+ official)
    lr_scales: str = "0.5,0.75,0.9"  # NFT, AWM: un-guarded runs at the official lr times these ("" = none)
    rescales: str = "0.9,0.95,1,1.05,1.1,1.15"  # the official un-guarded model sampled with |v| = s·|v_ref|
    jobs: int = 2  # RL runs in parallel, each in a spawned process with `threads` threads (1: in this process)
    threads: int = 1  # these ops are tiny; on a shared 2-core machine a second thread can stall in sync (100x)
    # evaluation: train_full's checkpoint evaluations and the final ones use this one set (20 per digit)
    eval_samples: int = 200  # a multiple of 10; FD and disc_acc are compared only between sets of this size
    adjoint_samples: int = 64
    out_dir: str = "runs/digits"  # a reward other than digits writes to <out_dir>_<reward> unless out_dir is given
    # train_full overrides (--key=value with a train_full Config key), on top of the preset and TRAIN_DEFAULTS
    train: dict = dataclasses.field(default_factory=dict)


SMOKE = dict(pretrain_steps=30, eval_samples=20, adjoint_samples=8, out_dir="runs/digits_smoke")
SMOKE.update(guard_lams="2", kl_weights="1e-2", dpo_guard_lams="4", lr_scales="0.5", rescales="0.95,1,1.05")
FLAGS = {
    "smoke": "tiny settings: train_full's --smoke for every run and a separate output folder",
    "frontier": "also the frontier runs of docs/protocol.md and quality at matched reward (evidence.frontier)",
}


def floats(text):
    return [float(x) for x in text.split(",") if x]


def seed_list(cfg):
    return [int(s) for s in cfg.seeds.split(",")]


def parse_args(argv):
    """(Config, frontier?) from --key=value overrides of Config or of train_full's Config (forwarded to every run,
    except PER_RUN keys), --smoke and --frontier. A bad argument raises cli.UsageError, a bad value ValueError."""
    forwarded = {f.name for f in dataclasses.fields(tf.Config)} - set(PER_RUN)
    shown = {**dg.PRESET, **TRAIN_DEFAULTS}  # --help lists the values the runs start from, not the sd3 preset's
    (own, train), flags = cli.parse(argv, [Config, (tf.Config, forwarded)], flags=FLAGS, doc=__doc__, defaults=shown)
    smoke = "smoke" in flags
    cfg = Config(**{**(SMOKE if smoke else {}), **own, "train": {"smoke": True, **train} if smoke else train})
    if cfg.reward != "digits" and "out_dir" not in own:  # a second reward's runs never mix with the first's
        cfg.out_dir += f"_{cfg.reward}"
    check_config(cfg)
    return cfg, "frontier" in flags


def check_config(cfg):
    if cfg.reward not in REWARDS:
        raise ValueError(f"reward: expected one of {REWARDS}, got {cfg.reward!r}")
    for name in ("methods", "frontier_methods"):
        if not set(getattr(cfg, name).split(",")) <= set(METHODS) or not getattr(cfg, name):
            raise ValueError(f"{name}: expected a comma-separated subset of {METHODS}, got {getattr(cfg, name)!r}")
    try:
        seeds = seed_list(cfg)
    except ValueError:
        raise ValueError(f"seeds: expected comma-separated ints, got {cfg.seeds!r}") from None
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: expected distinct ints, got {cfg.seeds!r}")
    for name in ("guard_lams", "dpo_guard_lams", "kl_weights", "lr_scales", "rescales"):
        try:
            values = floats(getattr(cfg, name))
        except ValueError:
            values = [-1.0]
        if not all(math.isfinite(v) and v > 0 for v in values):
            raise ValueError(f"{name}: expected comma-separated finite numbers > 0, got {getattr(cfg, name)!r}")
    for name in ("pretrain_steps", "jobs", "threads", "adjoint_samples"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {getattr(cfg, name)}")
    if cfg.eval_samples < 10 or cfg.eval_samples % 10:
        raise ValueError(f"eval_samples: expected a multiple of 10 (every digit equally often), got {cfg.eval_samples}")
    if not (math.isfinite(cfg.dpo_lr) and cfg.dpo_lr > 0):
        raise ValueError(f"dpo_lr: expected a finite number > 0, got {cfg.dpo_lr}")
    if not cfg.out_dir.strip():
        raise ValueError("out_dir: expected a folder for the experiment's outputs, got ''")
    if not 0 <= cfg.ref_seed <= tf.MAX_SEED:
        raise ValueError(f"ref_seed: expected an int in 0..{tf.MAX_SEED}, got {cfg.ref_seed}")
    for seed in seeds:  # the forwarded train_full keys and every seed fail here, before any work
        train_config(cfg, "nft", "null", seed, "")


# ---------------------------------------------------------------------------------------------------------------
# arms: the headline and the frontier members, each a set of train_full overrides


def arms(cfg, method, frontier):
    """{arm name: overrides} of one method: the headline arms and, with frontier, the family members. An override
    "lr_scale" multiplies the method's lr. Only the official run ("none") evaluates every eval_every steps (its
    checkpoints are the early-stopping path); every other arm only at step 0 and the end (eval_every=steps)."""
    member = dict(eval_every=None)  # None: the run's own step count
    out = {"none": {"guard": False}, "guard": dict(guard=True, **member)}
    out["null"] = dict(guard=False, reward=f"{cfg.reward}_shuffled", **member)
    if not frontier or method not in cfg.frontier_methods.split(","):
        return out
    for lam in floats(cfg.dpo_guard_lams if method == "dpo" else cfg.guard_lams):
        out[f"guard_lam{lam:g}"] = dict(guard=True, lam=lam, **member)
    if method != "dpo":
        for weight in floats(cfg.kl_weights):
            out[f"kl{weight:g}"] = dict(guard=False, kl_weight=weight, **member)
        for scale in floats(cfg.lr_scales):
            out[f"lr_x{scale:g}"] = dict(guard=False, lr_scale=scale, **member)
    return out


def run_dir(cfg, method, arm, seed):
    return Path(cfg.out_dir) / "runs" / f"{method}_{arm}_seed{seed}"


def train_config(cfg, method, arm, seed, ref_path):
    """The train_full Config of one run: its digits preset, TRAIN_DEFAULTS, the forwarded overrides, the run's own
    settings. (An empty ref_path only validates: train_full would pretrain or reuse the default reference.)"""
    train = dict(cfg.train)
    smoke = train.pop("smoke", False)
    per_run = dict(
        method=method,
        seed=seed,
        out_dir=str(run_dir(cfg, method, arm, seed)),
        pretrained_model_name_or_path=ref_path,
        cache_dir=cfg.cache_dir,
        eval_seeds=cfg.eval_samples // 10,
        reward=cfg.reward,
    )
    if method == "dpo":
        per_run["lr"] = cfg.dpo_lr
    overrides = dict(arms(cfg, method, frontier=True)[arm])
    if overrides.get("reward", "").endswith("_shuffled"):
        size = tf.make_config({**TRAIN_DEFAULTS, **train}, smoke=smoke, preset="digits")
        if size.prompts_per_step * size.group_size > size.train_batch_size:
            raise ValueError(
                "train_batch_size: expected >= prompts_per_step x group_size, so that the null control permutes "
                f"rewards across the whole rollout batch (one reward call), got {size.train_batch_size}"
            )
    scale = overrides.pop("lr_scale", 1.0)
    shared = {} if smoke else TRAIN_DEFAULTS  # --smoke takes train_full's tiny settings
    tcfg = tf.make_config({**shared, **train, **per_run}, smoke=smoke, preset="digits")
    if overrides.get("eval_every", 0) is None:
        overrides["eval_every"] = tcfg.steps
    return tf.make_config({**shared, **train, **per_run, **overrides, "lr": tcfg.lr * scale}, smoke, "digits")


# ---------------------------------------------------------------------------------------------------------------
# evaluation: one sample set per seed, the policy's own trajectories, the rescaled sampler, the adjoint diagnostic


def model_fn(transformer, encoder):
    """velocity_fn(x, t, labels) of one transformer (no grad flows into the frozen encoder)."""
    return lambda x, t, labels: dg.velocity(transformer, encoder, x, t, labels)


def load_trained(tcfg, ref_path):
    """The policy a train_full run exported, loaded as a user would: the full transformer, or the reference with
    the LoRA (diffusers' load_lora_adapter) fused in."""
    from diffusers import SD3Transformer2DModel

    out = Path(tcfg.out_dir)
    if tcfg.full_finetune:
        transformer = SD3Transformer2DModel.from_pretrained(str(out / "transformer"))
    else:
        transformer = SD3Transformer2DModel.from_pretrained(str(Path(ref_path) / "transformer"))
        transformer.load_lora_adapter(
            str(out / "lora"), weight_name="pytorch_lora_weights.safetensors", prefix="transformer"
        )
        transformer.fuse_lora()
    return transformer.eval().requires_grad_(False)


def eval_set(tcfg):
    """train_full's eval set of a run (Run.evaluate): labels 0..9, eval_seeds in a row each, and noise (B, 1, 8, 8)
    from seed + EVAL_SEED_OFFSET (train_full's own). Every run and the reference of one seed share it."""
    labels = torch.arange(dg.NUM_CLASSES).repeat_interleave(tcfg.eval_seeds)
    gen = torch.Generator().manual_seed(tcfg.seed + EVAL_SEED_OFFSET)
    return torch.randn(len(labels), 1, 8, 8, generator=gen), labels


def grid_order(n_per_digit, rows=10):
    """Indices into an eval set (eval_seeds in a row per digit) giving rows of 0..9: rows x 10 images."""
    per = torch.arange(min(rows, n_per_digit))
    return (per[:, None] + torch.arange(dg.NUM_CLASSES)[None, :] * n_per_digit).flatten()


def reward_of(cfg, images, labels):
    """(B,) rewards of images (B, 1, 8, 8) under cfg.reward, as train_full's `--reward` computes them: the digits
    proxy for the prompted labels, or JPEG compressibility (which reads no prompt)."""
    if cfg.reward == "jpeg":
        return rewards.jpeg_reward(images, [str(int(d)) for d in labels])
    return dg.reward_fn(images, labels, cfg.cache_dir)


def shuffled_jpeg_reward(cfg, device):
    """train_full's `--reward=jpeg_shuffled`, the JPEG reward's null control: as digits_shuffled, each call's
    rewards permuted across its batch (digits_testbed.batch_permutation), their distribution kept."""
    return lambda images, prompts: rewards.jpeg_reward(images, prompts)[dg.batch_permutation(cfg.seed, images)]


rewards.register_reward("jpeg_shuffled", shuffled_jpeg_reward)


@torch.no_grad()
def score(cfg, images, labels, v_norms, ref_norms):
    """Reward, digits.quality_metrics and, from the (K, B) velocity norms along the trajectories, "ratio" (mean of
    per-point ‖v‖/‖v_ref‖) and "rms_ratio" (√mean‖v‖² / √mean‖v_ref‖² over the same points)."""
    v, r = v_norms.double(), ref_norms.double()
    return {
        "reward": reward_of(cfg, images, labels).mean().item(),
        **dg.quality_metrics(images, labels, cfg.cache_dir),
        "ratio": (v / r.clamp_min(1e-6)).mean().item(),
        "rms_ratio": (v.square().mean().sqrt() / r.square().mean().sqrt()).item(),
    }


@torch.no_grad()
def sample(v_fn, ref_fn, noise, labels, grid, scale=None):
    """Euler samples of v_fn (or, with scale s, of s·‖v_ref‖·v/‖v‖ per sample and step) and the per-point norms
    ‖v‖ and ‖v_ref‖ along those trajectories: (x0 (B, 1, 8, 8), norms (K, B), ref norms (K, B), t (K, B))."""
    norms, ref_norms, ts = [], [], []

    def velocity(x, t):
        v, v_ref = v_fn(x, t, labels), ref_fn(x, t, labels)
        if scale is not None:
            v = scale * ng.rescale_to_reference(v, v_ref)
        norms.append(v.flatten(1).norm(dim=1))
        ref_norms.append(v_ref.flatten(1).norm(dim=1))
        ts.append(t)
        return v

    x = ng.euler_sample(velocity, noise, grid)
    return x, torch.stack(norms), torch.stack(ref_norms), torch.stack(ts)


@torch.no_grad()
def evaluate(cfg, tcfg, policy_t, ref, rescales=()):
    """Final metrics of one model (policy_t None = the reference) on its seed's eval set (eval_set).

    Returns ({"full", "few"}: score() at tcfg.sample_steps and tcfg.few_steps Euler steps; "profile": ‖v‖/‖v_ref‖
    per bin of t at full steps; for each s in rescales, "rescale" / "rescale_few" (s = 1) or "rescale_<s>" (full
    steps): the model sampled with ‖v‖ = s·‖v_ref‖ at every step, its ratios measured the same way}, images: the
    first 10 per digit of each phase, rows of 0..9).
    """
    ref_t, encoder = ref
    ref_fn = model_fn(ref_t, encoder)
    v_fn = ref_fn if policy_t is None else model_fn(policy_t, encoder)
    noise, labels = eval_set(tcfg)
    show = grid_order(tcfg.eval_seeds)
    out, images = {}, {}
    for phase, steps in (("full", tcfg.sample_steps), ("few", tcfg.few_steps)):
        grid = ng.flow_timesteps(steps, shift=tcfg.shift)
        x, norms, ref_norms, ts = sample(v_fn, ref_fn, noise, labels, grid)
        out[phase], images[phase] = score(cfg, x, labels, norms, ref_norms), x[show]
        if phase == "full":
            ratio = (norms / ref_norms.clamp_min(1e-6)).reshape(-1)
            out["profile"] = ng.norm_ratio_profile(ratio, ts.reshape(-1), tcfg.profile_bins)[0].tolist()
        for s in rescales:
            if s != 1 and phase == "few":
                continue
            name = ("rescale" if phase == "full" else "rescale_few") if s == 1 else f"rescale_{s:g}"
            x, norms, ref_norms, _ = sample(v_fn, ref_fn, noise, labels, grid, scale=s)
            out[name], images[name] = score(cfg, x, labels, norms, ref_norms), x[show]
    return out, images


def adjoint(cfg, tcfg, policy_t, ref):
    """ng.velocity_scale_sensitivity of the digits reward (the one with a gradient) for one model on its seed's
    adjoint noise (the reference and
    every model of the seed share it): mean and std over samples of Σ_k dR/dα_k, its sign split, per-step means."""
    ref_t, encoder = ref
    v_fn = model_fn(ref_t if policy_t is None else policy_t, encoder)
    gen = torch.Generator().manual_seed(tcfg.seed + ADJOINT_NOISE_OFFSET)
    labels = torch.arange(cfg.adjoint_samples) % dg.NUM_CLASSES
    noise = torch.randn(cfg.adjoint_samples, 1, 8, 8, generator=gen)
    grad, stats = ng.velocity_scale_sensitivity(
        lambda x, t: v_fn(x, t, labels),
        lambda x: dg.reward_fn(x, labels, cfg.cache_dir),
        noise,
        ng.flow_timesteps(tcfg.sample_steps, shift=tcfg.shift),
    )
    total = grad.sum(1)
    return {
        "total_mean": stats["total_mean"].item(),
        "total_std": stats["total_std"].item(),
        "frac_positive": (total > 0).float().mean().item(),
        "step_mean": stats["mean"].tolist(),
    }


def read_history(run_folder):
    """train_full's checkpoint evaluations of one run (evals.jsonl, step 0 = the reference) as lists per metric;
    ratio_max is what train_full's drift alarm reads (the overall norm ratio or its largest t bin)."""
    evals = [json.loads(line) for line in (Path(run_folder) / "evals.jsonl").read_text().splitlines() if line]
    keys = dict(step="step", reward="reward_full", fd="fd_full", judge_acc="judge_acc_full", ratio="norm_ratio")
    keys["ratio_max"] = "norm_ratio_max"
    return {name: [e[key] for e in evals] for name, key in keys.items()}


# ---------------------------------------------------------------------------------------------------------------
# one job: an RL run (train, then evaluate the export) or a seed's reference evaluation, each cached with its key


def cached(path, key, compute):
    """compute() -> result dict, saved whole to path with key; reused while the key is unchanged."""
    if path.is_file():
        result = torch.load(path, weights_only=False)
        if result["key"] == key:
            return result
    result = {"key": key, **compute()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(result, tmp)
    os.replace(tmp, path)  # whole or absent
    return result


# A finished run is reused when it computed the same thing: equal train_full configs, less the keys that only say
# where files go and how often to checkpoint (a moved output or cache folder reruns nothing; the reference is named
# by its folder, reference-seed<s>-steps<n>), and equal eval sizes. A train_full key added after a run was cached
# counts as unchanged when it holds the value under which the older code ran (train_full's KEYS_ADDED_SINCE, which
# its run identity reads too). A run without the guard computed the same thing whatever its lam (lam weighs the
# hinge only): changing --lam reruns the guarded runs.
NOT_COMPARED = "out_dir cache_dir resume overwrite report_to checkpoint_every checkpoints_keep gradient_checkpointing"


def same_run(stored, current):
    def compared(key):
        config = {**tf.KEYS_ADDED_SINCE, **{k: v for k, v in key.items() if k not in NOT_COMPARED.split()}}
        config["pretrained_model_name_or_path"] = Path(key["pretrained_model_name_or_path"]).name
        if not config["guard"]:
            config.pop("lam")
        return config

    return compared(stored) == compared(current)


def eval_key(cfg):
    return {"eval_samples": cfg.eval_samples, "adjoint_samples": cfg.adjoint_samples, "rescales": cfg.rescales}


def reference_job(cfg, ref_path, seed):
    """The reference on seed's eval set and adjoint noise: the first point of every path of that seed."""
    torch.set_num_threads(cfg.threads)
    tcfg = train_config(cfg, "nft", "none", seed, ref_path)
    path = Path(cfg.out_dir) / "reference" / f"seed{seed}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    key = {"reference": ref_path, "seed": seed, **eval_key(cfg), "steps": (tcfg.sample_steps, tcfg.few_steps)}
    key["reward"] = cfg.reward

    def compute():
        ref = dg.load_reference(ref_path)
        evaluation, images = evaluate(cfg, tcfg, None, ref)
        diagnostic = adjoint(cfg, tcfg, None, ref) if cfg.reward == "digits" else None  # JPEG has no gradient
        return {"eval": evaluation, "images": images, "adjoint": diagnostic}

    return cached(path, key, compute)


def run_job(cfg, ref_path, method, arm, seed):
    """Train one (method, arm, seed) with train_full (its output in the run's folder, train.log), then evaluate the
    exported model. A run whose result.pt was written under the same config is reused; any other folder is deleted
    and the run starts from scratch."""
    torch.set_num_threads(cfg.threads)
    tcfg = train_config(cfg, method, arm, seed, ref_path)
    out = Path(tcfg.out_dir)
    key = {**dataclasses.asdict(tcfg), "eval": eval_key(cfg)}
    if (out / "result.pt").is_file():
        result = torch.load(out / "result.pt", weights_only=False)
        if same_run(result["key"], key):
            return result
    with run_lock(out):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        return train_and_evaluate(cfg, tcfg, ref_path, arm, key)


def train_and_evaluate(cfg, tcfg, ref_path, arm, key):
    """run_job's work in the run's folder (emptied, locked): train_full, then the exported model's evaluation."""
    out = Path(tcfg.out_dir)

    def compute():
        t0 = time.time()
        with open(out / "train.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            tf.train(tcfg)
        t_train = time.time() - t0
        ref, policy = dg.load_reference(ref_path), load_trained(tcfg, ref_path)
        official = arm == "none"
        evaluation, images = evaluate(cfg, tcfg, policy, ref, floats(cfg.rescales) if official else ())
        return {
            "eval": evaluation,
            "images": images,
            "history": read_history(out),
            "adjoint": adjoint(cfg, tcfg, policy, ref) if official and cfg.reward == "digits" else None,
            "wall_time_s": {"train": t_train, "total": time.time() - t0},
        }

    return cached(out / "result.pt", key, compute)


@contextlib.contextmanager
def run_lock(folder):
    """Hold `folder`'s lock (<folder>.lock beside it: an OS lock on the file, which holds the owner's pid for the
    message) while a run writes into it: a second experiment started while a worker of the first still runs stops
    here instead of sharing the folder. The OS drops the lock when its owner dies (kill -9 included), so a killed
    run's lock is taken over, and a pid reused by another process since is never mistaken for a live owner."""
    import fcntl  # POSIX only, like the fork the toy uses: imported where it is needed

    lock = folder.with_name(folder.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        f = open(lock, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "unknown"
            f.close()
            raise RuntimeError(
                f"{folder} is in use by process {owner} (a run of another experiment still going): stop it, "
                "or give this experiment another --out_dir"
            ) from None
        try:
            if os.path.samestat(os.fstat(f.fileno()), os.stat(lock)):
                break
        except FileNotFoundError:
            pass
        f.close()  # the previous owner removed this file between our open and our lock: lock the path's new one
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still holding it, so that no one locks the removed file after us
        f.close()


def die_with_parent(parent):
    """A spawned worker's initializer: exit when the experiment's process `parent` is gone (kill -9 included: no
    handler of the parent runs then). A worker never outlives the run that owns its folder. Polls once a second."""
    import threading

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def run_all(cfg, ref_path, jobs, progress):
    """Every job ((method, arm, seed), or ("reference", None, seed)) in `cfg.jobs` spawned processes (jobs=1: one
    after the other in this process), one tqdm bar over them. Returns {job: result}."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    def submit(call, job):
        if job[0] == "reference":
            return call(reference_job, cfg, ref_path, job[2])
        return call(run_job, cfg, ref_path, *job)

    bar = tqdm(total=len(jobs), desc=f"runs ({cfg.jobs} at a time)", disable=not progress)
    results = {}
    if cfg.jobs == 1:
        for job in jobs:
            results[job] = submit(lambda fn, *a: fn(*a), job)
            report_run(job, results[job])
            bar.update()
        bar.close()
        return results
    context, parent = multiprocessing.get_context("spawn"), os.getpid()
    with ProcessPoolExecutor(cfg.jobs, mp_context=context, initializer=die_with_parent, initargs=(parent,)) as pool:
        pending = {submit(pool.submit, job): job for job in jobs}
        while pending:
            for future in wait(pending, return_when=FIRST_COMPLETED)[0]:
                job = pending.pop(future)
                results[job] = future.result()  # a failed run raises here, with its train.log kept
                report_run(job, results[job])
                bar.update()
    bar.close()
    return results


def report_run(job, result):
    e, seconds = result["eval"], result.get("wall_time_s", {}).get("train", 0.0)
    tqdm.write(
        f"{job[0]:>9} {job[1] or '':>12} seed {job[2]:>2} | reward {e['full']['reward']:.3f} | rms ratio "
        f"{e['full']['rms_ratio']:.3f} | judge {e['full']['judge_acc']:.3f} | FD {e['full']['fd']:.1f} | FD@few "
        f"{e['few']['fd']:.1f} | train {seconds:.0f} s"
    )


def priority(cfg, method, arm):
    """The order runs start in, so that an experiment stopped early has the runs that docs/protocol.md cuts last:
    0 headline, 1 inner guard/KL points, 2 the grids' outermost points, 3 lower lr, 4 DPO's frontier."""
    if arm in HEADLINE:
        return 0
    if method == "dpo":
        return 4
    if arm.startswith("lr_x"):
        return 3
    head = train_config(cfg, method, "none", 0, "")
    grid = [head.kl_weight, *floats(cfg.kl_weights)] if arm.startswith("kl") else [1.0, *floats(cfg.guard_lams)]
    value = float(arm.removeprefix("kl").removeprefix("guard_lam"))
    return 2 if value in (max(grid), min(grid)) else 1


# ---------------------------------------------------------------------------------------------------------------
# the evidence: evidence.py's inputs from the runs, the frontier's paths


def mean_eval(evals):
    """Mean over seeds of evaluations' "full" and "few" phases: the reference's row and r_ref of the verdicts (each
    seed's reference is evaluated on that seed's eval set; evidence.verdicts takes one reference)."""
    return {p: {k: statistics.fmean(e[p][k] for e in evals) for k in evals[0][p]} for p in ("full", "few")}


def point(phase):
    return phase["reward"], phase[QUALITY.key]


def early_stop_path(reference, official):
    """The reference, the official run's inner checkpoint evaluations (train_full's, on the same eval set), and the
    official run's final evaluation: (rewards, qualities)."""
    h = official["history"]
    inner = list(zip(h["reward"], h[QUALITY.key]))[1:-1]
    return [point(reference["eval"]["full"]), *inner, point(official["eval"]["full"])]


def family_members(cfg, method):
    """{family: [(knob, arm), ...]} of the trained families, each from the strongest effect to the weakest (guard,
    KL: by decreasing weight, the headline guard included; lower lr: by increasing lr factor)."""
    a, lam = arms(cfg, method, frontier=True), train_config(cfg, method, "guard", 0, "").lam
    guard = sorted([(lam, "guard")] + [(o["lam"], n) for n, o in a.items() if "lam" in o], reverse=True)
    kl = sorted([(o["kl_weight"], n) for n, o in a.items() if "kl_weight" in o], reverse=True)
    lower_lr = sorted((o["lr_scale"], n) for n, o in a.items() if "lr_scale" in o)
    families = {"guard": guard, "kl": kl, "lower_lr": lower_lr}
    return {f: members for f, members in families.items() if members}


def knob_values(cfg, method):
    """evidence.knobs' knob_values of one method: each family's knob in path order, rescaling's s included."""
    values = {f: [v for v, _ in members] for f, members in family_members(cfg, method).items()}
    return {**values, "rescale": sorted(floats(cfg.rescales))}


def frontier_paths(cfg, results, method, seeds):
    """{family: per seed [(reward, FD), ...]}: the reference, the family's members (strongest effect first), the
    official un-guarded run (docs/protocol.md). Early stopping: the official run's checkpoints; rescaling: the
    official model sampled at ‖v‖ = s·‖v_ref‖, s increasing. Every point on the seed's eval set."""
    scales = sorted(floats(cfg.rescales))
    paths = {}
    for s in seeds:
        reference, official = results[("reference", None, s)], results[(method, "none", s)]
        start, end = point(reference["eval"]["full"]), point(official["eval"]["full"])
        members = {
            f: [point(results[(method, arm, s)]["eval"]["full"]) for _, arm in members]
            for f, members in family_members(cfg, method).items()
        }
        members["early_stop"] = early_stop_path(reference, official)[1:-1]
        members["rescale"] = [point(official["eval"]["rescale" if x == 1 else f"rescale_{x:g}"]) for x in scales]
        for f, inner in members.items():
            paths.setdefault(f, []).append([start, *inner, end])
    return paths


def evidence_inputs(results, methods, seeds):
    """evidence.verdicts' inputs: runs, null_runs, adjoint, adjoint_reference (per seed; None for a reward without
    a gradient), the early-stopping control (the guarded run's final point against the official run's checkpoint
    path) and reference_eval."""
    runs = {m: {v: [results[(m, v, s)]["eval"] for s in seeds] for v in ev.VARIANTS} for m in methods}
    null_runs = {m: {"none": [results[(m, "null", s)]["eval"] for s in seeds]} for m in methods}
    adjoint_runs = {m: [results[(m, "none", s)]["adjoint"] for s in seeds] for m in methods}
    references = [results[("reference", None, s)] for s in seeds]
    has_adjoint = all(r["adjoint"] is not None for r in references)
    control = {}
    for m in methods:
        control[m] = []
        for s, reference in zip(seeds, references):
            rewards, fds = zip(*early_stop_path(reference, results[(m, "none", s)]))
            guard = results[(m, "guard", s)]["eval"]["full"]
            none, guarded = {"reward": rewards, "fd": fds}, {"reward": [guard["reward"]], "fd": [guard["fd"]]}
            control[m].append(ev.early_stopping_control(none, guarded, QUALITY))
    return dict(
        runs=runs,
        null_runs=null_runs,
        adjoint=adjoint_runs if has_adjoint else None,
        control=control,
        reference_eval=mean_eval([r["eval"] for r in references]),  # the table's reference row
        reference_per_seed=[r["eval"] for r in references],  # the verdicts': each seed's gain from its own
        adjoint_reference=[r["adjoint"] for r in references] if has_adjoint else None,
    )


def columns(tc):
    """The results table's columns (evidence.format_table)."""
    full = [("rms_ratio", "rms ratio", 3), ("ratio", "mean ratio", 3), ("reward", "reward", 3)]
    full += [("judge_acc", "judge acc", 3), ("fd", "FD", 1), ("disc_acc", "disc acc", 3)]
    few = [("reward", f"reward@{tc.few_steps}", 3), ("judge_acc", f"judge@{tc.few_steps}", 3)]
    few += [("fd", f"FD@{tc.few_steps}", 1)]
    return [ev.Column("full", *c) for c in full] + [ev.Column("few", *c) for c in few]


def format_members(results, methods, seeds):
    """Every arm's final evaluation (full steps), mean±std over seeds: the frontier's trained points."""
    fmt = lambda xs, p: "{:.{p}f}±{:.{p}f}".format(*ev.mean_std(xs), p=p)
    rows = [f"{'run':<20}{'reward':>14}{'FD':>14}{'rms ratio':>14}{'judge acc':>14}"]
    order = lambda arm: (arm not in HEADLINE, HEADLINE.index(arm) if arm in HEADLINE else 0, arm)
    for m in methods:  # a fixed row order (the headline arms, then by name), not the order the runs finished in
        for arm in sorted({a for (mm, a, _) in results if mm == m}, key=order):
            e = [results[(m, arm, s)]["eval"]["full"] for s in seeds]
            cells = [
                fmt([x[k] for x in e], p) for k, p in (("reward", 3), ("fd", 1), ("rms_ratio", 3), ("judge_acc", 3))
            ]
            rows.append(f"{m + ' ' + arm:<20}" + "".join(f"{c:>14}" for c in cells))
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------------------
# figures


def plot_samples(fig, gs, panels, tc):
    """Two strips (full and few steps), each the panels' sample grids side by side, 4 rows of 0..9 per panel."""
    from torchvision.utils import make_grid

    for i, phase in enumerate(("full", "few")):
        tiles = [
            make_grid(imgs[phase][:40].clamp(-1, 1) * 0.5 + 0.5, nrow=10, padding=1, pad_value=0.5)
            for _, imgs in panels
        ]
        gap = torch.ones(3, tiles[0].shape[1], 6)
        strip = torch.cat([t for tile in tiles for t in (tile, gap)][:-1], dim=2)
        ax = fig.add_subplot(gs[i, :])
        ax.imshow(strip.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set(xticks=[], yticks=[])
        width = tiles[0].shape[2] + gap.shape[2]
        for j, (title, _) in enumerate(panels):
            ax.text(j * width + tiles[0].shape[2] / 2, -2, title, ha="center", va="bottom", fontsize=9)
        ax.set_ylabel(f"{tc.sample_steps if phase == 'full' else tc.few_steps} Euler steps", fontsize=9)


def plot(results, inputs, methods, seeds, tc, path):
    """digits.png: samples of the first seed (reference, each method un-guarded, guarded, rescaled) at full and few
    steps; the norm ratio per t at the end of RL; every seed's final reward and FD; the norm ratio during RL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = lambda m, arm: results[(m, arm, seeds[0])]["images"]
    panels = [("reference", results[("reference", None, seeds[0])]["images"])]
    for m in methods:
        rescaled = {"full": first(m, "none")["rescale"], "few": first(m, "none")["rescale_few"]}
        panels += [(m, first(m, "none")), (f"{m} + NormGuard", first(m, "guard")), (f"{m} rescaled", rescaled)]
    fig = plt.figure(figsize=(max(2.1 * len(panels), 13), 9.5))  # the three bottom panels need 13 inches
    gs = fig.add_gridspec(3, 3, height_ratios=[1, 1, 2.2])
    plot_samples(fig, gs, panels, tc)
    ax_t, ax_q, ax_s = (fig.add_subplot(gs[2, j]) for j in range(3))
    ev.plot_profile(ax_t, inputs["runs"], tc.profile_bins)
    ev.plot_reward_quality(ax_q, inputs["runs"], inputs["reference_eval"], QUALITY, (tc.sample_steps, tc.few_steps))
    histories = {m: {v: [results[(m, v, s)]["history"] for s in seeds] for v in ev.VARIANTS} for m in methods}
    ev.plot_curves(ax_s, histories, "step", "ratio")
    ax_s.axhline(1, c="k", lw=0.8)
    ax_s.set(xlabel="RL step", ylabel="mean ‖v_θ‖/‖v_ref‖ (train_full evals)", title="norm ratio during RL")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_frontiers(paths, operating, path_for):
    """One figure per method (evidence.plot_frontier, the matched levels marked), saved at path_for(method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for m, families in paths.items():
        fig, ax = plt.subplots(figsize=(6, 4.5))
        ev.plot_frontier(ax, families, QUALITY, f"digits, {m}: reward vs FD, mean over seeds", operating[m])
        fig.tight_layout()
        fig.savefig(path_for(m), dpi=110)
        plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# run


def all_jobs(cfg, frontier):
    """The seeds' reference evaluations, then every (method, arm, seed): method by method in the order given (so
    that an experiment stopped early has whole methods), within a method by priority, then seed."""
    methods, seeds = cfg.methods.split(","), seed_list(cfg)
    runs = [(m, a, s) for s in seeds for m in methods for a in arms(cfg, m, frontier)]
    runs.sort(key=lambda job: (methods.index(job[0]), priority(cfg, *job[:2]), seeds.index(job[2])))
    return [("reference", None, s) for s in seeds] + runs


def summarise(cfg, tc, results, frontier):
    """Table, verdicts and (frontier) quality at matched reward, from the finished jobs."""
    methods, seeds = cfg.methods.split(","), seed_list(cfg)
    inputs = evidence_inputs(results, methods, seeds)
    lines, flags = ev.verdicts(
        inputs["runs"],
        inputs["reference_per_seed"],
        inputs["adjoint"],
        inputs["adjoint_reference"],
        inputs["control"],
        QUALITY,
        tc.few_steps,
        null_runs=inputs["null_runs"],
        ratio_key="rms_ratio",
    )
    out = dict(inputs, verdicts=lines, verdict_flags=flags)
    out["table"] = ev.format_table(inputs["runs"], inputs["reference_eval"], columns(tc))
    out["members"] = format_members({j: r for j, r in results.items() if j[0] != "reference"}, methods, seeds)
    out["drift_lead"] = {}  # the official run's checkpoints, read from its folder (older results lack ratio_max)
    for m in methods:
        histories = [read_history(run_dir(cfg, m, "none", s)) for s in seeds]
        for alarm in DRIFT_ALARMS:
            leads = [ev.drift_lead(h, QUALITY, alarm, DRIFT_DAMAGE) for h in histories]
            out["drift_lead"][f"{m}@{alarm:g}"] = leads
            out.setdefault("drift_lines", []).append(ev.drift_lead_line(m, leads, QUALITY, alarm, DRIFT_DAMAGE))
    if frontier:
        out["paths"] = {m: frontier_paths(cfg, results, m, seeds) for m in methods}
        # the primary comparison (protocol, amendment 1): at each seed's headline guarded run's own reward
        out["operating"] = {m: [point(results[(m, "guard", s)]["eval"]["full"]) for s in seeds] for m in methods}
        out["frontier"], out["frontier_summary"] = ev.frontier(out["paths"], QUALITY, out["operating"])
        values = {m: knob_values(cfg, m) for m in methods}  # the knob question (protocol, amendment 2 (g))
        out["knobs"], out["knob_summary"] = ev.knobs(out["paths"], values, QUALITY)
    return out


def run(cfg, frontier=False, progress=True):
    """The whole experiment: reference, every job, the evidence, outputs. Returns metrics (as in metrics.json)."""
    from torchvision.utils import save_image

    t0 = time.time()
    torch.set_num_threads(cfg.threads)
    ref_path = dg.get_reference(cfg.cache_dir, "cpu", steps=cfg.pretrain_steps, seed=cfg.ref_seed, progress=progress)
    for kind in ("reward", "judge"):  # trained once here, so the parallel runs only read them
        dg.classifier(kind, str(cfg.cache_dir), "cpu")
    t_pre = time.time() - t0
    methods, seeds = cfg.methods.split(","), seed_list(cfg)
    tc = train_config(cfg, methods[0], "none", seeds[0], ref_path)  # the settings every headline run shares
    out = Path(cfg.out_dir)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    results = run_all(cfg, ref_path, all_jobs(cfg, frontier), progress)
    for (m, arm, s), result in results.items():
        for name, x in result["images"].items():
            save_image(x.clamp(-1, 1) * 0.5 + 0.5, out / "grids" / f"{m}_{arm or 'eval'}_seed{s}_{name}.png", nrow=10)
    summary = summarise(cfg, tc, results, frontier)
    plot(results, summary, methods, seeds, tc, out / "digits.png")
    if frontier:
        plot_frontiers(summary["paths"], summary["operating"], lambda m: out / f"frontier_{m}.png")
    train_settings = {k: v for k, v in dataclasses.asdict(tc).items() if k not in PER_RUN}
    info = dict(config=dataclasses.asdict(cfg), frontier=frontier, train_config=train_settings, command=sys.argv)
    info.update(git_revision=cli.git_revision(), reference_path=ref_path)
    wall = {"reference": t_pre, "total": time.time() - t0}
    wall["runs"] = {f"{m}_{a}_seed{s}": r["wall_time_s"] for (m, a, s), r in results.items() if m != "reference"}
    histories = {f"{m}_{a}_seed{s}": r["history"] for (m, a, s), r in results.items() if m != "reference"}
    metrics = {**info, **summary, "histories": histories, "wall_time_s": wall}
    cli.write_atomic(out / "config.json", cli.dumps(info, indent=2))
    cli.write_atomic(out / "metrics.json", cli.dumps(metrics, indent=1))
    return metrics


def main(argv=None):
    cfg, frontier = cli.checked(parse_args, sys.argv[1:] if argv is None else argv)
    tc = train_config(cfg, "nft", "none", seed_list(cfg)[0], "")
    n_runs = len(all_jobs(cfg, frontier)) - len(seed_list(cfg))
    print(
        f"device cpu | {n_runs} RL runs of train_full with the digits preset ({cfg.methods}, seeds {cfg.seeds}, "
        f"{'headline + frontier' if frontier else 'headline'}), {cfg.jobs} at a time | reward {cfg.reward} | "
        f"reference seed {cfg.ref_seed} |"
        f" {'full fine-tuning' if tc.full_finetune else f'LoRA r={tc.lora_rank}'} | {tc.prompts_per_step}x"
        f"{tc.group_size} rollouts/step | {tc.steps} steps | lr {tc.lr:g} (dpo {cfg.dpo_lr:g}) | lam {tc.lam} "
        f"{tc.margin} | {tc.sample_steps} and {tc.few_steps} Euler steps | {cfg.eval_samples} eval samples per seed"
    )
    metrics = run(cfg, frontier)
    print(metrics["table"])
    print("\n".join(metrics["verdicts"]))
    print(metrics["members"])
    print("\n".join(metrics["drift_lines"]))
    if frontier:
        print("\n".join(metrics["frontier"] + metrics["knobs"]))
    print(
        f"wall time {metrics['wall_time_s']['total']:.0f} s (reference {metrics['wall_time_s']['reference']:.0f} s) | "
        f"outputs in {cfg.out_dir}: metrics.json, config.json, digits.png"
        f"{', frontier_<method>.png' if frontier else ''}, grids/, reference/, runs/<method>_<arm>_seed<s>/"
    )
    return metrics


if __name__ == "__main__":
    cli.run(main)
