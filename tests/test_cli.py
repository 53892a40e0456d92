"""The shared command line: conversions, one-line errors, --help from the dataclass comments."""

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
        (["--stepz=1"], "'--stepz=1'"),
        (["steps=1"], "'steps=1'"),
        (["--steps"], "'--steps'"),
        (["--steps=1.5"], "--steps: expected an int, got '1.5'"),
        (["--plot=yes"], "--plot: expected true or false"),
        (["--lr=fast"], "--lr: expected a float"),
        (["--steps=1", "--steps=2"], "--steps: given twice"),
    ],
)
def test_bad_arguments_name_the_argument(argv, words):
    with pytest.raises(cli.UsageError, match=words.replace("[", r"\[")):
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
