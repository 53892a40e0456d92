"""Faults lose nothing and say what happened (issue 21, part 4): the trainer and the drivers under a bad out_dir, bad
values, a full disk, a destroyed update, a resume that does not match, a killed driver. Each test fails on the code
before these faults were handled."""

import math
import os
import resource
import signal
import time
from pathlib import Path

import pytest
import torch

import train_full as tf
from tests import test_train_full as tt
from trainer import adapters, checkpoints, cli

sd3_path, run = tt.sd3_path, tt.run  # the tiny SD3 pipeline fixture and its --smoke run


def refused_before_the_model(tmp_path, monkeypatch, sd3_path, *args, out=None):
    """The UsageError of `args` on a tiny SD3 smoke run, checked to come within 5 s and before anything reads the
    model folder (no resolve_path, no check_model, no load)."""

    def never(*a, **k):
        raise AssertionError("the model folder was read before the error")

    for name in ("resolve_path", "check_model", "__init__"):
        monkeypatch.setattr(adapters.SD3Adapter, name, never)
    base = [f"--pretrained_model_name_or_path={sd3_path}", f"--out_dir={out or tmp_path / 'out'}"]
    base += [] if any(a.startswith("--reward=") for a in args) else ["--reward=jpeg"]
    t0 = time.time()
    with pytest.raises(cli.UsageError) as e:
        tf.main([*base, "--smoke", *args])
    assert time.time() - t0 < 5
    return str(e.value)


def test_an_out_dir_that_is_a_file_or_under_one_is_refused_first(sd3_path, tmp_path, monkeypatch):
    (tmp_path / "f").write_text("")
    message = refused_before_the_model(tmp_path, monkeypatch, sd3_path, out=tmp_path / "f")
    assert message.startswith(f"out_dir: {tmp_path / 'f'} is a file")
    message = refused_before_the_model(tmp_path, monkeypatch, sd3_path, out=tmp_path / "f" / "run")
    assert message.startswith(f"out_dir: {tmp_path / 'f' / 'run'} lies under {tmp_path / 'f'}, a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder: the probe cannot fail as root")
def test_a_read_only_out_dir_is_refused_first(sd3_path, tmp_path, monkeypatch):
    (tmp_path / "ro").mkdir(mode=0o500)
    message = refused_before_the_model(tmp_path, monkeypatch, sd3_path, out=tmp_path / "ro" / "run")
    assert message.startswith(f"out_dir: cannot write into {tmp_path / 'ro'}")


def test_the_write_probe_leaves_nothing(tmp_path):
    checkpoints.check_out_dir(tmp_path / "new" / "run")
    assert list(tmp_path.iterdir()) == []  # nothing made, nothing left: the probe went into tmp_path


@pytest.mark.parametrize(
    "args, message",
    [
        (["--reward=no_such_module_xyz:fn"], "reward: cannot load"),
        (["--eval_rewards=no_such_module_xyz:fn"], "eval_rewards: cannot load"),
        (["--train_prompts=/no/such/prompts.txt"], "train_prompts: expected a text file"),
        (["--eval_prompts=/no/such/prompts.txt"], "eval_prompts: expected a text file"),
        (["--resume=latest"], "resume: expected 'latest' with a complete checkpoint"),
        (["--resume=/no/such/checkpoint"], "resume: expected"),
        (["--seed=1180591620717411303424"], "seed: expected an int in 0..2147483647"),
        (["--seed=-1"], "seed: expected an int in 0..2147483647"),
    ],
)
def test_config_errors_come_before_the_model_folder_is_read(sd3_path, tmp_path, monkeypatch, args, message):
    assert refused_before_the_model(tmp_path, monkeypatch, sd3_path, *args).startswith(message)


def test_a_prompt_file_not_in_utf8_is_named(sd3_path, tmp_path, monkeypatch):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("a caf\xe9 at night\n".encode("latin-1"))
    message = refused_before_the_model(tmp_path, monkeypatch, sd3_path, f"--train_prompts={bad}")
    assert message.startswith(f"train_prompts: {bad} is not UTF-8 text (byte 0xe9")


