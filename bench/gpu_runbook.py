"""The GPU runbook: one command that measures NormGuard at SD3.5-Medium size and writes a report naming the GPU.

    python bench/gpu_runbook.py                    # one GPU, under --max_minutes=8: runs/gpu_runbook/gpu_report.md
    python bench/gpu_runbook.py --smoke            # CPU, tiny sizes, seconds: the same steps (the tests run this)
    python bench/gpu_runbook.py --model_path=/tmp/sd35m   # build the model there and keep it; a rerun reuses it

1. model: diffusers' SD3Transformer2DModel from SD3.5-Medium's published constructor config
   (bench_train_full.SD35_MEDIUM: 24 joint blocks, 24 heads x 64, dual attention in blocks 0-12, RMS qk-norm,
   T5 width 4096, pooled 2048) with random weights, in a StableDiffusion3Pipeline whose CLIP/T5 text encoders
   and VAE are tiny random stand-ins of the widths the transformer reads; saved with save_pretrained. Nothing is
   downloaded; time and memory do not depend on the weight values. The numbers are the transformer's: the real
   T5-XXL, CLIPs and VAE are not in them.
2. benchmark: bench/bench_train_full.py on that folder (its transformer loaded with from_pretrained), each method
   with the guard off and on, each setting in a fresh process: train_full's own loss of one micro-batch (policy
   forward, reference and old/EMA forwards, base loss, guard), backward and AdamW, LoRA r=32, bf16 autocast,
   gradient checkpointing; the median step time after a warm-up step (CUDA synchronised), the peak allocated
   memory, and a bare step of the same model on the same batch (one forward with grad, plain flow matching,
   backward, AdamW).
3. training: train_full.py itself on the folder, each method with the guard off and on, a few steps of one
   prompt's group (rollouts, JPEG reward, update; evals at the first and last step), each run in a fresh process:
   the median of train_full's logged step times after the first step, the run's peak allocated memory.
4. report: out_dir/gpu_report.md and gpu_report.json, rewritten after each measurement, so a run stopped early
   keeps what it measured; a setting that would end after --max_minutes is skipped and named in the report.
"""

import contextlib
import dataclasses
import json
import math
import shutil
import statistics
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the scripts live in the repo root
import train_full as tf  # noqa: E402
from bench import bench_train_full as bench  # noqa: E402
from trainer import (
    adapters,  # noqa: E402
    cli,  # noqa: E402
)


@dataclass
class Config:
    resolution: int = 1024  # pixels: 128 x 128 latents, 4096 image tokens (+ 333 text tokens: CLIP 77, T5 256)
    batch: int = 2  # samples per benchmark step (DPO: pairs) and rollouts per training step (one prompt's group)
    repeats: int = 5  # benchmark: timed steps per setting after one warm-up step; the median is reported
    train_steps: int = 3  # training: steps per run; the first warms up, the median of the others is reported
    sample_steps: int = 4  # training: rollout sampler steps (NFT and AWM then train 3 timesteps per step)
    methods: str = "nft,awm,dpo"
    max_minutes: float = 8.0  # a setting that would end after this is skipped (and named in the report)
    out_dir: str = "runs/gpu_runbook"
    model_path: str = ""  # a folder to build the model into and keep (reused if it holds one); "" = a temp folder
    fresh_process: bool = True  # each setting in its own process: clean peak memory (--smoke: false, seconds)
    child: str = ""  # internal: "train:<method>:<on|off>" runs that one training run in this process


SMOKE = dict(resolution=32, batch=2, repeats=1, train_steps=2, sample_steps=3, fresh_process=False)
FLAGS = {"smoke": "tiny sizes on the CPU, seconds: the same steps, for the tests"}
# text tokens of the prompt encoders (CLIP, T5): the real pipeline's 77 + 256 at full size; prompts that fit them
TEXT_TOKENS = {"full": (77, 256), "smoke": (12, 8)}
PROMPTS = {"full": adapters.registered("sd3").prompts, "smoke": ["a cat", "a dog", "a red car", "a blue bowl"]}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GUARD = ("on", "off")


def parse_args(argv):
    """(Config, smoke) from `--key=value` overrides on top of --smoke's sizes; checked."""
    (overrides,), flags = cli.parse(argv, [Config], flags=FLAGS, doc=__doc__)
    smoke = "smoke" in flags
    cfg = Config(**{**(SMOKE if smoke else {}), **overrides})
    cli.checked(check_config, cfg, smoke)
    return cfg, smoke


