"""What a user of the official trainers expects around train_full.py: config files and the diffusers flags, a run
that a tracker can watch, a command that samples a finished LoRA beside the reference, a launch that cannot split
stopping with a message; and the packaging (the wheel holds the core alone, the extras cover every import)."""

import ast
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import test_train_full
import torch

import train_full as tf
from trainer import adapters, checkpoints, cli, evaluation
from trainer import sample as sample_cmd

ROOT = Path(__file__).resolve().parents[1]
sd3_path = test_train_full.sd3_path  # the fixtures of the tiny SD3 pipeline (real diffusers classes) and prompts
prompt_file = test_train_full.prompt_file
lora_tensors = test_train_full.lora_tensors


def brightness(images, prompts):
    """A held-out reward for --eval_rewards=module:function: mean brightness, (B,)."""
    return images.float().mean(dim=(1, 2, 3))


def smoke(path, out, *extra):
    """A --smoke run of the tiny SD3 pipeline, rewarded by JPEG size."""
    return tf.main(["--smoke", f"--pretrained_model_name_or_path={path}", "--reward=jpeg", f"--out_dir={out}", *extra])


def logged(out):
    """log.jsonl and evals.jsonl of a run, step times left out (the only values that depend on the machine)."""
    lines = [json.loads(s) for s in (Path(out) / "log.jsonl").read_text().splitlines()]
    evals = [json.loads(s) for s in (Path(out) / "evals.jsonl").read_text().splitlines()]
    return [{k: v for k, v in x.items() if k != "step_time"} for x in lines], evals


# ---------------------------------------------------------------------------------------------------------------
# config files and the flags people type


def test_a_yaml_config_drives_a_run_and_the_command_line_overrides_it(sd3_path, prompt_file, tmp_path):
    config = tmp_path / "awm.yaml"
    config.write_text(f"method: awm\nguard: false\nlr: 1e-3\ntrain_prompts: {prompt_file}\nlearning_rate_x: 1\n")
    with pytest.raises(
        cli.UsageError, match="learning_rate_x in .*awm.yaml: unknown key, did you mean --learning_rate"
    ):
        smoke(sd3_path, tmp_path / "run", f"--config={config}")
    config.write_text(f"method: awm\nguard: false\nlr: 1e-3\ntrain_prompts: {prompt_file}\nkl_weight: 0.5\n")
    m = smoke(sd3_path, tmp_path / "run", f"--config={config}", "--kl_weight=0.25")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert (saved["method"], saved["guard"], saved["lr"], saved["kl_weight"]) == ("awm", False, 1e-3, 0.25)
    assert saved["train_prompts"] == prompt_file and saved["sampler"] == "sa_solver" and m["steps"] == 2


def test_a_runs_saved_config_repeats_it_exactly(sd3_path, prompt_file, tmp_path):
    """--config=<run>/config.json, with only out_dir changed: the same LoRA bit for bit and the same logs."""
    first, again = tmp_path / "first", tmp_path / "again"
    smoke(sd3_path, first, "--method=nft", "--lr=1e-3", "--seed=3", f"--train_prompts={prompt_file}")
    tf.main([f"--config={first / 'config.json'}", f"--out_dir={again}"])  # no --smoke: the file holds its sizes
    a, b = (json.loads((out / "config.json").read_text()) for out in (first, again))
    assert a["identity"] == b["identity"] and {**a["config"], "out_dir": ""} == {**b["config"], "out_dir": ""}
    la, lb = lora_tensors(first), lora_tensors(again)
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
    assert logged(first) == logged(again)


