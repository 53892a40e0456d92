"""RL fine-tuning of diffusers flow models (SD3/SD3.5, FLUX.1) with DiffusionNFT, AWM or Diffusion-DPO + NormGuard.

    accelerate launch train_full.py --preset=sd3 --pretrained_model_name_or_path=stabilityai/stable-diffusion-3.5-medium \
        --train_prompts=prompts.txt --eval_prompts=eval.txt --method=nft --guard=true --out_dir=runs/sd35_nft
    python train_full.py --preset=digits --smoke                     # CPU: the 8x8-digit SD3 transformer of digits.py
    python train_full.py --preset=digits --smoke --steps=4 --resume=latest   # continue from the last checkpoint
The digits preset pretrains (once, cached) its reference with digits.get_reference: about two minutes on 2 cores.

What happens, top to bottom:
1. config: one commented dataclass; presets fill model-specific defaults; `--key=value` overrides, unknown keys fail.
2. model: the pipeline loaded by its diffusers class; prompts encoded by the pipeline's own encode_prompt; a peft
   LoRA on the transformer. The frozen reference velocity is the same transformer with the adapter disabled; the
   old/EMA policy NFT and AWM need is a copy of the trainable (LoRA) tensors swapped in for a no-grad forward.
   Model differences (latent packing, timestep scale, guidance embedding, sigmas) live in the adapters below.
3. loop: on-policy rollouts in groups of `group_size` per prompt on the scheduler's sigmas, rewards, group
   advantages, then the base loss (ng.nft_loss / ng.awm_loss / ng.dpo_loss) + ng.normguard_penalty on fresh
   forward-process points at the method's own train timesteps; one optimiser step per rollout batch.
4. eval (at step 0, the reference, then every eval_every steps): reward at the full and the few-step sampler on
   fixed prompts and seeds, the per-timestep norm-ratio profile along the policy's own trajectories, an image grid.
5. save: atomic checkpoints (accelerate state: trainable weights, optimiser, LR schedule, RNG, step, old/EMA
   policy), the LoRA in the diffusers format (`pipe.load_lora_weights(out_dir + "/lora")`), config and metrics.
Every base loss here evaluates the reference velocity at the training points already (their KL terms and DPO's
implicit reward need it), so the guard reuses that forward: it costs no extra network evaluation.
"""
import contextlib
import dataclasses
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import normguard as ng

METHODS = ("nft", "awm", "dpo")


@dataclass
class Config:
    # model: a diffusers pipeline folder or hub id (sd3: StableDiffusion3Pipeline, flux: FluxPipeline); digits: a
    # digits.get_reference folder (empty = build or reuse the cached one)
    preset: str = "sd3"  # sd3 | flux | digits
    pretrained_model_name_or_path: str = ""
    resolution: int = 512
    max_sequence_length: int = 256  # T5 tokens of the prompt encoders
    # prompts: text files, one prompt per line (digits: lines "0".."9"); empty = the preset's built-in list
    train_prompts: str = ""
    eval_prompts: str = ""
    # trainable: LoRA on the transformer (rank/alpha as DiffusionNFT's official r=32, alpha=64), or everything
    full_finetune: bool = False  # costs a frozen copy of the transformer (reference), for NFT/AWM a 2nd (old/EMA)
    lora_rank: int = 32
    lora_alpha: int = 64
    lora_targets: str = "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out"
    # rollouts: groups of group_size samples per prompt, sampled on-policy with the scheduler's sigmas
    prompts_per_step: int = 2  # per process
    group_size: int = 24  # DiffusionNFT's official 24 images per prompt
    sample_steps: int = 10  # Euler steps of the rollout sampler (NFT 10, AWM 14 in the official configs)
    cfg_scale: float = 1.0  # classifier-free guidance of the rollouts (1.0 = off, NFT's official setting)
    flux_guidance: float = 3.5  # FLUX-dev's embedded guidance value (ignored by models without guidance_embeds)
    shift: float = 1.0  # digits only: the sampling grid's shift (sd3/flux take theirs from the scheduler)
    # reward: pickscore | jpeg | digits | module:function (called as fn(images (B,3,H,W) in [-1,1], prompts) -> (B,))
    reward: str = "pickscore"
    pickscore_model: str = "yuvalkirstain/PickScore_v1"  # a CLIPModel folder or hub id (tokenizer included)
    # method and its base-loss settings (defaults: the official configs, see shared notes)
    method: str = "nft"  # nft | awm | dpo
    train_timesteps: int = 0  # per sample and step; 0 = the method's recipe: nft K-1, awm 6, dpo 1
    nft_beta: float = 1.0
    kl_weight: float = 1e-4  # NFT's KL weight, AWM's ref_weight
    adv_clip: float = 5.0
    awm_weighting: str = "ghuber"
    awm_ema_weight: float = 1.0  # AWM's pull towards its EMA policy (official 1.0; 0 skips that forward)
    ema_decay_rate: float = 0.001  # old/EMA decay = min(rate * step, max): NFT max 0.5, AWM max 0.3
    dpo_beta: float = 2000.0
    # NormGuard (ng.normguard_penalty): zero unless |v_theta| > |v_ref|; loss = base + penalty
    guard: bool = True
    lam: float = 1.0  # DPO: the hinge's weight is lam * abs(dpo_beta) / 2, the factor its own loss carries
    margin: str = "relative"
    power: int = 2
    granularity: str = "sample"  # sample | token (token = one latent pixel, all channels)
    tolerance: float = 0.0
    dpo_guard: str = "both"  # which DPO branch is guarded: both (mean of the two) | winner | loser
    # optimisation: one AdamW step per rollout batch, gradients accumulated over micro-batches and train timesteps
    steps: int = 300
    lr: float = 3e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 0
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
    report_to: str = ""  # "" | tensorboard | wandb (through accelerate)
    # outputs
    out_dir: str = "runs/train_full"
    checkpoint_every: int = 50
    checkpoints_keep: int = 2
    resume: str = ""  # "" | latest | a checkpoint folder
    cache_dir: str = ""  # digits: where the reference and classifiers are cached ("" = digits' default)


