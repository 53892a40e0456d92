"""The shared command line: conversions, one-line errors, --help from the dataclass comments, --key value and bare
booleans, config files, other names and "did you mean"."""

import json
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

from trainer import cli


@dataclass
class Toy:
    steps: int = 3  # optimiser steps
    lr: float = 1e-3
    name: str = "run"  # output name
    plot: bool = True


@dataclass
class Other:
    steps: int = 9
    beta: float = 0.5  # a key of the second class


def test_values_take_the_type_of_the_default():
    (over,), flags = cli.parse(
        ["--steps=7", "--lr=2e-2", "--name=x", "--plot=false", "--smoke"], [Toy], flags={"smoke": "tiny"}
    )
    assert over == {"steps": 7, "lr": 0.02, "name": "x", "plot": False} and flags == {"smoke"}


def test_a_key_goes_to_the_first_class_that_allows_it():
    (a, b), _ = cli.parse(["--steps=1", "--beta=2"], [Toy, Other])
    assert a == {"steps": 1} and b == {"beta": 2.0}
    (a, b), _ = cli.parse(["--steps=1"], [(Toy, {"lr"}), Other])
    assert a == {} and b == {"steps": 1}


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--stepz=1"], "argument '--stepz=1': unknown key, did you mean --steps?"),
        (["--zzz=1"], "argument '--zzz=1': unknown key, (expected --key=value with a key that --help lists)"),
        (["steps=1"], "'steps=1'"),
        (["--steps"], "--steps: expected a value (--steps=VALUE or --steps VALUE)"),
        (["--steps", "--lr=1"], "--steps: expected a value"),
        (["--config"], "--config: expected a value"),
        (["--steps=1.5"], "--steps: expected an int, got '1.5'"),
        (["--plot=yes"], "--plot: expected true or false"),
        (["--lr=fast"], "--lr: expected a float"),
        (["--steps=1", "--steps=2"], "--steps: given twice"),
    ],
)
def test_bad_arguments_name_the_argument(argv, words):
    with pytest.raises(cli.UsageError, match=re.escape(words)):
        cli.parse(argv, [Toy])


