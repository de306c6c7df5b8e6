"""train.py end to end on a shrunken config: the loss falls, metrics and a sample are written."""

import json
import os

from tests.conftest import ROOT, run_train
from tests.conftest import train_args as args


def test_train_end_to_end(tmp_path):
    ckpt = tmp_path / "run"
    overrides = {
        "train.steps": 12, "train.log_every": 4, "train.eval_every": 8, "train.lr": 1e-2,
        "train.sample_tokens": 12, "train.tensorboard": True, "train.grad_accum": 2,
        "mesh.data": 2, "mesh.fsdp": -1, "mesh.tensor": 2,
    }  # fmt: skip
    result, proc = run_train(args(tmp_path, ckpt, **overrides))
    out = proc.stdout
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
    assert "mesh: {'data': 2, 'fsdp': 2, 'tensor': 2}" in out
    assert "--- sample (12 tokens) ---" in out
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(ckpt / "tensorboard"))
    assert sorted(os.listdir(ckpt))[0] == "12"  # the final checkpoint
    with open(ckpt / "train_summary.json") as f:
        summary = json.load(f)
    assert summary["step"] == 12 and summary["start_step"] == 0 and summary["stopped"] is None

    # Run again on the same directory with more steps and a time limit: it resumes at 12, the
    # limit stops it after one step, with a checkpoint, and metrics.jsonl holds each step once.
    more = dict(overrides, **{"train.steps": 40, "train.time_limit_s": 1e-3})
    result, proc = run_train(args(tmp_path, ckpt, **more))
    out = proc.stdout
    assert f"resumed from {ckpt} step 12" in out and "time limit: saving step 13" in out
    assert result["step"] == 13 and result["stopped"] == "time limit"
    assert "eval_loss" not in result  # no eval on an early stop
    assert "12" in os.listdir(ckpt) and "13" in os.listdir(ckpt)
    with open(ckpt / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [4, 8, 12, 13]
    # Starting over on a directory that holds checkpoints is refused, not silently mixed.
    _, proc = run_train(
        args(tmp_path, ckpt, **dict(overrides, **{"checkpoint.resume": False})), expect_ok=False
    )
    assert proc.returncode != 0 and "checkpoint.resume=false" in proc.stderr


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
    assert "multiple of the data x fsdp" in _error_line(
        args(tmp_path, tmp_path / "c", **{"train.batch_size": 4})
    )
    assert "matched no files" in _error_line(
        args(tmp_path, tmp_path / "c", **{"data.train_path": str(tmp_path / "x*")})
    )
