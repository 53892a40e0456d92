"""What NormGuard costs inside train_full.py: step time, peak memory and network forwards, guard off vs on.

    python bench/bench_train_full.py                 # CPU: the SD3.5-Medium block design at reduced size (~2 min)
    python bench/bench_train_full.py --full          # GPU: the full SD3.5-Medium transformer at 512 px, bf16
    python bench/bench_train_full.py --smoke         # seconds, for tests
    python bench/bench_train_full.py --full --model_path=<pipeline folder>   # its transformer, by from_pretrained

The transformer is diffusers' SD3Transformer2DModel built from SD3.5-Medium's published config (24 joint blocks,
24 heads x 64, dual attention in blocks 0-12, RMS qk-norm, T5 width 4096, pooled 2048) with random weights: no
download, and speed and memory do not depend on the weight values (--model_path loads one from a folder instead).
A LoRA (r=32, alpha=64, attention projections) is put on it by train_full.make_trainable and trained as
train_full.py trains it: one call of train_full.sample_loss (DPO: pair_loss), the script's own code path (policy
forward with grad, the no-grad reference forward with the adapter disabled, NFT's old / AWM's EMA forward, the
base loss from normguard.py and, when on, ng.normguard_penalty), then backward and AdamW, per timed step, in bf16
autocast with gradient checkpointing. Reported per method: forwards per step (counted by a hook: exact), and the
ratios guard-on / guard-off of the median step time, of the activations saved for backward (counted by a
saved-tensors hook: exact on any device) and, on CUDA, of the step's peak allocated memory (max_memory_allocated);
and the ratio of that step to a bare step of the same model on the same batch (one forward with grad, the plain
flow-matching loss, backward, AdamW): what the method's extra forwards and loss cost over plain fine-tuning.
Each setting runs in a fresh subprocess, so allocator state does not carry over (--fresh_process=false: here).
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
import normguard as ng  # noqa: E402
import train_full as tf  # noqa: E402
from trainer import (
    adapters,  # noqa: E402
    cli,  # noqa: E402
)

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
    model_path: str = ""  # a pipeline folder (or a transformer folder) to load; "" = build from the sizes above
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    threads: int = 2  # CPU intra-op threads
    fresh_process: bool = True  # each setting in its own process (clean peak memory); false: in this one
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
    if cfg.model_path and not Path(cfg.model_path).is_dir():
        raise ValueError(f"model_path: expected a pipeline or transformer folder, got {cfg.model_path!r}")
    for m in cfg.methods.split(","):
        if m not in tf.METHODS:
            raise ValueError(f"methods: expected a comma-separated subset of {tf.METHODS}, got {cfg.methods!r}")


class BenchAdapter(adapters.SD3Adapter):
    """train_full's SD3 adapter without a pipeline: only velocity() is used, and it needs only the config."""

    def __init__(self, cfg):
        self.cfg = cfg


def architecture(cfg):
    """SD3Transformer2DModel's constructor arguments: SD3.5-Medium's, at cfg's blocks, heads and text widths."""
    return {
        **SD35_MEDIUM,
        "num_layers": cfg.num_layers,
        "pos_embed_max_size": cfg.pos_embed_max_size,
        "dual_attention_layers": tuple(i for i in SD35_MEDIUM["dual_attention_layers"] if i < cfg.num_layers),
        "num_attention_heads": cfg.heads,
        "caption_projection_dim": cfg.heads * SD35_MEDIUM["attention_head_dim"],
        "joint_attention_dim": cfg.text_dim,
        "pooled_projection_dim": cfg.pooled_dim,
    }


