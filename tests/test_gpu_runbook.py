"""bench/gpu_runbook.py in its reduced CPU mode (--smoke), end to end, so the GPU command cannot rot: a tiny
SD3.5-Medium-design pipeline built, saved and loaded back, the benchmark and a train_full run per method with the
guard off and on, the report and its fields; the child processes' command lines; the full-size sizes; bad arguments
as one line naming the argument."""

import json
import math
import re

import pytest
import torch

import train_full as tf
from bench import bench_train_full as bench
from bench import gpu_runbook as rb
from trainer import cli


def strict(text):
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One --smoke run; the model folder kept (--model_path) for the child-process tests below."""
    out = tmp_path_factory.mktemp("runbook")
    argv = ["--smoke", f"--out_dir={out}", f"--model_path={out / 'model'}"]
    return out, argv, rb.main(argv)


def test_smoke_report_holds_every_field(smoke):
    out, _, returned = smoke
    report = strict((out / "gpu_report.json").read_text())
    md = (out / "gpu_report.md").read_text()
    assert report["done"] and report["results"] == strict(cli.dumps(returned["results"]))
    env = report["environment"]
    assert env["device"] == "cpu (reduced mode)" and "| device | cpu (reduced mode) |" in md
    assert env["torch"] == torch.__version__ and env["diffusers"] in md and env["git_revision"] in md
    assert "bf16 autocast" in report["precision"] and "32 px" in md and "batch 2" in md
    arch = report["model"]["transformer"]
    assert (arch["num_layers"], arch["dual_attention_layers"], arch["qk_norm"]) == (2, [0, 1], "rms_norm")
    assert "loaded with from_pretrained" in md and "tiny random stand-ins" in md

    results = {(r["kind"], r["method"], r["guard"]): r for r in report["results"]}
    assert len(results) == len(report["results"]) == 12 and not any("skipped" in r for r in report["results"])
    for method in tf.METHODS:
        for guard in (False, True):
            b, t = results["bench", method, guard], results["train", method, guard]
            assert b["step_time_s"] > 0 and b["bare_step_time_s"] > 0 and b["peak_memory_bytes"] is None  # CPU
            assert b["forwards_per_step"] == {"grad": 1, "no_grad": 1 if method == "dpo" else 2}
            assert t["step_time_s"] > 0 and len(t["step_times_s"]) == 2 and math.isfinite(t["last_loss"])
            assert t["peak_memory_bytes"] is None
            assert f"| {method} | {'on' if guard else 'off'} | {b['step_time_s']:.3f} | n/a |" in md
            assert f"| {method} | {'on' if guard else 'off'} | {t['step_time_s']:.3f} | n/a |" in md
    for kind in ("bench", "train"):
        rows = {row["method"]: row for row in report["summary"][kind]}
        assert set(rows) == set(tf.METHODS)
        for m, row in rows.items():
            assert row["time_ratio"] == pytest.approx(
                results[kind, m, True]["step_time_s"] / results[kind, m, False]["step_time_s"]
            )
            assert f"| {m} | {row['time_ratio']:.3f} | n/a |" in md
    for row in report["summary"]["bench"]:
        assert row["step_vs_bare_off"] > 0 and row["saved_ratio"] > 1  # the hinge's norms: a few bytes, not 0
    assert "- nothing: every setting ran" in md
    # the training runs' logs stay, their checkpoints and LoRA (hundreds of MB at full size) do not
    run = out / "train" / "nft_on"
    assert (run / "log.jsonl").is_file() and not (run / "checkpoints").exists() and not (run / "lora").exists()


def test_child_processes_print_what_the_parent_reads(smoke, capsys):
    """The fresh-process path, run here: the parent's child command lines parse, and each child's last line is the
    JSON the parent reads."""
    out, argv, _ = smoke
    cfg, is_smoke = rb.parse_args(argv)
    folder = cfg.model_path
    child = rb.child_argv(argv, folder, "awm", True)
    assert rb.parse_args(child)[0].child == "train:awm:on"
    capsys.readouterr()
    rb.main(child)
    res = strict(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["kind"] == "train" and res["method"] == "awm" and res["guard"] is True and res["step_time_s"] > 0
    bargv = rb.bench_argv(cfg, is_smoke, folder)
    bench.main([*bargv, "--child=dpo:on"])
    res = strict(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["guard"] is True and res["forwards_per_step"] == {"grad": 1, "no_grad": 1}


def test_out_of_time_still_writes_the_report_naming_what_it_skipped(smoke, tmp_path):
    folder = smoke[0] / "model"  # reused: no build
    report = rb.main(
        ["--smoke", f"--out_dir={tmp_path}", f"--model_path={folder}", "--max_minutes=1e-6", "--methods=dpo"]
    )
    assert report["done"] and [r["skipped"][:7] for r in report["results"]] == ["skipped"] * 4
    md = (tmp_path / "gpu_report.md").read_text()
    assert md.count("--max_minutes=1e-06") == 4 and "## Not measured" in md


def test_a_setting_that_would_not_fit_fails_or_overruns_is_named_and_the_run_goes_on(tmp_path, monkeypatch):
    """one_setting's branches, without a child process: not started when less time is left than the longest setting
    of its kind took; a child killed at the deadline; a child that failed, its stderr kept beside the report."""
    import subprocess
    import time

    cfg = rb.Config(out_dir=str(tmp_path), max_minutes=1.0)
    setting, later = ("train", "nft", True), time.time() + 5
    res = rb.one_setting(cfg, True, "unused", setting, [], later, {"train": 10.0})
    assert re.fullmatch(r"skipped: [45] s left of --max_minutes=1, the longest train setting took 10 s", res["skipped"])

    def overrun(*args):
        raise subprocess.TimeoutExpired("child", 5)

    def fail(*args):
        raise subprocess.CalledProcessError(
            1, "child", stderr="Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory\n"
        )

    took = {}
    monkeypatch.setattr(rb, "measure", overrun)
    assert rb.one_setting(cfg, True, "unused", setting, [], later, took)["skipped"] == "stopped at --max_minutes=1"
    assert took["train"] > 0  # the next setting of this kind is judged by it
    monkeypatch.setattr(rb, "measure", fail)
    res = rb.one_setting(cfg, True, "unused", setting, [], later, {})
    assert (
        res["skipped"]
        == "failed: torch.OutOfMemoryError: CUDA out of memory (the whole output: failed_train_nft_on.log)"
    )
    assert "Traceback" in (tmp_path / "failed_train_nft_on.log").read_text()
    assert rb.setting_line(res).startswith("train  nft guard on  | failed: torch.OutOfMemoryError")


def test_full_size_is_sd35_medium_and_its_command_lines_are_valid(tmp_path):
    """Without a GPU: the full-size transformer (on the meta device) is SD3.5-Medium's design, the tiny text
    encoders give the widths it reads (333 x 4096 tokens, pooled 2048), and the benchmark's and train_full's
    command lines of the full size pass their checks."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    arch = bench.architecture(rb.bench_config(smoke=False))
    assert arch == {**bench.SD35_MEDIUM, "dual_attention_layers": tuple(range(13))}
    with torch.device("meta"):
        n = sum(p.numel() for p in SD3Transformer2DModel(**arch).parameters())
    assert 2.2e9 < n < 2.3e9
    text = rb.tiny_text_encoders(4096, 2048, rb.TEXT_TOKENS["full"][0])
    pipe = StableDiffusion3Pipeline(
        transformer=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None, **text
    )
    with torch.no_grad():
        emb, _, pooled, _ = pipe.encode_prompt(
            rb.PROMPTS["full"][:2], None, None, device="cpu", do_classifier_free_guidance=False
        )
    assert emb.shape == (2, sum(rb.TEXT_TOKENS["full"]), 4096) and pooled.shape == (2, 2048)
    cfg = rb.Config()
    assert bench.parse_args(rb.bench_argv(cfg, False, str(tmp_path)))[0].text_tokens == emb.shape[1]
    gpu_precision = "bf16" if torch.cuda.is_available() else "no"
    for method in tf.METHODS:
        t = tf.parse_args(rb.train_argv(cfg, False, str(tmp_path), method, True))
        sizes = (t.resolution, t.group_size, t.lora_rank, t.max_sequence_length, t.mixed_precision, t.steps)
        assert sizes == (1024, 2, 32, 256, gpu_precision, 3) and t.guard and t.method == method


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--smoke", "--bogus=1"], "'--bogus=1'"),
        (["--smoke", "--batch=1"], "batch: expected an int >= 2"),
        (["--smoke", "--batch=two"], "--batch: expected an int"),
        (["--smoke", "--methods=nft,ppo"], "methods: expected"),
        (["--smoke", "--resolution=40"], "resolution: expected a multiple of 16"),
        (["--smoke", "--train_steps=1"], "train_steps: expected an int >= 2"),
        (["--smoke", "--max_minutes=nan"], "max_minutes: expected a finite number > 0"),
        (["--smoke", "--out_dir="], "out_dir: expected"),
        (["--smoke", "--child=bench:nft:on"], "child: expected train:<method>:<on|off>"),
        (["--smoke", "--model_path=tests"], "model_path: tests is neither"),
        (["--smoke", "--repeats=3", "--repeats=4"], "--repeats: given twice"),
    ],
)
def test_bad_arguments_give_one_line_naming_the_argument(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(rb.main, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and words in err, err


def test_help_lists_every_key_and_the_full_size_needs_a_gpu(capsys):
    with pytest.raises(SystemExit) as e:
        rb.main(["--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0 and all(f"--{k}=" in text for k in rb.Config.__dataclass_fields__) and "--smoke" in text
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            cli.run(rb.main, [])
        assert "needs a GPU; pass --smoke" in capsys.readouterr().err