PRESETS = {
    "sd3": dict(resolution=512, lora_targets="to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out"),
    "flux": dict(resolution=512, max_sequence_length=512, lora_targets="to_q,to_k,to_v,to_out.0,add_q_proj,"
                 "add_k_proj,add_v_proj,to_add_out"),
    "digits": dict(resolution=8, reward="digits", lora_rank=8, lora_alpha=16, group_size=8, prompts_per_step=4,
                   train_batch_size=32, mixed_precision="no", gradient_checkpointing=False, lr=1e-3, eval_seeds=4),
}
SMOKE = dict(steps=2, prompts_per_step=2, group_size=2, sample_steps=3, few_steps=1, train_batch_size=4,
             eval_every=2, eval_seeds=1, checkpoint_every=1, lora_rank=4, lora_alpha=8, mixed_precision="no",
             gradient_checkpointing=False, out_dir="runs/train_full_smoke")
SMOKE_SIZE = {"sd3": dict(resolution=16, max_sequence_length=16), "flux": dict(resolution=16, max_sequence_length=16),
              "digits": dict(resolution=8)}
DEFAULT_PROMPTS = {"sd3": ["a photo of a cat", "a red bicycle leaning on a wall", "a bowl of ramen, top view",
                           "a lighthouse at dusk"], "digits": [str(d) for d in range(10)]}
DEFAULT_PROMPTS["flux"] = DEFAULT_PROMPTS["sd3"]


