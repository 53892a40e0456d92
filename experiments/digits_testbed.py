"""An image-scale testbed on this CPU: real 8×8 handwritten digits, an SD3 transformer, a hackable reward, judges.

    python -m experiments.digits_testbed --smoke                   # train_full.py with the digits preset: seconds
    python -m experiments.digits_testbed --method=dpo --steps=160  # any train_full key (--help lists them)
    python -m experiments.digits                                   # the experiment: every method, hinge off and on

This file is the testbed only: the data splits, the reference generator (pretrained once and cached), the reward
proxy and the quality judges, and the `digits` preset of train_full.py (DigitsAdapter, registered on import).
`python -m experiments.digits_testbed` is train_full's command line with that preset; the experiment around the
runs (which runs, their reuse, evaluation, table, verdicts, figure) is digits.py.

scikit-learn ships 1,797 real 8×8 digits (pixels 0..16, scaled here to [-1, 1]). They are split once, by a fixed
permutation, into three disjoint parts that never meet:
    reward   (600)  trains the reward proxy: a small MLP; reward = its confidence in the prompted digit
    judge    (600)  trains the quality judge: a small CNN (a different architecture, never seen by the reward)
    held-out (597)  the real images that generated digits are compared with (Fréchet distance, discriminator)
The reference generator is pretrained on reward ∪ judge, never on held-out.

The reference is a class-conditional `SD3Transformer2DModel` (the diffusers class of SD3/SD3.5, shrunk: pixel
space, 1 channel, 2×2 patches, 3 blocks) pretrained by flow matching in the diffusers convention of normguard.py.
The digit label plays the prompt: `LabelEncoder` holds learned embeddings in the roles of the text encoders
(token states for `encoder_hidden_states`, a vector for `pooled_projections`), trained jointly with the
transformer. Label 10 is the null "prompt" (10 % label dropout in pretraining), so classifier-free guidance is
possible; the experiment samples without it (CFG 1.0), as DiffusionNFT's official setting does.

The reward is hackable the way learned reward models are: the MLP's logits are piecewise linear in the pixels, so
its confidence keeps rising along directions that leave the manifold of real digits (high-contrast, saturated
strokes). Quality is what the reward cannot see: the judge's agreement with the prompt, a Fréchet distance of the
judge's features to held-out real digits, and the accuracy of a real-vs-generated discriminator.
"""

import functools
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import normguard as ng
import train_full as tf
from trainer import adapters, cli, rewards

NUM_CLASSES = 10
NULL_LABEL = 10  # the "empty prompt" of classifier-free guidance
SPLIT_SIZES = {"reward": 600, "judge": 600}  # held-out gets the remaining 597
SPLIT_SEED = 0
REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = os.environ.get("NORMGUARD_DIGITS_CACHE", str(REPO / "runs" / "digits_cache"))
# the tiny SD3 transformer: 16 tokens of 2×2 pixels, hidden size 4 heads × 16 = 64
TRANSFORMER_CONFIG = dict(
    sample_size=8,
    patch_size=2,
    in_channels=1,
    out_channels=1,
    num_layers=3,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=32,
    caption_projection_dim=64,
    pooled_projection_dim=32,
    pos_embed_max_size=4,
)
LABEL_TOKENS = 2  # length of the label's "text" sequence
# softmax temperature of the reward: at 1 the MLP is ~0.95 confident on real digits and RL has no headroom; at 4
# real held-out digits score 0.69 on average (like PickScore, never saturated), and off-manifold pixels reach > 0.95
REWARD_TEMPERATURE = 4.0


# ---------------------------------------------------------------------------------------------------------------
# data


@functools.lru_cache(maxsize=1)
def _all_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # 0..16 -> [-1, 1]
    return images, torch.tensor(d.target, dtype=torch.long)


def load_split(name):
    """Real digits of one split: "reward", "judge", "heldout" or "train" (= reward ∪ judge, the generator's data).

    Returns (images (N, 1, 8, 8) in [-1, 1], labels (N,) in 0..9). The permutation is fixed (SPLIT_SEED).
    """
    images, labels = _all_digits()
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    a, b = SPLIT_SIZES["reward"], SPLIT_SIZES["reward"] + SPLIT_SIZES["judge"]
    index = {"reward": perm[:a], "judge": perm[a:b], "heldout": perm[b:], "train": perm[:b]}
    if name not in index:
        raise ValueError(f"name: expected one of {sorted(index)}, got {name!r}")
    return images[index[name]], labels[index[name]]