def test_a_resume_with_fewer_steps_than_its_checkpoint_is_refused(sd3_path, tmp_path, monkeypatch):
    run(sd3_path, tmp_path, "--steps=3", "--eval_every=100")
    message = refused_before_the_model(tmp_path, monkeypatch, sd3_path, "--resume=latest", "--steps=2", out=tmp_path)
    assert message.startswith("steps: expected >= 3, the step of ") and "checkpoint-0000003" in message


def test_resume_accepts_the_same_model_folder_written_otherwise(sd3_path, tmp_path):
    """A trailing slash or a symlink names the same folder: the identity compares resolved paths."""
    run(sd3_path, tmp_path, "--eval_every=100")
    link = tmp_path / "pipe_link"
    link.symlink_to(sd3_path, target_is_directory=True)
    assert run(sd3_path + "/", tmp_path, "--resume=latest", "--steps=3", "--eval_every=100")["steps"] == 3
    assert run(str(link), tmp_path, "--resume=latest", "--steps=4", "--eval_every=100")["steps"] == 4
    other = tmp_path / "other_pipe"
    other.symlink_to(Path(sd3_path).parent, target_is_directory=True)  # another folder: still refused
    with pytest.raises(cli.UsageError, match="pretrained_model_name_or_path"):
        run(str(other / Path(sd3_path).name) + "_x", tmp_path, "--resume=latest", "--steps=5")


def trainable_max(checkpoint):
    from safetensors.torch import load_file

    return max(float(v.abs().max()) for v in load_file(str(checkpoint / "trainable.safetensors")).values())


def test_lr_1e30_stops_at_the_bound_before_any_save(sd3_path, tmp_path):
    with pytest.raises(SystemExit, match=r"step 1: the update took the trainable weights' norm from .* beyond 10x"):
        run(sd3_path, tmp_path, "--lr=1e30", "--eval_every=100")
    assert not list((tmp_path / "checkpoints").glob("*checkpoint-*")) and not (tmp_path / "lora").exists()


def test_a_destroyed_update_at_step_2_names_checkpoint_1(sd3_path, tmp_path, monkeypatch):
    real, calls = torch.optim.AdamW.step, []

    def huge_lr_at_step_2(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            self.param_groups[0]["lr"] = 1e30
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", huge_lr_at_step_2)
    with pytest.raises(SystemExit, match=r"step 2: the update took .*last good checkpoint: .*checkpoint-0000001"):
        run(sd3_path, tmp_path, "--steps=3", "--eval_every=100")
    (kept,) = tf.complete_checkpoints(tmp_path / "checkpoints")
    assert kept.name == "checkpoint-0000001" and trainable_max(kept) < 10


def test_past_the_bound_the_next_rollouts_nan_rejects_the_checkpoint(sd3_path, tmp_path, monkeypatch):
    """With the bound lifted, lr 1e30 saves checkpoint 1 (|w| ~ 1e30, finite); the next rollouts are NaN: the run
    stops with one line, checkpoint 1 is renamed out of --resume's reach, and no checkpoint is named good."""
    monkeypatch.setattr(tf, "WEIGHT_NORM_BOUND", math.inf)
    with pytest.raises(SystemExit) as e:
        run(sd3_path, tmp_path, "--lr=1e30", "--eval_every=100")
    message = str(e.value)
    assert message.startswith("stopped: step 2: the policy's rollouts are NaN/Inf"), message
    assert "checkpoint-0000001 holds them: moved to rejected-checkpoint-0000001" in message
    assert message.endswith("last good checkpoint: None")
    assert tf.complete_checkpoints(tmp_path / "checkpoints") == []
    assert trainable_max(tmp_path / "checkpoints" / "rejected-checkpoint-0000001") > 1e20


@pytest.fixture
def file_size_limit():
    """Files of this process may grow to `limit` bytes (a full disk, as the writer sees it: a write fails with an
    errno), restored after the test."""
    before, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    yield lambda limit: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, before[1]))
    resource.setrlimit(resource.RLIMIT_FSIZE, before)
    signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.parametrize("limit", [2_000, 40_000])
