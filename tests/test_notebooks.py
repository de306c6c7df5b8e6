"""The notebooks run top to bottom at small sizes (MAMBA_NB_SMALL=1), and are committed executed.

The kernel is this interpreter, through a kernel spec written for the test, so the notebooks see
the same environment as the tests whatever kernels the machine has installed.
"""

import json
import pathlib
import sys
import time

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

pytestmark = pytest.mark.xdist_group("notebooks")

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
# Seconds for one whole notebook at small sizes; a cell gets the same as its own limit.
TIME_LIMIT_S = 240
MAX_BYTES = 1_200_000
KERNEL = "mamba-jax-notebook-test"


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kernels")
    spec_dir = root / KERNEL
    spec_dir.mkdir()
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "mamba-jax (test)",
        "language": "python",
        "env": {"MAMBA_NB_SMALL": "1", "MPLBACKEND": "Agg"},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return KernelSpecManager(kernel_dirs=[str(root)])


def test_the_three_notebooks_exist():
    names = [p.name for p in NOTEBOOKS]
    for name in ("01_selective_scan.ipynb", "02_selectivity.ipynb", "03_performance.ipynb"):
        assert name in names, f"missing notebooks/{name}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_with_outputs(path):
    """What a code host shows: every code cell ran, none failed, and the file stays small."""
    assert path.stat().st_size < MAX_BYTES, f"{path.name} is {path.stat().st_size} bytes"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code"
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), f"{path.name} not run in order: {counts}"
    for cell in code:
        for out in cell.outputs:
            assert out.output_type != "error", f"{path.name}: {out.ename}: {out.evalue}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_top_to_bottom(path, kernel_specs):
    nb = nbformat.read(path, as_version=4)
    km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=kernel_specs)
    client = NotebookClient(
        nb,
        km=km,
        timeout=TIME_LIMIT_S,
        startup_timeout=120,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    assert elapsed < TIME_LIMIT_S, f"{path.name} took {elapsed:.0f} s at small sizes"
    if any("MAMBA_NB_SMALL" in c.source for c in nb.cells):
        # The kernel's environment reached the notebook: it ran at the small sizes.
        printed = "".join(
            o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
        )
        assert "small sizes: True" in printed, f"{path.name} did not run at small sizes"
