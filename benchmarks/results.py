"""Reading benchmark records as flat tables, and plotting them.

Every JSON file under `benchmarks/results/` is one record in the format of `benchmarks/record.py`
(header: benchmark, device, platform, jax, date, commit, config; then `rows`, each with the point
keys of `record.ROW_KEYS`). Nothing else is read: a file in another format is an error that names
the file and what it lacks.

The rivals' numbers (mamba_ssm's CUDA kernel and PyTorch model, jla's Mosaic GPU kernels and
trainer) are records too, `impl` "mamba_ssm" or "jla": the `rivals_*` files copy the tables of
`benchmarks/README.md`, and `benchmarks/scan.py --rivals` writes them beside ours in one record.

    from benchmarks import results as br     # from the repository root
    records = br.load_results("benchmarks/results")
    br.plot_scan(br.scan_table(records), "fwd")
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib

from benchmarks.record import BENCHMARKS, HEADER_KEYS, ROW_KEYS

KINDS = ("scan", "train_throughput", "decode")  # what notebook 03 plots
RIVALS = ("mamba_ssm", "jla")


@dataclasses.dataclass(frozen=True)
class BenchRecord:
    """One record file. `date` is the day (YYYY-MM-DD) of the header's ISO timestamp."""

    benchmark: str
    path: str
    device: str
    platform: str
    jax: str
    date: str
    commit: str | None
    config: dict
    rows: list


def load_record(path) -> BenchRecord:
    """Reads and checks one record; ValueError names the file and what is wrong with it."""
    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: must hold one benchmark record as JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must hold a JSON object (a record), got {type(data).__name__}")
    missing = [k for k in HEADER_KEYS if k not in data]
    if missing:
        raise ValueError(
            f"{path}: a record must have the keys {HEADER_KEYS} (benchmarks/record.py), "
            f"it lacks {missing}"
        )
    if data["benchmark"] not in BENCHMARKS:
        raise ValueError(
            f"{path}: benchmark must be one of {BENCHMARKS}, got {data['benchmark']!r}"
        )
    rows = data["rows"]
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: rows must be a list of objects")
    for i, row in enumerate(rows):
        lacks = [k for k in ROW_KEYS[data["benchmark"]] if k not in row]
        if lacks:
            raise ValueError(
                f"{path}: every {data['benchmark']} row has the keys "
                f"{ROW_KEYS[data['benchmark']]}; row {i} lacks {lacks}"
            )
    return BenchRecord(
        benchmark=data["benchmark"],
        path=str(path),
        device=data["device"],
        platform=data["platform"],
        jax=data["jax"],
        date=str(data["date"])[:10],
        commit=data["commit"],
        config=data["config"],
        rows=rows,
    )


