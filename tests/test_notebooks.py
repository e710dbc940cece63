"""The research notebooks: each `notebooks/NAME.py` (jupytext percent script, the source) and its
paired, executed `NAME.ipynb` hold the same cells, and every notebook runs top to bottom,
headless, in its fast setting (JAXDL_FAST=1).

The pairing check compares cell types and sources as jupytext reads them, ignoring outputs, so
CI fails when one file was edited without `jupytext --sync notebooks/NAME.py`. The run uses the
"python3" kernel, which jupyter_client maps to the interpreter running the tests, so the
notebooks see the same installed jaxdl; they run with notebooks/ as their working directory,
where they import their shared setup (notebooks/nbsetup.py).
"""

import glob
import os

import nbformat
import pytest

jupytext = pytest.importorskip("jupytext")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from nbclient import NotebookClient  # noqa: E402
from nbclient.exceptions import CellExecutionError  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
NOTEBOOK_DIR = os.path.join(os.path.dirname(HERE), "notebooks")
SETUP_MODULE = "nbsetup"  # notebooks/nbsetup.py: imported by the notebooks, not one itself
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
NAMES = [os.path.basename(p)[: -len(".ipynb")] for p in NOTEBOOKS]
CELL_TIMEOUT_S = 300  # generous: the CI machine may be shared; a fast run takes well under a minute


def _cells(path):
    return [(c.cell_type, c.source) for c in jupytext.read(path).cells]


def test_every_notebook_has_exactly_one_percent_script():
    scripts = sorted(
        os.path.basename(p)[: -len(".py")] for p in glob.glob(os.path.join(NOTEBOOK_DIR, "*.py"))
    )
    scripts.remove(SETUP_MODULE)
    assert NAMES, "no notebooks found in notebooks/"
    assert scripts == NAMES, "each notebooks/NAME.ipynb needs its source notebooks/NAME.py, and back"


@pytest.mark.parametrize("name", NAMES)
def test_script_and_notebook_hold_the_same_cells(name):
    script, notebook = (os.path.join(NOTEBOOK_DIR, name + ext) for ext in (".py", ".ipynb"))
    formats = jupytext.read(script).metadata.get("jupytext", {}).get("formats")
    assert formats == "ipynb,py:percent", f"{name}.py is not paired with its .ipynb (formats: {formats!r})"
    assert _cells(script) == _cells(notebook), (
        f"{name}.py and {name}.ipynb differ; run `jupytext --sync notebooks/{name}.py` "
        f"(and re-execute the notebook if its code changed)"
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_headless_in_fast_mode(name, monkeypatch):
    monkeypatch.setenv("JAXDL_FAST", "1")  # the kernel inherits the environment
    nb = jupytext.read(os.path.join(NOTEBOOK_DIR, name + ".py"))  # the source, no outputs
    client = NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": NOTEBOOK_DIR}}
    )
    try:
        client.execute()
    except CellExecutionError as err:
        pytest.fail(f"{name}: a cell failed:\n{err}", pytrace=False)
    ran = [c for c in nb.cells if c.cell_type == "code"]
    assert ran and all(c.execution_count is not None for c in ran)
    assert nbformat.validate(nb) is None