def new_transformer(arch, device):
    """A random-weight SD3Transformer2DModel(**arch) in bf16 on `device` (seeded)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16: an fp32 copy first would dominate the CPU peak RSS
    try:
        with torch.device(device):
            return SD3Transformer2DModel(**arch)
    finally:
        torch.set_default_dtype(default)


def load_transformer(path):
    """The SD3Transformer2DModel of a pipeline folder (its transformer/) or of a transformer folder, in bf16."""
    from diffusers import SD3Transformer2DModel

    sub = "transformer" if (Path(path) / "transformer").is_dir() else None
    return SD3Transformer2DModel.from_pretrained(path, subfolder=sub, dtype=torch.bfloat16)


def build(cfg, device, tcfg):
    """The transformer (built, or loaded from cfg.model_path) made trainable as train_full makes it: LoRA per
    tcfg in float32 on frozen bf16 weights, gradient checkpointing."""
    model = load_transformer(cfg.model_path) if cfg.model_path else new_transformer(architecture(cfg), device)
    adapters.make_trainable(tcfg, model, device, torch.bfloat16)
    return model


def measure(cfg, method, guard):
    """One setting: forwards per step, median step time (s), peak memory (bytes: the step's, above what was resident
    before it, and the absolute peak), and the same for a bare step of the same model on the same batch."""
    device = torch.device(cfg.device)
    torch.set_num_threads(cfg.threads)
    tcfg = tf.Config(preset="sd3", method=method, guard=guard, pretrained_model_name_or_path="-")
    tcfg.lora_rank, tcfg.lora_alpha, tcfg.gradient_checkpointing = cfg.lora_rank, 2 * cfg.lora_rank, True
    model = build(cfg, device, tcfg)
    forwards = {"grad": 0, "no_grad": 0}

    def count(module, args):
        key = "grad" if torch.is_grad_enabled() else "no_grad"
        forwards[key] += 1

    model.register_forward_pre_hook(count)
    adapter, base = BenchAdapter(tcfg), adapters.Base(model)
    old = tf.PolicyCopy(tf.trainable_params(model)) if method in ("nft", "awm") else None
    opt = torch.optim.AdamW(tf.trainable_params(model), lr=1e-4)
    side, b, arch = cfg.resolution // 8, cfg.batch, model.config
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2 * b if method == "dpo" else b, arch.in_channels, side, side, generator=gen).to(device)
    n = len(x0)
    cond = {
        "encoder_hidden_states": torch.randn(n, cfg.text_tokens, arch.joint_attention_dim, generator=gen).to(
            device, torch.bfloat16
        ),
        "pooled_projections": torch.randn(n, arch.pooled_projection_dim, generator=gen).to(device, torch.bfloat16),
    }
    adv = torch.randn(b, generator=gen).to(device)

    saved = {}

    def pack(x):  # activations kept for backward, counted once per storage: the memory the guard could add
        saved[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    eps = torch.randn(b, *x0.shape[1:], generator=gen)
    if method == "dpo":
        t = torch.sigmoid(torch.randn(b, generator=gen))
        loss_fn = functools.partial(tf.pair_loss, x_w=x0[:b], x_l=x0[b:], cond=cond, t=t, eps=eps)
    else:
        loss_fn = functools.partial(tf.sample_loss, x0=x0, cond=cond, adv=adv, t_value=torch.tensor(0.7), eps=eps)

    def step():
        saved.clear()
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x)
        with torch.autocast(device.type, dtype=torch.bfloat16), hooks:
            loss, _ = loss_fn(tcfg, adapter, model, base, old)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # the bare step: the same model, the same samples and conditioning, one forward with grad and plain flow matching
    t = torch.full((n,), 0.7, device=device)
    x_t, u = ng.forward_process(x0, torch.randn(x0.shape, generator=gen).to(device), t)

    def bare_step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            v = adapter.velocity(model, x_t, t, cond)
        (v.float() - u).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step_time, peak, before = timed(step, cfg.repeats, device, counters=(forwards,))  # timed steps only
    counted = {k: v / cfg.repeats for k, v in forwards.items()}
    bare_time, bare_peak, bare_before = timed(bare_step, cfg.repeats, device)
    return {
        "method": method,
        "guard": guard,
        "forwards_per_step": counted,
        "step_time_s": step_time,
        "peak_step_memory_bytes": None if peak is None else peak - before,
        "peak_memory_bytes": peak,
        "saved_for_backward_bytes": sum(saved.values()),
        "bare_step_time_s": bare_time,
        "bare_peak_step_memory_bytes": None if bare_peak is None else bare_peak - bare_before,
        "bare_peak_memory_bytes": bare_peak,
    }


def timed(step, repeats, device, counters=()):
    """(median seconds of `repeats` calls of step() after one warm-up call, peak allocated bytes during them and
    bytes allocated before them; both None off CUDA). The warm-up settles the allocator, the kernels, Adam's state."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step()
    for counter in counters:
        counter.update({k: 0 for k in counter})
    before = None
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return statistics.median(times), peak, before