def test_diffusers_names_space_separated_values_and_bare_booleans(sd3_path, tmp_path):
    out = tmp_path / "diffusers_style"
    argv = ["--smoke", "--pretrained_model_name_or_path", sd3_path, "--reward", "jpeg", "--output_dir", str(out)]
    argv += ["--learning_rate", "2e-3", "--max_train_steps", "3", "--checkpointing_steps", "3", "--rank", "2"]
    argv += ["--checkpoints_total_limit", "1", "--lr_warmup_steps", "1", "--adam_weight_decay", "0.01"]
    argv += ["--lora_layers", "to_q,to_v", "--gradient_checkpointing", "--mixed_precision", "no", "--seed", "7"]
    m = tf.main(argv)
    saved = json.loads((out / "config.json").read_text())["config"]
    expected = dict(out_dir=str(out), lr=2e-3, steps=3, checkpoint_every=3, lora_rank=2, checkpoints_keep=1)
    expected.update(warmup_steps=1, weight_decay=0.01, lora_targets="to_q,to_v", gradient_checkpointing=True, seed=7)
    assert {k: saved[k] for k in expected} == expected and m["steps"] == 3
    assert [p.name for p in tf.complete_checkpoints(out / "checkpoints")] == ["checkpoint-0000003"]
    cfg = tf.parse_args(["--pretrained_model_name_or_path=x", "--resume_from_checkpoint", "latest", "--guard", "false"])
    assert cfg.resume == "latest" and cfg.guard is False


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--learning_rat=1e-4"], "argument '--learning_rat=1e-4': unknown key, did you mean --learning_rate"),
        (["--lam_=2"], "did you mean --lam"),
        (["--gradient_accumulation_steps=4"], "no such key here: each optimiser step accumulates the gradients"),
        (["--validation_prompt", "a cat"], "--eval_prompts takes a text file"),
        (["--lr=1e-3", "--learning_rate=1e-4"], "--learning_rate: given twice (also as --lr)"),
        (["--learning_rate=1e-3", "--lr=1e-4"], "--lr: given twice (also as --learning_rate)"),
        (["--steps"], "--steps: expected a value (--steps=VALUE or --steps VALUE)"),
    ],
)
def test_typos_and_foreign_names_get_one_clear_line(argv, words):
    with pytest.raises(cli.UsageError, match=re.escape(words)):
        tf.parse_args(["--pretrained_model_name_or_path=x", *argv])


def test_help_lists_the_diffusers_names_beside_ours(capsys):
    with pytest.raises(SystemExit):
        tf.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "--lr=0.0003  (float)  (also --learning_rate)" in text and "(also --output_dir)" in text
    assert "--eval_rewards=  (str)  # held-out rewards" in text


# ---------------------------------------------------------------------------------------------------------------
# a run you can watch


