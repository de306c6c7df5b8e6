"""train.py end to end on a shrunken config: the loss falls, metrics and a sample are written, the
run says where things went and what to run next; then the plot and generate commands on it."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_train
from tests.conftest import train_args as args


def _run_module(*argv, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", *map(str, argv)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow  # four train.py runs and two commands on their result: a few minutes
def test_train_end_to_end(tmp_path):
    ckpt = tmp_path / "run"
    overrides = {
        "train.steps": 12, "train.log_every": 4, "train.eval_every": 8, "train.lr": 1e-2,
        "train.sample_tokens": 12, "train.tensorboard": True, "train.grad_accum": 2,
        "train.progress": True, "mesh.data": 2, "mesh.fsdp": -1, "mesh.tensor": 2,
        "train.compilation_cache_dir": tmp_path / "xla",
    }  # fmt: skip
    every_compile = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    result, proc = run_train(args(tmp_path, ckpt, **overrides), env=every_compile)
    out, lines = proc.stdout, proc.stdout.splitlines()
    assert result["step"] == 12
    with open(ckpt / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [4, 8, 12]
    for r in records:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu"} <= set(r)
        assert r["tokens_per_sec"] > 0 and r["mfu"] is None  # no peak FLOP/s known for CPUs
    assert {"eval_loss", "eval_bpb"} <= set(records[1]) and "eval_loss" not in records[0]
    assert records[-1]["loss"] < records[0]["loss"] - 0.3  # learning, not just running
    assert records[-1]["eval_bpb"] > 0
    assert "'data': 2, 'fsdp': 2, 'tensor': 2" in out
    assert "--- sample (12 tokens) ---" in out
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(ckpt / "tensorboard"))
    assert sorted(os.listdir(ckpt))[0] == "12"  # the final checkpoint
    with open(ckpt / "train_summary.json") as f:
        summary = json.load(f)
    assert summary["step"] == 12 and summary["start_step"] == 0 and summary["stopped"] is None
    # What the run says: a compact config (no MambaConfig repr), the run directory at the start
    # and at the end, the evaluation on its own line above the bar, and the next commands.
    assert any(line.startswith("config: ") and "train.steps=12" in line for line in lines)
    assert "model: " in out and "d_model=32 n_layer=2" in out and "MambaConfig(" not in out
    assert f"run directory: {ckpt} (checkpoints, metrics.jsonl" in out
    assert any(line.startswith("step 8: eval_loss ") for line in lines), out
    assert "train: " in proc.stderr  # the bar
    assert f"s, compiling or loading from {tmp_path / 'xla'} included" in out
    assert any(line.startswith("step 1 took ") for line in lines), out
    assert any(f.startswith("jit_step-") for f in os.listdir(tmp_path / "xla"))
    end = out[out.index(f"run directory {ckpt}:") :]
    for item in ("metrics.jsonl", "tensorboard", "train_summary.json", f"{ckpt}/12"):
        assert item in end, end
    assert f"-m mamba_jax.generate --model {ckpt} --prompt 'def '" in end
    assert f"-m mamba_jax.training.plot {ckpt}" in end
    assert "resume" not in end  # the run is complete

    # Run again on the same directory with more steps and a time limit: it resumes at 12, the
    # limit stops it after one step, with a checkpoint, and metrics.jsonl holds each step once.
    more = dict(overrides, **{"train.steps": 40, "train.time_limit_s": 1e-3})
    result, proc = run_train(args(tmp_path, ckpt, **more))
    out, lines = proc.stdout, proc.stdout.splitlines()
    assert f"resumed from {ckpt} step 12" in out
    assert any(line.startswith("step 13 took ") for line in lines), out
    assert "time limit: saving step 13 and exiting" in lines  # a line of its own, not the bar's
    assert result["step"] == 13 and result["stopped"] == "time limit"
    assert "eval_loss" not in result  # no eval on an early stop
    assert "12" in os.listdir(ckpt) and "13" in os.listdir(ckpt)
    assert "resume       run the same command again" in out
    with open(ckpt / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [4, 8, 12, 13]
    # Starting over on a directory that holds checkpoints is refused, not silently mixed.
    _, proc = run_train(
        args(tmp_path, ckpt, **dict(overrides, **{"checkpoint.resume": False})), expect_ok=False
    )
    assert proc.returncode != 0 and "checkpoint.resume=false" in proc.stderr
    # Without --config, on a CPU: the tiny preset, said so. With nothing left to train (the
    # checkpoint is at train.steps) there is no progress bar, and the summary is kept.
    done = dict(overrides, **{"train.steps": 13})
    _, proc = run_train(args(tmp_path, ckpt, **done)[2:])
    assert proc.stdout.startswith("no --config given: training configs/tiny.yaml"), proc.stdout
    assert "nothing to train" in proc.stdout and "train: " not in proc.stderr
    with open(ckpt / "train_summary.json") as f:
        assert json.load(f)["step"] == 13

    # The commands the run suggested: the plot, and generate without Orbax's read-only notice.
    proc = _run_module("mamba_jax.training.plot", ckpt)
    assert proc.returncode == 0, proc.stderr
    with open(ckpt / "loss.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    proc = _run_module(
        "mamba_jax.generate", "--model", ckpt, "--prompt", "def ", "--max-new-tokens", 4
    )
    assert proc.returncode == 0, proc.stderr
    assert "4 new tokens" in proc.stderr and "read only" not in proc.stderr, proc.stderr


def _error_line(argv):
    """train.py's one-line error for bad input: exit status 2, no traceback."""
    _, proc = run_train(argv, expect_ok=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def test_cli_rejects_bad_input(tmp_path):
    tiny = os.path.join(ROOT, "configs", "tiny.yaml")
    line = _error_line(["--config", tiny, "train.stpes=3"])
    assert "unknown config key 'train.stpes'" in line and "did you mean 'train.steps'" in line
    line = _error_line(["--config", tiny, "trian.steps=3"])
    assert "unknown config section 'trian'" in line and "'train'" in line
    line = _error_line(["--config", "configs/tiy.yaml"])
    assert "'configs/tiy.yaml' does not exist (did you mean 'configs/tiny.yaml'?)" in line
    assert "multiple of the data x fsdp" in _error_line(
        args(tmp_path, tmp_path / "c", **{"train.batch_size": 4})
    )
    assert "matched no files" in _error_line(
        args(tmp_path, tmp_path / "c", **{"data.train_path": str(tmp_path / "x*")})
    )


def test_help_lists_presets_and_config_sections():
    _, proc = run_train(["--help"], timeout=300)
    for preset in ("configs/tiny.yaml", "configs/mamba_130m.yaml", "configs/induction_heads.yaml"):
        assert preset in proc.stdout
    for section in ("model:", "data:", "train:", "mesh:", "checkpoint:", "distributed:"):
        assert f"\n  {section} " in proc.stdout
    assert "steps batch_size seq_len" in proc.stdout


def test_plot_says_what_is_missing(tmp_path, monkeypatch):
    from mamba_jax.training import plot

    with pytest.raises(ValueError, match="no metrics.jsonl in"):
        plot.read_metrics(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    records = plot.read_metrics(str(tmp_path))  # a line cut short by a kill is skipped
    assert records == [{"step": 1, "loss": 2.0}]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(ValueError, match=r"needs matplotlib.*pip install -e '\.\[plot\]'"):
        plot.plot_metrics(records, str(tmp_path / "x.png"))