def parse_args(argv):
    """Config from --key=value overrides on top of a preset (and --smoke); unknown keys raise ValueError."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    overrides, smoke = {}, False
    for arg in argv:
        if arg == "--smoke":
            smoke = True
            continue
        key, eq, value = arg[2:].partition("=")
        if not arg.startswith("--") or not eq or key not in fields:
            raise ValueError(f"argument {arg!r}: expected --smoke or --key=value with key one of {sorted(fields)}")
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
    preset = overrides.get("preset", Config.preset)
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    smoke_kw = {**SMOKE, **SMOKE_SIZE[preset]} if smoke else {}
    cfg = Config(**{**PRESETS[preset], **smoke_kw, **overrides})
    check_config(cfg)
    return cfg


def check_config(cfg):
    choices = dict(method=METHODS, margin=("relative", "absolute"), power=(1, 2), granularity=("sample", "token"),
                   dpo_guard=("both", "winner", "loser"), mixed_precision=("no", "fp16", "bf16"),
                   report_to=("", "tensorboard", "wandb"), preset=tuple(PRESETS))
    for name, options in choices.items():
        if getattr(cfg, name) not in options:
            raise ValueError(f"{name}: expected one of {options}, got {getattr(cfg, name)!r}")
    for name in ("steps", "prompts_per_step", "group_size", "sample_steps", "few_steps", "train_batch_size",
                 "eval_every", "eval_seeds", "checkpoint_every", "checkpoints_keep", "lora_rank", "resolution"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {getattr(cfg, name)}")
    if cfg.group_size < 2:
        raise ValueError(f"group_size: expected >= 2 (advantages compare samples of one prompt), got {cfg.group_size}")
    if cfg.train_timesteps < 0:
        raise ValueError(f"train_timesteps: expected >= 0 (0 = the method's recipe), got {cfg.train_timesteps}")
    if cfg.method == "nft" and cfg.sample_steps < 2 and cfg.train_timesteps == 0:
        raise ValueError("sample_steps: NFT trains on the sampler's own K-1 timesteps, so it needs K >= 2")
    for name in ("lr", "cfg_scale", "nft_beta", "adv_clip", "max_grad_norm"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"{name}: expected a number > 0, got {getattr(cfg, name)}")
    for name in ("lam", "kl_weight", "awm_ema_weight", "tolerance", "weight_decay"):
        if not getattr(cfg, name) >= 0:
            raise ValueError(f"{name}: expected a number >= 0, got {getattr(cfg, name)}")
    if cfg.preset != "digits" and not cfg.pretrained_model_name_or_path:
        raise ValueError("pretrained_model_name_or_path: required for the sd3 and flux presets: a hub id such as "
                         "stabilityai/stable-diffusion-3.5-medium or a folder written by pipeline.save_pretrained")


# ---------------------------------------------------------------------------------------------------------------
# model adapters: everything that differs between SD3, FLUX and the digits testbed


def resolve_model_path(cfg):
    """A local folder as given, or a hub id that answers within seconds; else a ValueError that says what to pass."""
    path = cfg.pretrained_model_name_or_path
    if cfg.preset == "digits" and not path:
        import digits

        return digits.get_reference(cfg.cache_dir or digits.DEFAULT_CACHE, "cpu")
    marker = "transformer/config.json" if cfg.preset == "digits" else "model_index.json"
    hint = ("pass --pretrained_model_name_or_path=<hub id, e.g. stabilityai/stable-diffusion-3.5-medium or "
            "black-forest-labs/FLUX.1-dev> or <a folder written by pipeline.save_pretrained>")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, marker)):
            raise ValueError(f"pretrained_model_name_or_path: {path} has no {marker}; {hint}")
        return path
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ValueError(f"pretrained_model_name_or_path: no folder {path!r} and not a hub id (owner/name); {hint}")
    from huggingface_hub import hf_hub_download

    try:  # one small file with a short timeout: a wrong id, a gated model or no network fails here, not in 10 min
        hf_hub_download(path, marker, etag_timeout=10)
    except Exception as e:
        raise ValueError(f"pretrained_model_name_or_path: cannot reach {path!r} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}); {hint}; gated models need `hf auth login`, offline "
                         f"runs (HF_HUB_OFFLINE=1) need the model in the local cache") from None
    return path


class Adapter:
    """One model family: load, encode prompts, velocity v(x_t, t, c) in the ng convention, decode, sigmas.

    Latents x are always (B, C, H, W) (FLUX's are packed into 2x2 tokens only inside velocity), so the norms, the
    forward process and the Euler sampler of normguard.py see one layout for every family.
    """

    def __init__(self, cfg, path, device, weight_dtype):
        self.cfg, self.device, self.dtype = cfg, device, weight_dtype
        self.guidance = None
        if cfg.preset == "digits":
            import digits
            from diffusers import SD3Transformer2DModel

            self.digits = digits
            self.transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer")
            self.encoder = digits.LabelEncoder.from_pretrained(path).to(device).requires_grad_(False)
            c = self.transformer.config
            self.latent_shape = (c.in_channels, c.sample_size, c.sample_size)
            self.pipe = None
            return
        from diffusers import FluxPipeline, StableDiffusion3Pipeline

        cls = StableDiffusion3Pipeline if cfg.preset == "sd3" else FluxPipeline
        self.pipe = cls.from_pretrained(path, dtype=weight_dtype)
        for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            module = getattr(self.pipe, name, None)
            if module is not None:
                module.to(device).requires_grad_(False)
        self.transformer = self.pipe.transformer
        self.pipe.set_progress_bar_config(disable=True)
        vsf, c = self.pipe.vae_scale_factor, self.transformer.config
        if cfg.resolution % (vsf * 2):
            raise ValueError(f"resolution: expected a multiple of {vsf * 2} (VAE factor x 2x2 patches), got "
                             f"{cfg.resolution}")
        side = cfg.resolution // vsf
        channels = c.in_channels if cfg.preset == "sd3" else c.in_channels // 4  # FLUX: in_channels counts 2x2 packs
        self.latent_shape = (channels, side, side)
        if cfg.preset == "flux":
            self.img_ids = self.pipe._prepare_latent_image_ids(1, side // 2, side // 2, device, weight_dtype)
            if c.guidance_embeds:
                self.guidance = torch.tensor([cfg.flux_guidance], device=device)

    def encode(self, prompts):
        """prompts: list of str -> conditioning dict of batched tensors (the pipeline's own encoders)."""
        if self.pipe is None:
            try:
                labels = torch.tensor([int(p) for p in prompts], device=self.device)
            except ValueError:
                raise ValueError(f"prompts: the digits preset expects digit labels 0..9, got {prompts[:4]}") from None
            hidden, pooled = self.encoder(labels)
            return {"encoder_hidden_states": hidden, "pooled_projections": pooled, "labels": labels}
        with torch.no_grad():
            if self.cfg.preset == "sd3":
                emb, _, pooled, _ = self.pipe.encode_prompt(prompts, None, None, device=self.device,
                                                            do_classifier_free_guidance=False,
                                                            max_sequence_length=self.cfg.max_sequence_length)
                return {"encoder_hidden_states": emb, "pooled_projections": pooled}
            emb, pooled, txt_ids = self.pipe.encode_prompt(prompts, None, device=self.device,
                                                           max_sequence_length=self.cfg.max_sequence_length)
            self.txt_ids = txt_ids  # (L, 3), the same for every prompt
            return {"encoder_hidden_states": emb, "pooled_projections": pooled}

    def null_cond(self, n):
        """The unconditional "prompt" for CFG: the empty string (digits: the null label)."""
        if self.pipe is None:
            hidden, pooled = self.encoder(torch.full((n,), self.digits.NULL_LABEL, device=self.device))
            return {"encoder_hidden_states": hidden, "pooled_projections": pooled}
        return self.encode([""] * n)

    def velocity(self, model, x, t, cond):
        """v_theta(x_t, t, c): x (B, C, H, W), t (B,) in [0, 1] -> (B, C, H, W) in x's dtype."""
        kw = {k: cond[k] for k in ("encoder_hidden_states", "pooled_projections")}
        if self.cfg.preset != "flux":
            return model(hidden_states=x, timestep=ng.TIMESTEP_SCALE * t, return_dict=False, **kw)[0]
        b, c, h, w = x.shape
        packed = self.pipe._pack_latents(x, b, c, h, w)
        guidance = self.guidance.expand(b) if self.guidance is not None else None
        # FluxTransformer2DModel multiplies timestep (and guidance) by 1000 itself, so it takes t, not 1000·t
        out = model(hidden_states=packed, timestep=t, guidance=guidance, txt_ids=self.txt_ids, img_ids=self.img_ids,
                    return_dict=False, **kw)[0]
        return self.pipe._unpack_latents(out, h * self.pipe.vae_scale_factor, w * self.pipe.vae_scale_factor,
                                         self.pipe.vae_scale_factor)

    def sigmas(self, num_steps):
        """(K + 1,) sampling grid 1 -> 0 as the model's pipeline builds it (SD3: static shift; FLUX: dynamic mu)."""
        if self.pipe is None:
            return ng.flow_timesteps(num_steps, shift=self.cfg.shift, device=self.device)
        import numpy as np

        sched, kw = self.pipe.scheduler, {}
        if sched.config.get("use_dynamic_shifting", False):
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            seq = (self.latent_shape[1] // 2) * (self.latent_shape[2] // 2)
            kw["mu"] = calculate_shift(seq, sched.config.get("base_image_seq_len", 256),
                                       sched.config.get("max_image_seq_len", 4096),
                                       sched.config.get("base_shift", 0.5), sched.config.get("max_shift", 1.15))
        if self.cfg.preset == "flux":
            kw["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)  # as FluxPipeline.__call__ passes them
            sched.set_timesteps(device="cpu", **kw)
        else:
            sched.set_timesteps(num_steps, device="cpu", **kw)
        return sched.sigmas.to(self.device, torch.float32)

    def decode(self, x):
        """Latents -> images (B, 3 or 1, H, W) in [-1, 1]."""
        if self.pipe is None:
            return x.float().clamp(-1, 1)
        vae = self.pipe.vae
        x = x / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return vae.decode(x.to(vae.dtype), return_dict=False)[0].float().clamp(-1, 1)


# ---------------------------------------------------------------------------------------------------------------
# rewards: (images (B, C, H, W) in [-1, 1], prompts) -> (B,)


def jpeg_reward(images, prompts):
    """JPEG compressibility: minus the size in kB of each image encoded at quality 95 (flow_grpo's reward)."""
    from torchvision.io import encode_jpeg

    u8 = ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return torch.tensor([-len(encode_jpeg(img, quality=95)) / 1000 for img in u8], device=images.device)


class PickScore:
    """PickScore: logit_scale · cos(CLIP image, CLIP text), CLIP preprocessing done in torch (224 px, CLIP stats)."""

    MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, path, device):
        from transformers import AutoTokenizer, CLIPModel

        self.model = CLIPModel.from_pretrained(path).to(device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.size, self.device = self.model.config.vision_config.image_size, device

    @torch.no_grad()
    def __call__(self, images, prompts):
        x = torch.nn.functional.interpolate((images.float() + 1) / 2, size=(self.size, self.size), mode="bicubic",
                                            antialias=True).clamp(0, 1)
        mean, std = (torch.tensor(c, device=x.device)[:, None, None] for c in (self.MEAN, self.STD))
        x = (x - mean) / std
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        img = self.model.get_image_features(pixel_values=x.to(self.device))
        txt = self.model.get_text_features(**tok)
        # transformers 5 returns output objects whose pooler_output is the projected embedding (4.x: the tensor)
        img, txt = (torch.nn.functional.normalize(getattr(e, "pooler_output", e), dim=-1) for e in (img, txt))
        return self.model.logit_scale.exp() * (img * txt).sum(-1)


def build_reward(cfg, adapter, device):
    if cfg.reward == "jpeg":
        return jpeg_reward
    if cfg.reward == "pickscore":
        return PickScore(cfg.pickscore_model, device)
    if cfg.reward == "digits":
        digits, cache = adapter.digits, cfg.cache_dir or adapter.digits.DEFAULT_CACHE
        return lambda images, prompts: digits.reward_fn(images, torch.tensor([int(p) for p in prompts],
                                                                             device=images.device), cache_dir=cache)
    module, colon, name = cfg.reward.partition(":")
    if not colon:
        raise ValueError(f"reward: expected pickscore, jpeg, digits or module:function, got {cfg.reward!r}")
    return getattr(importlib.import_module(module), name)


# ---------------------------------------------------------------------------------------------------------------
# trainable state, old/EMA policy, atomic checkpoints


class PolicyCopy:
    """A copy of the trainable tensors (the LoRA weights) standing for the old/EMA policy; swapped in for forwards."""

    def __init__(self, params):
        self.params = params
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, decay):
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - decay)

    @contextlib.contextmanager
    def swapped_in(self):
        live = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, live):
                    p.copy_(v)

    def state_dict(self):
        return {"shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state):
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)


class Counter:
    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path):
    for root, dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def save_checkpoint(accelerator, ckpt_root, step, keep):
    """accelerate's save_state into a temp folder, fsync, then one rename: a killed save leaves only the temp folder,
    which nothing loads. COMPLETE (written last, inside the temp folder) marks a checkpoint as whole."""
    final = ckpt_root / f"checkpoint-{step:07d}"
    tmp = ckpt_root / f".tmp-checkpoint-{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "COMPLETE").write_text(json.dumps({"step": step}))
        _fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        _fsync_dir(ckpt_root)  # the rename itself is durable
        for old in sorted(complete_checkpoints(ckpt_root))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def complete_checkpoints(ckpt_root):
    return [p for p in Path(ckpt_root).glob("checkpoint-*") if (p / "COMPLETE").is_file()]


