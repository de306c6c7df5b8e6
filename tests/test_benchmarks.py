"""benchmarks/: the one record format (write, read, reject), tables and plots, the committed results
and the rivals' numbers in benchmarks/README.md, and the scan, tasks and profile scripts on CPU."""

import json
import os
import re

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest

from benchmarks import profile_summary, record, scan
from benchmarks import results as br
from benchmarks import tasks as tasks_bench
from tests.conftest import ROOT

matplotlib.use("Agg")

H100, H200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"
S1 = {"shape": "S1", "batch": 8, "d_inner": 1536, "length": 2048}


def _write(path, benchmark, rows, device=H200, date="2026-12-01T07:00:00+00:00", commit="a" * 40):
    data = {
        "benchmark": benchmark,
        "device": device,
        "platform": "gpu",
        "jax": "0.11.2",
        "date": date,
        "commit": commit,
        "config": {},
        "rows": rows,
    }
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def results_dir(tmp_path):
    ours = {**S1, "d_state": 16, "impl": "ours", "scan_impl": "pallas"}
    _write(
        tmp_path / "scan_h200.json",
        "scan",
        [
            {**ours, "variant": "", "fwd_ms": 0.40, "fwd_bwd_ms": 1.5, "check_ok": True},
            {**ours, "variant": "tile=16 sub=4", "fwd_ms": 0.35, "fwd_bwd_ms": 1.7},
            {**ours, "d_state": 64, "variant": "", "fwd_ms": 1.0, "fwd_bwd_ms": 4.0},
            {**S1, "d_state": 16, "impl": "jla", "fwd_ms": 0.30, "fwd_bwd_ms": 1.3},
            {**S1, "d_state": 64, "impl": "jla", "error": "ValueError: d_state in (4, 8, 16, 32)"},
            {**S1, "d_state": 16, "impl": "mamba_ssm", "fwd_ms": 0.45, "fwd_bwd_ms": 2.2},
        ],
    )
    (tmp_path / "sub").mkdir()
    _write(
        tmp_path / "sub" / "scan_h100.json",
        "scan",
        [
            {**ours, "variant": "", "fwd_ms": 0.42, "fwd_bwd_ms": 1.49},
            {
                "shape": "S4",
                "batch": 1,
                "d_inner": 1536,
                "length": 131072,
                "d_state": 16,
                "impl": "ours",
                "scan_impl": "associative",
                "error": "not run: out of memory",
            },
        ],
        device=H100,
        date="2026-11-23T07:52:06+00:00",
        commit=None,
    )
    train = {"model": "130m", "batch": 16, "length": 2048, "gpus": 1}
    _write(
        tmp_path / "train.json",
        "train_throughput",
        [
            {
                **train,
                "impl": "ours",
                "scan_impl": "pallas",
                "tokens_per_s": 164231.0,
                "mfu": 0.129,
            },
            {**train, "impl": "ours", "gpus": 4, "tokens_per_s": 600000.0},
            {**train, "impl": "jla", "tokens_per_s": 219692.0},
            {**train, "model": "1.4b", "impl": "ours", "error": "RESOURCE_EXHAUSTED"},
        ],
    )
    point = {"model": "130m", "batch": 64, "prompt": 2048, "new_tokens": 128}
    _write(
        tmp_path / "decode.json",
        "decode",
        [
            {
                **point,
                "impl": "ours",
                "arch": "mamba",
                "tokens_per_s": 27432.0,
                "decode_tokens_per_s": 49516.0,
                "generate_tokens_per_s": 27350.0,
            },
            {
                **point,
                "impl": "ours",
                "arch": "transformer",
                "tokens_per_s": 4352.0,
                "decode_tokens_per_s": 4035.0,
            },
            {**point, "impl": "mamba_ssm", "arch": "mamba", "tokens_per_s": 33662.0},
        ],
    )
    _write(
        tmp_path / "tasks.json",
        "tasks",
        [
            {
                "task": "induction_heads",
                "selective": True,
                "length": 64,
                "accuracy": 1.0,
                "chance": 1 / 15,
            },
        ],
    )
    return tmp_path


