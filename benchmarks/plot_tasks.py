"""Induction Heads accuracy against test length, one line per `tasks` record, as a PNG.

    python benchmarks/plot_tasks.py benchmarks/results/tasks_2026-12-03_NVIDIA_H200 \
        --out docs/tasks_induction_heads.png

Takes record files or folders (searched recursively for `tasks` records of Induction Heads).
Each line is labelled with its record's file name, training steps and device; the training
length (from the record's config) is marked, and chance is drawn dashed.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.results import load_record  # noqa: E402

TASK = "induction_heads"


def induction_records(paths) -> list:
    """The Induction Heads `tasks` records among `paths` (files, or folders searched
    recursively), sorted by path."""
    files = []
    for p in map(pathlib.Path, paths):
        if p.is_dir():
            files.extend(sorted(p.rglob("*.json")))
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"no such file or folder: {p}")
    records = [load_record(f) for f in files]
    return [r for r in records if r.benchmark == "tasks" and r.config.get("task") == TASK]


def label(record) -> str:
    path = pathlib.Path(record.path)
    name = f"{path.parent.name}/{path.stem}" if path.parent.name.startswith("run") else path.stem
    steps = record.config.get("train_step")
    return f"{name}, {steps:,} steps" if isinstance(steps, int) else name


def plot(records, out: str, title: str | None = None) -> str:
    """Draws every record's accuracy (%) against log2 of the length into the PNG `out`."""
    if not records:
        raise ValueError(f"no {TASK} tasks records to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    chance = None
    for r in records:
        rows = sorted(r.rows, key=lambda row: row["length"])
        xs = [row["length"] for row in rows]
        ys = [100 * row["accuracy"] for row in rows]
        ax.plot(xs, ys, "o-", markersize=3, label=label(r))
        chance = rows[0].get("chance", chance)
    trained = {r.config.get("train_seq_len") for r in records} - {None}
    for length in trained:
        ax.axvline(length, color="grey", linewidth=0.8)
        ax.text(length, 50, f" trained at {length}", fontsize=8, color="grey")
    if chance:
        ax.axhline(100 * chance, color="black", linestyle="--", linewidth=0.8, label="chance")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="test sequence length", ylabel="accuracy (%)", ylim=(0, 102))
    devices = "; ".join(dict.fromkeys(f"{r.device}, {r.date}" for r in records))
    ax.set_title(title or f"Induction Heads, 1000 fresh sequences per length\n{devices}",
                 fontsize=9)  # fmt: skip
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="tasks record files or folders")
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    try:
        out = plot(induction_records(args.paths), args.out)
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