def bench_config(smoke):
    """bench_train_full's Config of the model size: the full SD3.5-Medium design, or --smoke's tiny one (2 blocks:
    SD3's last block has no context output, so with 1 block train_full's LoRA target to_add_out would name none)."""
    return bench.Config(**({**bench.SMOKE, "num_layers": 2} if smoke else bench.FULL))


def check_config(cfg, smoke):
    """A ValueError naming the key and what it expects, for the first bad value."""
    for key, low in (("resolution", 16), ("batch", 2), ("repeats", 1), ("train_steps", 2), ("sample_steps", 3)):
        if getattr(cfg, key) < low:
            why = {"batch": " (the training runs' group compares rollouts)", "train_steps": " (a warm-up + 1)"}
            why["sample_steps"] = " (AWM's SA-Solver grid)"
            raise ValueError(f"{key}: expected an int >= {low}{why.get(key, '')}, got {getattr(cfg, key)}")
    side = bench_config(smoke).pos_embed_max_size
    if cfg.resolution % 16 or cfg.resolution // 16 > side:
        raise ValueError(
            f"resolution: expected a multiple of 16 up to {16 * side} (VAE x8, 2x2 patches), got {cfg.resolution}"
        )
    methods = cfg.methods.split(",")
    if not set(methods) <= set(tf.METHODS) or len(set(methods)) != len(methods):
        raise ValueError(f"methods: expected a comma-separated subset of {tf.METHODS}, got {cfg.methods!r}")
    if not (math.isfinite(cfg.max_minutes) and cfg.max_minutes > 0):
        raise ValueError(f"max_minutes: expected a finite number > 0, got {cfg.max_minutes}")
    if not cfg.out_dir.strip():
        raise ValueError("out_dir: expected a folder for the report, got ''")
    path = Path(cfg.model_path)
    if cfg.model_path and path.exists() and not (path / "model_index.json").is_file():
        if not path.is_dir() or any(path.iterdir()):
            raise ValueError(
                f"model_path: {cfg.model_path} is neither a folder this runbook built (model_index.json) nor an "
                "empty or new folder to build into"
            )
    parts = cfg.child.split(":")
    if cfg.child and (len(parts) != 3 or parts[0] != "train" or parts[1] not in tf.METHODS or parts[2] not in GUARD):
        raise ValueError(f"child: expected train:<method>:<on|off>, got {cfg.child!r}")
    if not smoke and DEVICE == "cpu":
        raise ValueError("no CUDA device here: the full-size runbook needs a GPU; pass --smoke for its reduced mode")


# ---------------------------------------------------------------------------------------------------------------
# the model folder


