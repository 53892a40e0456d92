"""Cost of the NormGuard hinge next to each base loss and next to a forward of a small diffusers transformer, and of
the core's value checks.

    python bench/bench_normguard.py                    # (B, 16, 64, 64) latents, float32, on CUDA if present
    python bench/bench_normguard.py --batch=8 --dtype=bf16
    python bench/bench_normguard.py --smoke            # tiny sizes, seconds (for tests)

Run from the repo root (or anywhere: it puts the root on sys.path). Prints times and, what matters, ratios:
hinge / base loss and hinge / model forward. Each timing is forward plus backward of the loss w.r.t. v (what a
training step pays); median over repeats (torch.utils.benchmark). Then the value checks (NaN/Inf, ranges, overflow:
one host sync per call): each call's forward with them on (the default) and off (`ng.value_checks(False)`), and
the difference, their cost per call.
"""

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # normguard.py and trainer/cli.py live at the repo root

import torch  # noqa: E402
from torch.utils import benchmark  # noqa: E402

import normguard as ng  # noqa: E402
from trainer import cli  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SMOKE = dict(batch=2, size=8, min_run_time=0.01)


@dataclass
class Config:
    batch: int = 4  # B; DPO pairs B winners with B losers
    channels: int = 16  # SD3/FLUX latent channels
    size: int = 64  # latent side: 64 is 512 px through the x8 VAE
    dtype: str = "fp32"  # fp32 | bf16: dtype of the velocities (the losses reduce in fp32 either way)
    min_run_time: float = 1.0  # seconds per measurement


def check(cfg):
    """A ValueError naming the key and the expected value (cli.checked turns it into a usage error)."""
    for key in ("batch", "channels", "size"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key}: expected an int >= 1, got {getattr(cfg, key)}")
    if cfg.size % 2:
        raise ValueError(f"size: expected an even latent side (the transformer's patches are 2x2), got {cfg.size}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {' | '.join(DTYPES)}, got {cfg.dtype!r}")
    if not cfg.min_run_time > 0:
        raise ValueError(f"min_run_time: expected seconds > 0, got {cfg.min_run_time}")
    return cfg


def small_transformer(cfg, device, dtype):
    """A 2-block SD3 transformer (diffusers' class) at the benchmark's latent size: the 'model forward' yardstick."""
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(
        sample_size=cfg.size,
        patch_size=2,
        in_channels=cfg.channels,
        num_layers=2,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=128,
        pooled_projection_dim=64,
        out_channels=cfg.channels,
        pos_embed_max_size=cfg.size,
    )
    model = model.to(device, dtype).eval()
    text = torch.randn(cfg.batch, 8, 64, device=device, dtype=dtype)
    pooled = torch.randn(cfg.batch, 64, device=device, dtype=dtype)

    def forward(x, t):
        with torch.no_grad():
            return model(
                hidden_states=x, timestep=ng.TIMESTEP_SCALE * t, encoder_hidden_states=text, pooled_projections=pooled
            ).sample

    return forward


def main(argv):
    (overrides,), flags = cli.parse(argv, [Config], flags={"smoke": "tiny sizes, for tests"}, doc=__doc__)
    cfg = cli.checked(check, Config(**{**(SMOKE if "smoke" in flags else {}), **overrides}))

    # data: one random batch of latents, noised by the forward process
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[cfg.dtype]
    shape = (cfg.batch, cfg.channels, cfg.size, cfg.size)
    g = torch.Generator(device).manual_seed(0)

    def draw():
        return torch.randn(shape, device=device, dtype=dtype, generator=g)

    x0, noise = draw(), draw()
    t = torch.rand(cfg.batch, device=device, generator=g) * 0.9 + 0.05
    x_t, u = ng.forward_process(x0, noise, t.to(dtype))
    v, v_l = (u + 0.3 * draw()).requires_grad_(True), (u + 0.3 * draw()).requires_grad_(True)
    v_old, v_ref, v_ref_l = u + 0.3 * draw(), u + 0.3 * draw(), u + 0.3 * draw()
    adv = torch.randn(cfg.batch, device=device, generator=g)

    # the losses: each base loss, and the hinge as each method would add it
    losses = {
        "nft": lambda: ng.nft_loss(v, v_old, v_ref, x_t, x0, t, adv)[0],
        "awm": lambda: ng.awm_loss(v, v_old, v_ref, u, t, adv)[0],
        "dpo": lambda: ng.dpo_loss(v, v_l, v_ref, v_ref_l, u, u)[0],
    }
    hinge = {
        "nft": lambda: ng.normguard_penalty(v, v_ref)[0],
        "awm": lambda: ng.normguard_penalty(v, v_ref)[0],
        # both winner and loser guarded; two calls average the same as one on the concatenation, without the copy
        "dpo": lambda: (ng.normguard_penalty(v, v_ref)[0] + ng.normguard_penalty(v_l, v_ref_l)[0]) / 2,
    }

    def timed(fn, backward=True):
        def step():
            out = fn()
            if backward:
                out.backward()

        step()  # warm-up
        stmt = benchmark.Timer(stmt="step()", globals={"step": step})
        return stmt.blocked_autorange(min_run_time=cfg.min_run_time).median

    # measure and report
    forward = small_transformer(cfg, device, dtype)
    model_time = timed(lambda: forward(x_t, t.to(dtype)), backward=False)
    print(
        f"device={device} dtype={cfg.dtype} latents={shape} threads={torch.get_num_threads()} torch={torch.__version__}"
    )
    print(f"small SD3 transformer forward (2 blocks, no grad): {model_time * 1e3:8.2f} ms")
    print(f"{'loss':<6}{'base ms':>10}{'hinge ms':>10}{'hinge/base':>12}{'hinge/fwd':>11}")
    for name in losses:
        base_time, hinge_time = timed(losses[name]), timed(hinge[name])
        print(
            f"{name:<6}{base_time * 1e3:>10.2f}{hinge_time * 1e3:>10.2f}{hinge_time / base_time:>12.3f}"
            f"{hinge_time / model_time:>11.3f}"
        )
    # the value checks: a forward with them on (eager's default) and off, the difference their cost per call; on
    # and off alternate, 3 times each, and the fastest of each counts (the least disturbed on a shared machine)
    print(f"value checks, forward only:\n{'call':<6}{'on ms':>10}{'off ms':>10}{'cost ms':>10}{'on/off':>8}")
    for name, fn in {"hinge": hinge["nft"], **losses}.items():
        on, off = [], []
        for _ in range(3):
            on.append(timed(fn, backward=False))
            with ng.value_checks(False):
                off.append(timed(fn, backward=False))
        on, off = min(on), min(off)
        print(f"{name:<6}{on * 1e3:>10.3f}{off * 1e3:>10.3f}{(on - off) * 1e3:>10.3f}{on / off:>8.2f}")
    return dataclasses.asdict(cfg)


if __name__ == "__main__":
    cli.run(main)
