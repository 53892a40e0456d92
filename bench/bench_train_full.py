"""What NormGuard costs inside train_full.py: step time, peak memory and network forwards, guard off vs on.

    python bench/bench_train_full.py                 # CPU: the SD3.5-Medium block design at reduced size (~2 min)
    python bench/bench_train_full.py --full          # GPU: the full SD3.5-Medium transformer at 512 px, bf16
    python bench/bench_train_full.py --smoke         # seconds, for tests

The transformer is diffusers' SD3Transformer2DModel built from SD3.5-Medium's published config (24 joint blocks,
24 heads x 64, dual attention in blocks 0-12, RMS qk-norm, T5 width 4096, pooled 2048) with random weights: no
download, and speed and memory do not depend on the weight values. A LoRA (r=32, alpha=64, attention projections)
is trained as train_full.py trains it: one call of train_full.sample_loss (DPO: pair_loss), the script's own code
path (policy forward with grad, the no-grad reference forward with the adapter disabled, NFT's old / AWM's EMA
forward, the base loss from normguard.py and, when on, ng.normguard_penalty), then backward, per timed step, in
bf16 autocast with gradient checkpointing. Reported per method: forwards per step (counted by a hook: exact),
and the ratios guard-on / guard-off of the median step time, of the activations saved for backward (counted by a
saved-tensors hook: exact on any device) and, on CUDA, of the step's peak allocated memory (max_memory_allocated).
Each setting runs in a fresh subprocess, so allocator state does not carry over.
The goal it checks: every base loss already evaluates v_ref at the training points, so the guard adds no forward
and no activation memory beyond a few per-sample norms.
"""

import dataclasses
import functools
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the scripts live in the repo root
import cli  # noqa: E402
import train_full as tf  # noqa: E402

SD35_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)


@dataclass
class Config:
    num_layers: int = 2  # SD3.5-M has 24 (--full); dual attention stays on the first 13 of them
    resolution: int = 128  # pixels; latents are resolution / 8, tokens (resolution / 16)^2 (512 px: 1024 tokens)
    text_tokens: int = 77  # CLIP 77 + T5 tokens (train_full's default max_sequence_length 256: 333)
    batch: int = 2  # samples per micro-batch (DPO: pairs, i.e. 2x samples per forward)
    repeats: int = 3  # timed steps per setting (after one warm-up step); the median is reported
    methods: str = "nft,awm,dpo"
    lora_rank: int = 32
    heads: int = 24  # attention heads of 64 dims (SD3.5-M: 24, hidden width 1536); --smoke: 2
    text_dim: int = 4096  # T5 width of encoder_hidden_states (SD3.5-M: 4096); --smoke: 64
    pooled_dim: int = 2048  # pooled CLIP width (SD3.5-M: 2048); --smoke: 64
    pos_embed_max_size: int = 384  # SD3.5-M's; the model uses only a cropped window, so smaller only saves memory
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    threads: int = 2  # CPU intra-op threads
    out: str = "runs/bench_train_full.json"
    child: str = ""  # internal: "method:on|off" measures that one setting in this (fresh) process


FULL = dict(num_layers=24, resolution=512, text_tokens=333, batch=4, repeats=10)
SMOKE = dict(
    heads=2,
    text_dim=64,
    pooled_dim=64,
    num_layers=1,
    resolution=32,
    text_tokens=8,
    batch=1,
    repeats=1,
    lora_rank=4,
    pos_embed_max_size=16,
)


FLAGS = {"full": "the full SD3.5-Medium transformer at 512 px (GPU)", "smoke": "tiny sizes, seconds, for tests"}


def parse_args(argv):
    """(Config, child setting or "") from `--key=value` overrides on top of --full or --smoke."""
    (overrides,), flags = cli.parse(argv, [Config], flags=FLAGS, doc=__doc__)
    preset = FULL if "full" in flags else SMOKE if "smoke" in flags else {}
    cfg = Config(**{**preset, **overrides})
    cli.checked(check_config, cfg)
    return cfg, cfg.child


def check_config(cfg):
    if cfg.resolution % 16 or cfg.num_layers < 1 or cfg.batch < 1 or cfg.repeats < 1:
        raise ValueError(f"resolution: expected a multiple of 16, num_layers/batch/repeats >= 1; got {cfg}")
    for m in cfg.methods.split(","):
        if m not in tf.METHODS:
            raise ValueError(f"methods: expected a comma-separated subset of {tf.METHODS}, got {cfg.methods!r}")


class BenchAdapter(tf.SD3Adapter):
    """train_full's SD3 adapter without a pipeline: only velocity() is used, and it needs only the config."""

    def __init__(self, cfg):
        self.cfg = cfg


def build(cfg, device):
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig

    arch = {
        **SD35_MEDIUM,
        "num_layers": cfg.num_layers,
        "pos_embed_max_size": cfg.pos_embed_max_size,
        "dual_attention_layers": tuple(i for i in SD35_MEDIUM["dual_attention_layers"] if i < cfg.num_layers),
        "num_attention_heads": cfg.heads,
        "caption_projection_dim": cfg.heads * SD35_MEDIUM["attention_head_dim"],
        "joint_attention_dim": cfg.text_dim,
        "pooled_projection_dim": cfg.pooled_dim,
    }
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16: an fp32 copy first would dominate the CPU peak RSS
    try:
        with torch.device(device):
            model = SD3Transformer2DModel(**arch)
    finally:
        torch.set_default_dtype(default)
    model.requires_grad_(False)
    model.add_adapter(
        LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=2 * cfg.lora_rank,
            init_lora_weights="gaussian",
            target_modules=tf.Config.lora_targets.split(","),
        )
    )
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.enable_gradient_checkpointing()
    return model