def tiny_text_encoders(text_dim, pooled_dim, clip_tokens):
    """Stand-ins for SD3's CLIP-L, CLIP-G and T5-XXL, one random layer each, of the widths the transformer reads:
    T5 `text_dim` wide, the two CLIP projections `pooled_dim / 2` each (the pipeline puts them side by side).
    Tokenizers from an in-memory vocabulary: CLIP per character, T5 per word of the runbook's prompts. Returns
    the StableDiffusion3Pipeline keyword arguments of the three encoders and their tokenizers."""
    import transformers as tr

    prompts = PROMPTS["full"] + PROMPTS["smoke"]
    chars = sorted((set("".join(prompts)) | set(string.ascii_lowercase)) - {" "})
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    clip_tok = tr.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=clip_tokens)
    words = sorted({w for p in prompts for w in p.replace(",", " ").split()})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in words]
    t5_tok = tr.T5Tokenizer(vocab=pieces + [(c, -2.0) for c in chars], extra_ids=0)
    clip = tr.CLIPTextConfig(
        vocab_size=len(clip_tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=clip_tokens,
        projection_dim=pooled_dim // 2,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    t5 = tr.T5Config(
        vocab_size=len(t5_tok) + 4,
        d_model=text_dim,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
    )
    return dict(
        text_encoder=tr.CLIPTextModelWithProjection(clip),
        tokenizer=clip_tok,
        text_encoder_2=tr.CLIPTextModelWithProjection(clip),
        tokenizer_2=clip_tok,
        text_encoder_3=tr.T5EncoderModel(t5),
        tokenizer_3=t5_tok,
    )


def tiny_vae(latent_channels):
    """An AutoencoderKL with SD3's x8 scale, latent channels, scaling and shift factors, 8 channels wide."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8] * 4,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    )


def build_pipeline(path, smoke):
    """Save a StableDiffusion3Pipeline with the SD3.5-Medium transformer design (random weights, bf16; built on the
    GPU when there is one) and tiny text encoders and VAE to `path`. Returns the seconds it took."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    t0 = time.time()
    arch = bench.architecture(bench_config(smoke))
    transformer = bench.new_transformer(arch, DEVICE).to("cpu")  # random init is fast on a GPU; saved from the CPU
    torch.manual_seed(1)
    text = tiny_text_encoders(
        arch["joint_attention_dim"], arch["pooled_projection_dim"], TEXT_TOKENS["smoke" if smoke else "full"][0]
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD3.5's
        vae=tiny_vae(arch["in_channels"]),
        **text,
    )
    pipe.save_pretrained(path)
    del pipe, transformer
    if DEVICE == "cuda":
        torch.cuda.empty_cache()  # the children load it again: this process keeps no GPU memory
    return time.time() - t0


@contextlib.contextmanager
def model_folder(cfg, smoke):
    """(path, what happened): cfg.model_path reused when it holds a built model, else built there (kept), or built
    into a temp folder removed at the end."""
    if cfg.model_path and (Path(cfg.model_path) / "model_index.json").is_file():
        yield cfg.model_path, "reused"
    elif cfg.model_path:
        seconds = build_pipeline(cfg.model_path, smoke)
        yield cfg.model_path, f"built in {seconds:.0f} s, kept"
    else:
        with tempfile.TemporaryDirectory(prefix="sd35m_random_") as path:
            seconds = build_pipeline(path, smoke)
            yield path, f"built in {seconds:.0f} s into a temp folder, removed at the end"


def describe_model(path):
    """The transformer's constructor config and parameter count (built on the meta device from the folder's config)
    and the depth of the folder's T5 (1 layer: this runbook's stand-in)."""
    from diffusers import SD3Transformer2DModel

    config = json.loads((Path(path) / "transformer" / "config.json").read_text())
    with torch.device("meta"):
        params = sum(p.numel() for p in SD3Transformer2DModel.from_config(config).parameters())
    keep = "num_layers num_attention_heads attention_head_dim dual_attention_layers qk_norm joint_attention_dim"
    keep += " caption_projection_dim pooled_projection_dim in_channels patch_size pos_embed_max_size"
    t5 = Path(path) / "text_encoder_3" / "config.json"
    t5_layers = json.loads(t5.read_text()).get("num_layers") if t5.is_file() else None
    return {"transformer": {"params": params, **{k: config[k] for k in keep.split()}}, "t5_layers": t5_layers}


# ---------------------------------------------------------------------------------------------------------------
# one setting: a benchmark step or a training run


def bench_argv(cfg, smoke, folder):
    """bench_train_full's command line for this runbook's sizes, on the model folder."""
    clip, t5 = TEXT_TOKENS["smoke" if smoke else "full"]
    return [
        "--smoke" if smoke else "--full",
        f"--model_path={folder}",
        f"--resolution={cfg.resolution}",
        f"--batch={cfg.batch}",
        f"--repeats={cfg.repeats}",
        f"--text_tokens={clip + t5}",
        f"--threads={torch.get_num_threads()}",
        f"--fresh_process={cfg.fresh_process}",
    ]


def train_argv(cfg, smoke, folder, method, guard):
    """train_full's command line of one short run: one prompt's group of `batch` rollouts per step, JPEG reward."""
    rank = bench_config(smoke).lora_rank
    return [
        "--preset=sd3",
        f"--pretrained_model_name_or_path={folder}",
        f"--method={method}",
        f"--guard={guard}",
        "--reward=jpeg",
        f"--resolution={cfg.resolution}",
        f"--max_sequence_length={TEXT_TOKENS['smoke' if smoke else 'full'][1]}",
        "--prompts_per_step=1",
        f"--group_size={cfg.batch}",
        f"--train_batch_size={cfg.batch}",
        f"--sample_steps={cfg.sample_steps}",
        "--few_steps=1",
        f"--steps={cfg.train_steps}",
        f"--eval_every={cfg.train_steps}",
        "--eval_seeds=1",
        f"--train_prompts={Path(cfg.out_dir) / 'train' / 'prompts.txt'}",
        f"--eval_prompts={Path(cfg.out_dir) / 'train' / 'eval_prompts.txt'}",
        f"--checkpoint_every={cfg.train_steps}",
        f"--lora_rank={rank}",
        f"--lora_alpha={2 * rank}",
        f"--mixed_precision={'bf16' if DEVICE == 'cuda' else 'no'}",
        "--gradient_checkpointing=true",
        f"--out_dir={run_dir(cfg, method, guard)}",
        "--overwrite=true",
    ]


def run_dir(cfg, method, guard):
    return Path(cfg.out_dir) / "train" / f"{method}_{guard_name(guard)}"


def guard_name(guard):
    return "on" if guard else "off"


def train_run(cfg, smoke, folder, method, guard):
    """One train_full run in this process: its median step time after the first step, peak allocated memory (CUDA),
    wall time, last logged loss and norm ratio. Its checkpoints and LoRA are removed after (hundreds of MB)."""
    out, prompts = run_dir(cfg, method, guard), PROMPTS["smoke" if smoke else "full"]
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / "prompts.txt").write_text("\n".join(prompts))
    (out.parent / "eval_prompts.txt").write_text("\n".join(prompts[i % len(prompts)] for i in range(cfg.batch)))
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    tf.main(train_argv(cfg, smoke, folder, method, guard))
    wall = time.time() - t0
    lines = [json.loads(s) for s in (out / "log.jsonl").read_text().splitlines()]
    for heavy in ("checkpoints", "lora"):
        shutil.rmtree(out / heavy, ignore_errors=True)
    times = [line["step_time"] for line in lines[1:]]
    return {
        "kind": "train",
        "method": method,
        "guard": guard,
        "step_time_s": statistics.median(times),
        "step_times_s": [line["step_time"] for line in lines],
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if DEVICE == "cuda" else None,
        "run_seconds": wall,
        "last_loss": lines[-1]["loss"],
        "last_norm_ratio": lines[-1]["norm_ratio"],
        "log": str(out / "log.jsonl"),
    }


