"""Reading the JSON that `benchmarks/` writes, as flat tables, and plotting them.

Each benchmark writes one JSON object per run under `benchmarks/results/`. The loader reads:

    {"benchmark": "scan" | "train_throughput" | "decode",   (else taken from the file name)
     "device": "NVIDIA H100 80GB HBM3", "date": "2026-11-23", "jax_version": "...",
     "git_commit": "...",
     "results": [ {one flat (or nested) dict per measured point}, ... ]}

The list may also sit under "rows", "records" or "measurements", or be the whole file. Column
names vary between writers, so each table looks a field up under a few common spellings
(`length`, `L` or `seq_len`; `ms`, `median_ms` or `time_ms`, ...). A scan row either names its
pass (`pass`: "fwd" / "fwd+bwd") beside one time, or holds both times (`fwd_ms`, `fwd_bwd_ms`).

The mamba_ssm anchors are the numbers in BENCHMARKS.md (one H100 80GB HBM3, 2026-11-22): the
official CUDA scan, the official PyTorch trainer, and `generate(cg=True)`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

KINDS = ("scan", "train_throughput", "decode")


def git_commit(cwd: str | None = None) -> str | None:
    """The commit a benchmark ran at: $MAMBA_JAX_COMMIT if set (for copies without .git), else
    `git rev-parse --verify HEAD` in `cwd`; None when neither gives one."""
    import os
    import subprocess

    if os.environ.get("MAMBA_JAX_COMMIT"):
        return os.environ["MAMBA_JAX_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=cwd,
                             capture_output=True, text=True)  # fmt: skip
    except OSError:
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


ANCHOR_DEVICE = "NVIDIA H100 80GB HBM3"
ANCHOR_DATE = "2026-11-22"

# BENCHMARKS.md: (b, d, L) of the four scan shapes, and mamba_ssm CUDA ms (fwd, fwd+bwd).
SCAN_SHAPES = {
    "S1": (8, 1536, 2048),
    "S2": (4, 4096, 2048),
    "S3": (2, 2048, 16384),
    "S4": (1, 1536, 131072),
}
MAMBA_SSM_SCAN_MS = {
    "S1": (0.451, 2.29),
    "S2": (0.596, 3.02),
    "S3": (1.42, 6.42),
    "S4": (4.55, 20.25),
}
# BENCHMARKS.md: training tokens/s (batch x 2048) and decode new tokens/s (prompt 2048, 128 new).
MAMBA_SSM_TRAIN_TOKENS_PER_S = {"130m": 162_432, "1.4b": 29_442}
MAMBA_SSM_DECODE_TOKENS_PER_S = {("130m", 1): 1_093, ("130m", 64): 32_606,
                                 ("1.4b", 1): 359, ("1.4b", 64): 5_706}  # fmt: skip

_ROW_LISTS = ("results", "rows", "records", "measurements")
_META = {
    "device": ("device", "device_name", "device_kind", "gpu"),
    "date": ("date", "timestamp", "datetime"),
    "jax_version": ("jax_version", "jax"),
    "git_commit": ("git_commit", "commit", "git"),
}
_FIELDS = {
    "impl": ("impl", "implementation", "backend", "kernel", "name"),
    "pass": ("pass", "mode", "direction", "which"),
    "shape": ("shape", "shape_name", "label"),
    "b": ("b", "batch", "batch_size"),
    "d": ("d", "d_inner", "dim", "channels"),
    "length": ("length", "L", "l", "seq_len", "seqlen", "prompt_len"),
    "ms": ("ms", "median_ms", "time_ms", "ms_median"),
    "model": ("model", "config", "preset", "size"),
    "gpus": ("gpus", "n_gpus", "num_devices", "devices", "n_devices"),
    "tokens_per_s": ("tokens_per_s", "tokens_per_sec", "tok_per_s", "throughput", "tokens/s"),
    "mfu": ("mfu", "MFU"),
    "arch": ("arch", "architecture", "model_type", "family"),
}


@dataclasses.dataclass(frozen=True)
class BenchResult:
    """One benchmark JSON file: its kind, run metadata, and flat rows."""

    kind: str
    path: str
    meta: dict
    rows: list


def _flatten(d, prefix=""):
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _lookup(row, field, default=None):
    """The first present spelling of `field` in `row`, also as the last part of a nested key."""
    names = _FIELDS.get(field) or _META.get(field) or (field,)
    for name in names:
        if row.get(name) is not None:
            return row[name]
    for name in names:
        for key, value in row.items():
            if key.endswith(f".{name}") and value is not None:
                return value
    return default


def _kind_of(data, path):
    kind = (data.get("benchmark") or data.get("kind")) if isinstance(data, dict) else None
    stem = pathlib.Path(path).stem.lower()
    for k in KINDS:
        if (isinstance(kind, str) and kind.lower().startswith(k.split("_")[0])) or (
            kind is None and stem.startswith(k.split("_")[0])
        ):
            return k
    return None


def load_result(path) -> BenchResult | None:
    """Reads one JSON file. Returns None when it is not a scan/train/decode benchmark."""
    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"path {str(path)!r} must hold benchmark JSON: {err}") from err
    kind = _kind_of(data, path)
    if kind is None:
        return None
    if isinstance(data, list):
        meta, rows = {}, data
    else:
        rows = next((data[k] for k in _ROW_LISTS if isinstance(data.get(k), list)), None)
        if rows is None:
            raise ValueError(
                f"path {str(path)!r} must hold a list of rows under one of {_ROW_LISTS}, "
                f"got keys {sorted(data)}"
            )
        meta = {k: v for k, v in data.items() if k not in _ROW_LISTS}
    meta = _flatten(meta)
    norm = {field: _lookup(meta, field) for field in _META}
    if isinstance(norm["date"], str):
        norm["date"] = norm["date"][:10]  # an ISO timestamp's day
    rows = [_flatten(r) for r in rows if isinstance(r, dict)]
    return BenchResult(kind, str(path), {**meta, **norm}, rows)


def load_results(directory="benchmarks/results") -> list[BenchResult]:
    """Every benchmark JSON under `directory` (recursively), sorted by path. [] if none."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    found = (load_result(p) for p in sorted(directory.rglob("*.json")))
    return [r for r in found if r is not None]


