"""The import graph of the project's own modules, in layers that only import downward, with no cycle (imports
inside functions count):

    normguard (the core)  <-  trainer.* (the trainer's parts)  <-  train_full, toy_2d (the products)
                          <-  experiments.* (the paper's experiments)  <-  tests, bench, notebooks (import nothing back)

normguard.py imports only torch and the standard library at module level; train_full.py knows no testbed; toy_2d.py
reads alone. Every .py in the repo is parsed with ast; nothing is imported or run.
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


def module_name(path):
    """The dotted name a file is imported by from the repo root (`trainer/cli.py` -> `trainer.cli`)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p) for p in FILES}
LAYER = {"normguard": 0, "trainer": 1, "train_full": 2, "toy_2d": 2, "experiments": 3}  # by the name's first part


def layer(module):
    return LAYER.get(module.split(".")[0], 4)  # tests, bench, notebooks: the top, imported by nothing


def imported_modules(tree, known, module_level_only=False):
    """The modules of `known` that `tree` imports: `import a.b`, `from a import b` (b a module or a name in a), and
    importlib.import_module / __import__ of a string literal; with module_level_only, only statements outside
    functions and classes."""
    nodes = ast.walk(tree) if not module_level_only else module_level(tree.body)
    found = set()

    def add(dotted):
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        if dotted:
            found.add(dotted)

    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                add(f"{node.module}.{alias.name}")
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module",
            "__import__",
        ):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                add(node.args[0].value)
    return found


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
        name = module_name(path)
        imports = imported_modules(ast.parse(path.read_text(), filename=str(path)), MODULES)
        graph[name] = imports - {name} - {p for p in MODULES if name.startswith(p + ".")}  # not its own package
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


def test_the_collector_resolves_modules_sees_imports_inside_functions_and_finds_cycles():
    known = {"a", "a.b", "c", "c.d", "e"}
    tree = ast.parse(
        "import a.b\nfrom c import x\ndef f():\n    from c import d\n    import importlib\n"
        "    importlib.import_module('e')\n"
    )
    assert imported_modules(tree, known) == {"a.b", "c", "c.d", "e"}
    assert imported_modules(tree, known, module_level_only=True) == {"a.b", "c"}
    assert find_cycle({"x": {"y"}, "y": {"z"}, "z": {"x"}}) == ["x", "y", "z", "x"]
    assert find_cycle({"x": {"y"}, "y": set(), "z": {"x", "y"}}) is None


def test_the_root_holds_the_three_products_and_the_parts_live_in_two_packages():
    assert sorted(p.name for p in ROOT.glob("*.py")) == ["normguard.py", "toy_2d.py", "train_full.py"]
    assert {"trainer.cli", "trainer.adapters", "trainer.samplers", "experiments.toy", "experiments.evidence"} <= MODULES


def test_the_project_import_graph_has_no_cycle_and_nothing_imports_upward():
    graph = project_graph()
    assert "experiments.digits_testbed" in graph["experiments.digits"]  # the graph is not empty
    assert "train_full" in graph["experiments.digits_testbed"]
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    upward = {(a, b) for a, targets in graph.items() for b in targets if layer(b) > layer(a)}
    assert not upward, upward


def test_train_full_knows_no_testbed():
    """train_full.py imports only normguard and the trainer's parts: a testbed registers itself from its own module."""
    graph = project_graph()
    assert graph["train_full"] <= {"normguard"} | {m for m in MODULES if m.startswith("trainer.")}, graph["train_full"]
    parts = ("adapters", "rewards", "checkpoints", "recipes", "rollouts", "evaluation", "samplers", "cli")
    assert {name: graph[f"trainer.{name}"] for name in parts} == {
        "adapters": {"normguard"},
        "rewards": {"trainer.adapters"},
        "checkpoints": {"trainer.cli"},
        "recipes": set(),
        "rollouts": {"normguard", "trainer.samplers"},
        "evaluation": {"normguard", "trainer.rollouts"},
        "samplers": {"normguard"},
        "cli": set(),
    }


def test_the_toy_reads_alone_and_its_experiment_drives_it():
    """toy_2d.py (the world, the model, RL, its own short demo) imports only normguard and the shared command line,
    so a student reads it alone; experiments/toy.py (arms, evaluation, verdicts, figures) imports it, never the
    other way."""
    graph = project_graph()
    assert graph["toy_2d"] <= {"normguard", "trainer.cli"}, graph["toy_2d"]
    assert {"toy_2d", "experiments.evidence"} <= graph["experiments.toy"]


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
