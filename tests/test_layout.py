"""The two wings of the package: the model library never imports the training wing."""

import ast
import pathlib
import subprocess
import sys

from tests.conftest import ROOT

CORE = sorted(p for p in (ROOT / "mamba_jax").glob("*.py"))


def _imported_modules(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_core_modules_never_import_the_training_package():
    assert len(CORE) >= 10, [p.name for p in CORE]
    offenders = {
        p.name: sorted(m for m in _imported_modules(p) if m.startswith("mamba_jax.training"))
        for p in CORE
    }
    assert not {k: v for k, v in offenders.items() if v}, offenders


def test_generate_command_loads_no_training_code():
    """Importing the command line (and through it every core module it needs) pulls in neither
    the training package nor the data pipeline. (optax is imported by flax.nnx itself.)"""
    code = (
        "import sys, mamba_jax, mamba_jax.generate, mamba_jax.loading, mamba_jax.convert; "
        "bad = [m for m in sys.modules if m.startswith(('mamba_jax.training', 'grain', 'tensorboardX'))]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