def _with_meta(result, row):
    return {"device": result.meta["device"], "date": result.meta["date"],
            "file": pathlib.Path(result.path).name, **row}  # fmt: skip


def _shape_fields(row):
    shape = _lookup(row, "shape")
    b, d, length = (_lookup(row, f) for f in ("b", "d", "length"))
    if isinstance(shape, str) and shape in SCAN_SHAPES and None in (b, d, length):
        b, d, length = SCAN_SHAPES[shape]
    if shape is None or not isinstance(shape, str):
        match = [k for k, v in SCAN_SHAPES.items() if v == (b, d, length)]
        shape = match[0] if match else None
    return shape, b, d, length


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _scan_passes(row):
    """(pass, ms) pairs of one scan row, long (`ms` + `pass`) or wide (`fwd_ms`, `fwd_bwd_ms`)."""
    ms = _lookup(row, "ms")
    if _is_number(ms):
        pass_ = str(_lookup(row, "pass", "fwd")).lower()
        return [("fwd+bwd" if "bwd" in pass_ or "grad" in pass_ else "fwd", float(ms))]
    out = []
    for key, value in row.items():
        k = key.lower()
        if not _is_number(value) or not k.endswith("_ms"):
            continue  # a None time marks a size that was not run
        if "bwd" in k or "backward" in k or "grad" in k:
            out.append(("fwd+bwd", float(value)))
        elif "fwd" in k or "forward" in k:
            out.append(("fwd", float(value)))
    return out


def _variant(row):
    """Pallas block sizes as 'tile=32 sub=8' when the row records them, else ''."""
    prefix = "block_sizes."
    return " ".join(
        f"{k[len(prefix) :]}={v}" for k, v in row.items() if k.startswith(prefix) and v is not None
    )


def scan_table(results) -> list[dict]:
    """Rows {device, date, file, impl, variant, pass, shape, b, d, length, n, ms} of every scan
    result; one row per pass, and none for sizes that were not run."""
    table = []
    for result in results:
        if result.kind != "scan":
            continue
        for row in result.rows:
            shape, b, d, length = _shape_fields(row)
            for pass_, ms in _scan_passes(row):
                table.append(_with_meta(result, {
                    "impl": str(_lookup(row, "impl", "?")), "variant": _variant(row),
                    "pass": pass_, "shape": shape, "b": b, "d": d, "length": length,
                    "n": row.get("n", row.get("d_state", 16)), "ms": ms,
                }))  # fmt: skip
    return table


def mamba_ssm_scan_table() -> list[dict]:
    """BENCHMARKS.md's mamba_ssm CUDA scan times, in scan_table's columns."""
    return [
        {"device": ANCHOR_DEVICE, "date": ANCHOR_DATE, "file": "BENCHMARKS.md",
         "impl": "mamba_ssm", "variant": "", "pass": pass_, "shape": s, "b": b, "d": d,
         "length": length, "n": 16, "ms": MAMBA_SSM_SCAN_MS[s][i]}
        for s, (b, d, length) in SCAN_SHAPES.items()
        for i, pass_ in enumerate(("fwd", "fwd+bwd"))
    ]  # fmt: skip