def test_tables_read_the_record_format(results_dir):
    records = br.load_results(results_dir)
    assert [r.benchmark for r in records] == ["decode", "scan", "scan", "tasks", "train_throughput"]
    scan_rows = br.scan_table(records)
    keys = {
        (r["device"], r["impl"], r["scan_impl"], r["variant"], r["d_state"], r["pass"]): r
        for r in scan_rows
    }
    assert len(keys) == len(scan_rows) == 12  # 6 measured rows x 2 passes; errors add nothing
    tiled = keys[H200, "ours", "pallas", "tile=16 sub=4", 16, "fwd+bwd"]
    assert (tiled["ms"], tiled["length"], tiled["date"], tiled["commit"]) == (
        1.7,
        2048,
        "2026-12-01",
        "a" * 40,
    )
    assert keys[H100, "ours", "pallas", "", 16, "fwd"]["ms"] == 0.42
    assert keys[H200, "jla", None, "", 16, "fwd"]["ms"] == 0.30
    # Rivals over our fastest variant, within one run only (the H100 file has no rival).
    ratios = {(r["rival"], r["pass"]): r["ratio"] for r in br.scan_ratios(scan_rows)}
    assert ratios == pytest.approx(
        {
            ("jla", "fwd"): 0.30 / 0.35,
            ("jla", "fwd+bwd"): 1.3 / 1.5,
            ("mamba_ssm", "fwd"): 0.45 / 0.35,
            ("mamba_ssm", "fwd+bwd"): 2.2 / 1.5,
        }
    )
    train = br.train_table(records)
    assert [(r["impl"], r["gpus"], r["tokens_per_s"], r["mfu"]) for r in train] == [
        ("ours", 1, 164231.0, 0.129),
        ("ours", 4, 600000.0, None),
        ("jla", 1, 219692.0, None),
    ]
    decode = {
        (r["impl"], r["arch"], r["metric"]): r["tokens_per_s"] for r in br.decode_table(records)
    }
    assert decode == {
        ("ours", "mamba", "e2e"): 27432.0,
        ("ours", "mamba", "decode"): 49516.0,
        ("ours", "mamba", "generate"): 27350.0,
        ("ours", "transformer", "e2e"): 4352.0,
        ("ours", "transformer", "decode"): 4035.0,
        ("mamba_ssm", "mamba", "e2e"): 33662.0,
    }
    assert [(r["task"], r["length"], r["accuracy"]) for r in br.tasks_table(records)] == [
        ("induction_heads", 64, 1.0)
    ]
    failed = br.errors(records)
    assert [(e["benchmark"], e["device"]) for e in failed] == [
        ("scan", H200),
        ("scan", H100),
        ("train_throughput", H200),
    ]
    assert "d_state=64 impl=jla" in failed[0]["what"] and "d_state" in failed[0]["error"]
    assert br.missing(records) == []
    only_rivals = [r for r in records if r.benchmark == "tasks"]
    notes = br.missing(only_rivals)
    assert len(notes) == 3 and "benchmarks/scan.py --rivals" in notes[0]


def test_reader_rejects_anything_but_the_record_format(tmp_path, capsys):
    path = tmp_path / "scan.json"
    # The 2026-11-23 scan.py header: no benchmark, jax_version instead of jax.
    path.write_text(json.dumps({"device": H100, "jax_version": "0.11.2", "rows": []}))
    with pytest.raises(ValueError, match=r"scan.json.*lacks \['benchmark', 'platform', 'jax'"):
        br.load_results(tmp_path)
    _write(path, "scan", [{**S1, "d_state": 16, "impl": "ours"}, {**S1, "impl": "ours"}])
    with pytest.raises(ValueError, match=r"row 1 lacks \['d_state'\]"):
        br.load_record(path)
    _write(path, "scans", [])
    with pytest.raises(ValueError, match="benchmark must be one of"):
        br.load_record(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        br.load_record(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="scan.json"):
        br.load_record(path)
    assert br.load_results(tmp_path / "nope") == []
    # The writer warns (a GPU run keeps its numbers) where the reader will refuse.
    rec = record.Record("decode", tmp_path / "d.json", {"reps": 3})
    rec.add({"model": "130m", "batch": 1, "impl": "ours", "tokens_per_s": 1.0})
    assert "lacks ['arch']" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"lacks \['arch'\]"):
        br.load_record(tmp_path / "d.json")