def measure(cfg, smoke, folder, kind, method, guard, argv, timeout):
    """One setting's result dict, in a fresh process when cfg.fresh_process (started with `argv`, this script's
    command line), else in this one."""
    if kind == "bench":
        bargv = bench_argv(cfg, smoke, folder)
        bcfg, _ = bench.parse_args(bargv)
        return {"kind": "bench", **bench.run_setting(bargv, bcfg, method, guard, timeout=timeout)}
    if not cfg.fresh_process:
        return train_run(cfg, smoke, folder, method, guard)
    cmd = [sys.executable, __file__, *child_argv(argv, folder, method, guard)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=timeout)
    return json.loads(done.stdout.strip().splitlines()[-1])


def child_argv(argv, folder, method, guard):
    """The command line of a child that runs one training run on the model folder: this run's own arguments."""
    own = [a for a in argv if not a.startswith("--model_path=")]
    return [*own, f"--model_path={folder}", f"--child=train:{method}:{guard_name(guard)}"]


# ---------------------------------------------------------------------------------------------------------------
# the report


def gib(nbytes):
    return "n/a" if nbytes is None else f"{nbytes / 2**30:.2f} GiB"


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def fmt(x, spec=".3f"):
    return "n/a" if x is None else format(x, spec)


def setting_line(res):
    """The fixed-format line of one measurement."""
    head = f"{res['kind']:<5} {res['method']:>4} guard {guard_name(res['guard']):<3}"
    if "skipped" in res:
        return f"{head} | {res['skipped']}"
    if res["kind"] == "bench":
        fw = res["forwards_per_step"]
        return (
            f"{head} | step {res['step_time_s']:.3f} s | bare step {res['bare_step_time_s']:.3f} s | step/bare "
            f"{res['step_time_s'] / res['bare_step_time_s']:.2f} | peak {gib(res['peak_memory_bytes'])} | forwards "
            f"{fw['grad']:g} + {fw['no_grad']:g} | {res['seconds']:.0f} s"
        )
    return (
        f"{head} | step {res['step_time_s']:.3f} s (median of {len(res['step_times_s']) - 1}) | peak "
        f"{gib(res['peak_memory_bytes'])} | run {res['run_seconds']:.0f} s | loss {fmt(res['last_loss'], '.4g')} norm "
        f"ratio {fmt(res['last_norm_ratio'], '.4f')} | {res['seconds']:.0f} s"
    )