def _gpu_count(result, row):
    """GPUs of one training row: the row's own count, else the file's `num_devices`, else the
    product of the row's mesh axes (`mesh.data`, `mesh.fsdp`, ...), else 1."""
    gpus = _lookup(row, "gpus")
    if _is_number(gpus):
        return int(gpus)
    gpus = result.meta.get("num_devices")
    if _is_number(gpus):
        return int(gpus)
    axes = [v for k, v in row.items() if k.startswith("mesh.") and _is_number(v)]
    return int(math.prod(axes)) if axes else 1


def train_table(results) -> list[dict]:
    """Rows {device, date, file, model, gpus, batch, seq_len, scan_impl, tokens_per_s, mfu} of
    every training result that measured a throughput (rows that record an error are left out:
    see `errors`)."""
    return [
        _with_meta(r, {"model": str(_lookup(row, "model", "?")), "gpus": _gpu_count(r, row),
                       "batch": _lookup(row, "b"), "seq_len": _lookup(row, "length"),
                       "scan_impl": row.get("scan_impl"),
                       "tokens_per_s": float(_lookup(row, "tokens_per_s")),
                       "mfu": _lookup(row, "mfu")})
        for r in results if r.kind == "train_throughput"
        for row in r.rows if _is_number(_lookup(row, "tokens_per_s"))
    ]  # fmt: skip


DECODE_METRICS = ("e2e", "decode", "generate")


def _decode_points(row):
    """(arch, metric, tokens/s) of one decode row: long (`arch`, `tokens_per_s`) or wide
    (`mamba_e2e_tok_s`, `transformer_decode_tok_s`, `mamba_generate_tok_s`, ...)."""
    tps = _lookup(row, "tokens_per_s")
    if _is_number(tps):
        metric = str(row.get("metric", "e2e"))
        return [(str(_lookup(row, "arch", "mamba")).lower(), metric, float(tps))]
    out = []
    for key, value in row.items():
        for metric in DECODE_METRICS:
            suffix = f"_{metric}_tok_s"
            if key.endswith(suffix) and _is_number(value):
                out.append((key[: -len(suffix)].lower(), metric, float(value)))
    return out


def decode_table(results) -> list[dict]:
    """Rows {device, date, file, model, arch, metric, batch, tokens_per_s} of every decode
    result. metric: "e2e" (new tokens over prefill + decode, the figure BENCHMARKS.md quotes),
    "decode" (the decode loop alone) or "generate" (mamba_jax.generate, one program)."""
    return [
        _with_meta(r, {"model": str(_lookup(row, "model", "?")), "arch": arch, "metric": metric,
                       "batch": _lookup(row, "b"), "tokens_per_s": tps})
        for r in results if r.kind == "decode"
        for row in r.rows
        for arch, metric, tps in _decode_points(row)
    ]  # fmt: skip


# What writes each kind of result into benchmarks/results/ (run from the repository root).
PRODUCERS = {
    "scan": "python benchmarks/scan.py",
    "train_throughput": "python benchmarks/train_throughput.py "
    "--out benchmarks/results/train_throughput_$(date +%Y-%m-%d).json",
    "decode": "python benchmarks/decode.py",
}


def missing(results) -> list[str]:
    """One sentence per benchmark kind that has no file among `results`, naming the command
    that writes it. [] when every kind is present."""
    have = {r.kind for r in results}
    return [
        f"No {kind} results under benchmarks/results/: on a GPU, run `{PRODUCERS[kind]}` "
        f"and re-execute this notebook."
        for kind in KINDS
        if kind not in have
    ]


def errors(results) -> list[dict]:
    """Rows {kind, device, date, file, what, error} for every row (or part of a row) that records
    a failure instead of a measurement: an `error` field (out of memory at one size, say) or a
    `*_error` field (a first try that fell back to another implementation), and every item a
    file lists under `skipped` (sizes a time-budgeted run never started)."""
    out = []
    for r in results:
        skipped = r.meta.get("skipped")
        for item in skipped if isinstance(skipped, list) else []:
            out.append(_with_meta(r, {"kind": r.kind, "what": str(item), "field": "skipped",
                                      "error": "not run: the run's time budget was spent"}))  # fmt: skip
        for row in r.rows:
            what = " ".join(f"{f}={_lookup(row, f)}" for f in ("model", "b", "shape", "impl")
                            if _lookup(row, f) is not None)  # fmt: skip
            for key, value in row.items():
                if (key == "error" or key.endswith("_error")) and value:
                    out.append(_with_meta(r, {"kind": r.kind, "what": what or "-",
                                              "field": key, "error": str(value)}))  # fmt: skip
    return out


def provenance(table) -> str:
    """'device, date' (several joined by '; ') of the rows of a table, for plot titles."""
    seen = dict.fromkeys(
        f"{r['device'] or 'unknown device'}, {r['date'] or 'undated'}" for r in table
    )
    return "; ".join(seen) or "no results"


