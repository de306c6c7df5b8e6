"""Training throughput: tokens/s, MFU (6N rule), step ms and peak memory of the full jitted train
step (forward, backward, AdamW) on random tokens, beside the rivals' trainers in the same run.

    python benchmarks/train_throughput.py                        # 130m b16 and 1.4b b8 at L 2048
    python benchmarks/train_throughput.py --rivals .anchors      # + mamba_ssm and jla, same run
    python benchmarks/train_throughput.py --models 130m --batch 16 --remat 130m --profile
    python benchmarks/train_throughput.py --models 1.4b --batch 8 --keep-scan 1.4b \
        --keep-scan-layers 20 --also-layers 1.4b    # the scan kept in 20 layers; scanned too
    python benchmarks/train_throughput.py --tiny                 # CPU check of the script, seconds

The models are the presets configs/mamba_130m.yaml and configs/mamba_1.4b.yaml (bf16 compute,
fp32 params; remat as `--remat` says, default both; layers unrolled or scanned as the preset
says, or as `--layers` forces), trained with one micro-batch per step. Each
of our rows runs in a subprocess of its own, so its peak memory is its own. `--reference` adds a
row trained with the plain loss (whole float32 logits and optax's cross-entropy) from the same
initial state on the same batches: its losses must match ours step by step (`max_loss_diff`).
`--profile` traces a few steps of each model's first row and prints its top device ops
(benchmarks/profile_summary.py).

Rivals (`--rivals PATH` or $MAMBA_JAX_RIVALS, the folder with their packages and unpack.sh):
mamba_ssm's official PyTorch model (its runner mamba_ssm_e2e.py: AdamW fused, bf16 autocast) and
jla's own trainer (`jla train` on the folder's jla_130m.toml / jla_1p4b.toml, tokens/s read from
its metrics.jsonl, the first logging window, which holds the compilation, left out).

Writes one record (benchmarks/record.py) to --out (default
benchmarks/results/train_throughput_<date>_<device>.json), then prints a table and each rival's
tokens/s over ours.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.record import Record, rivals_dir, run_rival, unpack_rivals  # noqa: E402

PRESETS = {"130m": "configs/mamba_130m.yaml", "1.4b": "configs/mamba_1.4b.yaml"}
JLA_CONFIGS = {"130m": "jla_130m.toml", "1.4b": "jla_1p4b.toml"}
ROW_PREFIX = "ROW "


# ------------------------------------------------------------------------------------------------
# One of our rows, in its own process.


def _model_config(name, args, remat, keep_scan=False, scan_layers=None, keep_layers=None):
    from mamba_jax.config import MambaConfig
    from mamba_jax.training.run_config import load_config

    if name == "tiny":  # a CPU-sized model for checking the script itself
        return MambaConfig(d_model=64, n_layer=2, vocab_size=257, dtype="bfloat16",
                           scan_impl=args.scan_impl, remat=remat, remat_keep_scan=keep_scan,
                           scan_layers=True if scan_layers is None else scan_layers,
                           remat_keep_scan_layers=keep_layers)  # fmt: skip
    config = load_config(str(REPO / PRESETS[name])).model
    if scan_layers is not None:  # else the preset's
        config = config.replace(scan_layers=scan_layers)
    if keep_layers is not None:  # else the preset's
        config = config.replace(remat_keep_scan_layers=keep_layers)
    return config.replace(scan_impl=args.scan_impl, remat=remat, remat_keep_scan=keep_scan,
                          dtype="bfloat16", param_dtype="float32")  # fmt: skip


def measure(spec: dict) -> dict:
    """spec: {model, batch, length, steps, warmup, remat, keep_scan (MambaConfig.remat_keep_scan),
    scan_layers and keep_layers (MambaConfig.scan_layers and remat_keep_scan_layers; None: the
    preset's), loss ("chunked" | "plain"), scan_impl, profile}. Returns the row."""
    import jax
    import numpy as np

    from mamba_jax import sharding as shd
    from mamba_jax.config import MeshConfig
    from mamba_jax.model import count_params
    from mamba_jax.training import trainer
    from mamba_jax.training.metrics import mfu
    from mamba_jax.training.run_config import TrainConfig

    args = argparse.Namespace(**spec)
    keep_scan = bool(getattr(args, "keep_scan", False)) and args.remat
    model_config = _model_config(
        args.model,
        args,
        args.remat,
        keep_scan,
        getattr(args, "scan_layers", None),
        getattr(args, "keep_layers", None),
    )
    mesh = shd.make_mesh(MeshConfig(-1, 1, 1))
    batch, length = args.batch, args.length
    tiny = args.model == "tiny"
    train_config = TrainConfig(steps=1000, batch_size=batch, seq_len=length,
                               warmup_steps=1 if tiny else 10, lr=1e-2 if tiny else 1e-3)  # fmt: skip
    tx = trainer.make_optimizer(train_config)
    graphdef, state, shardings = trainer.init_state(model_config, tx, mesh, seed=0)
    n_params = count_params(state["params"])
    loss = trainer.reference_loss_terms if args.loss == "plain" else trainer.loss_terms
    step = trainer.make_train_step(graphdef, tx, train_config, shardings, mesh, loss=loss)
    # Two batches of random tokens, alternated (the time does not depend on the data); the loss
    # of batch 0 must fall once the model has trained on it.
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(2):
        tokens = rng.integers(0, model_config.vocab_size, (batch, length + 1)).astype(np.int32)
        local = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
        batches.append(trainer.global_batch(local, mesh))
    losses = []
    t0 = time.perf_counter()
    state, metrics = step(state, batches[0])
    losses.append(float(metrics["loss"]))
    compile_s = time.perf_counter() - t0
    for i in range(args.warmup):
        state, metrics = step(state, batches[(i + 1) % 2])
        losses.append(float(metrics["loss"]))
    times = []
    n = args.steps + (args.warmup + args.steps) % 2  # end on batch 0 again
    for i in range(n):
        t = time.perf_counter()
        state, metrics = step(state, batches[(args.warmup + 1 + i) % 2])
        losses.append(float(metrics["loss"]))  # waits for the step
        times.append(time.perf_counter() - t)
    if not all(np.isfinite(losses)) or not losses[-1] < losses[0]:
        raise RuntimeError(f"the loss did not fall: {losses}")
    median = statistics.median(times)
    tokens_per_s = batch * length / median
    row = {
        "model": args.model, "gpus": 1, "batch": batch, "length": length, "impl": "ours",
        "variant": ("remat" if args.remat else "no remat") + (", keep scan" if keep_scan else "")
                   + (f" in {k} layers" if keep_scan and (k := model_config.remat_keep_scan_layers)
                      is not None else "")
                   + ("" if model_config.scan_layers else ", unrolled layers")
                   + ("" if args.loss == "chunked" else ", plain loss"),
        "params": n_params, "scan_impl": _resolved_impl(model_config, batch, length),
        "remat": args.remat, "remat_keep_scan": keep_scan, "loss": args.loss,
        "scan_layers": model_config.scan_layers,
        "remat_keep_scan_layers": model_config.remat_keep_scan_layers,
        "step_ms": median * 1e3, "step_ms_min": min(times) * 1e3,
        "tokens_per_s": tokens_per_s, "mfu": mfu(n_params, tokens_per_s, 1),
        "peak_gib": (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30,
        "compile_s": compile_s, "losses": losses,
    }  # fmt: skip
    if args.profile:
        row["profile"] = _profile(step, state, batches, steps=3)
    return row


def _resolved_impl(model_config, batch, length):
    import jax.numpy as jnp

    from mamba_jax.scan import resolve_impl

    c = model_config
    try:
        return resolve_impl(c.scan_impl, batch, length, c.d_inner, c.d_state, 1, jnp.bfloat16)
    except Exception as err:  # noqa: BLE001 - only a label
        return f"{c.scan_impl} ({type(err).__name__})"


def _profile(step, state, batches, steps):
    """Top device ops of `steps` traced steps, by HLO op, as printed by profile_summary.py."""
    import jax

    from benchmarks import profile_summary

    trace = tempfile.mkdtemp(prefix="train_trace_")
    with jax.profiler.trace(trace):
        for i in range(steps):
            state, metrics = step(state, batches[i % 2])
        jax.block_until_ready(metrics)
    tables = {}
    for by in ("hlo_op", "name"):
        rows, totals = profile_summary.summarize(
            profile_summary.device_ops(trace), by=by, top=40, steps=steps
        )
        tables[by] = profile_summary.format_table(rows, totals, steps=steps)
    shutil.rmtree(trace, ignore_errors=True)
    return tables


def run_ours(spec: dict, timeout: float) -> dict:
    point = {"model": spec["model"], "gpus": 1, "batch": spec["batch"], "length": spec["length"],
             "impl": "ours"}  # fmt: skip
    cmd = [sys.executable, __file__, "--row", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return point | {"error": f"ran past {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(ROW_PREFIX):
            return json.loads(line[len(ROW_PREFIX) :])
    return point | {"error": f"exited {proc.returncode}: {proc.stderr[-600:]}"}


# ------------------------------------------------------------------------------------------------
# The rivals.


def run_mamba_ssm(rivals, models, timeout) -> list[dict]:
    out = run_rival(rivals, "mamba_ssm_e2e.py", [f"train_{m}" for m in models], timeout=timeout)
    rows = []
    for m in models:
        point = {"model": m, "gpus": 1, "batch": 16 if m == "130m" else 8, "length": 2048,
                 "impl": "mamba_ssm"}  # fmt: skip
        got = out.get(f"train_{m}", out.get("error", "no result"))
        if not isinstance(got, dict):
            rows.append(point | {"error": str(got)[:500]})
            continue
        rows.append(point | {
            "params": int(got["params_M"] * 1e6), "step_ms": got["step_s"] * 1e3,
            "tokens_per_s": got["tokens_per_s"], "mfu": got["mfu_6N"], "peak_gib": got["peak_GiB"],
            "variant": "AdamW fused, bf16 autocast",
        })  # fmt: skip
    return rows


def run_jla(rivals, model, steps, timeout) -> dict:
    """jla's own trainer on the rivals' config for `model`; tokens/s is the median of its logging
    windows after the first (which holds the compilation)."""
    point = {"model": model, "gpus": 1, "batch": 16 if model == "130m" else 8, "length": 2048,
             "impl": "jla"}  # fmt: skip
    dest = unpack_rivals(rivals)
    with tempfile.TemporaryDirectory() as work:
        config = pathlib.Path(work) / JLA_CONFIGS[model]
        shutil.copy(rivals / JLA_CONFIGS[model], config)
        code = ("import sys; from jla.cli import main; sys.exit(main(['train', '--config', "
                f"{str(config)!r}, '--set', 'train.max_steps={steps}']))")  # fmt: skip
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(dest / "site"), str(REPO)]))
        try:
            proc = subprocess.run([sys.executable, "-c", code], cwd=work, env=env,
                                  capture_output=True, text=True, timeout=timeout)  # fmt: skip
        except subprocess.TimeoutExpired:
            return point | {"error": f"jla train ran past {timeout:.0f} s"}
        windows = []
        for path in pathlib.Path(work).rglob("metrics.jsonl"):
            for line in path.read_text().splitlines():
                record = json.loads(line)
                if record.get("event") == "train" and "tokens_per_sec" in record["metrics"]:
                    windows.append(record["metrics"])
        if proc.returncode != 0 or len(windows) < 2:
            return point | {"error": f"jla train exited {proc.returncode} with {len(windows)} "
                                     f"logging windows: {proc.stderr[-600:]}"}  # fmt: skip
    rates = [w["tokens_per_sec"] for w in windows[1:]]
    tokens_per_s = statistics.median(rates)
    tokens_per_step = point["batch"] * point["length"]
    return point | {
        "tokens_per_s": tokens_per_s, "step_ms": 1e3 * tokens_per_step / tokens_per_s,
        "mfu": statistics.median(w.get("mfu_percent", 0.0) for w in windows[1:]) / 100,
        "variant": "jla train (its preset's remat)", "windows": len(rates),
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------


def print_table(rows):
    print("\n| model | impl | variant | batch x L | tokens/s | MFU (6N) | step ms | peak GiB | "
          "compile s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        head = (
            f"| {r['model']} | {r['impl']} | {r.get('variant', '')} | {r['batch']} x {r['length']} "
        )
        if "error" in r:
            print(head + f"| error: {r['error'][:100]} | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") else "-"
        compile_s = f"{r['compile_s']:.0f}" if r.get("compile_s") is not None else "-"
        print(head + f"| {r['tokens_per_s']:,.0f} | {mfu} | {r['step_ms']:.1f} | {peak} "
                     f"| {compile_s} |")  # fmt: skip
    best = {}
    for r in rows:
        if r["impl"] == "ours" and "error" not in r and r.get("loss") == "chunked":
            if r["tokens_per_s"] > best.get(r["model"], {}).get("tokens_per_s", 0):
                best[r["model"]] = r
    lines = []
    for r in rows:
        if r["impl"] != "ours" and "error" not in r and r["model"] in best:
            ours = best[r["model"]]
            ratio = ours["tokens_per_s"] / r["tokens_per_s"]
            lines.append(f"{r['model']:6} ours ({ours['variant']}) / {r['impl']:9} = {ratio:.3f}")
    if lines:
        print("\nour tokens/s over the rival's (> 1: ours is faster)")
        print("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="130m,1.4b")
    parser.add_argument("--batch", default="16,8", help="batch per model")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--scan-impl", default="auto")
    # 130m too: on one H200 (2026-12-01) remat was faster there (148.0 vs 154.7 ms) in 10 GiB
    parser.add_argument("--remat", default="130m,1.4b", help="models trained with config.remat")
    parser.add_argument("--also-remat", default="", help="models also measured with remat flipped")
    parser.add_argument(
        "--keep-scan",
        default="130m,1.4b",  # as the presets
        help="models whose remat also keeps the scan (config.remat_keep_scan)",
    )
    parser.add_argument("--also-keep-scan", default="",
                        help="models also measured with --keep-scan flipped")  # fmt: skip
    parser.add_argument(
        "--layers",
        choices=("preset", "scan", "unrolled"),
        default="preset",
        help="config.scan_layers of every row: the preset's, True or False",
    )
    parser.add_argument(
        "--keep-scan-layers",
        type=int,
        default=None,
        help="config.remat_keep_scan_layers of every row (default: the preset's)",
    )
    parser.add_argument("--also-layers", default="",
                        help="models also measured with scan_layers flipped")  # fmt: skip
    parser.add_argument("--reference", default="", help="models also trained with the plain loss")
    parser.add_argument("--profile", action="store_true", help="trace the first row's steps")
    parser.add_argument("--rivals", default=None, help="the rivals' folder ($MAMBA_JAX_RIVALS)")
    parser.add_argument("--rival-impls", default="mamba_ssm,jla",
                        help="which rivals to run, of mamba_ssm and jla")  # fmt: skip
    parser.add_argument("--only-rivals", action="store_true", help="run the rivals' rows only")
    parser.add_argument("--jla-steps", type=int, default=15)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per subprocess")
    parser.add_argument("--out", default=None)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model, batch 2 x 64 (CPU)")
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: one row
    args = parser.parse_args(argv)
    if args.row is not None:
        print(ROW_PREFIX + json.dumps(measure(json.loads(args.row))), flush=True)
        return
    if args.tiny:
        args.models, args.batch, args.seq_len, args.steps, args.warmup = "tiny", "2", 64, 2, 1
        args.scan_impl = "reference" if args.scan_impl == "auto" else args.scan_impl
    models = args.models.split(",")
    batches = [int(b) for b in args.batch.split(",")]
    if len(batches) != len(models):
        raise ValueError(f"--batch needs one size per model in --models={args.models!r}")
    rivals = rivals_dir(args.rivals)
    rival_impls = set(args.rival_impls.split(",")) - {""}
    if not rival_impls <= {"mamba_ssm", "jla"}:
        raise ValueError(f"--rival-impls takes mamba_ssm and jla, got {args.rival_impls!r}")

    import jax

    device = jax.devices()[0].device_kind.replace(" ", "_")
    date = datetime.date.today().isoformat()
    out = args.out or REPO / "benchmarks" / "results" / f"train_throughput_{date}_{device}.json"
    record = Record("train_throughput", out, config={k: v for k, v in vars(args).items()
                                                     if k != "row"})  # fmt: skip
    specs = []
    for model, batch in zip(models, batches, strict=True):
        remat = model in args.remat.split(",")
        keep = model in args.keep_scan.split(",")
        layers = {"preset": None, "scan": True, "unrolled": False}[args.layers]
        base = dict(model=model, batch=batch, length=args.seq_len, steps=args.steps,
                    warmup=args.warmup, scan_impl=args.scan_impl, keep_scan=keep,
                    scan_layers=layers, keep_layers=args.keep_scan_layers)  # fmt: skip
        specs.append(base | dict(remat=remat, loss="chunked", profile=args.profile))
        if model in args.also_remat.split(","):
            specs.append(base | dict(remat=not remat, loss="chunked", profile=False))
        if model in args.also_keep_scan.split(","):
            specs.append(base | dict(remat=remat, keep_scan=not keep, loss="chunked",
                                     profile=False))  # fmt: skip
        if model in args.also_layers.split(","):
            flipped = not _model_config(model, args, remat, keep, layers).scan_layers
            # Scanned layers all run one policy: the scan kept in all of them or none.
            keep_layers = None if flipped else args.keep_scan_layers
            specs.append(base | dict(remat=remat, scan_layers=flipped, keep_layers=keep_layers,
                                     loss="chunked", profile=False))  # fmt: skip
        if model in args.reference.split(","):
            specs.append(base | dict(remat=remat, loss="plain", profile=False))
    # Ours first (one row per model), then the rivals, then the extra variants of ours.
    first = {s["model"]: s for s in reversed(specs)}
    order = [s for s in specs if first[s["model"]] is s]
    rows = []
    for spec in [] if args.only_rivals else order:
        rows.append(record.add(run_ours(spec, args.timeout)))
        _print_profile(rows[-1])
    if rivals is not None:
        known = [m for m in models if m in JLA_CONFIGS]
        for row in run_mamba_ssm(rivals, known, args.timeout) if "mamba_ssm" in rival_impls else []:
            rows.append(record.add(row))
        for model in known if "jla" in rival_impls else []:
            rows.append(record.add(run_jla(rivals, model, args.jla_steps, args.timeout)))
    for spec in [] if args.only_rivals else specs:
        if spec not in order:
            rows.append(record.add(run_ours(spec, args.timeout)))
    _compare_losses(rows, record)
    print_table(rows)
    print(f"\nrecord: {out}")


def _print_profile(row):
    for by, table in (row.get("profile") or {}).items():
        print(f"\ntop device ops by {by} ({row['model']}, {row.get('variant')}):\n{table}")


def _compare_losses(rows, record):
    """Our chunked-loss rows against the plain-loss row of the same model: the same initial state
    and batches (remat changes no arithmetic), so the losses agree step by step up to bf16
    rounding. Writes `max_loss_diff` into the record's rows."""
    for ref in rows:
        if ref["impl"] != "ours" or ref.get("loss") != "plain" or "losses" not in ref:
            continue
        for i, r in enumerate(rows):
            if r is ref or r["impl"] != "ours" or r["model"] != ref["model"] or "losses" not in r:
                continue
            diff = max(abs(a - b) for a, b in zip(r["losses"], ref["losses"], strict=True))
            r["max_loss_diff"] = record.data["rows"][i]["max_loss_diff"] = diff
            print(f"{r['model']} {r['variant']}: max |loss - plain loss| over "
                  f"{len(r['losses'])} steps = {diff:.4f}")  # fmt: skip
    record.write()


if __name__ == "__main__":
    main()
