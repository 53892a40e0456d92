"""Suite-wide settings: no model hub, the repo root importable, deterministic CPU math, one shared digits cache, one
run of the toy's headline."""

import gc
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a stray hub call fails at once instead of hanging
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The suite's models are tiny: a second intra-op thread only adds sync cost, and on a loaded 2-core machine
    it made a tiny-model training step 100x slower (10 s against 0.05 s)."""
    import torch  # here, not at the top: pytest-xdist's controller loads this file too, and needs no torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_unconfigure(config):
    """At exit the interpreter's last garbage collections walk every object that torch, diffusers and transformers
    made: ~2 s per worker on this machine, after its last test. Frozen, they are skipped (nothing of the suite's
    waits on a cycle being collected at exit)."""
    gc.freeze()


# module fixtures whose work (a run) several tests share: the tests of a file that use one run together. (The
# digits cache is not among them: the workers share it through a file lock.)
SHARED_FIXTURES = {"toy_headline", "smoke"}
# tests that each take 15-25 s on this machine (fresh interpreters: a notebook kernel, torchrun's two workers),
# handed out first: pytest-xdist deals units out in collection order, and a long one dealt last is the run's tail
LONG_FIRST = ("tests/test_notebooks.py::", "tests/test_train_full.py::test_two_processes")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups in its own hook
def pytest_collection_modifyitems(items):
    """Groups for pytest-xdist's --dist loadgroup: the tests of a file that share an expensive fixture run on one
    worker, so that it is built once per session; every other test is its own unit, so that the slow ones spread
    over the workers. (The tiny pipelines of module fixtures take a second to build again on the other worker.)
    The LONG_FIRST tests move to the front, in their order; the rest keep theirs."""
    items.sort(key=lambda item: not item.nodeid.startswith(LONG_FIRST))
    for item in items:
        shared = sorted(SHARED_FIXTURES & set(item.fixturenames))
        path = item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(f"{path}::{'+'.join(shared)}" if shared else item.nodeid))


# the suite's two digits caches. The unit tests check plumbing, not pictures: their reference has the experiment's
# --smoke pretraining budget and their judge a tenth of its training. The `experiment` tests judge what a reference
# draws: theirs has a short pretraining budget (the experiment's own is 2000 steps) and the real judge.
DIGITS_UNIT = dict(name="digits_cache", steps=30, judge_epochs=30)
DIGITS_TRAINED = dict(name="digits_cache_trained", steps=400, judge_epochs=None)


def shared_digits_cache(tmp_path_factory, name, steps, judge_epochs):
    """A digits cache of the session, in its temp root (no file from an earlier session is trusted) and shared by
    the pytest-xdist workers: a reference pretrained with `steps`, the reward classifier, and the judge (trained for
    judge_epochs, or, with None, as classifier() trains it), built by whichever worker takes the lock first and read
    by the others. Returns (cache dir, reference path)."""
    from filelock import FileLock

    from experiments import digits_testbed as digits

    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root  # the root every worker shares
    cache = str(root / name)
    with FileLock(str(root / f"{name}.lock")):
        path = digits.get_reference(cache, "cpu", steps=steps, progress=False)
        digits.classifier("reward", cache, "cpu")
        if judge_epochs and not digits.classifier_file("judge", cache).is_file():
            digits.build_classifier("judge", cache, epochs=judge_epochs)
        digits.classifier("judge", cache, "cpu")
    return cache, path


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """(cache dir, reference path) of DIGITS_UNIT, for the tests of the plumbing."""
    return shared_digits_cache(tmp_path_factory, **DIGITS_UNIT)


@pytest.fixture(scope="session")
def trained_digits_cache(tmp_path_factory):
    """(cache dir, reference path) of DIGITS_TRAINED, for the `experiment` tests that judge what is drawn."""
    return shared_digits_cache(tmp_path_factory, **DIGITS_TRAINED)


@pytest.fixture(scope="session")
def toy_headline():
    """`python -m experiments.toy` at its default settings (the headline, ~25 s), run once per session for every
    test that pins what it shows: run()'s result (metrics, models, samples), without figures or files."""
    from experiments import toy as toy_experiment

    return toy_experiment.run(toy_experiment.Config(plot=False), progress=False)


@pytest.fixture
def host_syncs(monkeypatch):
    """The list every way a tensor's value reaches Python (bool, item, tolist, float) appends its name to, from now
    until the test ends: a host sync on a GPU."""
    import torch

    syncs = []
    for name in ("__bool__", "item", "tolist", "__float__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name):
            syncs.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return syncs