def _check_images(images, labels):
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1:] != (1, 8, 8) or len(images) == 0:
        raise ValueError(f"images: expected a (B, 1, 8, 8) tensor with B >= 1, got {getattr(images, 'shape', images)}")
    if not isinstance(labels, torch.Tensor) or labels.shape != (images.shape[0],) or labels.is_floating_point():
        raise ValueError(
            f"labels: expected an integer tensor of shape (B,) = ({images.shape[0]},), "
            f"got {getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}"
        )
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images: expected finite values, got NaN or Inf")
    if not bool(((labels >= 0) & (labels < NUM_CLASSES)).all()):
        raise ValueError(
            f"labels: expected digits in 0..{NUM_CLASSES - 1}, got min {labels.min().item()}, max {labels.max().item()}"
        )


# ---------------------------------------------------------------------------------------------------------------
# the "text encoder": learned label embeddings


class LabelEncoder(nn.Module):
    """Labels -> (encoder_hidden_states (B, LABEL_TOKENS, joint_attention_dim), pooled_projections (B, pooled_dim)).

    The two outputs take the places of SD3's T5/CLIP token states and pooled CLIP vector. Index NULL_LABEL (10)
    is the empty prompt for classifier-free guidance. Saved as label_embeddings.safetensors in a model folder.
    """

    def __init__(self, num_tokens=LABEL_TOKENS, joint_attention_dim=32, pooled_projection_dim=32):
        super().__init__()
        self.num_tokens, self.joint_attention_dim = num_tokens, joint_attention_dim
        self.tokens = nn.Embedding(NUM_CLASSES + 1, num_tokens * joint_attention_dim)
        self.pooled = nn.Embedding(NUM_CLASSES + 1, pooled_projection_dim)

    def forward(self, labels):
        if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.is_floating_point():
            raise ValueError(f"labels: expected an integer (B,) tensor, got {getattr(labels, 'shape', labels)}")
        if not bool(((labels >= 0) & (labels <= NULL_LABEL)).all()):
            raise ValueError(f"labels: expected values in 0..{NULL_LABEL} ({NULL_LABEL} = null), got {labels.tolist()}")
        hidden = self.tokens(labels).reshape(len(labels), self.num_tokens, self.joint_attention_dim)
        return hidden, self.pooled(labels)

    def save_pretrained(self, path):
        Path(path).mkdir(parents=True, exist_ok=True)
        meta = {
            "num_tokens": str(self.num_tokens),
            "joint_attention_dim": str(self.joint_attention_dim),
            "pooled_projection_dim": str(self.pooled.embedding_dim),
        }
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
            str(Path(path) / "label_embeddings.safetensors"),
            metadata=meta,
        )

    @classmethod
    def from_pretrained(cls, path):
        from safetensors import safe_open

        file = Path(path) / "label_embeddings.safetensors"
        if not file.is_file():
            raise ValueError(f"path: expected a folder holding label_embeddings.safetensors, got {path}")
        with safe_open(str(file), "pt") as f:
            meta = f.metadata()
        enc = cls(**{k: int(v) for k, v in meta.items()})
        enc.load_state_dict(load_file(str(file)))
        return enc


# ---------------------------------------------------------------------------------------------------------------
# the reference generator: pretrained once, saved in the diffusers format


def velocity(transformer, encoder, x, t, labels):
    """v(x_t, t, c) of the transformer in the diffusers convention (timestep = TIMESTEP_SCALE·t)."""
    hidden, pooled = encoder(labels)
    return transformer(
        x, encoder_hidden_states=hidden, pooled_projections=pooled, timestep=ng.TIMESTEP_SCALE * t
    ).sample


@torch.no_grad()
def generate(transformer, encoder, labels, noise, steps):
    """Euler samples (B, 1, 8, 8) for labels (B,) from noise (B, 1, 8, 8) on ng.flow_timesteps(steps)."""
    return ng.euler_sample(
        lambda x, t: velocity(transformer, encoder, x, t, labels), noise, ng.flow_timesteps(steps, device=noise.device)
    )


