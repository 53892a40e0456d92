"""Execute every notebooks/*.py (jupytext percent format) headless; any cell error fails the test.

Notebooks that are never run rot: each one is converted with jupytext and run top to bottom by nbclient on the
python3 kernel, from the notebooks/ folder (where Jupyter would start it), with its figures sent to a temp dir. The
walkthrough runs the toy with NORMGUARD_TOY_ARGS=--smoke: this test checks that it runs, not what the toy shows
(tests/test_toy.py pins the headline's results at full size, once per session).
"""

from pathlib import Path

import jupytext
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.py"))


def test_there_are_notebooks():
    assert {p.stem for p in NOTEBOOKS} >= {"put_normguard_in_your_trainer", "walkthrough"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_clean(path, tmp_path, monkeypatch):
    monkeypatch.setenv("NORMGUARD_NOTEBOOK_OUT", str(tmp_path))  # the kernel inherits it: figures land in tmp
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("NORMGUARD_TOY_ARGS", "--smoke")  # the walkthrough's toy run at smoke size (its first cell)
    notebook = jupytext.read(path)
    # raises CellExecutionError, with the failing cell and its traceback, on the first error. The kernel is stopped
    # at once after the last cell: a graceful stop only adds the interpreter's teardown (~3 s with diffusers loaded),
    # which nothing here checks
    NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        shutdown_kernel="immediate",
        resources={"metadata": {"path": str(path.parent)}},
    ).execute()
    errors = [
        out
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors, errors
    assert any(tmp_path.rglob("*.png")), f"{path.name} saved no figure under NORMGUARD_NOTEBOOK_OUT"
