"""Wall time of the toy's two commands next to their budgets: the demo and the judged experiment's default.

    python bench/bench_toy.py              # each command once: wall and CPU seconds, wall / budget
    python bench/bench_toy.py --repeats=3  # the fastest of 3 runs of each (another job on the cores only slows one)
    python bench/bench_toy.py --smoke      # both commands at their --smoke sizes, seconds (for tests)

Each command runs as a user runs it, in a fresh interpreter from the repo root, imports included, its outputs in a
temporary folder: `python toy_2d.py` (budget 15 s) and `python -m experiments.toy` (budget 20 s), both on a 2-core
CPU. The budgets are for the default sizes; with --smoke the ratios only show that the bench runs. The load average
is printed before each run: a second job on a 2-core machine stretches the wall time, not the CPU time.
"""

import importlib.metadata
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # trainer/cli.py lives under the repo root

from trainer import cli  # noqa: E402

COMMANDS = {  # the command a user types -> its budget in seconds of wall time on the 2-core CPU
    "python toy_2d.py": 15.0,
    "python -m experiments.toy": 20.0,
}


@dataclass
class Config:
    repeats: int = 1  # runs of each command; the fastest counts


def machine():
    """The CPU's model name, its count, and the versions that set the speed: one line for the report."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    name = names[0] if names else platform.processor() or platform.machine()
    versions = f"Python {platform.python_version()}, torch {importlib.metadata.version('torch')}"
    return f"{name}, {os.cpu_count()} CPUs, {versions}"


def timed(command, smoke, out_dir):
    """(wall s, CPU s of the child, load average before) of one run of `command` with its outputs in out_dir."""
    argv = [sys.executable, *command.split()[1:], f"--out_dir={out_dir}", *(["--smoke"] if smoke else [])]
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{command} exited {done.returncode}:\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, load


def main(argv):
    (overrides,), flags = cli.parse(argv, [Config], flags={"smoke": "both commands at --smoke size"}, doc=__doc__)
    cfg = Config(**overrides)
    if cfg.repeats < 1:
        raise cli.UsageError(f"repeats: expected an int >= 1, got {cfg.repeats}")
    smoke = "smoke" in flags
    print(f"machine: {machine()}")
    print(f"{'command':<38}{'wall s':>8}{'cpu s':>8}{'load':>7}{'budget s':>10}{'wall/budget':>13}")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for command, budget in COMMANDS.items():
            runs = [timed(command, smoke, Path(tmp) / f"run{i}") for i in range(cfg.repeats)]
            wall, cpu, load = min(runs)
            rows[command] = dict(wall=wall, cpu=cpu, load=load, budget=budget)
            shown = command + (" --smoke" if smoke else "")
            print(f"{shown:<38}{wall:>8.1f}{cpu:>8.1f}{load:>7.1f}{budget:>10.0f}{wall / budget:>13.2f}")
    demo, experiment = (rows[c]["wall"] for c in COMMANDS)
    print(f"the demo takes {demo / experiment:.2f} of the experiment's wall time (fastest of {cfg.repeats} each)")
    return rows


if __name__ == "__main__":
    cli.run(main)
