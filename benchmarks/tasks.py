"""Synthetic-task accuracy of a trained checkpoint at every length, written as one record.

    python benchmarks/tasks.py --task induction_heads --checkpoint runs/induction_heads \
        --num 1000 --out benchmarks/results/tasks_induction_heads.json
    python benchmarks/tasks.py --task selective_copying --checkpoint runs/selective_copying

The evaluation itself is the library's (`mamba_jax.training.eval_tasks.task_accuracy`): fresh
sequences from a seed training never uses, fed in chunks through the model's cache, so memory
depends on the chunk and not on the length. This script picks the lengths and the scan
implementation, and writes a `tasks` record (benchmarks/record.py): the config says what was
evaluated (checkpoint, training step and recipe), one row per length. The record is rewritten after
each length, so a run cut short keeps what it measured. `benchmarks/tasks_gpu.sh` trains and
evaluates the paper's four runs on one GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.record import Record  # noqa: E402
from mamba_jax.model import with_config  # noqa: E402
from mamba_jax.training.eval_tasks import (  # noqa: E402
    DEFAULT_LENGTHS,
    EVAL_SEED,
    TailPredictor,
    fastest_scan_impl,
    pick_chunk,
    task_accuracy,
)
from mamba_jax.training.tasks import TASKS  # noqa: E402

SCAN_IMPLS = ("fastest", "reference", "associative", "pallas", "auto")


def run(
    model,
    task_name,
    lengths,
    num,
    batch,
    chunk_tokens,
    scan_impl,
    seed,
    out=None,
    config=None,
    batch_tokens=2**25,
) -> dict:
    """Evaluates every length and returns the record (a dict); also written to `out` when given.
    scan_impl="fastest" times one chunk with each implementation and keeps the fastest one that
    agrees with the reference."""
    if scan_impl not in SCAN_IMPLS:
        raise ValueError(f"scan_impl must be one of {SCAN_IMPLS}, got {scan_impl!r}")
    if not lengths or min(lengths) < 1:
        raise ValueError(f"lengths must be a non-empty list of positive ints, got {lengths}")
    if scan_impl == "fastest":
        longest = max(lengths)
        b = min(batch, num, max(1, batch_tokens // longest))
        scan_impl = fastest_scan_impl(model, b, pick_chunk(longest, b, chunk_tokens))
    model = with_config(model, scan_impl=scan_impl)
    predictor = TailPredictor(model, model.config.vocab_size)
    selective = model.config.selective
    record = Record(
        "tasks",
        out,
        {
            "task": task_name,
            "lengths": list(lengths),
            "num": num,
            "batch": batch,
            "chunk_tokens": chunk_tokens,
            "batch_tokens": batch_tokens,
            "scan_impl": scan_impl,
            "eval_seed": seed,
            "selective": selective,
            "model": {"d_model": model.config.d_model, "n_layer": model.config.n_layer},
            **(config or {}),
        },
    )
    for length in lengths:
        row = task_accuracy(
            model,
            task_name,
            length,
            num,
            batch=batch,
            chunk_tokens=chunk_tokens,
            batch_tokens=batch_tokens,
            seed=seed,
            predictor=predictor,
        )
        record.add({"task": task_name, "selective": selective, **row})
    return record.data


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=TASKS, required=True)
    parser.add_argument("--checkpoint", required=True, help="train.py's checkpoint directory")
    parser.add_argument("--lengths", default=None, help="comma-separated; default per task")
    parser.add_argument("--num", type=int, default=1000, help="fresh sequences per length")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--chunk-tokens", type=int, default=2**21, help="batch x chunk bound")
    parser.add_argument(
        "--batch-tokens", type=int, default=2**25, help="batch x length bound (host memory)"
    )
    parser.add_argument("--scan-impl", default="fastest", choices=SCAN_IMPLS)
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    parser.add_argument("--out", default=None, help="write the record here")
    parser.add_argument("--recipe", default=None, help="free text kept in the record's config")
    parser.add_argument(
        "--stages",
        default=None,
        help="a JSON-lines file of the training stages (one train summary per line), kept in "
        "the record's config",
    )
    args = parser.parse_args(argv)
    from mamba_jax.training.checkpoint import read_run_config, restore_model

    run_config, step = read_run_config(args.checkpoint)
    model, _ = restore_model(args.checkpoint, step)
    trained_on = getattr(run_config.data, "task", None)
    if trained_on not in (None, args.task):
        raise ValueError(f"--task {args.task}, but the checkpoint was trained on {trained_on}")
    lengths = (
        [int(x) for x in args.lengths.split(",")] if args.lengths else DEFAULT_LENGTHS[args.task]
    )
    train = run_config.train
    config = {
        "checkpoint": args.checkpoint,
        "train_step": step,
        "train_seq_len": train.seq_len,
        "train_batch_size": train.batch_size,
        "train_lr": train.lr,
        "train_min_lr": train.min_lr,
        "train_warmup_steps": train.warmup_steps,
    }
    if args.recipe:
        config["recipe"] = args.recipe
    if args.stages:
        with open(args.stages) as f:
            config["stages"] = [json.loads(line) for line in f if line.strip()]
    summary = os.path.join(args.checkpoint, "train_summary.json")
    if os.path.exists(summary):  # written by train.py: wall time and final training metrics
        with open(summary) as f:
            config["train_summary"] = json.load(f)
    return run(
        model,
        args.task,
        lengths,
        args.num,
        args.batch,
        args.chunk_tokens,
        args.scan_impl,
        args.seed,
        out=args.out,
        config=config,
        batch_tokens=args.batch_tokens,
    )


if __name__ == "__main__":
    main()
