"""Model families of train_full.py: one adapter per family (SD3 the base, FLUX overriding what differs) in a
registry that another file extends with register_adapter (experiments/digits_testbed.py registers its 8x8 testbed
from its own file).

An adapter loads the pipeline, encodes prompts, gives the velocity v(x_t, t, c) in normguard's convention (t in
[0, 1], t = 1 noise, v = eps - x0), decodes latents and builds the sampler's sigmas; nothing else in the trainer
knows which family runs.
"""

import contextlib
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

import normguard as ng


@dataclass
class Family:
    adapter: type  # SD3Adapter or a subclass
    defaults: dict  # Config values of the preset (the command line overrides them)
    smoke_sizes: dict  # Config values --smoke adds on top of SMOKE (the sizes the family needs)
    prompts: list  # the built-in prompts when no prompt file is given


ADAPTERS = {}  # preset name -> Family


def register_adapter(name, cls, preset_defaults=None, smoke_sizes=None, default_prompts=()):
    """Make `--preset=name` load `cls` with these Config defaults. A second registration of a name replaces the
    first (a script run as __main__ and also imported by name registers twice)."""
    ADAPTERS[name] = Family(cls, dict(preset_defaults or {}), dict(smoke_sizes or {}), list(default_prompts))


def registered(preset):
    if preset in ADAPTERS:
        return ADAPTERS[preset]
    # a testbed registers its preset from its own module, experiments/<preset>_testbed.py
    module = f"experiments.{preset}_testbed"
    script = Path(__file__).resolve().parents[1] / (module.replace(".", "/") + ".py")
    hint = f"; {module} registers it: run `python -m {module}` with the same arguments"
    raise ValueError(f"preset: expected one of {sorted(ADAPTERS)}, got {preset!r}{hint if script.is_file() else ''}")


