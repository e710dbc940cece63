"""Every notebook in notebooks/ runs top to bottom, headless, in its fast setting (JAXDL_FAST=1).

One test per notebook; a failing cell fails the test with the cell's traceback. The kernel is
"python3", which jupyter_client maps to the interpreter running the tests, so the notebooks see
the same installed jaxdl. The committed notebooks are also checked to be the ones that
notebooks/_build.py generates (same cell sources), so the two cannot drift apart.
"""

import glob
import importlib.util
import os

import nbformat
import pytest

pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from nbclient import NotebookClient  # noqa: E402
from nbclient.exceptions import CellExecutionError  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
NOTEBOOK_DIR = os.path.join(os.path.dirname(HERE), "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
CELL_TIMEOUT_S = 300  # generous: the CI machine may be shared; a fast run takes well under a minute


def _build_module():
    spec = importlib.util.spec_from_file_location("_notebook_build", os.path.join(NOTEBOOK_DIR, "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_notebooks_and_each_is_generated_by_build_script():
    build = _build_module()
    names = sorted(os.path.basename(p)[: -len(".ipynb")] for p in NOTEBOOKS)
    assert names == sorted(build.NOTEBOOKS), "run `python notebooks/_build.py` after editing it"
    for path in NOTEBOOKS:
        name = os.path.basename(path)[: -len(".ipynb")]
        committed = [(c.cell_type, c.source) for c in nbformat.read(path, as_version=4).cells]
        generated = [(c.cell_type, c.source) for c in build.build(name).cells]
        assert committed == generated, f"{name}.ipynb differs from notebooks/_build.py; regenerate it"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p)[:-6] for p in NOTEBOOKS])
def test_notebook_runs_headless_in_fast_mode(path, monkeypatch):
    monkeypatch.setenv("JAXDL_FAST", "1")  # the kernel inherits the environment
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": NOTEBOOK_DIR}})
    try:
        client.execute()
    except CellExecutionError as err:
        pytest.fail(f"{os.path.basename(path)}: a cell failed:\n{err}", pytrace=False)
    ran = [c for c in nb.cells if c.cell_type == "code"]
    assert ran and all(c.execution_count is not None for c in ran)