def test_plots_label_devices_and_draw_rivals_dashed(results_dir):
    records = br.load_results(results_dir)
    table = br.scan_table(records)
    ax = br.plot_scan([r for r in table if r["device"] == H200], "fwd")
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"pallas", "jla", "mamba_ssm"}
    assert list(lines["pallas"].get_ydata()) == [0.35]  # the fastest variant at that size
    assert lines["jla"].get_linestyle() == "--" and lines["pallas"].get_linestyle() == "-"
    assert "NVIDIA H200, 2026-12-01" in ax.get_title() and "d_state 16" in ax.get_title()
    ax = br.plot_scan(table, "fwd+bwd")  # two devices: every line names its device
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {
        f"pallas ({H200})",
        f"pallas ({H100})",
        f"jla ({H200})",
        f"mamba_ssm ({H200})",
    }
    assert list(lines[f"pallas ({H200})"].get_ydata()) == [1.5]
    ax = br.plot_scan(table, "fwd", d_state=64)
    assert [line.get_label() for line in ax.get_lines()] == ["pallas"]
    ax = br.plot_train(br.train_table(records))
    labels = {t.get_text() for t in ax.get_legend().get_texts()}
    assert labels == {"pallas, 1 GPU", "mamba-jax, 4 GPU", "jla, 1 GPU"}
    # A second run on the same device and day: the commit tells the two apart.
    row = {"model": "130m", "batch": 16, "length": 2048, "gpus": 1, "impl": "ours"}
    again = _write(
        results_dir / "train2.json",
        "train_throughput",
        [
            {**row, "scan_impl": "pallas", "variant": v, "tokens_per_s": t}
            for v, t in (("a", 3.0), ("b", 2.0))
        ],
        commit="b" * 40,
    )
    ax = br.plot_train(br.train_table([*records, br.load_record(again)]))
    labels = {t.get_text() for t in ax.get_legend().get_texts()}
    assert labels == {
        "pallas, 1 GPU (bbbbbbb)",
        "pallas, 1 GPU (aaaaaaa)",
        "mamba-jax, 4 GPU (aaaaaaa)",
        "jla, 1 GPU (aaaaaaa)",
    }
    bars = {c.get_label(): [b.get_height() for b in c] for c in ax.containers}
    assert bars["pallas, 1 GPU (bbbbbbb)"] == [3.0]  # the faster of the run's two variants
    ax = br.plot_decode(br.decode_table(records), "e2e")
    labels = {t.get_text() for t in ax.get_legend().get_texts()}
    assert labels == {"mamba-jax", "transformer (ours)", "mamba_ssm"}
    ax = br.plot_decode([], "decode")
    assert "no results" in ax.get_title()


def _readme_rows(heading):
    """{first cell: [numbers of the other cells]} of the first table after `heading`."""
    text = (ROOT / "benchmarks" / "README.md").read_text()
    table = text[text.index(heading) :].split("\n\n| ", 1)[1].split("\n\n")[0]
    rows = {}
    for line in table.splitlines()[2:]:
        first, *cells = [c.strip() for c in line.strip("|").split("|")]
        rows[first] = [
            float(x.replace(",", "")) for x in re.findall(r"\d[\d,]*\.?\d*", " ".join(cells))
        ]
    return rows


def test_committed_results_load_and_the_rivals_match_the_readme():
    records = br.load_results(ROOT / "benchmarks" / "results")
    assert {r.benchmark for r in records} == {
        "scan", "conv", "train_throughput", "decode", "tasks", "length_eval"
    }  # fmt: skip
    h200 = {r.benchmark: r for r in records if "rivals" in r.path and r.device == H200}
    assert {r.date for r in h200.values()} == {"2026-12-01"}
    # Scan: README columns mamba_ssm, jla, ours; fwd / fwd+bwd each.
    ms = {(r["impl"], r["shape"]): (r["fwd_ms"], r["fwd_bwd_ms"]) for r in h200["scan"].rows}
    for first, nums in _readme_rows("**Selective scan**").items():
        shape = first.split()[0]
        assert nums[-6:] == [*ms["mamba_ssm", shape], *ms["jla", shape], *ms["ours", shape]]
    tps = {(r["impl"], r["model"]): r["tokens_per_s"] for r in h200["train_throughput"].rows}
    for first, nums in _readme_rows("**Training throughput**").items():
        model = first.split(",")[0]
        assert nums[0] == tps["ours", model] and tps["mamba_ssm", model] in nums
        assert nums[-2] == tps["jla", model]
    e2e = {
        (r["impl"], r["arch"], r["model"], r["batch"]): r["tokens_per_s"]
        for r in h200["decode"].rows
    }
    for first, nums in _readme_rows("**Decode**").items():
        model, batch = first.split(", ")
        assert nums == [
            e2e[impl, arch, model, int(batch)]
            for impl, arch in (("ours", "mamba"), ("mamba_ssm", "mamba"), ("ours", "transformer"))
        ]


