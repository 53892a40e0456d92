"""The official per-reward settings of DiffusionNFT and AWM as train_full Config values, and their old-policy schedules.

`--recipe=nft_ocr` applies RECIPES["nft_ocr"] on top of the preset and below --smoke and the command line, so any key
stays overridable. Sources (the official code, read for facts only): DiffusionNFT `config/nft.py` and
`scripts/train_nft_sd3.py`; AWM `advantage_weighted_matching/config/dgx_awm.py` and `scripts/train_sd3_awm.py`.
What a recipe does not reproduce (NFT's rollouts from its old policy, ...) is listed in docs/train_full.md.
"""

# Both official trainers encode prompts with 128 T5 tokens (compute_text_embeddings(..., max_sequence_length=128));
# without a recipe the trainer keeps the SD3 pipeline's own default, 256
OFFICIAL_T5 = dict(max_sequence_length=128)
# DiffusionNFT: SD3.5-M at 512 px, 10 deterministic dpm2 steps, CFG 1, 24 images per prompt, lr 3e-4, KL 1e-4
NFT = dict(method="nft", sample_steps=10, train_timesteps=0, group_size=24, cfg_scale=1.0, lr=3e-4, weight_decay=1e-4)
NFT.update(nft_beta=1.0, kl_weight=1e-4, adv_clip=5.0, nft_decay_type=1, sampler="dpm2", **OFFICIAL_T5)
# AWM: 14 SA-Solver steps, 6 train timesteps (0 = the recipe), one per stratum of the first 90 %, ghuber p = 0.25,
# EMA weight 1; the strata from index 0 and noise level 0 for PickScore, from index 1 and 0.4 for GenEval and OCR
AWM = dict(method="awm", sample_steps=14, train_timesteps=0, group_size=24, cfg_scale=1.0, lr=3e-4, weight_decay=1e-4)
AWM.update(adv_clip=5.0, awm_weighting="ghuber", awm_loss_type="exp_first", awm_kl_weighting="uniform")
AWM.update(sampler="sa_solver", awm_timesteps="discrete", sa_noise_level=0.0)
AWM.update(awm_ema_weight=1.0, ema_decay_rate=0.001, **OFFICIAL_T5)
AWM_WO_INIT = dict(AWM, awm_timesteps="discrete_wo_init", sa_noise_level=0.4)

# reward="" marks a reward we do not ship (OCR, GenEval, HPSv2, the multi-reward mix): check() asks for --reward
RECIPES = {
    "nft_pickscore": {**NFT, "reward": "pickscore"},
    "nft_hpsv2": {**NFT, "reward": ""},
    "nft_geneval": {**NFT, "reward": ""},
    "nft_ocr": {**NFT, "reward": "", "nft_beta": 0.1, "nft_decay_type": 2, "grad_steps_per_batch": 2},
    "nft_multi_reward": {**NFT, "reward": "", "nft_beta": 0.1, "sample_steps": 25},  # PickScore + HPSv2 + CLIPScore
    "awm_pickscore": {**AWM, "reward": "pickscore", "kl_weight": 1e-4},
    "awm_geneval": {**AWM_WO_INIT, "reward": "", "kl_weight": 1e-3},
    "awm_ocr": {**AWM_WO_INIT, "reward": "", "kl_weight": 3e-3},
}

# DiffusionNFT's return_decay(step, decay_type): type -> (flat steps, uprate, uphold)
NFT_DECAY = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}
AWM_EMA_MAX = 0.3  # AWM's kl_ema_decay with kl_ema_decay_type "linear"


def settings(name):
    """The Config values of recipe `name` ("" = none); a ValueError naming the key for an unknown one."""
    if name and name not in RECIPES:
        raise ValueError(f"recipe: expected one of {sorted(RECIPES)} (or '' for none), got {name!r}")
    return dict(RECIPES.get(name, {}))


def check(cfg):
    """cfg.recipe is a recipe's name or ""; a recipe whose reward we do not ship needs --reward."""
    settings(cfg.recipe)
    if cfg.recipe and not cfg.reward:
        what = cfg.recipe.split("_", 1)[1]
        raise ValueError(
            f"reward: the {cfg.recipe} recipe's {what} reward is not built in: pass --reward=module:function"
        )


def old_policy_decay(cfg, optimizer_steps):
    """The decay d of old <- d·old + (1 - d)·theta, applied once per rollout batch after its update.

    n = optimizer_steps - cfg.decay_lag, where optimizer_steps counts the updates so far, this batch's included (the
    official global_step). NFT (return_decay): 0 for the first `flat` steps, then min(uprate·(n - flat), uphold): type 0
    keeps old = theta, type 1 is min(0.001·n, 0.5), type 2 is 0 up to n = 75, then min(0.0075·(n - 75), 0.999).
    AWM's EMA: min(ema_decay_rate·n, 0.3)."""
    n = optimizer_steps - cfg.decay_lag
    if cfg.method == "nft":
        flat, uprate, uphold = NFT_DECAY[cfg.nft_decay_type]
        return 0.0 if n < flat else min(uprate * (n - flat), uphold)
    return min(cfg.ema_decay_rate * n, AWM_EMA_MAX)