def test_help_lists_every_key_with_default_and_comment(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse(["--help"], [Toy, Other], flags={"smoke": "tiny sizes"}, doc="What it does.")
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("What it does.")
    for line in (
        "--steps=3  (int)  # optimiser steps",
        "--lr=0.001  (float)",
        "--name=run  (str)  # output name",
        "--beta=0.5  (float)  # a key of the second class",
        "--smoke  tiny sizes",
    ):
        assert line in text


def test_checked_turns_value_errors_into_usage_errors():
    def check(x):
        raise ValueError(f"x: expected > 0, got {x}")

    with pytest.raises(cli.UsageError, match="x: expected > 0, got -1"):
        cli.checked(check, -1)


def test_run_prints_one_line_and_exits_2():
    code = (
        "import cli\n"
        "def main(argv):\n"
        "    raise cli.UsageError('--lr: expected a float, got \\'x\\'')\n"
        "cli.run(main, [])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=str(__import__("pathlib").Path(cli.__file__).parent),
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "error: --lr: expected a float, got 'x'"


def test_git_revision_is_this_checkouts_commit():
    rev = cli.git_revision()
    assert rev == "unknown" or (len(rev) == 40 and all(c in "0123456789abcdef" for c in rev))


def test_key_space_value_and_bare_booleans():
    (over,), _ = cli.parse(["--steps", "7", "--plot", "--name", "x y", "--lr", "-1e-3"], [Toy])
    assert over == {"steps": 7, "plot": True, "name": "x y", "lr": -1e-3}  # a value may start with one dash
    (over,), flags = cli.parse(["--plot", "false", "--smoke", "--steps=2"], [Toy], flags={"smoke": "tiny"})
    assert over == {"plot": False, "steps": 2} and flags == {"smoke"}
    (over,), _ = cli.parse(["--plot", "--steps", "1"], [Toy])  # a bare bool before another key
    assert over == {"plot": True, "steps": 1}


ALIASES = {"learning_rate": "lr", "max_train_steps": "steps", "output_dir": "name"}
NOTES = {"gradient_accumulation_steps": "micro-batches are accumulated already"}


def test_other_names_and_notes():
    (over,), _ = cli.parse(["--learning_rate", "0.5", "--max_train_steps=4"], [Toy], aliases=ALIASES)
    assert over == {"lr": 0.5, "steps": 4}
    with pytest.raises(cli.UsageError, match=re.escape("--lr: given twice (also as --learning_rate)")):
        cli.parse(["--learning_rate=1", "--lr=2"], [Toy], aliases=ALIASES)
    with pytest.raises(cli.UsageError, match="did you mean --learning_rate"):
        cli.parse(["--learning_rat=1"], [Toy], aliases=ALIASES)
    with pytest.raises(cli.UsageError, match="no such key here: micro-batches are accumulated already"):
        cli.parse(["--gradient_accumulation_steps=4"], [Toy], aliases=ALIASES, notes=NOTES)
    (a, b), _ = cli.parse(["--beta", "2"], [Toy, Other], aliases={"b": "beta"})  # an alias of the second class
    assert a == {} and b == {"beta": 2.0}


def test_config_files_yaml_json_and_a_runs_config_json(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    # YAML reads 3e-4 as a string and 5 as an int: each takes the key's type, as on the command line
    yaml_file.write_text("steps: 5\nlr: 3e-4\nplot: false\nname:\n")  # name: empty, YAML null
    (over,), _ = cli.parse([f"--config={yaml_file}"], [Toy])
    assert over == {"steps": 5, "lr": 3e-4, "plot": False, "name": ""}
    (over,), _ = cli.parse(["--steps=9", "--config", str(yaml_file)], [Toy])  # the command line wins, any order
    assert over["steps"] == 9 and over["lr"] == 3e-4
    saved = tmp_path / "config.json"  # what a run writes: its resolved config under "config"
    saved.write_text(json.dumps({"config": {"steps": 2, "lr": 1, "beta": 0.25}, "git_revision": "abc"}))
    (a, b), _ = cli.parse([f"--config={saved}"], [Toy, Other])
    assert a == {"steps": 2, "lr": 1.0} and b == {"beta": 0.25} and isinstance(a["lr"], float)
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"learning_rate": 0.1}))
    (over,), _ = cli.parse([f"--config={flat}"], [Toy], aliases=ALIASES)
    assert over == {"lr": 0.1}


@pytest.mark.parametrize(
    "name, text, words",
    [
        ("bad.yaml", "stepz: 1\n", "--config: stepz in {path}: unknown key, did you mean --steps?"),
        ("bad.yaml", "steps: 1.5\n", "{path}: steps: expected an int, got 1.5"),
        ("bad.yaml", "plot: maybe\n", "--plot: expected true or false, got 'maybe'"),
        ("bad.yaml", "plot: 1\n", "{path}: plot: expected a bool, got 1"),
        ("bad.yaml", "- steps\n", "--config: expected a mapping of keys to values in {path}, got list"),
        ("bad.yaml", "steps: [1\n", "--config: {path} is not valid YAML"),
        ("bad.json", "{steps: 1}", "--config: {path} is not valid JSON"),
        ("bad.toml", "steps = 1", "--config: expected a .yaml, .yml or .json file"),
    ],
)
def test_bad_config_files_name_the_file_and_key(tmp_path, name, text, words):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(cli.UsageError, match=re.escape(words.format(path=path))):
        cli.parse([f"--config={path}"], [Toy])
    with pytest.raises(cli.UsageError, match="--config: no file"):
        cli.parse([f"--config={tmp_path / 'missing.yaml'}"], [Toy])


def test_help_names_the_forms_and_the_other_names(capsys):
    with pytest.raises(SystemExit):
        cli.parse(["--help"], [Toy], aliases=ALIASES)
    text = capsys.readouterr().out
    assert "--key=value or --key value" in text and "--config=<file.yaml|.json>" in text
    assert "--lr=0.001  (float)  (also --learning_rate)" in text