def test_git_commit_from_env_repo_or_none(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.delenv("MAMBA_JAX_COMMIT", raising=False)
    # Outside any repository, and in a repository without commits, there is no commit ('git
    # rev-parse HEAD' prints "HEAD" in the latter).
    assert record.git_commit(str(tmp_path)) is None
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    assert record.git_commit(str(tmp_path)) is None
    monkeypatch.setenv("MAMBA_JAX_COMMIT", "abc1234")
    assert record.git_commit(str(tmp_path)) == "abc1234"


# ----------------------------------------------------------------------------------------------
# The scripts, at toy sizes on CPU.


TOY_SCAN = "--shapes 1x32x19 --no-n64 --inner 1 --reps 1 --seed 3".split()  # shared reference


def test_readme_training_rows_match_their_record():
    """The README's Speed table: the training rows are ours and jla from one record's run."""
    (rec,) = [r for r in br.load_results(ROOT / "benchmarks" / "results")
              if r.path.endswith("conv_kernel_vs_jla.json")]  # fmt: skip
    tps = {(r["impl"], r["model"]): round(r["tokens_per_s"]) for r in rec.rows}
    readme = (ROOT / "README.md").read_text()
    for model in ("130m", "1.4b"):
        line = next(x for x in readme.splitlines() if x.startswith(f"| training {model},"))
        cells = [c.strip() for c in line.split("|")[2:4]]
        assert int(cells[0].split()[0].replace(",", "")) == tps["ours", model], line
        assert int(cells[1].replace(",", "")) == tps["jla", model], line


def test_conv_benchmark_checks_and_times_on_cpu(tmp_path, capsys):
    from benchmarks import conv

    out = tmp_path / "conv.json"
    conv.main(["--shapes", "tiny", "--variants", "32:16:4:1", "--interpret", "--inner", "1",
               "--reps", "1", "--out", str(out)])  # fmt: skip
    rec = br.load_record(out)
    assert [r["variant"] for r in rec.rows] == ["xla", "32:16:4:1"]
    assert all(r["check_ok"] and r["fwd_ms"] > 0 and r["vjp_ms"] > 0 for r in rec.rows)
    assert 0 < max(r["max_rel_err"] for r in rec.rows[1:]) < 3e-2  # bf16 output, fp32 inside
    assert "| tiny | 32:16:4:1 |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="channels:chunk:unroll:warps"):
        conv.main(["--shapes", "tiny", "--variants", "32:16", "--interpret"])


def test_scan_benchmark_checks_and_times_on_cpu(tmp_path, capsys):
    out = tmp_path / "scan.json"
    data = scan.main([*TOY_SCAN, "--impls", "associative", "--out", str(out)])
    rec = br.load_record(out)
    assert rec.config["check_seed"] == 3 and data["rows"] == rec.rows
    (row,) = rec.rows
    assert (row["impl"], row["scan_impl"], row["check_ok"]) == ("ours", "associative", True)
    assert set(row["rel_err"]) == {"y", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "dbias"}
    assert 0 < max(row["rel_err"].values()) < scan.CHECK_TOL  # bf16 inputs against fp32
    assert len(br.scan_table([rec])) == 2
    assert "associative" in capsys.readouterr().out.split("selective scan, cpu")[1]
    with pytest.raises(ValueError, match="needs --rivals"):
        scan.main(["--impls", "jla"])
    with pytest.raises(ValueError, match="BxExL"):
        scan.main(["--shapes", "S9"])


@pytest.mark.parametrize("wrong", [False, True])
def test_scan_checks_the_cuda_rival_against_our_reference(tmp_path, monkeypatch, wrong):
    """The CUDA child's outputs (channels-first, as selective_scan_cuda lays them out) are
    compared with our reference in our layout; a wrong gradient fails the check."""
    (tmp_path / "rivals").mkdir()
    (tmp_path / "rivals" / "unpack.sh").write_text("")

    def fake_child(rivals, script, args):
        configs, seed = json.loads(args[1]), int(args[3])
        rows = []
        for b, e, length, n, check in configs:
            row = {"size": [b, e, length, n]}
            if not check:
                rows.append({**row, "fwd_ms": 1.0, "fwd_bwd_ms": 2.0})
                continue
            ref = scan.reference_outputs((b, e, length, n), seed)
            row["outputs"] = {}
            for k, v in ref.items():
                first = scan.to_channels_first(np.asarray(v), "u" if k == "y" else k[1:])
                first = first * (1.1 if wrong and k == "dB" else 1.0)
                row["outputs"][k] = scan.from_channels_first(first, k).tolist()
            rows.append(row)
        return {"device": "fake", "torch": "0", "rows": rows}

    monkeypatch.setattr(scan, "run_rival", fake_child)
    rivals = ["--rivals", str(tmp_path / "rivals"), "--out", str(tmp_path / "scan.json")]
    data = scan.main([*TOY_SCAN, "--impls", "mamba_ssm", *rivals])
    (cuda,) = data["rows"]
    assert cuda["impl"] == "mamba_ssm" and (cuda["fwd_ms"], cuda["fwd_bwd_ms"]) == (1.0, 2.0)
    assert cuda["check_ok"] is (not wrong) and data["config"]["mamba_ssm_torch"] == "0"
    assert (cuda["rel_err"]["dB"] > 0.05) is wrong and cuda["rel_err"]["y"] < 1e-6
    # A child that could not run leaves error rows, not a crash.
    monkeypatch.setattr(scan, "run_rival", lambda *a: {"error": "cuda_scan exited 1"})
    (failed,) = scan.main([*TOY_SCAN, "--impls", "mamba_ssm", *rivals])["rows"]
    assert "exited 1" in failed["error"] and "fwd_ms" not in failed


def test_tasks_benchmark_writes_a_record(tmp_path):
    from flax import nnx

    from mamba_jax.config import MambaConfig
    from mamba_jax.model import MambaLM

    model = MambaLM(
        MambaConfig(d_model=8, n_layer=1, vocab_size=16, scan_impl="reference"), rngs=nnx.Rngs(0)
    )
    out = tmp_path / "tasks.json"
    # 16-token chunks at both lengths: one compilation
    kw = dict(num=4, batch=4, chunk_tokens=64, scan_impl="reference", seed=5)
    tasks_bench.run(model, "induction_heads", [16, 32], **kw, out=out, config={"checkpoint": "x"})
    rec = br.load_record(out)
    assert rec.benchmark == "tasks" and rec.config["scan_impl"] == "reference"
    assert rec.config["checkpoint"] == "x" and rec.config["eval_seed"] == 5
    assert rec.commit is None or len(rec.commit) == 40
    rows = br.tasks_table([rec])
    assert [r["length"] for r in rows] == [16, 32] and all(0 <= r["accuracy"] <= 1 for r in rows)
    with pytest.raises(ValueError, match="scan_impl must be one of"):
        tasks_bench.run(model, "induction_heads", [16], 4, 4, 2**21, "fast", 5)


def test_profile_summary_of_a_cpu_trace(tmp_path):
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum() + jnp.exp(x).mean())
    x = jnp.ones((64, 64))
    f(x).block_until_ready()
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(3):
            f(x).block_until_ready()
    events = profile_summary.device_ops(tmp_path)
    rows, totals = profile_summary.summarize(events, top=100, steps=3)
    assert rows and totals["devices"] == 1 and totals["events"] == len(events)
    assert all(r["count"] % 3 == 0 for r in rows)  # every op ran once per call
    assert sum(r["percent"] for r in rows) == pytest.approx(100.0)
    assert rows == sorted(rows, key=lambda r: -r["total_ms"])
    assert 0 < totals["device_ms"] <= totals["span_ms"] * 1.01
    # The trace's two files agree.
    json_gz = list(tmp_path.rglob("*.trace.json.gz"))
    if json_gz:
        rows_json, _ = profile_summary.summarize(profile_summary.device_ops(json_gz[0]), top=100)
        assert [(r["name"], r["count"]) for r in rows_json] == [
            (r["name"], r["count"]) for r in rows
        ]
    table = profile_summary.main([str(tmp_path), "--steps", "3", "--top", "2"])
    assert "3 steps" in table and len(table.splitlines()) == 2 + min(2, len(rows))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .xplane.pb or .trace.json.gz"):
        profile_summary.device_ops(tmp_path / "empty")