def test_a_full_disk_stops_with_the_file_named(sd3_path, tmp_path, file_size_limit, limit):
    """At 2 kB config.json fails (before step 1); at 40 kB a checkpoint or an eval grid does, mid-run."""
    file_size_limit(limit)
    with pytest.raises(SystemExit) as e:
        run(sd3_path, tmp_path, "--steps=3")
    file_size_limit(resource.RLIM_INFINITY)
    message = str(e.value)
    assert message.startswith(f"stopped: could not write {tmp_path}"), message
    assert "File too large" in message or "disk full" in message
    assert "Traceback" not in message and not list(tmp_path.rglob("*.tmp*"))


def test_outputs_are_written_by_the_atomic_helper(sd3_path, tmp_path, monkeypatch):
    written, real = [], cli.write_atomic
    monkeypatch.setattr(cli, "write_atomic", lambda path, text: (written.append(Path(path).name), real(path, text)))
    run(sd3_path, tmp_path, "--eval_every=100")
    assert {"config.json", "metrics.json", "log.jsonl", "evals.jsonl"} <= set(written)


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    cli.write_atomic(path, "old")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(cli.WriteError, match=f"could not write {path} \\(No space left on device\\)"):
        cli.write_atomic(path, "new")
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]


def test_a_failed_export_keeps_the_previous_lora(sd3_path, tmp_path, monkeypatch):
    run(sd3_path, tmp_path, "--eval_every=100")
    before = {p.name: p.read_bytes() for p in (tmp_path / "lora").iterdir()}

    def half_written(cfg, adapter, transformer, out_dir):
        (Path(out_dir) / "lora").mkdir(parents=True)
        (Path(out_dir) / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tf, "export_lora", half_written)
    with pytest.raises(SystemExit, match=f"stopped: could not write {tmp_path / 'lora'} \\(No space left"):
        run(sd3_path, tmp_path, "--eval_every=100", "--resume=latest", "--steps=3")
    assert {p.name: p.read_bytes() for p in (tmp_path / "lora").iterdir()} == before


# ---------------------------------------------------------------------------------------------------------------
# the digits driver: its workers die with it, a run folder has one writer, every value is checked up front


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--out_dir=", "out_dir: expected a folder"),
        ("--kl_weight=-1", "kl_weight: expected a finite number >= 0"),
        ("--lam=inf", "lam: expected a finite number >= 0"),
        ("--threads=0", "threads: expected an int >= 1"),
        ("--rescales=inf", "rescales: expected comma-separated finite numbers > 0"),
        ("--kl_weights=1e-2,nan", "kl_weights: expected comma-separated finite numbers > 0"),
        ("--dpo_lr=inf", "dpo_lr: expected a finite number > 0"),
        ("--seeds=0,1180591620717411303424", "seed: expected an int in 0..2147483647"),
        ("--ref_seed=-1", "ref_seed: expected an int in 0..2147483647"),
        ("--jobs=0", "jobs: expected an int >= 1"),
    ],
)
def test_digits_refuses_each_bad_value_up_front(arg, message):
    from experiments import digits as dx

    with pytest.raises(cli.UsageError) as e:
        cli.checked(dx.parse_args, [arg])
    assert str(e.value).startswith(message), str(e.value)


