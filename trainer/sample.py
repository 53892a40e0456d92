"""Images from a finished train_full run beside its reference: the LoRA's samples next to the frozen model's, from
the same noise, in one grid (what nanoGPT's sample.py is to its checkpoints).

    python -m trainer.sample --run=runs/sd35m_nft_guard           # the run's eval prompts, seeds and noise
    python -m trainer.sample --run=runs/sd35m_nft_guard --prompts=my_prompts.txt --seeds=4 --steps=28
    python -m trainer.sample --run=runs/train_full_smoke --preset_module=experiments.digits_testbed

It reads the run's config.json (preset, model, resolution, sampler sizes), loads the model as the trainer did, then
the exported LoRA with the pipeline's own `load_lora_weights` (full fine-tuning: the saved transformer), and samples
the policy and the reference (the LoRA switched off) with Euler steps on the model's sigmas, as the trainer's eval
does. With the run's defaults (its eval prompts, eval seeds and eval noise, sample_steps, cfg_scale, batch size)
the LoRA's images are those of the run's last eval. Writes <run>/samples.png (or --out): one row per prompt, its
reference images on the left, the LoRA's on the right, and prints the prompts in row order.
Imports only the trainer's parts (never train_full), so a run is read from its config.json alone.
"""

import contextlib
import functools
import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

import normguard as ng
from trainer import cli
from trainer.adapters import Base, registered
from trainer.evaluation import EVAL_SEED_OFFSET
from trainer.rollouts import guided_velocity


@dataclass
class Config:
    run: str = ""  # a finished train_full run: its out_dir (config.json, lora/ or, full fine-tuning, transformer/)
    prompts: str = ""  # a text file, one prompt per line; "" = the run's eval prompts
    seeds: int = 0  # images per prompt; 0 = the run's eval_seeds
    steps: int = 0  # Euler steps; 0 = the run's sample_steps
    cfg_scale: float = 0.0  # classifier-free guidance (1 = off); 0 = the run's cfg_scale
    seed: int = -1  # the noise's seed; -1 = the run's eval noise (its seed + 12345)
    out: str = ""  # the grid (PNG); "" = <run>/samples.png
    device: str = ""  # "" = cuda if available, else cpu
    preset_module: str = ""  # a module that registers the run's preset, if not built in (experiments.digits_testbed)


def parse_args(argv):
    """Config from the command line (keys and values; the run's folder is read by load_run)."""
    (overrides,), _ = cli.parse(argv, [Config], doc=__doc__)
    cfg = Config(**overrides)
    for key in ("seeds", "steps", "cfg_scale"):
        if getattr(cfg, key) < 0:
            raise cli.UsageError(f"--{key}: expected >= 0 (0: the run's own), got {getattr(cfg, key)}")
    return cfg


def load_run(cfg):
    """(the run's config as a namespace, its model path, the trained weights' folder, prompts)."""
    if not (Path(cfg.run) / "config.json").is_file():
        raise cli.UsageError(f"--run: expected a finished train_full run's out_dir (its config.json), got {cfg.run!r}")
    saved = json.loads((Path(cfg.run) / "config.json").read_text())
    run_cfg = SimpleNamespace(**saved["config"])
    if cfg.preset_module:
        try:
            importlib.import_module(cfg.preset_module)  # it registers its preset (register_adapter)
        except ImportError as e:
            raise cli.UsageError(f"--preset_module: cannot import {cfg.preset_module!r} ({e})") from None
    family = cli.checked(registered, run_cfg.preset)
    weights = Path(cfg.run) / ("transformer" if run_cfg.full_finetune else "lora")
    if not weights.is_dir():
        raise cli.UsageError(f"--run: {cfg.run} has no {weights.name}/ (a run writes it when it finishes)")
    path = saved.get("model_path") or run_cfg.pretrained_model_name_or_path
    prompts_file = cfg.prompts or run_cfg.eval_prompts
    if prompts_file:
        if not Path(prompts_file).is_file():
            raise cli.UsageError(f"--prompts: expected a text file with one prompt per line, got {prompts_file!r}")
        prompts = [line.strip() for line in Path(prompts_file).read_text().splitlines() if line.strip()]
    else:
        prompts = list(family.prompts)
    return run_cfg, path, weights, prompts


@torch.no_grad()
def sample(adapter, model, prompts, noise, steps, cfg_scale, batch_size, autocast):
    """Images (N, C, H, W) in [-1, 1] on the CPU: Euler steps on the model's sigmas of model's velocity (with
    classifier-free guidance cfg_scale), from noise (N, *latent_shape), prompts[i] conditioning row i."""
    sigmas, images = adapter.sigmas(steps), []
    for i in range(0, len(prompts), batch_size):
        part = prompts[i : i + batch_size]
        cond = adapter.encode(part)
        null = adapter.null_cond(len(part)) if cfg_scale != 1 else None
        velocity = functools.partial(guided_velocity, adapter, model, cond=cond, null=null, cfg_scale=cfg_scale)
        with autocast():
            x0 = ng.euler_sample(velocity, noise[i : i + batch_size], sigmas.to(noise.dtype))
        images.append(adapter.decode(x0).cpu())
    return torch.cat(images)