class SD3Adapter:
    """One model family: load, encode prompts, velocity v(x_t, t, c) in the ng convention, decode, sigmas.

    Latents x are always (B, C, H, W) (FLUX's are packed into 2x2 tokens only inside velocity), so the norms, the
    forward process and the Euler sampler of normguard.py see one layout for every family.
    """

    model_file = "model_index.json"  # what a model folder or hub repo of this family holds
    guidance = None

    pipeline_name = "StableDiffusion3Pipeline"  # model_index.json's _class_name of this family's folders

    @classmethod
    def pipeline_class(cls):
        import diffusers

        return getattr(diffusers, cls.pipeline_name)

    @classmethod
    def check(cls, cfg):
        """The config alone (no file read): a ValueError naming the key."""
        if not cfg.pretrained_model_name_or_path:
            raise ValueError(f"pretrained_model_name_or_path: required for the {cfg.preset} preset: {PATH_HINT}")
        if cfg.max_sequence_length > 512:  # the pipelines' own limit on T5 tokens
            raise ValueError(f"max_sequence_length: expected an int in 1..512, got {cfg.max_sequence_length}")

    @classmethod
    def resolve_path(cls, cfg):
        """A local folder as given, or a hub id that answers within seconds; else a ValueError saying what to pass."""
        path = cfg.pretrained_model_name_or_path
        model_file("pretrained_model_name_or_path", path, cls.model_file, PATH_HINT)
        return path

    @classmethod
    def check_model(cls, cfg, path):
        """Before any weight loads, from the folder's small json files: it holds this family's pipeline, resolution
        fits its VAE, and each of lora_targets names modules of its transformer (built on the meta device)."""
        index = optional_file(path, "model_index.json")
        found = json.loads(Path(index).read_text()).get("_class_name") if index else None
        if found and found != cls.pipeline_name:
            presets = [n for n, f in ADAPTERS.items() if f.adapter.pipeline_name == found]
            hint = f"; pass --preset={presets[0]}" if presets else ""
            raise ValueError(f"preset: {cfg.preset} loads a {cls.pipeline_name}, {path} holds a {found}{hint}")
        vae = optional_file(path, "vae/config.json")
        if vae:
            vsf = 2 ** (len(json.loads(Path(vae).read_text())["block_out_channels"]) - 1)  # the pipelines' own rule
            if cfg.resolution % (vsf * 2):
                raise ValueError(
                    f"resolution: expected a multiple of {vsf * 2} (VAE x 2x2 patches), got {cfg.resolution}"
                )
        transformer = optional_file(path, "transformer/config.json")
        if transformer and not cfg.full_finetune:
            check_lora_targets(cfg.lora_targets, Path(transformer).read_text())

    def __init__(self, cfg, path, device, weight_dtype):
        self.cfg, self.device, self.dtype = cfg, device, weight_dtype
        self.pipe = self.pipeline_class().from_pretrained(path, dtype=weight_dtype)
        for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            if getattr(self.pipe, name, None) is not None:
                getattr(self.pipe, name).to(device).requires_grad_(False)
        self.transformer = self.pipe.transformer
        self.pipe.set_progress_bar_config(disable=True)
        vsf = self.pipe.vae_scale_factor  # resolution is a multiple of 2 vsf: check_model
        self.latent_shape = (self.transformer.config.in_channels, cfg.resolution // vsf, cfg.resolution // vsf)

    def encode(self, prompts):
        """prompts: list of str -> conditioning dict of batched tensors (the pipeline's own encoders)."""
        kw = dict(
            device=self.device, do_classifier_free_guidance=False, max_sequence_length=self.cfg.max_sequence_length
        )
        with torch.no_grad():
            emb, _, pooled, _ = self.pipe.encode_prompt(prompts, None, None, **kw)
        return {"encoder_hidden_states": emb, "pooled_projections": pooled}

    def null_cond(self, n):
        """The unconditional "prompt" for CFG: the empty string."""
        return self.encode([""] * n)

    def velocity(self, model, x, t, cond):
        """v_theta(x_t, t, c): x (B, C, H, W), t (B,) in [0, 1] -> (B, C, H, W) in x's dtype."""
        kw = {k: cond[k] for k in ("encoder_hidden_states", "pooled_projections")}
        return model(hidden_states=x, timestep=ng.TIMESTEP_SCALE * t, return_dict=False, **kw)[0]

    def sigmas(self, num_steps):
        """(K + 1,) sampling grid 1 -> 0 as the model's pipeline builds it (SD3: static shift; FLUX: dynamic mu)."""
        sched, kw = self.pipe.scheduler, {}
        if sched.config.get("use_dynamic_shifting", False):
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            c, seq = sched.config, (self.latent_shape[1] // 2) * (self.latent_shape[2] // 2)
            lens, shifts = (c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)), (0.5, 1.15)
            kw["mu"] = calculate_shift(seq, *lens, c.get("base_shift", shifts[0]), c.get("max_shift", shifts[1]))
        self.set_timesteps(sched, num_steps, kw)
        return sched.sigmas.to(self.device, torch.float32)

    def set_timesteps(self, sched, num_steps, kw):
        sched.set_timesteps(num_steps, device="cpu", **kw)

    def decode(self, x):
        """Latents -> images (B, 3 or 1, H, W) in [-1, 1]."""
        vae = self.pipe.vae
        x = x / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return vae.decode(x.to(vae.dtype), return_dict=False)[0].float().clamp(-1, 1)

    def image_metrics(self, images, prompts):
        """Extra eval metrics of decoded images (B, C, H, W) for their prompts: {name: float}; none here."""
        return {}


class FluxAdapter(SD3Adapter):
    """FLUX.1: latents packed into 2x2 tokens with position ids, the timestep scaled inside the model, embedded
    guidance, sigmas passed explicitly with a resolution-dependent shift."""

    pipeline_name = "FluxPipeline"

    def __init__(self, cfg, path, device, weight_dtype):
        super().__init__(cfg, path, device, weight_dtype)
        side = self.latent_shape[1]
        self.latent_shape = (self.transformer.config.in_channels // 4, side, side)  # in_channels counts 2x2 packs
        self.img_ids = self.pipe._prepare_latent_image_ids(1, side // 2, side // 2, device, weight_dtype)
        if self.transformer.config.guidance_embeds:
            self.guidance = torch.tensor([cfg.flux_guidance], device=device)

    def encode(self, prompts):
        with torch.no_grad():
            emb, pooled, txt_ids = self.pipe.encode_prompt(
                prompts, None, device=self.device, max_sequence_length=self.cfg.max_sequence_length
            )
        self.txt_ids = txt_ids  # (L, 3), the same for every prompt
        return {"encoder_hidden_states": emb, "pooled_projections": pooled}

    def velocity(self, model, x, t, cond):
        b, c, h, w = x.shape
        packed, vsf = self.pipe._pack_latents(x, b, c, h, w), self.pipe.vae_scale_factor
        ids = dict(guidance=self.guidance.expand(b) if self.guidance is not None else None, txt_ids=self.txt_ids)
        kw = {k: cond[k] for k in ("encoder_hidden_states", "pooled_projections")}
        # FluxTransformer2DModel multiplies timestep (and guidance) by 1000 itself, so it takes t, not 1000·t
        out = model(hidden_states=packed, timestep=t, img_ids=self.img_ids, return_dict=False, **ids, **kw)[0]
        return self.pipe._unpack_latents(out, h * vsf, w * vsf, vsf)

    def set_timesteps(self, sched, num_steps, kw):
        import numpy as np

        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), device="cpu", **kw)  # as FluxPipeline


def model_file(key, path, file, hint):
    """The local copy of `file` of the folder or hub repo `path` (downloaded with a 10 s timeout: a wrong id, a gated
    model or no network fails here, not after minutes); else a ValueError naming `key` and what to pass."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, file)):
            raise ValueError(f"{key}: {path} has no {file}; pass {hint}")
        return os.path.join(path, file)
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ValueError(f"{key}: no folder {path!r} and not a hub id (owner/name); pass {hint}")
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(path, file, etag_timeout=10)
    except Exception as e:
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        raise ValueError(
            f"{key}: cannot reach {path!r} ({why}); pass {hint}; gated models need `hf auth login`, offline runs "
            "(HF_HUB_OFFLINE=1) need the model in the local cache"
        ) from None


def optional_file(path, file):
    """`file` of the folder or hub repo `path` if it has one, else None."""
    try:
        return model_file("", path, file, "")
    except ValueError:
        return None


def check_lora_targets(targets, transformer_config):
    """Each comma-separated target names a module of the transformer whose config.json text is transformer_config
    (peft's rule: the module's name or its dotted suffix)."""
    class_name, names = module_names(transformer_config)
    missing = [t for t in targets.split(",") if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(f"lora_targets: {missing} name no module of the {class_name} (e.g. to_q, to_k, to_v)")


@functools.lru_cache(maxsize=8)
def module_names(config_text):
    """(class name, module names) of the diffusers model a config.json text describes, built on the meta device
    (no weight read or allocated). Kept per config text: the build takes ~0.2 s for SD3.5-Medium's 24 blocks, and
    both the command line and train() check a run before its model loads."""
    import diffusers

    config = json.loads(config_text)
    cls = getattr(diffusers, config["_class_name"])
    with torch.device("meta"):
        return cls.__name__, tuple(name for name, _ in cls.from_config(config).named_modules())


def export_lora(cfg, adapter, transformer, out_dir):
    """The LoRA in the family pipeline's format, rank and alpha included: `pipe.load_lora_weights(out_dir / "lora")`
    (full fine-tuning: the transformer's save_pretrained)."""
    if cfg.full_finetune:
        transformer.save_pretrained(str(out_dir / "transformer"))
        return
    from peft.utils import get_peft_model_state_dict

    layers = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(transformer).items()}
    meta = transformer.peft_config["default"].to_dict()
    adapter.pipeline_class().save_lora_weights(
        str(out_dir / "lora"), transformer_lora_layers=layers, transformer_lora_adapter_metadata=meta
    )


PATH_HINT = "a hub id (e.g. stabilityai/stable-diffusion-3.5-medium) or a folder written by pipeline.save_pretrained"
PROMPTS = ["a photo of a cat", "a red bicycle leaning on a wall", "a bowl of ramen, top view", "a lighthouse at dusk"]
TINY = dict(resolution=16, max_sequence_length=16)
register_adapter("sd3", SD3Adapter, dict(resolution=512), TINY, PROMPTS)
register_adapter("flux", FluxAdapter, dict(resolution=512, max_sequence_length=512), TINY, PROMPTS)


class Base:
    """The frozen reference: the same transformer with the LoRA adapter disabled (full fine-tuning: a frozen copy)."""

    def __init__(self, module, frozen_copy=None):
        self.module, self.frozen_copy = module, frozen_copy
        self.lora_layers = None  # found at the first reference(), after the adapter is added

    @contextlib.contextmanager
    def reference(self):
        if self.frozen_copy is not None:
            live, self.module = self.module, self.frozen_copy
            try:
                yield
            finally:
                self.module = live
            return
        # what diffusers' disable_adapters()/enable_adapters() do, on layers found once: they walk every module and
        # check peft's version at each call, which cost 2.4 ms per switch on the tests' 2-block SD3 and 16 ms on 24
        # blocks (a tiny model's forward is 5 ms), twice per reference forward
        if self.lora_layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self.lora_layers = [m for m in self.module.modules() if isinstance(m, BaseTunerLayer)]
            if not self.lora_layers:
                raise ValueError("Base: the module has no LoRA layer to switch off and no frozen copy")
        for layer in self.lora_layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in self.lora_layers:
                layer.enable_adapters(True)


def make_trainable(cfg, transformer, device, weight_dtype):
    """LoRA (float32 adapters on frozen weights of weight_dtype), or all weights in float32 plus a frozen copy for
    the reference, which is returned (None for LoRA: its reference is the adapter switched off)."""
    frozen_copy = None
    if cfg.full_finetune:
        import copy

        frozen_copy = copy.deepcopy(transformer).to(device, weight_dtype).requires_grad_(False).eval()
        transformer.to(device, torch.float32).requires_grad_(True)
    else:
        from peft import LoraConfig

        transformer.to(device).requires_grad_(False)
        if transformer.dtype != weight_dtype:  # (loaded in it already: diffusers warns on a needless cast)
            transformer.to(weight_dtype)
        targets = cfg.lora_targets.split(",")
        lora = LoraConfig(
            r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian", target_modules=targets
        )
        transformer.add_adapter(lora)
        for p in transformer.parameters():
            if p.requires_grad:  # LoRA weights train in float32 whatever the frozen weights' dtype
                p.data = p.data.float()
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return frozen_copy