def summaries(results, methods):
    """Per kind and method with both settings measured: the guard's overhead (on / off) and, for the benchmark,
    bench_train_full's own row (step / bare step, saved activations)."""
    got = {(r["kind"], r["method"], r["guard"]): r for r in results if "skipped" not in r}
    out = {"bench": [], "train": []}
    for kind in out:
        for m in methods:
            off, on = got.get((kind, m, False)), got.get((kind, m, True))
            if off and on:
                row = bench.summarize(off, on) if kind == "bench" else {"method": m}
                row["time_ratio"] = on["step_time_s"] / off["step_time_s"]  # (bench.summarize's own, for train)
                row["peak_memory_ratio"] = ratio(on["peak_memory_bytes"], off["peak_memory_bytes"])
                out[kind].append(row)
    return out


def markdown_setup(report):
    """The report's heading and setup table (device, software, model, sizes, precision)."""
    env, cfg, model = report["environment"], report["config"], report["model"]
    arch = model.get("transformer", {})
    clip, t5 = report["text_tokens"]
    side = cfg["resolution"] // 8
    lines = [
        "# GPU runbook: NormGuard in train_full.py at SD3.5-Medium size",
        "",
        f"`{report['command']}` at revision {env['git_revision']}, {env['date']}.",
        "",
        "| | |",
        "|---|---|",
        f"| device | {env['device']} |",
        f"| software | torch {env['torch']} (built for CUDA {env['cuda']}), diffusers {env['diffusers']}, python "
        f"{env['python']} |",
    ]
    if arch:
        dual = arch["dual_attention_layers"]
        dual_text = f"blocks {min(dual)}-{max(dual)}" if dual else "none"
        lines.append(
            f"| transformer | SD3Transformer2DModel: {arch['num_layers']} blocks, {arch['num_attention_heads']} heads"
            f" x {arch['attention_head_dim']}, dual attention in {dual_text}, qk-norm {arch['qk_norm']}, T5 width "
            f"{arch['joint_attention_dim']}, pooled {arch['pooled_projection_dim']}: {arch['params'] / 1e6:,.1f} M "
            f"parameters, {'random weights' if model['how'].startswith('built') else 'the weights of the folder'}; "
            f"{model['how']}, loaded with from_pretrained |"
        )
    encoders = (
        "tiny random stand-ins of the widths the transformer reads (2 CLIP, a 1-layer T5, a x8 VAE of 8 channels): "
        "the numbers are the transformer's; the real T5-XXL, CLIPs and VAE are not in them"
        if model.get("t5_layers") == 1
        else f"the folder's own (T5: {model.get('t5_layers')} layers): the training numbers include them"
    )
    lines += [
        f"| text encoders, VAE | {encoders} |",
        f"| sizes | {cfg['resolution']} px: {side} x {side} latents, {(cfg['resolution'] // 16) ** 2} image + "
        f"{clip + t5} text tokens (CLIP {clip}, T5 {t5}); batch {cfg['batch']} |",
        f"| precision | {report['precision']} |",
        "",
    ]
    return lines