def load_results(directory="benchmarks/results") -> list[BenchRecord]:
    """Every record under `directory` (recursively), sorted by path; [] if it does not exist."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    return [load_record(p) for p in sorted(directory.rglob("*.json"))]


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _point(record, row, drop=()):
    """The row (less the keys ending in one of `drop`) with its record's device, date, commit and
    file name in front."""
    kept = {k: v for k, v in row.items() if not k.endswith(drop)}
    where = {"device": record.device, "date": record.date, "commit": record.commit}
    return {**where, "file": pathlib.Path(record.path).name, **kept}


def scan_table(records) -> list[dict]:
    """One row per measured pass of every scan record: {device, date, commit, file, impl,
    scan_impl, variant, pass ("fwd" or "fwd+bwd"), shape, batch, d_inner, length, d_state, ms}.
    Rows that record an error add nothing (see `errors`)."""
    table = []
    for record in records:
        if record.benchmark != "scan":
            continue
        for row in record.rows:
            for pass_, key in (("fwd", "fwd_ms"), ("fwd+bwd", "fwd_bwd_ms")):
                if _is_number(row.get(key)):
                    point = _point(record, row, drop=("_ms",))
                    point.update(scan_impl=row.get("scan_impl"), variant=row.get("variant") or "")
                    table.append({**point, "pass": pass_, "ms": float(row[key])})
    return table


def scan_ratios(table) -> list[dict]:
    """Each rival's time over our fastest at the same point and pass, in the same run (file):
    rows {file, device, date, shape, d_state, pass, rival, rival_ms, ours_ms, ratio}; a ratio
    above 1 means ours is faster. Numbers from different runs are never compared."""
    best = {}
    for r in table:
        key = (r["file"], r["shape"], r["d_state"], r["pass"])
        if r["impl"] == "ours" and (key not in best or r["ms"] < best[key]):
            best[key] = r["ms"]
    out = []
    for r in table:
        key = (r["file"], r["shape"], r["d_state"], r["pass"])
        if r["impl"] in RIVALS and key in best:
            out.append(
                {
                    "file": r["file"],
                    "device": r["device"],
                    "date": r["date"],
                    "shape": r["shape"],
                    "d_state": r["d_state"],
                    "pass": r["pass"],
                    "rival": r["impl"],
                    "rival_ms": r["ms"],
                    "ours_ms": best[key],
                    "ratio": r["ms"] / best[key],
                }
            )
    return out


def train_table(records) -> list[dict]:
    """Rows {device, date, commit, file, impl, model, gpus, batch, length, scan_impl,
    tokens_per_s, mfu, peak_gib} of every training row that measured a throughput."""
    return [
        {
            **_point(r, row),
            "scan_impl": row.get("scan_impl"),
            "mfu": row.get("mfu"),
            "peak_gib": row.get("peak_gib"),
            "tokens_per_s": float(row["tokens_per_s"]),
        }
        for r in records
        if r.benchmark == "train_throughput"
        for row in r.rows
        if _is_number(row.get("tokens_per_s"))
    ]


# decode metric -> the row key that holds it (record.py's decode vocabulary)
DECODE_METRICS = {
    "e2e": "tokens_per_s",
    "decode": "decode_tokens_per_s",
    "generate": "generate_tokens_per_s",
}


def decode_table(records) -> list[dict]:
    """Rows {device, date, commit, file, impl, arch, model, batch, metric, tokens_per_s}, one per
    metric a decode row measured: "e2e" (new tokens over prefill + decode, the figure the rivals
    are measured in), "decode" (the token loop alone) or "generate" (mamba_jax.generate)."""
    return [
        {
            **_point(r, row, drop=("_per_s",)),
            "metric": metric,
            "tokens_per_s": float(row[key]),
        }
        for r in records
        if r.benchmark == "decode"
        for row in r.rows
        for metric, key in DECODE_METRICS.items()
        if _is_number(row.get(key))
    ]


def tasks_table(records) -> list[dict]:
    """Rows {device, date, commit, file, task, selective, length, accuracy, chance} of every
    task evaluation row."""
    return [
        {
            "device": r.device,
            "date": r.date,
            "commit": r.commit,
            "file": pathlib.Path(r.path).name,
            "task": row["task"],
            "selective": row.get("selective"),
            "length": row["length"],
            "accuracy": row["accuracy"],
            "chance": row.get("chance"),
        }
        for r in records
        if r.benchmark == "tasks"
        for row in r.rows
        if _is_number(row.get("accuracy"))
    ]


# What writes each kind of record into benchmarks/results/ (run from the repository root).
PRODUCERS = {
    "scan": "python benchmarks/scan.py --rivals .anchors",
    "train_throughput": "python benchmarks/train_throughput.py",
    "decode": "python benchmarks/decode.py",
}


def missing(records) -> list[str]:
    """One sentence per plotted kind that no record of ours measured, naming the command that
    writes it; [] when every kind is present. The rivals' records do not count."""
    have = {r.benchmark for r in records if any(row.get("impl") == "ours" for row in r.rows)}
    return [
        f"No {kind} results of ours under benchmarks/results/: on a GPU, run "
        f"`{PRODUCERS[kind]}` and re-execute this notebook."
        for kind in KINDS
        if kind not in have
    ]


def errors(records) -> list[dict]:
    """Rows {benchmark, device, date, file, what, error} for every row that records why a point
    was not measured (out of memory, a spent time budget, an unsupported size)."""
    out = []
    for r in records:
        for row in r.rows:
            if row.get("error"):
                what = " ".join(f"{k}={row[k]}" for k in ROW_KEYS[r.benchmark])
                out.append(
                    {
                        "benchmark": r.benchmark,
                        "device": r.device,
                        "date": r.date,
                        "file": pathlib.Path(r.path).name,
                        "what": what,
                        "error": str(row["error"]),
                    }
                )
    return out


def provenance(table) -> str:
    """'device, date' (several joined by '; ') of the rows of a table, for plot titles."""
    seen = dict.fromkeys(f"{r['device']}, {r['date']}" for r in table)
    return "; ".join(seen) or "no results"


# ----------------------------------------------------------------------------------------------
# Plots. Each takes a table and a matplotlib Axes, draws the rivals dashed, and titles the plot
# with the devices and dates of what it shows. Results from several devices never share a line.


def _name(row):
    """Legend name: ours by scan implementation where the row names one, rivals by name."""
    if row["impl"] == "ours":
        return row.get("scan_impl") or "mamba-jax"
    return row["impl"]


# One colour per implementation in every plot, whatever else a plot draws.
_COLORS = {
    "pallas": "C0",
    "mamba-jax": "C0",
    "mamba_ssm": "C1",
    "jla": "C2",
    "associative": "C3",
    "transformer": "C4",
    "reference": "C5",
}