def run_setting(argv, cfg, method, guard, timeout=None):
    """measure(cfg, method, guard): in a fresh process started with `argv` (this script's command line) when
    cfg.fresh_process, else in this one. A child that fails raises CalledProcessError (its stderr attached)."""
    if not cfg.fresh_process:
        return measure(cfg, method, guard)
    cmd = [sys.executable, __file__, *argv, f"--child={method}:{'on' if guard else 'off'}"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=timeout)
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(off, on):
    """One method's row from its guard-off and guard-on settings: forwards, the on/off ratios, step / bare step."""
    row = {
        "method": off["method"],
        "forwards_off": off["forwards_per_step"],
        "forwards_on": on["forwards_per_step"],
        "time_ratio": on["step_time_s"] / off["step_time_s"],
        "step_time_off_s": off["step_time_s"],
        "step_time_on_s": on["step_time_s"],
        "saved_ratio": on["saved_for_backward_bytes"] / off["saved_for_backward_bytes"],
        "saved_off_mib": off["saved_for_backward_bytes"] / 2**20,
        "step_vs_bare_off": off["step_time_s"] / off["bare_step_time_s"],
        "step_vs_bare_on": on["step_time_s"] / on["bare_step_time_s"],
    }
    if off["peak_step_memory_bytes"] is not None:
        row["memory_ratio"] = on["peak_step_memory_bytes"] / off["peak_step_memory_bytes"]
        row["peak_step_memory_off_mib"] = off["peak_step_memory_bytes"] / 2**20
        row["peak_memory_ratio"] = on["peak_memory_bytes"] / off["peak_memory_bytes"]
    return row


def row_line(row):
    """The fixed-format line of one method's row."""
    fw = lambda d: f"{d['grad']:g} + {d['no_grad']:g}"
    peak = (
        f" | peak step memory on/off {row['memory_ratio']:.3f} (off {row['peak_step_memory_off_mib']:.0f} MiB)"
        if "memory_ratio" in row
        else ""
    )
    return (
        f"{row['method']:>4} | forwards (grad + no-grad) off {fw(row['forwards_off'])}, on {fw(row['forwards_on'])} | "
        f"step time on/off {row['time_ratio']:.3f} (off {row['step_time_off_s']:.2f} s) | step / bare step off "
        f"{row['step_vs_bare_off']:.2f}, on {row['step_vs_bare_on']:.2f} | saved for backward on/off "
        f"{row['saved_ratio']:.4f} (off {row['saved_off_mib']:.1f} MiB){peak}"
    )


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg, child = parse_args(argv)
    if child:
        method, guard = child.split(":")
        print(json.dumps(measure(cfg, method, guard == "on")))
        return None
    name = torch.cuda.get_device_name() if cfg.device == "cuda" else f"CPU, {cfg.threads} thread(s)"
    size = f"{cfg.num_layers} of 24 blocks, {cfg.heads} of 24 heads" if not cfg.model_path else cfg.model_path
    print(
        f"SD3.5-Medium transformer design, {size} | {cfg.resolution} px ({(cfg.resolution // 16) ** 2} image + "
        f"{cfg.text_tokens} text tokens) | micro-batch {cfg.batch} | LoRA r={cfg.lora_rank} | bf16 autocast, "
        f"gradient checkpointing | {name} | median of {cfg.repeats} steps"
    )
    rows = []
    for method in cfg.methods.split(","):
        # a fresh process per setting: clean peak memory, no allocator carry-over
        off, on = (run_setting(argv, cfg, method, guard) for guard in (False, True))
        rows.append(summarize(off, on))
        print(row_line(rows[-1]))
    result = {"config": dataclasses.asdict(cfg), "device": name, "rows": rows}
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    cli.run(main)