def test_scan_tpu_mode_refuses_other_backends_and_prints_floors(monkeypatch, capsys):
    import jax

    from benchmarks import scan as scan_bench

    with pytest.raises(ValueError, match="--tpu needs a TPU backend"):
        scan_bench.main(["--tpu", "--shapes", "S1"])
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    scan_bench.print_tpu_floors("S1,S4")
    out = capsys.readouterr().out
    assert "v5e floor ms" in out and out.count("fwd_bwd") == 2


def test_length_eval_record_matches_the_training_page():
    """docs/training.md's length-generalisation table is the committed record, rounded."""
    (record,) = [r for r in br.load_results(ROOT / "benchmarks" / "results")
                 if r.benchmark == "length_eval"]  # fmt: skip
    text = (ROOT / "docs" / "training.md").read_text()
    table = text[text.index("| positions | 0-63") :].split("\n\n")[0].splitlines()
    cells = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in table[2:]}
    for label, run in (("packed, reset (default)", "plain"), ("state passing", "state_passing")):
        want = [f"{r['loss']:.3f}" for r in record.rows if r["run"] == run]
        assert [c.strip() for c in cells[label]] == want
    tokens = [f"{r['tokens']:,}" for r in record.rows if r["run"] == "plain"]
    assert [c.strip() for c in cells["tokens counted"]] == tokens