def markdown_bench(report):
    """The benchmark part: one row per method and guard setting, then the guard's overhead."""
    cfg = report["config"]
    lines = [
        "## Benchmark: one update step (bench/bench_train_full.py)",
        "",
        f"train_full's own loss of one micro-batch ({cfg['batch']} samples; DPO: {cfg['batch']} pairs, "
        f"{2 * cfg['batch']} samples per forward), backward and AdamW; median of {cfg['repeats']} steps after a "
        "warm-up, CUDA synchronised; peak = max_memory_allocated over the timed steps (weights, optimiser state "
        "and activations). Bare step: the same model on the same batch, one forward with grad, plain flow "
        "matching, backward, AdamW. Each setting in a fresh process"
        + ("." if cfg["fresh_process"] else " (here: all in one process, --fresh_process=false)."),
        "",
        "| method | guard | step time (s) | peak memory | forwards (grad + no-grad) | bare step (s) | step / bare |",
        "|---|---|---|---|---|---|---|",
    ]
    results = report["results"]
    for r in (r for r in results if r["kind"] == "bench" and "skipped" not in r):
        fw = r["forwards_per_step"]
        lines.append(
            f"| {r['method']} | {guard_name(r['guard'])} | {r['step_time_s']:.3f} | {gib(r['peak_memory_bytes'])} | "
            f"{fw['grad']:g} + {fw['no_grad']:g} | {r['bare_step_time_s']:.3f} | "
            f"{r['step_time_s'] / r['bare_step_time_s']:.2f} |"
        )
    lines += [
        "",
        "The guard's overhead, guard on / guard off:",
        "",
        "| method | step time | peak memory | step's own peak memory | activations saved for backward |",
        "|---|---|---|---|---|",
    ]
    for row in report["summary"]["bench"]:
        lines.append(
            f"| {row['method']} | {row['time_ratio']:.3f} | {fmt(row['peak_memory_ratio'])} | "
            f"{fmt(row.get('memory_ratio'))} | {row['saved_ratio']:.4f} |"
        )
    return lines