def test_a_run_folder_lock_refuses_a_live_owner_and_takes_over_a_dead_ones(tmp_path):
    """A live holder stops a second run (the message names its pid); once it is killed (-9: none of its code runs)
    the lock is free. A lock file left with the pid of a live process that does not hold it (a pid reused after a
    crash) is taken over too: the OS lock, not the pid, says who owns the folder."""
    import subprocess
    import sys

    from experiments import digits as dx

    folder, lock = tmp_path / "runs" / "nft_none_seed0", tmp_path / "runs" / "nft_none_seed0.lock"
    hold = (
        "import sys, time; from pathlib import Path; from experiments import digits as dx\n"
        f"with dx.run_lock(Path({str(folder)!r})):\n    print('held', flush=True); time.sleep(60)"
    )
    root = Path(__file__).resolve().parents[1]
    live = subprocess.Popen([sys.executable, "-c", hold], cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match=f"{folder} is in use by process {live.pid}"):
            with dx.run_lock(folder):
                pass
    finally:
        live.kill()
        live.wait()
    assert lock.read_text() == str(live.pid)  # a kill -9 leaves the file, not the lock
    with dx.run_lock(folder):
        assert lock.read_text() == str(os.getpid())
    assert not lock.exists()
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(str(bystander.pid))  # alive, but holding nothing
        with dx.run_lock(folder):
            assert lock.read_text() == str(os.getpid())
    finally:
        bystander.kill()
        bystander.wait()


def test_kill_9_of_the_digits_driver_takes_its_workers_with_it(digits_cache, tmp_path):
    """kill -9 of `python -m experiments.digits --jobs=2` while its two spawned workers train: both are gone
    within seconds (they poll their parent), so a rerun never meets them in its run folders."""
    import subprocess
    import sys

    from tests.test_digits import smoke_args

    args = smoke_args(digits_cache, tmp_path, "--jobs=2", "--methods=nft", "--steps=50")
    root = Path(__file__).resolve().parents[1]
    main = subprocess.Popen([sys.executable, "-m", "experiments.digits", *args], cwd=root, stdout=subprocess.DEVNULL)
    try:
        deadline, workers = time.time() + 240, []
        while len(workers) < 2 and time.time() < deadline and main.poll() is None:
            time.sleep(0.5)
            training = len(list((tmp_path / "runs").glob("*/train.log")))
            workers = spawned_children(main.pid) if training == 2 else []
        assert len(workers) == 2, f"two workers never trained (driver exit code {main.poll()})"
        os.kill(main.pid, signal.SIGKILL)
        main.wait()
        deadline = time.time() + 15
        while any(alive(pid) for pid in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(alive(pid) for pid in workers), "a worker outlived the killed driver"
    finally:
        main.kill()


def spawned_children(parent):
    """The pids of multiprocessing's spawned workers whose parent is `parent` (read from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().split(") ")[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


def alive(pid):
    """Whether process `pid` runs (a zombie, dead but not yet reaped by init, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


TOY_BAD = [  # each passed the toy's checks and failed later (a traceback) or ran to a NaN result
    ("--out_dir=", "out_dir: expected a folder"),
    ("--sw_projections=0", "sw_projections: expected an int >= 1"),
    ("--kl_weight=-1", "kl_weight: expected a finite number >= 0"),
    ("--lam=inf", "lam: expected a finite number >= 0"),
    ("--threads=0", "threads: expected an int >= 1"),
    ("--rl_lr=inf", "rl_lr: expected a finite number > 0"),
    ("--dpo_beta=nan", "dpo_beta: expected a finite number != 0"),
    ("--seed=1180591620717411303424", "seed: expected an int in 0..2147483647"),
    ("--temb_dim=3", "temb_dim: expected an even int >= 2"),
    ("--radius=inf", "radius: expected a finite number > 0"),
]


@pytest.mark.parametrize("arg, message", TOY_BAD)
def test_the_toy_and_its_experiment_refuse_each_bad_value_up_front(arg, message, capsys):
    import toy_2d
    from experiments import toy

    with pytest.raises(cli.UsageError) as e:
        toy.parse_args([arg])
    assert str(e.value).startswith(message), str(e.value)
    with pytest.raises(SystemExit) as e:
        cli.run(toy_2d.main, [arg])
    assert e.value.code == 2 and capsys.readouterr().err.startswith(f"error: {message}")