def trainable_params(model):
    return [p for p in model.parameters() if p.requires_grad]


def register_trainable_only_hooks(accelerator):
    """Checkpoints hold the trainable tensors only (the LoRA), not the frozen multi-GB transformer."""
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        for model in models:
            named = {n: p.detach().cpu().contiguous() for n, p in accelerator.unwrap_model(model).named_parameters()
                     if p.requires_grad}
            if accelerator.is_main_process:
                save_file(named, os.path.join(output_dir, "trainable.safetensors"))
        weights.clear()  # accelerate would save the whole state dict otherwise

    def load_hook(models, input_dir):
        while models:
            params = dict(accelerator.unwrap_model(models.pop()).named_parameters())
            with torch.no_grad():
                for n, v in load_file(os.path.join(input_dir, "trainable.safetensors")).items():
                    params[n].copy_(v)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ---------------------------------------------------------------------------------------------------------------
# sampling and the training step


def guided_velocity(adapter, model, x, t, cond, null, cfg_scale):
    """The velocity the sampler integrates: conditional, or v_u + s·(v_c - v_u) against `null` when s != 1."""
    if cfg_scale == 1.0:
        return adapter.velocity(model, x, t, cond)
    both = {k: torch.cat([null[k], cond[k]]) for k in ("encoder_hidden_states", "pooled_projections")}
    v_u, v_c = adapter.velocity(model, torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
    return v_u + cfg_scale * (v_c - v_u)


def rollout(adapter, model, cond, noise, sigmas, cfg_scale, null):
    """Euler samples x0 (B, C, H, W) on sigmas (K + 1,), classifier-free guided when cfg_scale != 1."""
    return ng.euler_sample(lambda x, t: guided_velocity(adapter, model, x, t, cond, null, cfg_scale), noise,
                           sigmas.to(noise.dtype))


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


def train_timestep_plan(cfg, sigmas, gen):
    """The t values each sample is trained at this step: NFT the sampler's own (K - 1 of K), AWM a subset of the
    first 90 % of the sampler's steps, DPO logit-normal (returned as None: drawn per pair)."""
    k = len(sigmas) - 1
    if cfg.method == "dpo":
        return None
    pool = sigmas[:k] if cfg.method == "nft" else sigmas[:max(1, int(0.9 * k))]
    n = cfg.train_timesteps or (k - 1 if cfg.method == "nft" else min(6, len(pool)))
    if n > len(pool):
        raise ValueError(f"train_timesteps: {n} asked for, but the {cfg.method} pool has {len(pool)} sampler steps")
    return pool[torch.randperm(len(pool), generator=gen)[:n].to(pool.device)]


def micro_batch_loss(cfg, adapter, model, base, old, x0, cond, adv, t_value, gen, pairs=None):
    """Base loss + guard on one micro-batch at one train timestep. Returns (loss, stats dict of floats-to-be)."""
    device = x0.device
    if cfg.method == "dpo":
        x_w, x_l = pairs
        t = torch.sigmoid(torch.randn(len(x_w), generator=gen)).to(device)  # logit-normal
        eps = torch.randn(x_w.shape, generator=gen).to(device, x_w.dtype)  # shared by winner and loser
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
        return loss + penalty, {**stats, "hinge": g["hinge"], "active_frac": g["active_frac"],
                                "guard": penalty.detach()}
    t = t_value.expand(len(x0)).to(device)
    eps = torch.randn(x0.shape, generator=gen).to(device, x0.dtype)
    x_t, u = ng.forward_process(x0, eps, t)
    with torch.no_grad():  # before the policy forward: swapping the old weights in writes to the parameters
        with base.reference():
            v_ref = adapter.velocity(base.module, x_t, t, cond)
        v_extra = None
        if old is not None:
            with old.swapped_in():
                v_extra = adapter.velocity(base.module, x_t, t, cond)
    v = adapter.velocity(model, x_t, t, cond)
    if cfg.method == "nft":
        loss, stats = ng.nft_loss(v, v_extra, v_ref, x_t, x0, t, adv, beta=cfg.nft_beta, adv_clip=cfg.adv_clip,
                                  kl_weight=cfg.kl_weight)
    else:  # one optimiser step per rollout batch: the pre-update policy is v itself, detached (ratio 1, no forward)
        loss, stats = ng.awm_loss(v, v.detach(), v_ref, u, t, adv, weighting=cfg.awm_weighting,
                                  adv_clip=cfg.adv_clip, ref_weight=cfg.kl_weight, v_ema=v_extra,
                                  ema_weight=cfg.awm_ema_weight if v_extra is not None else 0.0)
    penalty, g = guard_terms(cfg, v, v_ref)
    return loss + penalty, {**stats, "hinge": g["hinge"], "active_frac": g["active_frac"], "guard": penalty.detach()}


class Base:
    """The frozen reference: the same transformer with the LoRA adapter disabled (full fine-tuning: a frozen copy)."""

    def __init__(self, module, frozen_copy=None):
        self.module, self.frozen_copy = module, frozen_copy

    @contextlib.contextmanager
    def reference(self):
        if self.frozen_copy is not None:
            live, self.module = self.module, self.frozen_copy
            try:
                yield
            finally:
                self.module = live
            return
        self.module.disable_adapters()
        try:
            yield
        finally:
            self.module.enable_adapters()


class NonFiniteLoss(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------------------------
# the run


def read_prompts(path, preset):
    if not path:
        return list(DEFAULT_PROMPTS[preset])
    if not os.path.isfile(path):
        raise ValueError(f"prompt file: expected a text file with one prompt per line, got {path!r}")
    prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path!r}: no prompts (expected one per line)")
    return prompts


def step_generator(cfg, step, rank, stream):
    """A generator seeded by (seed, step, process, stream): rollouts and train noise do not depend on RNG history,
    so a resumed run draws exactly what the uninterrupted run drew."""
    return torch.Generator().manual_seed(((cfg.seed * 1_000_003 + step) * 1009 + rank) * 7 + stream)


def git_revision():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@torch.no_grad()
def evaluate(cfg, adapter, base, reward_fn, eval_prompts, step, out_dir, accelerator):
    """Reward at the full and few-step samplers on fixed prompts and seeds (the rollouts' CFG), the per-timestep
    norm-ratio profile along the policy's own full-step trajectories, an image grid. Runs on the main process."""
    from torchvision.utils import save_image

    prompts = [p for p in eval_prompts for _ in range(cfg.eval_seeds)]
    noise = torch.randn(len(prompts), *adapter.latent_shape, generator=torch.Generator().manual_seed(cfg.seed + 12345))
    noise, bs, result = noise.to(accelerator.device), cfg.train_batch_size, {}
    for name, k in (("full", cfg.sample_steps), ("few", cfg.few_steps)):
        sigmas, ratios, ts, images, rewards = adapter.sigmas(k), [], [], [], []
        for i in range(0, len(prompts), bs):
            cond = adapter.encode(prompts[i:i + bs])
            null = adapter.null_cond(len(prompts[i:i + bs])) if cfg.cfg_scale != 1 else None

            def velocity(x, t):
                v = guided_velocity(adapter, base.module, x, t, cond, null, cfg.cfg_scale)
                if name == "full":  # drift along the policy's own trajectory: its velocity vs the reference's
                    with base.reference():
                        ratios.append(ng.norm_ratio(v, guided_velocity(adapter, base.module, x, t, cond, null,
                                                                       cfg.cfg_scale)))
                    ts.append(t.float())
                return v

            with accelerator.autocast():
                x0 = ng.euler_sample(velocity, noise[i:i + bs], sigmas.to(noise.dtype))
            images.append(adapter.decode(x0).cpu())
            rewards.append(reward_fn(images[-1].to(x0.device), prompts[i:i + bs]).float().cpu())
        images = torch.cat(images)
        result[f"reward_{name}"] = torch.cat(rewards).mean().item()
        if name == "full":
            save_image((images + 1) / 2, out_dir / "eval" / f"grid_{step:07d}.png", nrow=cfg.eval_seeds * 4)
            means, counts = ng.norm_ratio_profile(torch.cat(ratios), torch.cat(ts).clamp(0, 1), cfg.profile_bins)
            result["norm_ratio"] = torch.cat(ratios).mean().item()
            result["profile"] = [None if c == 0 else round(m, 5) for m, c in zip(means.tolist(), counts.tolist())]
        if cfg.preset == "digits" and len(prompts) >= 10:  # quality the reward cannot see (digits' judges)
            labels = torch.tensor([int(p) for p in prompts])
            cache = {"cache_dir": cfg.cache_dir} if cfg.cache_dir else {}
            quality = adapter.digits.quality_metrics(images, labels, **cache)
            result.update({f"{key}_{name}": value for key, value in quality.items()})
    profile = " ".join("  -  " if m is None else f"{m:.3f}" for m in result["profile"])
    print(f"eval {step:6d} | reward full {result['reward_full']:.4f} few {result['reward_few']:.4f} | norm ratio "
          f"{result['norm_ratio']:.4f} | per t bin (0 -> 1): {profile}")
    return result


def train(cfg):
    """Run cfg; returns the final metrics dict (also written to out_dir/metrics.json). accelerate's state is
    process-wide: runs in one process must share mixed_precision."""
    check_config(cfg)
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from tqdm import tqdm

    path = resolve_model_path(cfg)  # before anything heavy: a wrong path fails in seconds
    train_prompts = read_prompts(cfg.train_prompts, cfg.preset)
    eval_prompts = read_prompts(cfg.eval_prompts, cfg.preset)
    out_dir = Path(cfg.out_dir)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, log_with=cfg.report_to or None,
                              project_config=ProjectConfiguration(project_dir=str(out_dir)),
                              step_scheduler_with_optimizer=False)
    device, main = accelerator.device, accelerator.is_main_process
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
    torch.manual_seed(cfg.seed)

    # model: the pipeline's own classes; LoRA through peft (diffusers' add_adapter) or full fine-tuning
    adapter = Adapter(cfg, path, device, weight_dtype)
    transformer = adapter.transformer
    frozen_copy = None
    if cfg.full_finetune:
        import copy

        frozen_copy = copy.deepcopy(transformer).to(device, weight_dtype).requires_grad_(False).eval()
        transformer.to(device, torch.float32).requires_grad_(True)
    else:
        from peft import LoraConfig

        transformer.to(device).requires_grad_(False)
        if weight_dtype != torch.float32:
            transformer.to(weight_dtype)
        transformer.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                                           target_modules=cfg.lora_targets.split(",")))
        for p in transformer.parameters():
            if p.requires_grad:  # LoRA weights train in float32 whatever the frozen weights' dtype
                p.data = p.data.float()
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    params = trainable_params(transformer)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    register_trainable_only_hooks(accelerator)
    model, opt, sched = accelerator.prepare(transformer, opt, sched)
    base = Base(accelerator.unwrap_model(model), frozen_copy)  # no-grad forwards skip the DDP wrapper
    old = None
    if cfg.method == "nft" or (cfg.method == "awm" and cfg.awm_ema_weight > 0):
        old = PolicyCopy(trainable_params(base.module))
    counter = Counter()
    accelerator.register_for_checkpointing(counter)
    if old is not None:
        accelerator.register_for_checkpointing(old)
    reward_fn = build_reward(cfg, adapter, device)

    # derived quantities and invariants, before step 1
    n_proc, per_proc = accelerator.num_processes, cfg.prompts_per_step * cfg.group_size
    sigmas = adapter.sigmas(cfg.sample_steps)
    n_t = 1 if cfg.method == "dpo" else len(train_timestep_plan(cfg, sigmas, torch.Generator().manual_seed(0)))
    n_train = cfg.prompts_per_step if cfg.method == "dpo" else per_proc
    n_micro = math.ceil(n_train / cfg.train_batch_size)
    assert per_proc % cfg.group_size == 0 and len(sigmas) == cfg.sample_steps + 1 and float(sigmas[-1]) == 0.0
    assert len(params) > 0 and all(p.dtype == torch.float32 for p in params)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "eval").mkdir(exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "command": sys.argv,
                                                         "git_revision": git_revision(), "model_path": path}, indent=1))
        print(f"device {device} x {n_proc} process(es) | {cfg.mixed_precision} | preset {cfg.preset} | latents "
              f"{tuple(adapter.latent_shape)} | trainable {sum(p.numel() for p in params) / 1e6:.3f} M "
              f"({'full' if cfg.full_finetune else f'LoRA r={cfg.lora_rank}'}) | {cfg.method}, guard "
              f"{'on: lam ' + str(cfg.lam) + ', ' + cfg.margin if cfg.guard else 'off'}\n"
              f"per step: {cfg.prompts_per_step} prompts x {cfg.group_size} = {per_proc} rollouts per process, "
              f"{per_proc * n_proc} in all | {cfg.sample_steps} sampler steps, sigmas "
              f"{[round(s, 3) for s in sigmas.tolist()]} | {n_t} train timestep(s) x {n_micro} micro-batch(es) of "
              f"<= {cfg.train_batch_size} {'pairs' if cfg.method == 'dpo' else 'samples'} accumulated into 1 "
              f"optimiser step | {cfg.steps} steps")
    if cfg.report_to:
        accelerator.init_trackers("normguard", config={k: v for k, v in dataclasses.asdict(cfg).items()})

    ckpt_root = out_dir / "checkpoints"
    if cfg.resume:
        found = sorted(complete_checkpoints(ckpt_root)) if cfg.resume == "latest" else [Path(cfg.resume)]
        if not found or not (found[-1] / "COMPLETE").is_file():
            raise ValueError(f"resume: expected 'latest' with a complete checkpoint under {ckpt_root} or a checkpoint "
                             f"folder holding COMPLETE, got {cfg.resume!r}")
        accelerator.load_state(str(found[-1]))
        if main:
            print(f"resumed from {found[-1]} at step {counter.step}")
    last_good = max(complete_checkpoints(ckpt_root), default=None) if main else None

    # a fresh run starts its logs anew; a resumed one appends to them
    log = open(out_dir / "log.jsonl", "a" if counter.step else "w") if main else None
    evals, stats_log = [], {}
    if main and not counter.step:
        (out_dir / "evals.jsonl").write_text("")

    def run_eval(step):
        model.eval()
        ev = {"step": step, **evaluate(cfg, adapter, base, reward_fn, eval_prompts, step, out_dir, accelerator)}
        evals.append(ev)
        accelerator.log({f"eval/{k}": v for k, v in ev.items() if k != "profile"}, step=step)
        with open(out_dir / "evals.jsonl", "a") as f:
            f.write(json.dumps(ev) + "\n")

    if main and not counter.step:  # the reference itself: the baseline every later eval is read against
        run_eval(0)
    bar = tqdm(range(counter.step, cfg.steps), initial=counter.step, total=cfg.steps, disable=not main, desc="train")
    for step in bar:
        t0 = time.time()
        rank = accelerator.process_index
        gen = step_generator(cfg, step, rank, 0)
        idx = torch.randint(len(train_prompts), (cfg.prompts_per_step,), generator=gen)
        prompts = [train_prompts[i] for i in idx.tolist() for _ in range(cfg.group_size)]
        noise = torch.randn(per_proc, *adapter.latent_shape, generator=gen).to(device)

        # on-policy rollouts and rewards (no grad); groups are contiguous per process
        model.eval()
        x0s, conds, rewards = [], [], []
        with torch.no_grad(), accelerator.autocast():
            for i in range(0, per_proc, cfg.train_batch_size):
                cond = adapter.encode(prompts[i:i + cfg.train_batch_size])
                null = adapter.null_cond(len(prompts[i:i + cfg.train_batch_size])) if cfg.cfg_scale != 1 else None
                x0 = rollout(adapter, base.module, cond, noise[i:i + cfg.train_batch_size], sigmas, cfg.cfg_scale, null)
                x0s.append(x0.float())
                conds.append(cond)
                rewards.append(reward_fn(adapter.decode(x0), prompts[i:i + cfg.train_batch_size]).float())
        x0, rewards = torch.cat(x0s), torch.cat(rewards)
        cond_all = {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
        all_rewards = accelerator.gather(rewards)
        if not bool(torch.isfinite(all_rewards).all()):
            raise NonFiniteLoss(f"step {step + 1}: the reward returned NaN/Inf; stopped, last good checkpoint: "
                                f"{last_good}")
        adv = ng.group_advantages(all_rewards, cfg.group_size)[rank * per_proc:(rank + 1) * per_proc].to(device)

        # the update: base loss + guard, accumulated over train timesteps and micro-batches, one optimiser step
        model.train()
        tgen = step_generator(cfg, step, rank, 1)
        plan = train_timestep_plan(cfg, sigmas, tgen)
        if cfg.method == "dpo":
            g = rewards.view(cfg.prompts_per_step, cfg.group_size)
            base_idx = torch.arange(cfg.prompts_per_step, device=device) * cfg.group_size
            win, lose = base_idx + g.argmax(1), base_idx + g.argmin(1)
            items = [(win[i:i + cfg.train_batch_size], lose[i:i + cfg.train_batch_size])
                     for i in range(0, cfg.prompts_per_step, cfg.train_batch_size)]
            plan = [None]
        else:
            items = [torch.arange(i, min(i + cfg.train_batch_size, per_proc), device=device)
                     for i in range(0, per_proc, cfg.train_batch_size)]
        n_back, done, sums, bad = len(items) * len(plan), 0, {}, ""
        for t_value in plan:
            for item in items:
                done += 1
                if cfg.method == "dpo":
                    w, l = item
                    c = {k: torch.cat([v[w], v[w]]) for k, v in cond_all.items() if k != "labels"}
                    args = dict(x0=x0[w], cond=c, adv=None, pairs=(x0[w], x0[l]))
                else:
                    c = {k: v[item] for k, v in cond_all.items() if k != "labels"}
                    args = dict(x0=x0[item], cond=c, adv=adv[item])
                sync = contextlib.nullcontext() if done == n_back else accelerator.no_sync(model)
                with sync, accelerator.autocast():
                    try:
                        loss, st = micro_batch_loss(cfg, adapter, model, base, old, t_value=t_value, gen=tgen, **args)
                        if not bool(torch.isfinite(loss)):
                            bad = bad or f"loss is {loss.item()}"
                    except ValueError as e:  # normguard's input checks name a NaN/Inf velocity or target
                        if "finite" not in str(e):
                            raise
                        loss, st, bad = sum(p.sum() for p in params) * 0, {}, bad or str(e)
                    # every process still runs backward: a process that stopped alone would hang the others' all-reduce
                    accelerator.backward(loss / n_back)
                for k, v in {"loss": loss.detach(), **st}.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / n_back
        if accelerator.reduce(torch.tensor([float(bool(bad))], device=device), "sum").item() > 0:
            raise NonFiniteLoss(f"step {step + 1}: {bad or 'non-finite loss on another process'}; stopped before the "
                                f"update, last good checkpoint: {last_good}")
        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if old is not None:  # NFT's old policy / AWM's EMA: decay = min(rate * step, max), once per rollout batch
            old.update(min(cfg.ema_decay_rate * step, 0.5 if cfg.method == "nft" else 0.3))
        counter.step = step + 1

        # one log line per step (process-averaged where it matters: the reward)
        line = {"step": step + 1, "reward_mean": all_rewards.mean().item(), "reward_std": all_rewards.std().item(),
                **{k: v for k, v in sums.items()}, "grad_norm": float(grad_norm), "lr": sched.get_last_lr()[0],
                "step_time": time.time() - t0}
        stats_log = line
        if main:
            extra = " ".join(f"{k} {v:.4g}" for k, v in sums.items()
                             if k not in ("loss", "norm_ratio", "active_frac", "hinge"))
            tqdm.write(f"step {step + 1:6d} | reward {line['reward_mean']:.4f} +- {line['reward_std']:.4f} | loss "
                       f"{line['loss']:.5f} ({extra}) | hinge {line['hinge']:.3g} active {line['active_frac']:.3f} | "
                       f"norm ratio {line['norm_ratio']:.4f} | {line['step_time']:.2f} s")
            log.write(json.dumps(line) + "\n")
            log.flush()
        accelerator.log(line, step=step + 1)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            last_good = save_checkpoint(accelerator, ckpt_root, step + 1, cfg.checkpoints_keep)
        if main and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            run_eval(step + 1)
        accelerator.wait_for_everyone()

    metrics = {"steps": counter.step, "last_step": stats_log, "eval": evals[-1] if evals else None}
    if main:
        export_lora(cfg, adapter, base.module, out_dir)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        log.close()
    accelerator.end_training()
    return metrics


def export_lora(cfg, adapter, transformer, out_dir):
    """The LoRA in diffusers' format: `pipe.load_lora_weights(out_dir / "lora")` (full fine-tuning: the transformer)."""
    if cfg.full_finetune:
        transformer.save_pretrained(str(out_dir / "transformer"))
        return
    from peft.utils import get_peft_model_state_dict

    layers = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(transformer).items()}
    if adapter.pipe is None:
        from diffusers import StableDiffusion3Pipeline as cls  # digits: the SD3 format, loadable into its transformer
    else:
        cls = type(adapter.pipe)
    cls.save_lora_weights(str(out_dir / "lora"), transformer_lora_layers=layers,  # rank and alpha travel along
                          transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())


def main(argv=None):
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        metrics = train(cfg)
    except NonFiniteLoss as e:
        sys.exit(f"stopped: {e}")
    return metrics


if __name__ == "__main__":
    main()