def markdown_train(report):
    """The training part: one row per method and guard setting, then the guard's overhead."""
    cfg, results = report["config"], report["results"]
    lines = [
        "",
        "## Training: train_full.py",
        "",
        f"{cfg['train_steps']} steps per run, each: {cfg['batch']} rollouts of one prompt ({cfg['sample_steps']} "
        "sampler steps), the JPEG reward, the update (NFT and AWM at each of their train timesteps, DPO one pair); "
        "evals at step 0 and at the end. Step time: the median of train_full's logged step times after the first "
        "step; peak = max_memory_allocated over the whole run (load, evals, steps). Each run in a fresh process"
        + ("." if cfg["fresh_process"] else " (here: all in one process, --fresh_process=false)."),
        "",
        "| method | guard | step time (s) | peak memory | run (s) | last loss | last norm ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in results if r["kind"] == "train" and "skipped" not in r):
        lines.append(
            f"| {r['method']} | {guard_name(r['guard'])} | {r['step_time_s']:.3f} | {gib(r['peak_memory_bytes'])} | "
            f"{r['run_seconds']:.0f} | {fmt(r['last_loss'], '.4g')} | {fmt(r['last_norm_ratio'], '.4f')} |"
        )
    lines += [
        "",
        "The guard's overhead, guard on / guard off:",
        "",
        "| method | step time | peak memory |",
        "|---|---|---|",
    ]
    for row in report["summary"]["train"]:
        lines.append(f"| {row['method']} | {row['time_ratio']:.3f} | {fmt(row['peak_memory_ratio'])} |")
    return lines


def markdown(report):
    """The report as Markdown: the setup, then one table per part and the guard's overhead, then what is missing."""
    lines = markdown_setup(report) + markdown_bench(report) + markdown_train(report)
    results = report["results"]
    missing = [r for r in results if "skipped" in r]
    lines += ["", "## Not measured", ""]
    lines += [f"- {r['kind']} {r['method']} guard {guard_name(r['guard'])}: {r['skipped']}" for r in missing]
    lines += [] if missing else ["- nothing: every setting ran"]
    lines += ["", f"Wall time: {report['seconds']:.0f} s" + (" (stopped early)" if not report["done"] else "")]
    return "\n".join(lines) + "\n"


def write_report(report):
    out = Path(report["config"]["out_dir"])
    (out / "gpu_report.json").write_text(cli.dumps(report, indent=1))
    (out / "gpu_report.md").write_text(markdown(report))


def environment(smoke):
    import platform

    import diffusers

    device = "cpu (reduced mode)"
    if DEVICE == "cuda":
        memory = torch.cuda.get_device_properties(0).total_memory / 2**30
        device = f"{torch.cuda.get_device_name()} ({memory:.1f} GiB)" + (" (reduced mode)" if smoke else "")
    return {
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "git_revision": cli.git_revision(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


# ---------------------------------------------------------------------------------------------------------------
# the command


def run_all(cfg, smoke, argv):
    """Build (or reuse) the model, then every benchmark setting, then every training run, within max_minutes."""
    from tqdm import tqdm

    start, deadline = time.time(), time.time() + 60 * cfg.max_minutes
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    methods, report = cfg.methods.split(","), new_report(cfg, smoke, argv)
    print(f"{report['environment']['device']} | {report['precision']} | {cfg.resolution} px, batch {cfg.batch}")
    write_report(report)
    with model_folder(cfg, smoke) as (folder, how):
        report["model"] = {"how": how, **describe_model(folder)}
        print(f"model: {report['model']['transformer']['params'] / 1e6:,.1f} M parameters, {how}")
        write_report(report)
        settings = [(kind, m, g) for kind in ("bench", "train") for m in methods for g in (False, True)]
        took = {}  # kind -> the longest setting of that kind so far: what the next one is expected to take
        for kind, method, guard in tqdm(settings, desc="settings", unit="setting"):
            res = one_setting(cfg, smoke, folder, (kind, method, guard), argv, deadline, took)
            report["results"].append(res)
            report["summary"] = summaries(report["results"], methods)
            report["seconds"] = time.time() - start
            tqdm.write(setting_line(res))
            write_report(report)
    report["seconds"], report["done"] = time.time() - start, True
    write_report(report)
    print(f"report: {Path(cfg.out_dir) / 'gpu_report.md'} ({report['seconds']:.0f} s)")
    return report


def new_report(cfg, smoke, argv):
    """The report before any measurement: command, environment, config, sizes and precision."""
    mixed = "bf16 (accelerate), frozen weights bf16" if DEVICE == "cuda" else "float32 (accelerate 'no' on a CPU)"
    rank = bench_config(smoke).lora_rank
    return {
        "command": " ".join(["python bench/gpu_runbook.py", *argv]),
        "environment": environment(smoke),
        "config": dataclasses.asdict(cfg),
        "smoke": smoke,
        "text_tokens": TEXT_TOKENS["smoke" if smoke else "full"],
        "precision": f"benchmark: bf16 autocast over bf16 weights; training: {mixed}; both: LoRA r={rank}, "
        f"alpha={2 * rank} in float32, gradient checkpointing",
        "model": {"how": "being built"},
        "results": [],
        "summary": {"bench": [], "train": []},
        "seconds": 0.0,
        "done": False,
    }


def one_setting(cfg, smoke, folder, setting, argv, deadline, took):
    """The result of one (kind, method, guard) setting, or why it was not measured: the time left is spent or less
    than the longest setting of its kind took so far, it ran past the deadline (a child: killed), or a child failed.
    Updates `took`."""
    kind, method, guard = setting
    res, left, t0 = {"kind": kind, "method": method, "guard": guard}, deadline - time.time(), time.time()
    if left <= 0:
        return {**res, "skipped": f"skipped: the --max_minutes={cfg.max_minutes:g} were spent"}
    if left <= took.get(kind, 0.0):
        why = f"{left:.0f} s left of --max_minutes={cfg.max_minutes:g}, the longest {kind} setting took"
        return {**res, "skipped": f"skipped: {why} {took[kind]:.0f} s"}
    try:
        res = measure(cfg, smoke, folder, kind, method, guard, argv, left)
    except subprocess.TimeoutExpired:
        res["skipped"] = f"stopped at --max_minutes={cfg.max_minutes:g}"
    except subprocess.CalledProcessError as e:
        res["skipped"] = failed(cfg, kind, method, guard, e)
    res["seconds"] = time.time() - t0
    took[kind] = max(took.get(kind, 0.0), res["seconds"])
    return res


def failed(cfg, kind, method, guard, error):
    """'failed: <its last line>', the child's whole stderr kept next to the report."""
    log = Path(cfg.out_dir) / f"failed_{kind}_{method}_{guard_name(guard)}.log"
    log.write_text(error.stderr or "")
    last = [s for s in (error.stderr or "").splitlines() if s.strip()] or [f"exit code {error.returncode}"]
    return f"failed: {last[-1][:300]} (the whole output: {log.name})"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg, smoke = parse_args(argv)
    if cfg.child:
        _, method, guard = cfg.child.split(":")
        print(cli.dumps(train_run(cfg, smoke, cfg.model_path, method, guard == "on")))
        return None
    return run_all(cfg, smoke, argv)


if __name__ == "__main__":
    cli.run(main)