def load_trained(adapter, weights, device, dtype):
    """(policy, reference, a context in which `reference` is the frozen model): the transformer with the run's LoRA
    loaded, itself again and the LoRA switched off; for a full fine-tuning run, the saved transformer and the
    original one."""
    if weights.name == "transformer":
        policy = type(adapter.transformer).from_pretrained(str(weights), dtype=dtype).to(device).eval()
        return policy, adapter.transformer.to(device).eval(), contextlib.nullcontext
    if getattr(adapter, "pipe", None) is not None:
        adapter.pipe.load_lora_weights(str(weights))  # what a user of the LoRA calls
    else:  # a family without a diffusers pipeline (the digits testbed): the transformer's own loader
        adapter.transformer.load_lora_adapter(
            str(weights), weight_name="pytorch_lora_weights.safetensors", prefix="transformer"
        )
    model = adapter.transformer.to(device).eval()
    return model, model, Base(model).reference


def draw(cfg):
    """(reference images, LoRA images, prompts per row, seeds per prompt), each (N, C, H, W) in [-1, 1]."""
    run_cfg, path, weights, prompts = load_run(cfg)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[run_cfg.mixed_precision]
    autocast = contextlib.nullcontext
    if run_cfg.mixed_precision != "no":
        autocast = lambda: torch.autocast(device.type, dtype=dtype)
    adapter = registered(run_cfg.preset).adapter(run_cfg, path, device, dtype)
    policy, reference, switched_off = load_trained(adapter, weights, device, dtype)
    seeds = cfg.seeds or run_cfg.eval_seeds
    rows = [p for p in prompts for _ in range(seeds)]  # as the trainer's eval orders them
    seed = run_cfg.seed + EVAL_SEED_OFFSET if cfg.seed < 0 else cfg.seed
    noise = torch.randn(len(rows), *adapter.latent_shape, generator=torch.Generator().manual_seed(seed)).to(device)
    kw = dict(steps=cfg.steps or run_cfg.sample_steps, cfg_scale=cfg.cfg_scale or run_cfg.cfg_scale)
    kw.update(batch_size=run_cfg.train_batch_size, autocast=autocast)
    trained = sample(adapter, policy, rows, noise, **kw)
    with switched_off():
        frozen = sample(adapter, reference, rows, noise, **kw)
    return frozen, trained, prompts, seeds


def side_by_side(frozen, trained, seeds):
    """One row per prompt: its `seeds` reference images, then its `seeds` LoRA images; (N', C, H, W) in [0, 1]."""
    pairs = [torch.cat([f, t]) for f, t in zip(frozen.split(seeds), trained.split(seeds))]
    return (torch.cat(pairs) + 1) / 2


def how_to_load(cfg, adapter, out_dir):
    """The line a run ends with: where its LoRA (full fine-tuning: its transformer) went, how to load it, and the
    command that samples it beside the reference."""
    command = f"python -m trainer.sample --run={out_dir}"
    module = type(adapter).__module__
    if module == "__main__":  # a family registered by the script that was run (python -m experiments.x)
        module = getattr(sys.modules["__main__"].__spec__, "name", "") or ""
    if cfg.preset not in ("sd3", "flux") and module:
        command += f" --preset_module={module}"
    if cfg.full_finetune:
        folder = Path(out_dir) / "transformer"
        how = f"{type(adapter.transformer).__name__}.from_pretrained('{folder}')"
    elif getattr(adapter, "pipe", None) is not None:
        folder = Path(out_dir) / "lora"
        how = f"pipe = {adapter.pipeline_name}.from_pretrained(...); pipe.load_lora_weights('{folder}')"
    else:
        folder = Path(out_dir) / "lora"
        how = f"transformer.load_lora_adapter('{folder}', prefix='transformer')"
    return f"trained weights: {folder} | load them: {how} | images beside the reference: {command}"


def main(argv=None):
    from torchvision.utils import save_image

    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    frozen, trained, prompts, seeds = cli.checked(draw, cfg)
    out = Path(cfg.out or Path(cfg.run) / "samples.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(side_by_side(frozen, trained, seeds), out, nrow=2 * seeds)
    print(f"wrote {out}: one row per prompt, {seeds} reference image(s) on the left, the LoRA's on the right")
    for i, prompt in enumerate(prompts):
        print(f"  row {i + 1}: {prompt}")
    return out


if __name__ == "__main__":
    cli.run(main)