# ----------------------------------------------------------------------------------------------
# Plots. Each takes a table (plus the mamba_ssm anchors) and a matplotlib Axes, and titles the
# plot with the device and date of what it shows.


ANCHOR_NOTE = f"mamba_ssm: {ANCHOR_DEVICE}, {ANCHOR_DATE} (BENCHMARKS.md)"


def _labeller(table):
    """A function (row, name) -> legend label: `name` alone when the measured rows come from one
    device, else `name (device)`, so results from different GPUs never share a line. The
    BENCHMARKS.md anchors keep their bare name."""
    devices = {r["device"] for r in table if r.get("file") != "BENCHMARKS.md"}
    if len(devices) <= 1:
        return lambda row, name: name
    return lambda row, name: (
        name if row.get("file") == "BENCHMARKS.md" else f"{name} ({row['device'] or 'unknown'})"
    )


def _axes(ax):
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(6, 3.6))
    return ax


def plot_scan(table, pass_="fwd", anchors=None, ax=None):
    """Scan ms against L, one line per implementation, for one pass ("fwd" or "fwd+bwd").

    Only d_state 16 (the BENCHMARKS.md shapes) is drawn; where several block-size variants of
    one implementation ran at a size, the fastest is drawn. Results from several devices get
    one line per (implementation, device)."""
    ax = _axes(ax)
    rows = [r for r in list(table) + list(anchors or [])
            if r["pass"] == pass_ and r["length"] and r.get("n", 16) == 16]  # fmt: skip
    label = _labeller(rows)
    best = {}
    for r in rows:
        key = (label(r, r["impl"]), r["length"], r["b"], r["d"])
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    for name in dict.fromkeys(key[0] for key in best):
        pts = sorted((r["length"], r["ms"], r["shape"] or "") for key, r in best.items()
                     if key[0] == name)  # fmt: skip
        style = "--" if name == "mamba_ssm" else "-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=name)
        for length, ms, shape in pts:
            if shape:
                ax.annotate(shape, (length, ms), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")  # fmt: skip
    ax.set(xscale="log", yscale="log", xlabel="L (tokens)", ylabel="ms (median)")
    measured = [r for r in rows if r.get("file") != "BENCHMARKS.md"]
    note = f"\n{ANCHOR_NOTE}" if len(measured) < len(rows) else ""
    ax.set_title(f"selective scan, {pass_}\n{provenance(measured)}{note}", fontsize=9)
    ax.legend(fontsize=8)
    return ax


def _bars(ax, groups, series, values, title, ylabel):
    """Grouped bars: values[(group, series)] -> height."""
    width = 0.8 / max(1, len(series))
    for j, name in enumerate(series):
        xs = [i + j * width for i in range(len(groups))]
        ax.bar(xs, [values.get((g, name), float("nan")) for g in groups], width, label=name)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(groups))], groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if series:
        ax.legend(fontsize=8)
    return ax


def plot_train(table, ax=None):
    """Training tokens/s per model: ours by GPU count, and mamba_ssm on one H100."""
    ax = _axes(ax)
    label = _labeller(table)
    values = {(r["model"], label(r, f"mamba-jax, {r['gpus']} GPU")): r["tokens_per_s"]
              for r in table}  # fmt: skip
    for model, tps in MAMBA_SSM_TRAIN_TOKENS_PER_S.items():
        values[(model, "mamba_ssm, 1 GPU")] = tps
    groups = list(dict.fromkeys(g for g, _ in values))
    series = list(dict.fromkeys(s for _, s in values))
    title = f"training tokens/s\n{provenance(table)}\n{ANCHOR_NOTE}"
    return _bars(ax, groups, series, values, title, "tokens/s")


def plot_decode(table, metric="e2e", ax=None):
    """New tokens/s per (model, batch) for one metric: Mamba, the Transformer baseline, and
    (for "e2e", the metric it was measured in) mamba_ssm."""
    ax = _axes(ax)
    table = [r for r in table if r["metric"] == metric]
    label = _labeller(table)
    values = {(f"{r['model']} b{r['batch']}", label(r, r["arch"])): r["tokens_per_s"]
              for r in table}  # fmt: skip
    if metric == "e2e":
        for (model, batch), tps in MAMBA_SSM_DECODE_TOKENS_PER_S.items():
            values[(f"{model} b{batch}", "mamba_ssm")] = tps
    groups = list(dict.fromkeys(g for g, _ in values))
    series = list(dict.fromkeys(s for _, s in values))
    ax.set_yscale("log")
    title = f"decode new tokens/s ({metric})\n{provenance(table)}"
    if metric == "e2e":
        title += f"\n{ANCHOR_NOTE}"
    return _bars(ax, groups, series, values, title, "new tokens/s")
