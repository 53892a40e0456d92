"""The official recipes' last details: the T5 prompt length, and DPO's train t as Flow-Factory draws it (its law,
and one t shared by a micro-batch of pairs), each against the formula written out here."""

import pytest
import torch

import train_full as tf
from trainer import recipes, rollouts

PATH = dict(pretrained_model_name_or_path="owner/model")  # make_config reads no file
# ours is computed in float32: sigmoid, the product and 1 - x each round, the last by up to half an ulp of 1 (6e-8)
TOL = 2.5e-7


def test_every_official_recipe_encodes_prompts_with_128_t5_tokens():
    """Both official trainers call compute_text_embeddings(..., max_sequence_length=128); without a recipe the
    trainer keeps the SD3 pipeline's own default, 256; the command line still wins over a recipe."""
    for name in recipes.RECIPES:
        assert tf.make_config({"recipe": name, "reward": "jpeg", **PATH}).max_sequence_length == 128, name
    assert tf.make_config(dict(PATH)).max_sequence_length == 256
    cfg = tf.make_config({"recipe": "nft_pickscore", "max_sequence_length": 77, **PATH})
    assert cfg.max_sequence_length == 77


def flow_factory_t(n):
    """Flow-Factory's DPO draw written out in float64 (logit-normal, mean 0, std 1, no shift, timestep_range 0.99):
    raw = clamp(sigmoid(n), 0.01, 1 - 1e-6), scheduler timestep 1000·(1 - 0.99·raw), σ = timestep / 1000."""
    raw = torch.sigmoid(n.double()).clamp(0.01, 1 - 1e-6)
    return 1000 * (1 - 0.99 * raw) / 1000


def dpo(**keys):
    return tf.make_config({"method": "dpo", **PATH, **keys})


def test_dpo_t_is_flow_factorys_law_shared_by_a_micro_batch_by_default():
    """Against the float64 formula, to float32's rounding (TOL)."""
    cfg = dpo()
    assert (cfg.dpo_t_law, cfg.dpo_t_shared) == ("flow_factory", True)
    t = rollouts.dpo_train_t(cfg, 5, torch.Generator().manual_seed(0))
    n = torch.randn(1, generator=torch.Generator().manual_seed(0))
    assert t.shape == (5,) and t.dtype == torch.float32 and torch.equal(t, t[:1].expand(5))
    torch.testing.assert_close(t.double(), flow_factory_t(n).expand(5), rtol=0, atol=TOL)


def test_dpo_t_per_pair_and_the_earlier_law_are_keys():
    """dpo_t_shared=false draws one n per pair; dpo_t_law=sigmoid with it is this trainer's earlier draw, bit for
    bit (the digits preset keeps it: its DPO numbers stay what they were)."""
    n = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    t = rollouts.dpo_train_t(dpo(dpo_t_shared=False), 1000, torch.Generator().manual_seed(1))
    torch.testing.assert_close(t.double(), flow_factory_t(n), rtol=0, atol=TOL)
    assert 0.0100 <= t.min() and t.max() <= 0.9901 and t.unique().numel() == 1000
    earlier = rollouts.dpo_train_t(dpo(dpo_t_law="sigmoid", dpo_t_shared=False), 1000, torch.Generator().manual_seed(1))
    assert torch.equal(earlier, torch.sigmoid(n))
    with pytest.raises(ValueError, match=r"^dpo_t_law: expected one of \('flow_factory', 'sigmoid'\)"):
        dpo(dpo_t_law="logit_normal")


def test_the_trainer_draws_dpo_t_once_per_micro_batch_of_pairs():
    """train_full.minibatches: 4 prompts' pairs in micro-batches of 2 pairs, one t per micro-batch, in the order the
    generator is read (the micro-batch's t, then its shared noise)."""
    cfg = dpo(prompts_per_step=4, group_size=2, train_batch_size=2)
    batch = tf.Rollouts(torch.zeros(8, 3), {}, torch.arange(8.0), torch.zeros(8), None)
    (losses,) = tf.minibatches(cfg, batch, None, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    for loss in losses:
        n = torch.randn(1, generator=g)
        eps = torch.randn(2, 3, generator=g)
        t = loss.keywords["t"]
        torch.testing.assert_close(t.double(), flow_factory_t(n).expand(2), rtol=0, atol=TOL)
        assert torch.equal(loss.keywords["eps"], eps)
    assert len(losses) == 2 and losses[0].keywords["t"][0] != losses[1].keywords["t"][0]