def test_train_loop_script_times_every_row_on_cpu():
    from benchmarks import train_loop

    rows = train_loop.main(["--tiny"])
    assert [r["row"] for r in rows] == [
        "step, one batch, sync", "step, one batch, async", "data next()",
        "step + data, async", "step + data, sync",
    ]  # fmt: skip
    assert all(r["median_ms"] > 0 and r["tokens_per_s"] > 0 for r in rows)


def test_tasks_gpu_script_runs_a_curriculum_and_keeps_its_stages(tmp_path):
    """benchmarks/tasks_gpu.sh at toy size on CPU: a two-stage run (the length curriculum) trains,
    resumes at the new length, brings its checkpoint back, and writes a record naming both
    stages."""
    import subprocess
    import sys
    import tarfile

    out, runs = tmp_path / "out", tmp_path / "runs"
    env = dict(
        os.environ, OUT=str(out), RUNS_DIR=str(runs), PYTHON=sys.executable,
        ONLY="selective_copying_s6", SC_SHORT_LEN="40", SC_LONG_LEN="48", SC_SHORT_S="1",
        SC_LONG_S="1", EVAL_IMPL="reference", JAX_PLATFORMS="cpu",
        EXTRA_TRAIN="train.batch_size=2 train.eval_every=1 train.eval_batches=1 "
        "train.log_every=1 model.d_model=16",
        EXTRA_EVAL="--lengths 48 --num 2",
    )  # fmt: skip
    env.pop("XLA_FLAGS", None)  # one CPU device, not the suite's eight
    subprocess.run(["bash", "benchmarks/tasks_gpu.sh"], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=600)  # fmt: skip
    rec = br.load_record(out / "selective_copying_s6.json")
    stages = rec.config["stages"]
    assert [s["seq_len"] for s in stages] == [40, 48] and [s["rc"] for s in stages] == [0, 0]
    assert stages[1]["start_step"] == stages[0]["step"] >= 1
    assert rec.config["train_step"] == stages[1]["step"]
    assert "40:1,48:1" in rec.config["recipe"] and [r["length"] for r in rec.rows] == [48]
    with tarfile.open(out / "selective_copying_s6.ckpt.tar.gz") as tar:
        assert f"./{stages[1]['step']}/_CHECKPOINT_METADATA" in tar.getnames()
    status = json.loads((out / "selective_copying_s6.status").read_text())
    assert status["train_rc"] == 0 and status["eval_rc"] == 0
    assert "selective_copying_s6" in (out / "tasks_summary.jsonl").read_text()


def test_plot_tasks_draws_the_committed_records(tmp_path):
    from benchmarks import plot_tasks

    folder = ROOT / "benchmarks" / "results" / "tasks_2026-12-03_NVIDIA_H200"
    records = plot_tasks.induction_records([folder])
    assert records and all(r.config["task"] == "induction_heads" for r in records)
    png = plot_tasks.main([str(folder / "run2"), "--out", str(tmp_path / "ih.png")])
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no such file"):
        plot_tasks.induction_records([tmp_path / "missing"])
    with pytest.raises(ValueError, match="no induction_heads tasks records"):
        plot_tasks.plot([], str(tmp_path / "none.png"))
    with pytest.raises(SystemExit) as exit_info:  # the command line: a one-line error
        plot_tasks.main([str(tmp_path), "--out", str(tmp_path / "none.png")])
    assert exit_info.value.code == 2
