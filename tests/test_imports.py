"""The import graph of the project's own modules: no cycle (imports inside functions count), train_full.py imports
no testbed, normguard.py imports only torch and the standard library at module level.

Every .py in the repo (scripts, tests, notebooks, benchmarks) is parsed with ast; nothing is imported or run.
"""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted(
    p
    for p in ROOT.rglob("*.py")
    if not any(part.startswith(".") or part in ("runs", "__pycache__") for part in p.relative_to(ROOT).parts)
)
MODULES = {p.stem for p in FILES}  # a project module is imported by its file name (scripts run from the repo root)
TESTBEDS = {"digits", "digits_experiment", "toy_2d", "toy_experiment"}


def imported_names(tree, module_level_only=False):
    """Every dotted component and imported name of each import (and importlib.import_module / __import__ of a
    string literal) in `tree`; with module_level_only, only statements outside functions and classes."""
    nodes = ast.walk(tree) if not module_level_only else module_level(tree.body)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {part for alias in node.names for part in alias.name.split(".")}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= set(node.module.split(".")) | {alias.name for alias in node.names}
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module",
            "__import__",
        ):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                names |= set(node.args[0].value.split("."))
    return names


def module_level(body):
    """The statements of a module body, descending into if/try/with blocks but not into functions or classes."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        yield node
        for field in ("body", "orelse", "finalbody", "handlers"):
            yield from module_level(getattr(node, field, []) or [])


def project_graph():
    """{module: set of project modules it imports anywhere in its file}."""
    graph = {}
    for path in FILES:
        names = imported_names(ast.parse(path.read_text(), filename=str(path)))
        graph.setdefault(path.stem, set()).update((names & MODULES) - {path.stem})
    return graph


def find_cycle(graph):
    """One import cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_collector_sees_imports_inside_functions_and_cycles():
    tree = ast.parse(
        "import a.b\ndef f():\n    from c import d\n    import importlib\n    importlib.import_module('e')\n"
    )
    assert imported_names(tree) >= {"a", "b", "c", "d", "e"}
    assert imported_names(tree, module_level_only=True) == {"a", "b"}
    assert find_cycle({"x": {"y"}, "y": {"z"}, "z": {"x"}}) == ["x", "y", "z", "x"]
    assert find_cycle({"x": {"y"}, "y": set(), "z": {"x", "y"}}) is None


def test_the_project_import_graph_has_no_cycle():
    graph = project_graph()
    assert {"train_full", "digits", "digits_experiment", "normguard", "cli"} <= set(graph)
    assert "train_full" in graph["digits"] and "digits" in graph["digits_experiment"]  # the graph is not empty
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_train_full_knows_no_testbed():
    """train_full.py imports only normguard, cli and its own parts (adapters, rewards, checkpoints, recipes, rollouts
    with samplers, evaluation) of the project: a testbed registers itself from its own file."""
    graph = project_graph()
    assert not graph["train_full"] & TESTBEDS
    own = {"normguard", "cli", "adapters", "rewards", "checkpoints", "recipes", "rollouts", "evaluation"}
    assert graph["train_full"] <= own, graph["train_full"]
    parts = {name: graph[name] for name in ("adapters", "rewards", "checkpoints", "recipes", "rollouts", "evaluation")}
    assert parts == {
        "adapters": {"normguard"},
        "rewards": {"adapters"},
        "checkpoints": {"cli"},
        "recipes": set(),
        "rollouts": {"normguard", "samplers"},
        "evaluation": {"normguard", "rollouts"},
    }, parts


def test_the_toy_reads_alone_and_its_experiment_drives_it():
    """toy_2d.py (the world, the model, RL) imports only normguard of the project, so a student reads it alone;
    toy_experiment.py (arms, evaluation, verdicts, figures, command line) imports it, never the other way."""
    graph = project_graph()
    assert graph["toy_2d"] == {"normguard"}, graph["toy_2d"]
    assert "toy_2d" in graph["toy_experiment"] and "evidence" in graph["toy_experiment"]


def test_normguard_imports_only_torch_and_the_standard_library_at_module_level():
    """normguard.py works when copied alone into another project: its module-level imports are torch and stdlib."""
    tree = ast.parse((ROOT / "normguard.py").read_text())
    roots = set()
    for node in module_level(tree.body):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or ".").split(".")[0] if not node.level else ".")
    assert "torch" in roots
    assert all(r == "torch" or r in sys.stdlib_module_names for r in roots), roots