def get_reference(
    cache_dir=DEFAULT_CACHE,
    device="cpu",
    *,
    steps=2000,
    batch=128,
    lr=1e-3,
    seed=0,
    ema=0.995,
    label_dropout=0.1,
    progress=True,
):
    """Path of the pretrained reference (a diffusers-format folder), pretraining it first (pretrain, with these
    settings) if it is not cached.

    The folder holds transformer/ (SD3Transformer2DModel.save_pretrained) and label_embeddings.safetensors
    (LabelEncoder), plus pretrain.json (settings, final loss, wall time). The folder name carries seed and steps, so
    a short test budget never shadows the real reference. About 2 min at steps=2000 on 2 cores.
    """
    for name, value in (("steps", steps), ("batch", batch)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    path = Path(cache_dir) / f"reference-seed{seed}-steps{steps}"
    if (path / "transformer" / "config.json").is_file() and (path / "label_embeddings.safetensors").is_file():
        return str(path)
    t0 = time.time()
    settings = dict(steps=steps, batch=batch, lr=lr, seed=seed, ema=ema, label_dropout=label_dropout)
    transformer, encoder, info = pretrain(device, progress=progress, **settings)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")  # write, then rename: a reader sees all or nothing
    transformer.to("cpu").save_pretrained(str(tmp / "transformer"))
    encoder.to("cpu").save_pretrained(str(tmp))
    info.update(transformer_config=TRANSFORMER_CONFIG, label_tokens=LABEL_TOKENS, split_seed=SPLIT_SEED)
    (tmp / "pretrain.json").write_text(json.dumps({**info, "wall_time_s": time.time() - t0}, indent=1))
    try:
        tmp.rename(path)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


def pretrain(device="cpu", *, steps=2000, batch=128, lr=1e-3, seed=0, ema=0.995, label_dropout=0.1, progress=True):
    """(transformer, encoder, info): the reference generator trained by flow matching on the "train" split.

    x_t = (1 - t)·x0 + t·ε with t ~ U(0, 1), target ε - x0, the model called with timestep TIMESTEP_SCALE·t; AdamW at
    lr with a linear warm-up and cosine decay; the returned weights are an EMA (decay ema) of the trained ones, as
    image generators ship. Deterministic given seed. info: the settings and the mean loss of the last 100 steps.
    """
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    transformer = SD3Transformer2DModel(**TRANSFORMER_CONFIG).to(device)
    dims = TRANSFORMER_CONFIG["joint_attention_dim"], TRANSFORMER_CONFIG["pooled_projection_dim"]
    encoder = LabelEncoder(LABEL_TOKENS, *dims).to(device)
    nn.init.normal_(encoder.tokens.weight, std=1.0)
    nn.init.normal_(encoder.pooled.weight, std=1.0)
    params = list(transformer.parameters()) + list(encoder.parameters())
    ema_params = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    cosine = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    images, labels = load_split("train")
    images, labels = images.to(device), labels.to(device)
    bar = tqdm(range(steps), desc="pretrain reference", disable=not progress, leave=False)
    losses = []
    for step in bar:
        idx = torch.randint(len(labels), (batch,), generator=gen).to(device)
        x0, c = images[idx], labels[idx].clone()
        c[torch.rand(batch, generator=gen).to(device) < label_dropout] = NULL_LABEL
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.rand(batch, generator=gen).to(device)
        x_t, target = ng.forward_process(x0, noise, t)
        loss = F.mse_loss(velocity(transformer, encoder, x_t, t, c), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(ema, (1 + step) / (10 + step))  # short runs: do not average in the random init
            for p_ema, p in zip(ema_params, params):
                p_ema.lerp_(p.detach(), 1 - decay)
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            bar.set_postfix_str(f"loss {sum(losses[-100:]) / len(losses[-100:]):.4f}")
    with torch.no_grad():
        for p_ema, p in zip(ema_params, params):
            p.copy_(p_ema)
    settings = dict(steps=steps, batch=batch, lr=lr, seed=seed, ema=ema, label_dropout=label_dropout)
    return transformer, encoder, {**settings, "final_loss_last100": sum(losses[-100:]) / len(losses[-100:])}


def load_reference(path, device="cpu"):
    """(transformer, encoder) from a get_reference folder, in eval mode with gradients off."""
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(str(Path(path) / "transformer")).to(device).eval()
    encoder = LabelEncoder.from_pretrained(path).to(device).eval()
    for p in list(transformer.parameters()) + list(encoder.parameters()):
        p.requires_grad_(False)
    return transformer, encoder


# ---------------------------------------------------------------------------------------------------------------
# reward proxy and quality judges: small classifiers trained once on their own splits, cached as safetensors


class RewardMLP(nn.Module):
    """Pixels -> 10 logits, one hidden ReLU layer: piecewise linear, so its confidence is hackable off-manifold."""

    def __init__(self, hidden=128):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, NUM_CLASSES))

    def forward(self, x):
        return self.net(x)


