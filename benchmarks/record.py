"""The one record every benchmark writes, and the rivals' runner.

A record is one JSON object, one per file under `benchmarks/results/`:

    {"benchmark": "scan" | "conv" | "train_throughput" | "decode" | "tasks",
     "device": "NVIDIA H200", "platform": "gpu", "jax": "0.11.2",
     "date": "2026-12-01T07:00:00+00:00", "commit": "60b5c27...",
     "config": {what the run was asked to do},
     "rows": [ {one flat dict per measured point}, ... ]}

Rows use one vocabulary: `shape`/`model`/`batch`/`length` for the point, `impl` for whose code ran
("ours", "jla", "mamba_ssm"), and times in `*_ms`, rates in `*_per_s`. `write` rewrites the whole
file after every row, so a run cut short keeps what it measured. A point that was not measured
(out of memory, a time budget spent, a rival that does not support it) is still a row: its point
keys and an `error` string instead of the measurements.

The keys each benchmark's rows must have (`ROW_KEYS`; benchmarks/results.py rejects a record
whose rows lack them), and the measurements it reads:

| benchmark | point keys (every row) | measurements (rows without `error`) |
|---|---|---|
| scan | shape, batch, d_inner, length, d_state, impl | fwd_ms, fwd_bwd_ms; ours also scan_impl ("pallas", "associative", "reference") and variant (block sizes, "" for the default) |
| conv | shape, batch, length, d_inner, impl | fwd_ms, vjp_ms (the backward); variant (kernel block sizes, "xla" for XLA's op) |
| train_throughput | model, gpus, batch, length, impl | tokens_per_s, step_ms; optional mfu, peak_gib, scan_impl |
| decode | model, batch, impl, arch ("mamba" or "transformer") | tokens_per_s (new tokens over prefill + decode); optional decode_tokens_per_s (the token loop alone), generate_tokens_per_s (mamba_jax.generate) |
| tasks | task, length | accuracy, chance |

Rivals (the official CUDA/PyTorch package and jla) are optional: give their folder with `--rivals
PATH` or `$MAMBA_JAX_RIVALS`. The folder holds their prebuilt packages and runner scripts (each
writes `$OUT/<name>.json`); `run_rival` runs one script in a subprocess and returns its JSON, and
`unpack_rivals` gives the folder where they are unpacked (its `site/` holds jla, importable).
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import subprocess
import sys
import tempfile

BENCHMARKS = ("scan", "conv", "train_throughput", "decode", "tasks", "length_eval")
HEADER_KEYS = ("benchmark", "device", "platform", "jax", "date", "commit", "config", "rows")
ROW_KEYS = {
    "scan": ("shape", "batch", "d_inner", "length", "d_state", "impl"),
    "conv": ("shape", "batch", "length", "d_inner", "impl"),
    "train_throughput": ("model", "gpus", "batch", "length", "impl"),
    "decode": ("model", "batch", "impl", "arch"),
    "tasks": ("task", "length"),
    "length_eval": ("run", "start", "end", "tokens", "loss"),  # mamba_jax.training.length_eval
}


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
        missing = [k for k in ROW_KEYS[self.data["benchmark"]] if k not in row]
        if missing:  # a warning, not an error: a GPU run keeps going and keeps its numbers
            print(
                f"warning: this {self.data['benchmark']} row lacks {missing}; "
                "benchmarks/results.py will reject the record",
                file=sys.stderr,
            )
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


def unpack_rivals(rivals: pathlib.Path) -> pathlib.Path:
    """Unpacks the rivals (once per machine) into $MAMBA_JAX_RIVALS_UNPACKED (default
    /tmp/anchors) and returns that folder: `site/` holds jla, `built/` the CUDA extensions."""
    dest = pathlib.Path(os.environ.get("MAMBA_JAX_RIVALS_UNPACKED", "/tmp/anchors"))
    if not (dest / "site").is_dir():
        subprocess.run(
            ["bash", str(rivals / "unpack.sh"), str(dest)],
            check=True,
            capture_output=True,
            text=True,
        )
    return dest


def run_rival(rivals: pathlib.Path, script: str, args=(), timeout: float = 1800) -> dict:
    """Unpacks the rivals and runs `script` (a file in their folder, or an absolute path: a
    project script that drives a rival in its own process) with $OUT, $MAMBA_EXT and PYTHONPATH
    set; returns the JSON it writes under $OUT, or {"error": ...} when it fails."""
    dest = unpack_rivals(rivals)
    repo = pathlib.Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as out:
        env = dict(
            os.environ,
            OUT=out,
            MAMBA_EXT=str(dest),
            PYTHONPATH=os.pathsep.join([str(dest / "site"), str(repo)]),
        )
        try:
            proc = subprocess.run(
                [sys.executable, str(rivals / script), *map(str, args)],
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return {"error": f"{script} ran past {timeout} s"}
        written = list(pathlib.Path(out).glob("*.json"))
        if proc.returncode != 0 or not written:
            return {"error": f"{script} exited {proc.returncode}: {proc.stderr[-800:]}"}
        return json.loads(written[0].read_text())