def test_tensorboard_gets_scalars_images_the_ratio_profile_and_held_out_rewards(sd3_path, tmp_path, capsys):
    """A smoke run with --report_to=tensorboard: the event file holds the step scalars, each eval's scalars (the
    held-out reward among them), one scalar per t bin of the norm-ratio profile and the eval grid, at steps 0 and 2;
    the run ends with one line naming the LoRA folder and how to load it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "watched"
    smoke(sd3_path, out, "--report_to=tensorboard", "--eval_rewards=test_ecosystem:brightness")
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line == (
        f"trained weights: {out / 'lora'} | load them: pipe = StableDiffusion3Pipeline.from_pretrained(...); "
        f"pipe.load_lora_weights('{out / 'lora'}') | images beside the reference: python -m trainer.sample --run={out}"
    )
    (events,) = (out / "normguard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    evals = [json.loads(s) for s in (out / "evals.jsonl").read_text().splitlines()]
    for key in ("reward_full", "reward_few", "norm_ratio", "reward_test_ecosystem_brightness_full"):
        assert [(e.step, round(e.value, 5)) for e in acc.Scalars(f"eval/{key}")] == [
            (r["step"], round(r[key], 5)) for r in evals
        ]
    n = len(evals[-1]["profile"])
    bins = [f"eval/norm_ratio_by_t/{i / n:.2f}-{(i + 1) / n:.2f}" for i, m in enumerate(evals[-1]["profile"]) if m]
    assert bins and set(bins) <= set(tags["scalars"])
    assert [round(acc.Scalars(b)[-1].value, 5) for b in bins] == [round(m, 5) for m in evals[-1]["profile"] if m]
    assert [e.step for e in acc.Scalars("loss")] == [1, 2] and [e.step for e in acc.Images("eval/grid")] == [0, 2]
    grid = acc.Images("eval/grid")[-1]
    from PIL import Image

    png = Image.open(out / "eval" / "grid_0000002.png")
    assert (grid.width, grid.height) == png.size
    assert {"reward_test_ecosystem_brightness_full", "reward_test_ecosystem_brightness_few"} <= set(evals[-1])


def test_a_missing_tracker_or_a_bad_held_out_reward_stops_before_the_model_loads(sd3_path, tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(adapters.SD3Adapter, "__init__", no_load)
    real_find_spec = evaluation.importlib.util.find_spec
    monkeypatch.setattr(
        evaluation.importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("tensorboard", "tensorboardX") else real_find_spec(name, *a),
    )
    with pytest.raises(cli.UsageError, match="report_to: tensorboard is not installed; pip install tensorboard"):
        smoke(sd3_path, tmp_path, "--report_to=tensorboard")
    for value, words in (
        ("jpeg", "eval_rewards: jpeg is the trained reward"),
        ("nope", "eval_rewards: expected one of"),
        ("test_ecosystem:brightness,test_ecosystem:brightness", "eval_rewards: test_ecosystem:brightness given twice"),
        ("no_such_module_xyz:fn", "eval_rewards: cannot load"),
    ):
        with pytest.raises(cli.UsageError, match=re.escape(words)):
            smoke(sd3_path, tmp_path, f"--eval_rewards={value}")
    assert not (tmp_path / "config.json").exists()


def test_the_sample_command_turns_a_finished_lora_into_a_grid_beside_the_reference(sd3_path, tmp_path, capsys):
    """With the run's defaults the LoRA's images are the run's last eval (loaded by pipe.load_lora_weights, sampled
    by the same Euler steps from the same noise) and the reference's are the step-0 eval's (the LoRA starts at 0)."""
    from PIL import Image
    from torchvision.utils import make_grid

    out = tmp_path / "run"
    smoke(sd3_path, out, "--lr=3e-2")
    cfg = sample_cmd.parse_args([f"--run={out}"])
    frozen, trained, prompts, seeds = sample_cmd.draw(cfg)
    assert prompts == adapters.PROMPTS and seeds == 1 and frozen.shape == trained.shape == (4, 3, 16, 16)
    for images, grid in ((trained, "grid_0000002.png"), (frozen, "grid_0000000.png")):
        as_saved = make_grid((images + 1) / 2, nrow=4).mul(255).add(0.5).clamp(0, 255).to(torch.uint8)
        png = torch.from_numpy(__import__("numpy").array(Image.open(out / "eval" / grid))).permute(2, 0, 1)
        assert (as_saved.int() - png.int()).abs().max() <= 1  # PNG rounding of equal floats
    assert (trained - frozen).abs().max() > 1e-3  # the LoRA moved the images
    written = sample_cmd.main([f"--run={out}", "--seeds=2", f"--out={tmp_path / 'side.png'}"])
    assert Image.open(written).size == (2 + 4 * 18, 2 + 4 * 18)  # 4 rows (prompts) x 2 reference + 2 LoRA images
    assert "row 4: a lighthouse at dusk" in capsys.readouterr().out
    with pytest.raises(cli.UsageError, match="--run: expected a finished train_full run's out_dir"):
        sample_cmd.draw(sample_cmd.parse_args([f"--run={tmp_path}"]))
    with pytest.raises(cli.UsageError, match="--seeds: expected >= 0"):
        sample_cmd.parse_args(["--run=x", "--seeds=-1"])


# ---------------------------------------------------------------------------------------------------------------
# launches that cannot split


def test_a_launch_of_more_processes_than_accelerate_joins_stops_before_any_work(sd3_path, tmp_path, monkeypatch):
    """torchrun --nproc_per_node=2 without ACCELERATE_USE_CPU on a CPU: each process sees WORLD_SIZE=2, accelerate
    one process. Checked by hand with torchrun; here the environment the launcher sets, in this process."""

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(adapters.SD3Adapter, "__init__", no_load)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    (tmp_path / "log.jsonl").write_text("an earlier run's log\n")
    with pytest.raises(cli.UsageError, match="the launcher started 2 processes but accelerate sees 1"):
        smoke(sd3_path, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]  # nothing cleared, nothing written


def clear_twice(out, barrier, results):
    barrier.wait()
    try:
        checkpoints.clear_run(out)
        results.put("ok")
    except Exception as e:  # what the old clear_run raised: FileNotFoundError
        results.put(f"{type(e).__name__}: {e}")


def test_two_processes_clearing_one_out_dir_at_once_both_succeed(tmp_path):
    """Two --overwrite runs into one out_dir: each removes entries the other is walking. Before the fix this failed
    in each of 15 tries out of 15 on this machine (FileNotFoundError in rmtree)."""
    ctx = multiprocessing.get_context("fork")
    for trial in range(2):
        out = tmp_path / f"out{trial}"
        for i in range(40):
            folder = out / "checkpoints" / f"checkpoint-{i:07d}"
            folder.mkdir(parents=True)
            for j in range(20):
                (folder / f"f{j}").write_text("x")
        (out / "log.jsonl").write_text("")
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=clear_twice, args=(out, barrier, results)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [results.get(timeout=10) for _ in procs] == ["ok", "ok"]
        assert sorted(p.name for p in out.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# packaging


PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# import name -> distribution name, where they differ
DISTRIBUTION = {"PIL": "pillow", "sklearn": "scikit-learn", "yaml": "pyyaml", "tensorboard": "tensorboard"}
PROJECT_MODULES = {"normguard", "toy_2d", "train_full", "trainer", "experiments", "bench", "tests", "test_train_full"}


def third_party_imports(paths):
    found = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            found |= {n.split(".")[0] for n in names}
    return {n for n in found - set(sys.stdlib_module_names) - PROJECT_MODULES if not n.startswith("test_")}


def declared(*extras):
    """Distribution names the core and `extras` require (a self-reference like normguard[trainer] expanded)."""
    names, todo = set(), list(PYPROJECT["project"]["dependencies"])
    for extra in extras:
        todo += PYPROJECT["project"]["optional-dependencies"][extra]
    while todo:
        name = re.split(r"[\[<>=!~ ;]", todo.pop())[0].lower()
        if name == "normguard":
            continue
        names.add(name)
    for extra in extras:
        for req in PYPROJECT["project"]["optional-dependencies"][extra]:
            if req.startswith("normguard["):
                for sub in req[len("normguard[") : req.index("]")].split(","):
                    names |= declared(sub)
    return names


def test_the_core_needs_only_torch_and_each_tier_declares_what_it_imports():
    assert PYPROJECT["project"]["dependencies"] == ["torch>=2.0"]
    tiers = {
        "trainer": [ROOT / "train_full.py", *(ROOT / "trainer").glob("*.py")],
        "experiments": [ROOT / "toy_2d.py", ROOT / "experiments" / "toy.py", ROOT / "experiments" / "evidence.py"],
        "trainer,experiments": [*(ROOT / "experiments").glob("*.py"), *(ROOT / "bench").glob("*.py")],
        "all": [*(ROOT / "tests").glob("*.py"), *(ROOT / "notebooks").glob("*.py")],
    }
    for tier, files in tiers.items():
        needed = {DISTRIBUTION.get(n, n).lower() for n in third_party_imports(files)}
        missing = needed - declared(*tier.split(","))
        assert not missing, f"{tier} imports {sorted(missing)} that its extras do not install"


def test_requirements_pin_every_declared_package():
    """requirements.txt (what CI installs) is the project with every extra plus a pin for each package they name."""
    lines = [s.split("#")[0].strip() for s in (ROOT / "requirements.txt").read_text().splitlines()]
    lines = [s for s in lines if s]
    assert lines[0] == "-e .[all]"
    pinned = {s.split("==")[0].lower() for s in lines[1:] if "==" in s}
    assert declared("all") <= pinned, sorted(declared("all") - pinned)


def test_the_wheel_holds_the_core_module_alone(tmp_path):
    """The wheel built from a copy of this working tree installs normguard.py and nothing else: trainer/,
    experiments/ and the scripts run from a clone (generic top-level names like `trainer` would collide in
    site-packages). Built offline with this Python's setuptools (a build writes build/ and *.egg-info beside the
    sources: the copy keeps them out of the checkout)."""
    junk = shutil.ignore_patterns(".git", "runs", "outputs", "build", "*.egg-info", "__pycache__", ".pytest_cache")
    source = shutil.copytree(ROOT, tmp_path / "src", ignore=junk)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PIP_NO_INDEX": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("normguard-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert [n for n in names if ".dist-info/" not in n] == ["normguard.py"]
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Requires-Dist: torch>=2.0\n" in metadata and "Provides-Extra: trainer" in metadata