class JudgeCNN(nn.Module):
    """A small CNN (a different architecture from the reward); features() are its 64-d penultimate activations."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 16, 64),
            nn.ReLU(),
        )
        self.head = nn.Linear(64, NUM_CLASSES)

    def features(self, x):
        return self.conv(x)

    def forward(self, x):
        return self.head(self.features(x))


def _shift(x, gen):
    """Random shifts by up to one pixel (zero-padded with the background value -1): the judge's augmentation."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(3, (2,), generator=gen).tolist()
    return padded[..., dy : dy + 8, dx : dx + 8]


def _train_classifier(kind, seed=0, epochs=300, progress=False):
    """Full-batch Adam on one split. The reward MLP sees raw pixels; the judge CNN also one-pixel shifts."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = RewardMLP() if kind == "reward" else JudgeCNN()
    images, labels = load_split(kind)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    with torch.enable_grad():  # first use may come from inside quality_metrics' no_grad
        for _ in tqdm(range(epochs), desc=f"train {kind} classifier", disable=not progress, leave=False):
            x = images if kind == "reward" else _shift(images, gen)
            loss = F.cross_entropy(model(x), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def classifier_file(kind, cache_dir):
    return Path(cache_dir) / f"{kind}_classifier.safetensors"


def build_classifier(kind, cache_dir, epochs=300):
    """Train the reward MLP or judge CNN (_train_classifier) and write it where classifier() reads it, with its
    held-out accuracy and epochs; returns the model. classifier() calls it on first use; the tests build a
    short-budget judge in their own cache with it."""
    model = _train_classifier(kind, epochs=epochs)
    heldout_x, heldout_y = load_split("heldout")
    with torch.no_grad():
        acc = (model(heldout_x).argmax(1) == heldout_y).float().mean().item()
    file = classifier_file(kind, cache_dir)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(file.name + f".tmp{os.getpid()}")
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(tmp),
        metadata={"heldout_accuracy": f"{acc:.4f}", "split": kind, "epochs": str(epochs)},
    )
    tmp.replace(file)  # whole or absent
    return model


@functools.lru_cache(maxsize=None)
def classifier(kind, cache_dir, device):
    """The reward MLP or judge CNN, trained on first use and cached as cache_dir/<kind>_classifier.safetensors."""
    file = classifier_file(kind, cache_dir)
    if file.is_file():
        model = RewardMLP() if kind == "reward" else JudgeCNN()
        model.load_state_dict(load_file(str(file)))
    else:
        model = build_classifier(kind, cache_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval().to(device)


@functools.lru_cache(maxsize=None)
def heldout_features(cache_dir):
    """The judge's features of the held-out real digits, (N, 64): computed once per judge, as classifier() loads
    it once (every quality_metrics call compares against them)."""
    with torch.no_grad():
        return classifier("judge", cache_dir, "cpu").features(load_split("heldout")[0])


def reward_fn(images, labels, cache_dir=DEFAULT_CACHE):
    """Reward proxy: the reward MLP's confidence in the prompted digit, softmax(logits / REWARD_TEMPERATURE), (B,).

    images: (B, 1, 8, 8), nominally in [-1, 1]; values outside are clamped to it first, as a pipeline's image
    post-processing clamps decoded pixels (the clamp is where saturated, off-manifold strokes come from).
    labels: (B,) integer digits 0..9. Differentiable in images (inside [-1, 1]), for the adjoint diagnostic.
    """
    _check_images(images, labels)
    model = classifier("reward", str(cache_dir), str(images.device))
    logits = model(images.float().clamp(-1, 1)) / REWARD_TEMPERATURE
    return logits.softmax(-1).gather(1, labels[:, None]).squeeze(1)


def frechet_distance(feat_a, feat_b):
    """‖μ_a - μ_b‖² + tr(Σ_a + Σ_b - 2 (Σ_a^½ Σ_b Σ_a^½)^½) between two (N, D) feature sets, in float64."""
    a, b = feat_a.double(), feat_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)

    def sqrtm_psd(m):
        w, q = torch.linalg.eigh((m + m.T) / 2)
        return (q * w.clamp_min(0).sqrt()) @ q.T

    s = sqrtm_psd(cov_a)
    cross = torch.linalg.eigvalsh(s @ cov_b @ s).clamp_min(0).sqrt().sum()
    return ((mu_a - mu_b) ** 2).sum().item() + (torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross).item()


def discriminator_accuracy(fake, real, folds=5, seed=0):
    """Cross-validated accuracy of a logistic-regression real-vs-generated classifier on pixels (0.5 = can't tell).

    fake, real: (N, 1, 8, 8); the larger set is subsampled so both classes are equally many.
    """
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    n = min(len(fake), len(real))
    g = torch.Generator().manual_seed(seed)
    fake = fake[torch.randperm(len(fake), generator=g)[:n]]
    real = real[torch.randperm(len(real), generator=g)[:n]]
    x = torch.cat([fake, real]).flatten(1).double().numpy()
    y = np.array([0] * n + [1] * n)
    splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, y)
    # a plain loop, not sklearn's cross_val_score: the same fits and accuracies without its per-call validation
    # and joblib dispatch, which took half the time of these tiny fits (one such call per image metric). One BLAS
    # thread: these 64-wide products are too small to split, and on a busy 2-core machine the threaded OpenBLAS
    # made each fit ~5x slower (it waits for a core the other jobs hold)
    with blas_controller().limit(limits=1, user_api="blas"):
        scores = [LogisticRegression(max_iter=2000).fit(x[a], y[a]).score(x[b], y[b]) for a, b in splits]
    return float(np.mean(scores))


@functools.lru_cache(maxsize=1)
def blas_controller():
    """threadpoolctl's view of the loaded BLAS pools, listed once (~5 ms each time). First made inside
    discriminator_accuracy, after sklearn's imports have loaded scipy's BLAS."""
    from threadpoolctl import ThreadpoolController  # installed with scikit-learn

    return ThreadpoolController()


@torch.no_grad()
def quality_metrics(images, labels, cache_dir=DEFAULT_CACHE):
    """Quality, independent of the reward: nothing here was trained on the reward split or sees the reward MLP.

    images: (B, 1, 8, 8) (clamped to [-1, 1] as in reward_fn), B >= 10; labels: (B,) digits 0..9. Returns
        judge_acc   fraction of images the judge CNN classifies as the prompted digit (higher is better)
        fd          Fréchet distance of the judge's 64-d features to the held-out real digits (lower is better)
        disc_acc    real-vs-generated discriminator accuracy against held-out digits (0.5 = indistinguishable)
    Compare fd and disc_acc only between image sets of one size: both depend on B.
    """
    _check_images(images, labels)
    if len(images) < 10:
        raise ValueError(f"images: expected B >= 10 for feature statistics, got B = {len(images)}")
    judge = classifier("judge", str(cache_dir), "cpu")
    x = images.detach().float().cpu().clamp(-1, 1)
    real, _ = load_split("heldout")
    feats = judge.features(x)
    return {
        "judge_acc": (judge.head(feats).argmax(1) == labels.cpu()).float().mean().item(),
        "fd": frechet_distance(feats, heldout_features(str(cache_dir))),
        "disc_acc": discriminator_accuracy(x, real),
    }


# ---------------------------------------------------------------------------------------------------------------
# the digits preset of train_full.py: the same loop, losses, checkpoints and exports as on SD3/FLUX


class DigitsAdapter(adapters.SD3Adapter):
    """The testbed as a train_full model family: the reference's SD3 transformer in pixel space (no VAE), digit
    labels "0".."9" as prompts through LabelEncoder, ng.flow_timesteps(shift) as the sampling grid, and the judges'
    quality_metrics as extra eval metrics. Its LoRA exports in the SD3 format (loadable into the transformer)."""

    model_file = "transformer/config.json"

    @classmethod
    def check(cls, cfg):
        pass  # an empty path is fine: resolve_path builds or reuses the cached reference

    @classmethod
    def resolve_path(cls, cfg):
        if not cfg.pretrained_model_name_or_path:
            return get_reference(cfg.cache_dir or DEFAULT_CACHE, "cpu")
        return super().resolve_path(cfg)

    def __init__(self, cfg, path, device, weight_dtype):
        from diffusers import SD3Transformer2DModel

        self.cfg, self.device, self.dtype, self.pipe = cfg, device, weight_dtype, None
        self.transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer")
        self.encoder = LabelEncoder.from_pretrained(path).to(device).requires_grad_(False)
        c = self.transformer.config
        self.latent_shape = (c.in_channels, c.sample_size, c.sample_size)

    def labels(self, prompts):
        try:
            return torch.tensor([int(p) for p in prompts], device=self.device)
        except ValueError:
            raise ValueError(f"prompts: the digits preset expects digit labels 0..9, got {prompts[:4]}") from None

    def encode(self, prompts):
        hidden, pooled = self.encoder(self.labels(prompts))
        return {"encoder_hidden_states": hidden, "pooled_projections": pooled}

    def null_cond(self, n):
        hidden, pooled = self.encoder(torch.full((n,), NULL_LABEL, device=self.device))
        return {"encoder_hidden_states": hidden, "pooled_projections": pooled}

    def sigmas(self, num_steps):
        return ng.flow_timesteps(num_steps, shift=self.cfg.shift, device=self.device)

    def decode(self, x):
        return x.float().clamp(-1, 1)

    def image_metrics(self, images, prompts):
        """quality_metrics (judge accuracy, FD, discriminator accuracy): quality the reward cannot see; B >= 10."""
        if len(prompts) < 10:
            return {}
        return quality_metrics(images, self.labels(prompts).cpu(), cache_dir=self.cfg.cache_dir or DEFAULT_CACHE)


def label_reward(cfg, device):
    """train_full's `--reward=digits`: reward_fn with the prompts read as digit labels."""
    cache = cfg.cache_dir or DEFAULT_CACHE
    return lambda images, prompts: reward_fn(
        images, torch.tensor([int(p) for p in prompts], device=images.device), cache_dir=cache
    )


def batch_permutation(seed, images):
    """A permutation of range(B) drawn from a generator seeded by (seed, the batch's bytes): a fresh run and a
    resumed one draw the same permutation for the same samples, and nothing in it depends on the rewards."""
    import hashlib

    data = images.detach().float().cpu().contiguous().numpy().tobytes()
    digest = hashlib.blake2b(data, digest_size=8, key=str(seed).encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return torch.randperm(len(images), generator=gen).to(images.device)


def shuffled_label_reward(cfg, device):
    """train_full's `--reward=digits_shuffled`, the null-reward control: the digits reward of each call permuted
    across its batch (a train_full rollout batch is one call when train_batch_size holds it). The rewards keep
    their distribution and lose any relation to the samples they are given to; their batch mean is unchanged."""
    real = label_reward(cfg, device)
    return lambda images, prompts: real(images, prompts)[batch_permutation(cfg.seed, images)]


PRESET = dict(
    resolution=8,
    reward="digits",
    lora_rank=8,
    lora_alpha=16,
    group_size=8,
    prompts_per_step=4,
    train_batch_size=32,
    mixed_precision="no",
    gradient_checkpointing=False,
    lr=1e-3,
    eval_seeds=4,
    decay_lag=1,  # the old/EMA decay one update late, as every digits run so far (the official schedules: 0)
    # the experiment's tables were run with Euler rollouts of 10 steps and AWM's first-90 % subset for every method
    sampler="euler",
    sample_steps=10,
    awm_timesteps="subset",
    # and DPO at t = sigmoid(n) drawn per pair (train_full's default is Flow-Factory's law, one t per micro-batch)
    dpo_t_law="sigmoid",
    dpo_t_shared=False,
)
# --smoke keeps the preset's micro-batch: 8x8 images need no smaller one, and the evaluation (batched by it) then
# samples its 10 x eval_seeds images in one batch instead of one batch per 4
SMOKE_SIZES = dict(resolution=8, train_batch_size=PRESET["train_batch_size"])
adapters.register_adapter("digits", DigitsAdapter, PRESET, SMOKE_SIZES, [str(d) for d in range(NUM_CLASSES)])
rewards.register_reward("digits", label_reward)
rewards.register_reward("digits_shuffled", shuffled_label_reward)


def main(argv=None):
    """`python -m experiments.digits_testbed`: train_full's command line with the digits preset (every train_full
    key applies)."""
    return tf.main(argv, preset="digits")


if __name__ == "__main__":
    cli.run(main)