def _color(label):
    """The colour of the implementation a legend label starts with (None: matplotlib's next)."""
    return next((c for name, c in _COLORS.items() if label.startswith(name)), None)


def _run(row):
    """(device, date, commit, file) of the run a table row comes from."""
    return row["device"], row["date"], (row["commit"] or "no commit")[:7], row["file"]


# Which parts of _run name a series when one name spans several runs: the first that tells the
# runs apart (a device, else a date, else a commit, else two or three of them, else the file).
_SUFFIXES = ((0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2), (3,))


def _labeller(rows, name_of):
    """A function row -> legend label: `name_of(row)` alone when every name comes from one run,
    else every label gets the parts of its run that tell the runs apart ("pallas (NVIDIA H200)",
    "jla (2026-12-01)"), so numbers from two runs never share a line or a bar."""
    runs = collections.defaultdict(set)
    for r in rows:
        runs[name_of(r)].add(_run(r))
    if all(len(v) <= 1 for v in runs.values()):
        return name_of
    parts = next(
        (
            p
            for p in _SUFFIXES
            if all(len({tuple(k[i] for i in p) for k in v}) == len(v) for v in runs.values())
        ),
        _SUFFIXES[-1],
    )
    return lambda r: f"{name_of(r)} ({', '.join(_run(r)[i] for i in parts)})"


def _axes(ax):
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(6, 3.6))
    return ax


def plot_scan(table, pass_="fwd", ax=None, d_state=16):
    """Scan ms against L, one line per (implementation, device), for one pass ("fwd" or
    "fwd+bwd") at one d_state. Where several variants of one implementation ran at a size, the
    fastest is drawn; each point is labelled with its shape."""
    ax = _axes(ax)
    rows = [r for r in table if r["pass"] == pass_ and r["d_state"] == d_state]
    label = _labeller(rows, _name)
    best = {}
    for r in rows:
        key = (label(r), r["impl"], r["length"], r["batch"], r["d_inner"])
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    for name, impl in dict.fromkeys(key[:2] for key in best):
        pts = sorted(
            (r["length"], r["ms"], r["shape"]) for key, r in best.items() if key[:2] == (name, impl)
        )
        style = "--" if impl in RIVALS else "-"
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, style, marker="o", label=name, color=_color(name))
        for length, ms, shape in pts:
            ax.annotate(shape, (length, ms), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xscale="log", yscale="log", xlabel="L (tokens)", ylabel="ms (median)")
    ax.set_title(f"selective scan, {pass_}, d_state {d_state}\n{provenance(rows)}", fontsize=9)
    if best:
        ax.legend(fontsize=8)
    return ax


def _fastest(pairs):
    """{(group, series): the highest rate} of ((group, series), rate) pairs: where several
    variants of one implementation ran in one run (remat or not, say), a bar shows the fastest."""
    out = {}
    for key, value in pairs:
        out[key] = max(value, out.get(key, value))
    return out


def _bars(ax, groups, series, values, title, ylabel):
    """Grouped bars: values[(group, series)] -> height."""
    width = 0.8 / max(1, len(series))
    for j, name in enumerate(series):
        xs = [i + j * width for i in range(len(groups))]
        heights = [values.get((g, name), float("nan")) for g in groups]
        ax.bar(xs, heights, width, label=name, color=_color(name))
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(groups))], groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if series:
        ax.legend(fontsize=8)
    return ax


def plot_train(table, ax=None):
    """Training tokens/s per model: one bar per (implementation, GPU count, run); the fastest
    where an implementation ran in several variants."""
    ax = _axes(ax)
    label = _labeller(table, lambda r: f"{_name(r)}, {r['gpus']} GPU")
    values = _fastest(((r["model"], label(r)), r["tokens_per_s"]) for r in table)
    groups = list(dict.fromkeys(g for g, _ in values))
    series = list(dict.fromkeys(s for _, s in values))
    return _bars(ax, groups, series, values, f"training tokens/s\n{provenance(table)}", "tokens/s")


def plot_decode(table, metric="e2e", ax=None):
    """New tokens/s per (model, batch) for one metric: Mamba, our same-size Transformer and
    (where measured in that metric) the rivals."""
    ax = _axes(ax)
    table = [r for r in table if r["metric"] == metric]

    def name(r):
        if r["impl"] == "ours":
            return "mamba-jax" if r["arch"] == "mamba" else f"{r['arch']} (ours)"
        return r["impl"]

    label = _labeller(table, name)
    values = _fastest(((f"{r['model']} b{r['batch']}", label(r)), r["tokens_per_s"]) for r in table)
    groups = list(dict.fromkeys(g for g, _ in values))
    series = list(dict.fromkeys(s for _, s in values))
    ax.set_yscale("log")
    title = f"decode new tokens/s ({metric})\n{provenance(table)}"
    return _bars(ax, groups, series, values, title, "new tokens/s")
