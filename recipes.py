"""The old-policy schedules of DiffusionNFT and AWM, from their official code (`scripts/train_nft_sd3.py`,
`scripts/train_sd3_awm.py`, read for facts only)."""

# DiffusionNFT's return_decay(step, decay_type): type -> (flat steps, uprate, uphold)
NFT_DECAY = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}
AWM_EMA_MAX = 0.3  # AWM's kl_ema_decay with kl_ema_decay_type "linear"


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
