"""Suite-wide settings: no model hub, the repo root importable, deterministic CPU math, one shared digits cache, one
run of the toy's headline."""

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a stray hub call fails at once instead of hanging
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The suite's models are tiny: a second intra-op thread only adds sync cost, and on a loaded 2-core machine
    it made a tiny-model training step 100x slower (10 s against 0.05 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


DIGITS_TEST_STEPS = 400  # pretraining steps of the suite's digits reference (the experiment's is 2000)


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """One digits cache for the whole session, in a temp dir (no file from an earlier run is trusted): the reference
    pretrained once with DIGITS_TEST_STEPS, and the reward and judge classifiers, trained on first use, shared by
    every test that needs them. Returns (cache dir, reference path)."""
    import digits

    cache = str(tmp_path_factory.mktemp("digits_cache"))
    return cache, digits.get_reference(cache, "cpu", steps=DIGITS_TEST_STEPS, progress=False)


@pytest.fixture(scope="session")
def toy_headline():
    """`python toy_experiment.py` at its default settings (the headline, ~1 min), run once per session for every
    test that pins what it shows: run()'s result (metrics, models, samples), without figures or files."""
    import toy_2d
    import toy_experiment

    return toy_experiment.run(toy_2d.Config(plot=False), progress=False)
