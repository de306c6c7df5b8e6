"""The top device ops of a jax.profiler trace, by total time.

    python benchmarks/profile_summary.py /tmp/trace                  # the newest run under it
    python benchmarks/profile_summary.py /tmp/trace --steps 10 --top 40 --by hlo_op
    python benchmarks/profile_summary.py /tmp/trace/plugins/profile/RUN/HOST.xplane.pb

Capture the trace around a few warmed-up steps (compilation outside it):

    with jax.profiler.trace("/tmp/trace"):
        for _ in range(10):
            state, metrics = train_step(state, batch)
        jax.block_until_ready(metrics)

`jax.profiler.trace` writes plugins/profile/<run>/<host>.xplane.pb (and <host>.trace.json.gz);
either is read, the .xplane.pb first. Device ops are the events of the device planes
(/device:GPU:0, /device:TPU:0, ...): the plane's "XLA Ops" line where it has one (TPU), else its
"Stream #..." lines (GPU kernels and copies). A CPU trace has no device plane; there the ops are the
host events that XLA's CPU runtime tags with an `hlo_op`.

Columns: the op (`--by name`, the event name, i.e. the kernel on GPU; or `--by hlo_op`, the HLO
instruction that launched it), count, total ms, % of all device op time in the trace (% of a step
when the trace holds whole steps), and ms per step with `--steps`. The header gives the device time,
the wall span it covers and how busy the devices were.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import json
import pathlib
import warnings


@dataclasses.dataclass(frozen=True)
class OpEvent:
    plane: str
    name: str
    hlo_op: str | None
    start_ns: float
    duration_ns: float


def find_trace_files(path) -> list[pathlib.Path]:
    """The trace files to read: `path` itself if it is one, else the newest run folder under it
    (its .xplane.pb files, or its .trace.json.gz files when it has none)."""
    path = pathlib.Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ValueError(f"trace path {str(path)!r} must be a jax.profiler.trace directory or file")
    for pattern in ("*.xplane.pb", "*.trace.json.gz"):
        files = sorted(path.rglob(pattern))
        if files:
            newest = max(f.parent for f in files)  # run folders are named by their start time
            return [f for f in files if f.parent == newest]
    raise ValueError(f"no .xplane.pb or .trace.json.gz under {str(path)!r}")


def _op_lines(line_names):
    """Which lines of a device plane hold its ops (see the module docstring)."""
    if "XLA Ops" in line_names:
        return {"XLA Ops"}
    streams = {n for n in line_names if n.startswith("Stream")}
    return streams or set(line_names)


def _select(planes):
    """planes: [(plane name, {line name: [(name, start_ns, duration_ns, stats dict)]})]."""
    device = [(p, lines) for p, lines in planes if p.startswith("/device:")]
    out = []
    if device:
        for plane, lines in device:
            for line in _op_lines(list(lines)):
                out += [OpEvent(plane, n, s.get("hlo_op"), t, d) for n, t, d, s in lines[line]]
        return out
    for plane, lines in planes:  # a CPU trace: XLA's thunks carry an hlo_op stat
        for events in lines.values():
            out += [
                OpEvent(plane, n, s["hlo_op"], t, d) for n, t, d, s in events if s.get("hlo_op")
            ]
    return out


def _read_xplane(path):
    from jax.profiler import ProfileData

    planes = []
    with warnings.catch_warnings():  # jaxlib's stats type warns that it has no __module__
        warnings.simplefilter("ignore", DeprecationWarning)
        for plane in ProfileData.from_file(str(path)).planes:
            lines = collections.defaultdict(list)
            for line in plane.lines:
                for e in line.events:
                    stats = {k: str(v) for k, v in e.stats}
                    lines[line.name].append((e.name, e.start_ns, e.duration_ns, stats))
            planes.append((plane.name, lines))
    return planes


def _read_trace_json(path):
    with gzip.open(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    process, thread = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            process[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            thread[e["pid"], e.get("tid")] = e["args"]["name"]
    planes = collections.defaultdict(lambda: collections.defaultdict(list))
    for e in events:
        if e.get("ph") == "X":
            line = thread.get((e["pid"], e.get("tid")), str(e.get("tid")))
            args = {k: str(v) for k, v in (e.get("args") or {}).items()}
            planes[process.get(e["pid"], str(e["pid"]))][line].append(
                (e["name"], e["ts"] * 1e3, e.get("dur", 0.0) * 1e3, args)
            )
    return list(planes.items())


def device_ops(path) -> list[OpEvent]:
    """Every device op event of the trace at `path` (a directory or one file)."""
    events = []
    for f in find_trace_files(path):
        planes = _read_xplane(f) if f.name.endswith(".xplane.pb") else _read_trace_json(f)
        events += _select(planes)
    return events


def summarize(events, by="name", top=20, steps=None) -> tuple[list[dict], dict]:
    """(rows {name, count, total_ms, percent, per_step_ms} of the `top` ops by total time,
    totals {device_ms, span_ms, devices, events})."""
    if by not in ("name", "hlo_op"):
        raise ValueError(f"by must be 'name' or 'hlo_op', got {by!r}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    total = collections.Counter()
    count = collections.Counter()
    for e in events:
        key = (e.hlo_op or e.name) if by == "hlo_op" else e.name
        total[key] += e.duration_ns
        count[key] += 1
    device_ns = sum(total.values())
    rows = [
        {
            "name": name,
            "count": count[name],
            "total_ms": ns / 1e6,
            "percent": 100.0 * ns / device_ns if device_ns else 0.0,
            "per_step_ms": ns / 1e6 / steps if steps else None,
        }
        for name, ns in total.most_common(top)
    ]
    span_ns = (
        max(e.start_ns + e.duration_ns for e in events) - min(e.start_ns for e in events)
        if events
        else 0.0
    )
    totals = {
        "device_ms": device_ns / 1e6,
        "span_ms": span_ns / 1e6,
        "devices": len({e.plane for e in events}),
        "events": len(events),
    }
    return rows, totals


def format_table(rows, totals, steps=None, width=60) -> str:
    busy = 100 * totals["device_ms"] / (totals["span_ms"] * max(totals["devices"], 1) or 1)
    lines = [
        f"{totals['events']} device op events on {totals['devices']} device(s): "
        f"{totals['device_ms']:.3f} ms of op time over a {totals['span_ms']:.3f} ms span "
        f"(busy {busy:.0f}%)" + (f", {steps} steps" if steps else ""),
        f"{'op':{width}} {'count':>7} {'total ms':>10} {'%':>6}" + ("  ms/step" if steps else ""),
    ]
    for r in rows:
        name = r["name"] if len(r["name"]) <= width else r["name"][: width - 3] + "..."
        line = f"{name:{width}} {r['count']:7d} {r['total_ms']:10.3f} {r['percent']:6.1f}"
        lines.append(line + (f" {r['per_step_ms']:8.3f}" if steps else ""))
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", help="jax.profiler.trace's directory, or one trace file")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--by", default="name", choices=("name", "hlo_op"))
    parser.add_argument("--steps", type=int, default=None, help="steps the trace holds")
    args = parser.parse_args(argv)
    events = device_ops(args.trace)
    if not events:
        raise SystemExit(f"no device op events in {args.trace}")
    rows, totals = summarize(events, by=args.by, top=args.top, steps=args.steps)
    table = format_table(rows, totals, steps=args.steps)
    print(table)
    return table


if __name__ == "__main__":
    main()
