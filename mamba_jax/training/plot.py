"""`python -m mamba_jax.training.plot RUN_DIR [--out FILE]`: a training run's curves as a PNG.

Reads RUN_DIR/metrics.jsonl (written by train.py under its checkpoint.dir) and draws the training
loss at every logged step, with the eval loss where the run evaluated; a second panel shows the
eval accuracy (synthetic tasks) or bits per byte (text) when the run recorded them. The image goes
to RUN_DIR/loss.png unless --out says otherwise.

matplotlib is an optional dependency: `pip install -e '.[plot]'` (the `notebooks` extra, which
`make` installs, includes it too).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

INSTALL_HINT = "pip install -e '.[plot]' (or pip install matplotlib)"


def read_metrics(run_dir: str) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl, in file order; a line cut short by a kill is skipped."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ValueError(
            f"no metrics.jsonl in {run_dir!r}: give the checkpoint.dir of a train.py run "
            "(for example runs/tiny)"
        )
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    if not any("loss" in r for r in records):
        raise ValueError(f"{path} holds no logged steps yet")
    return records


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_metrics(records: list[dict], out: str, title: str = "") -> str:
    """Draws `records` (metrics.jsonl objects) into the PNG `out`; returns `out`."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError(
            f"the plot needs matplotlib, which is not installed: {INSTALL_HINT}"
        ) from None

    second = next((k for k in ("eval_accuracy", "eval_bpb") if _series(records, k)[0]), None)
    fig, axes = plt.subplots(1, 2 if second else 1, figsize=(10 if second else 6, 3.5))
    axes = list(axes) if second else [axes]
    axes[0].plot(*_series(records, "loss"), label="train loss")
    steps, values = _series(records, "eval_loss")
    if steps:
        axes[0].plot(steps, values, "o-", label="eval loss")
    axes[0].set(xlabel="step", ylabel="cross-entropy (nats per token)", title=title)
    axes[0].legend()
    if second:
        label = "eval accuracy" if second == "eval_accuracy" else "eval bits per byte"
        axes[1].plot(*_series(records, second), "o-", color="C1")
        axes[1].set(xlabel="step", ylabel=label, title=label)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(
        prog="python -m mamba_jax.training.plot",
        description="Plot the loss curve of a train.py run from its metrics.jsonl.",
    )
    parser.add_argument("run_dir", help="the run's checkpoint.dir, e.g. runs/tiny")
    parser.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/loss.png)")
    args = parser.parse_args(argv)
    try:
        records = read_metrics(args.run_dir)
        out = args.out or os.path.join(args.run_dir, "loss.png")
        plot_metrics(records, out, title=os.path.basename(os.path.normpath(args.run_dir)))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    last = records[-1]
    print(f"wrote {out} ({len(records)} logged steps, last step {last['step']})")
    return out


if __name__ == "__main__":
    main()