def measure(cfg, method, guard):
    """One setting: forwards per step, median step time (s), peak step memory (bytes)."""
    device = torch.device(cfg.device)
    torch.set_num_threads(cfg.threads)
    model = build(cfg, device)
    forwards = {"grad": 0, "no_grad": 0}

    def count(module, args):
        key = "grad" if torch.is_grad_enabled() else "no_grad"
        forwards[key] += 1

    model.register_forward_pre_hook(count)
    tcfg = tf.Config(preset="sd3", method=method, guard=guard, pretrained_model_name_or_path="-")
    adapter, base = BenchAdapter(tcfg), tf.Base(model)
    old = tf.PolicyCopy(tf.trainable_params(model)) if method in ("nft", "awm") else None
    opt = torch.optim.AdamW(tf.trainable_params(model), lr=1e-4)
    side, b = cfg.resolution // 8, cfg.batch
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2 * b if method == "dpo" else b, 16, side, side, generator=gen).to(device)
    n = len(x0)
    cond = {
        "encoder_hidden_states": torch.randn(n, cfg.text_tokens, cfg.text_dim, generator=gen).to(
            device, torch.bfloat16
        ),
        "pooled_projections": torch.randn(n, cfg.pooled_dim, generator=gen).to(device, torch.bfloat16),
    }
    adv = torch.randn(b, generator=gen).to(device)

    saved = {}

    def pack(x):  # activations kept for backward, counted once per storage: the memory the guard could add
        saved[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    if method == "dpo":
        loss_fn = functools.partial(tf.pair_loss, x_w=x0[:b], x_l=x0[b:], cond=cond)
    else:
        loss_fn = functools.partial(tf.sample_loss, x0=x0, cond=cond, adv=adv, t_value=torch.tensor(0.7))

    def step():
        saved.clear()
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x)
        with torch.autocast(device.type, dtype=torch.bfloat16), hooks:
            loss, _ = loss_fn(tcfg, adapter, model, base, old, gen)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, kernels, Adam state
    forwards.update(grad=0, no_grad=0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    times = []
    for _ in range(cfg.repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() - before if device.type == "cuda" else None
    return {
        "method": method,
        "guard": guard,
        "forwards_per_step": {k: v / cfg.repeats for k, v in forwards.items()},
        "step_time_s": statistics.median(times),
        "peak_step_memory_bytes": peak,
        "saved_for_backward_bytes": sum(saved.values()),
    }


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg, child = parse_args(argv)
    if child:
        method, guard = child.split(":")
        print(json.dumps(measure(cfg, method, guard == "on")))
        return None
    name = torch.cuda.get_device_name() if cfg.device == "cuda" else f"CPU, {cfg.threads} thread(s)"
    print(
        f"SD3.5-Medium transformer design, {cfg.num_layers} of 24 blocks, {cfg.heads} of 24 heads | {cfg.resolution} "
        f"px ({(cfg.resolution // 16) ** 2} image + {cfg.text_tokens} text tokens) | micro-batch {cfg.batch} | LoRA "
        f"r={cfg.lora_rank} | bf16 autocast, gradient checkpointing | {name} | median of {cfg.repeats} steps"
    )
    rows = []
    for method in cfg.methods.split(","):
        res = {}
        for guard in ("off", "on"):  # a fresh process per setting: clean peak memory, no allocator carry-over
            out = (
                subprocess.run(
                    [sys.executable, __file__, *argv, f"--child={method}:{guard}"],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            res[guard] = json.loads(out)
        off, on = res["off"], res["on"]
        row = {
            "method": method,
            "forwards_off": off["forwards_per_step"],
            "forwards_on": on["forwards_per_step"],
            "time_ratio": on["step_time_s"] / off["step_time_s"],
            "step_time_off_s": off["step_time_s"],
            "saved_ratio": on["saved_for_backward_bytes"] / off["saved_for_backward_bytes"],
            "saved_off_mib": off["saved_for_backward_bytes"] / 2**20,
        }
        if off["peak_step_memory_bytes"] is not None:
            row["memory_ratio"] = on["peak_step_memory_bytes"] / off["peak_step_memory_bytes"]
            row["peak_step_memory_off_mib"] = off["peak_step_memory_bytes"] / 2**20
        rows.append(row)
        fw = lambda d: f"{d['grad']:g} + {d['no_grad']:g}"
        peak = (
            f" | peak step memory on/off {row['memory_ratio']:.3f} (off {row['peak_step_memory_off_mib']:.0f} MiB)"
            if "memory_ratio" in row
            else ""
        )
        print(
            f"{method:>4} | forwards (grad + no-grad) off {fw(row['forwards_off'])}, on {fw(row['forwards_on'])} | "
            f"step time on/off {row['time_ratio']:.3f} (off {row['step_time_off_s']:.2f} s) | saved for backward "
            f"on/off {row['saved_ratio']:.4f} (off {row['saved_off_mib']:.1f} MiB){peak}"
        )
    result = {"config": dataclasses.asdict(cfg), "device": name, "rows": rows}
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    cli.run(main)
