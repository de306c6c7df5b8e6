"""The one record every benchmark writes, and the rivals' runner.

A record is one JSON object:

    {"benchmark": "scan" | "train_throughput" | "decode" | "tasks",
     "device": "NVIDIA H200", "platform": "gpu", "jax": "0.11.2",
     "date": "2026-12-01T07:00:00+00:00", "commit": "60b5c27...",
     "config": {what the run was asked to do},
     "rows": [ {one flat dict per measured point}, ... ]}

Rows use one vocabulary: `shape`/`model`/`batch`/`length` for the point, `impl` for whose code ran
("ours", "jla", "mamba_ssm"), and times in `*_ms`, rates in `*_per_s`. `write` rewrites the whole
file after every row, so a run cut short keeps what it measured.

Rivals (the official CUDA/PyTorch package and jla) are optional: give their folder with `--rivals
PATH` or `$MAMBA_JAX_RIVALS`. The folder holds their prebuilt packages and runner scripts (each
writes `$OUT/<name>.json`); `run_rival` runs one script there in a subprocess and returns its JSON.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import subprocess
import sys
import tempfile

BENCHMARKS = ("scan", "train_throughput", "decode", "tasks")


def git_commit(cwd: str | None = None) -> str | None:
    """$MAMBA_JAX_COMMIT if set (for copies without .git), else `git rev-parse --verify HEAD`;
    None when neither gives one (never the literal 'HEAD')."""
    if os.environ.get("MAMBA_JAX_COMMIT"):
        return os.environ["MAMBA_JAX_COMMIT"]
    cwd = cwd or os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--verify", "-q", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) == 40 else None


def header(benchmark: str, config: dict | None = None) -> dict:
    """The fields every record starts with: what ran, where, when, at which commit."""
    import jax

    if benchmark not in BENCHMARKS:
        raise ValueError(f"benchmark must be one of {BENCHMARKS}, got {benchmark!r}")
    device = jax.devices()[0]
    return {
        "benchmark": benchmark,
        "device": device.device_kind,
        "platform": device.platform,
        "jax": jax.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "config": dict(config or {}),
    }


class Record:
    """Collects rows under a header and rewrites `path` (when given) after each one."""

    def __init__(
        self, benchmark: str, path: str | os.PathLike | None = None, config: dict | None = None
    ):
        self.data = {**header(benchmark, config), "rows": []}
        self.path = None if path is None else pathlib.Path(path)

    def add(self, row: dict) -> dict:
        self.data["rows"].append(dict(row))
        print(json.dumps(row), flush=True)
        self.write()
        return row

    def write(self):
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.data, indent=1) + "\n")


def rivals_dir(arg: str | None = None) -> pathlib.Path | None:
    """The rivals' folder from `--rivals` or $MAMBA_JAX_RIVALS; None when neither is set."""
    path = arg or os.environ.get("MAMBA_JAX_RIVALS")
    if not path:
        return None
    path = pathlib.Path(path)
    if not (path / "unpack.sh").is_file():
        raise ValueError(
            f"--rivals {str(path)!r} must be a folder holding unpack.sh and the "
            "rivals' runner scripts"
        )
    return path


def run_rival(rivals: pathlib.Path, script: str, args=(), timeout: float = 1800) -> dict:
    """Unpacks the rivals (once per process) and runs `script` from their folder; returns the
    JSON it writes under $OUT, or {"error": ...} when it fails."""
    dest = pathlib.Path(os.environ.get("MAMBA_JAX_RIVALS_UNPACKED", "/tmp/anchors"))
    if not (dest / "site").is_dir():
        subprocess.run(
            ["bash", str(rivals / "unpack.sh"), str(dest)],
            check=True,
            capture_output=True,
            text=True,
        )
    repo = pathlib.Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as out:
        env = dict(
            os.environ,
            OUT=out,
            MAMBA_EXT=str(dest),
            PYTHONPATH=os.pathsep.join([str(dest / "site"), str(repo)]),
        )
        proc = subprocess.run(
            [sys.executable, str(rivals / script), *map(str, args)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        written = list(pathlib.Path(out).glob("*.json"))
        if proc.returncode != 0 or not written:
            return {"error": f"{script} exited {proc.returncode}: {proc.stderr[-800:]}"}
        return json.loads(written[0].read_text())
