"""The committed task checkpoints (benchmarks/checkpoints/): the models that reached the paper's
numbers on the GPU still load with today's code and still solve their task on CPU, on fresh
sequences from the evaluation seed stream. A change to the model, the checkpoint layout or the
task generators that breaks them fails here."""

import json
import tarfile

import pytest

from mamba_jax.model import with_config
from mamba_jax.training.checkpoint import read_run_config, restore_model
from mamba_jax.training.eval_tasks import EVAL_SEED, task_accuracy
from tests.conftest import ROOT

CHECKPOINTS = ROOT / "benchmarks" / "checkpoints"
RESULTS = ROOT / "benchmarks" / "results" / "tasks_2026-12-03_NVIDIA_H200"


def _restore(name, tmp_path):
    with tarfile.open(CHECKPOINTS / f"{name}.ckpt.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    config, step = read_run_config(str(tmp_path))
    model, _ = restore_model(str(tmp_path), step)
    return config, step, with_config(model, scan_impl="reference")


@pytest.mark.parametrize(
    "name, task, lengths, num, record",
    [
        # Trained at 2^8; 2^12 is 16x the training length (the GPU record goes to 2^20).
        ("induction_heads_s6_lr3e-3", "induction_heads", [4096], 32,
         "run2/induction_heads_s6_lr3e-3.json"),
        ("selective_copying_s6", "selective_copying", [4096], 8,
         "run3/selective_copying_s6.json"),
    ],
)  # fmt: skip
def test_committed_checkpoint_solves_its_task(tmp_path, name, task, lengths, num, record):
    config, step, model = _restore(name, tmp_path)
    assert config.data.task == task
    with open(RESULTS / record) as f:
        recorded = json.load(f)
    # The checkpoint is the one the GPU record evaluated.
    assert recorded["config"]["train_step"] == step
    assert min(row["accuracy"] for row in recorded["rows"]) >= 0.99
    for length in lengths:
        row = task_accuracy(model, task, length, num, seed=EVAL_SEED, progress=False,
                            batch_tokens=2**19, chunk_tokens=2**16)  # fmt: skip
        assert row["accuracy"] >= 0.99, (length, row)
