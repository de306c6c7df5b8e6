"""bench_results: loading benchmark JSON in its several spellings, tables, and labelled plots."""

import json
import os

import matplotlib
import pytest

from mamba_jax import bench_results as br

matplotlib.use("Agg")

H100 = "NVIDIA H100 80GB HBM3"
V64 = "tile=64 sub=8 bwd_reduce=smem cache_decay=False"  # a Pallas variant's label


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def results_dir(tmp_path):
    # Long format: one time per row, the pass named; the run metadata nested under "meta".
    _write(tmp_path / "scan_2026-11-23.json", {
        "benchmark": "scan",
        "meta": {"device": H100, "date": "2026-11-23T10:00:00", "jax_version": "0.11.2"},
        "results": [
            {"impl": "pallas", "pass": "fwd", "shape": "S1", "median_ms": 0.3},
            {"impl": "pallas", "pass": "fwd+bwd", "shape": "S1", "median_ms": 1.1},
            {"impl": "associative", "pass": "fwd", "b": 4, "d": 4096, "L": 2048, "ms": 4.0},
        ],
    })  # fmt: skip
    # As benchmarks/scan.py writes it: the kind from the file name, both passes in one row,
    # Pallas block-size variants, a None time for a size that was not run, a d_state 64 row.
    (tmp_path / "sub").mkdir()
    row = dict(shape="S1", b=8, d=1536, L=2048, n=16, impl="pallas")
    _write(tmp_path / "sub" / "scan_20261123_120000_NVIDIA_H200.json", {
        "device": "NVIDIA H200", "jax_version": "0.11.2", "date": "2026-11-24T01:02:03+00:00",
        "commit": "abc", "cuda_anchors": {"S1": [0.451, 2.29]},
        "rows": [
            {**row, "block_sizes": {"tile": 32, "sub": 8, "chunks": None, "target_blocks": 264},
             "rel_err": {"y": 2e-3, "du": 4e-3, "ddelta": 5e-3, "dA": 3e-3, "dB": 4e-3,
                         "dC": 4e-3, "dD": 1e-3, "dz": 2e-3, "dbias": 6e-3},
             "fwd_ms": 0.40, "fwd_bwd_ms": 1.5},
            {**row, "block_sizes": {"tile": 64, "sub": 8, "chunks": None, "target_blocks": None,
                                    "bwd_reduce": "smem", "cache_decay": False},
             "fwd_ms": 0.35, "fwd_bwd_ms": 1.7},
            {**row, "n": 64, "fwd_ms": 1.0, "fwd_bwd_ms": 4.0},
            dict(shape="S4", b=1, d=1536, L=131072, n=16, impl="associative", fwd_ms=None,
                 fwd_bwd_ms=None),
            {"implementation": "reference", "batch": 1, "d_inner": 64, "seq_len": 512,
             "fwd_ms": 2.0, "fwd_bwd_ms": 7.5},
        ],
    })  # fmt: skip
    # Another spelling: the GPU count in the row.
    _write(tmp_path / "train_throughput.json", {
        "benchmark": "train_throughput", "device": H100, "date": "2026-11-23",
        "results": [{"model": "130m", "n_gpus": 1, "tokens_per_sec": 200000.0, "mfu": 0.13},
                    {"model": "130m", "n_gpus": 2, "tokens_per_sec": 390000.0}],
    })  # fmt: skip
    # As benchmarks/train_throughput.py writes it: the GPU count in the file, the mesh per row,
    # a row that failed and was retried with the fallback implementation.
    train_row = {"model": "1.4b", "batch": 8, "seq_len": 2048, "params": 1.37e9,
                 "scan_impl": "associative", "remat": True,
                 "mesh": {"data": 1, "fsdp": 4, "tensor": 1}, "step_ms_median": 300.0,
                 "step_ms_min": 290.0, "tokens_per_sec": 54613.3, "mfu": 0.45, "peak_gib": 30.1,
                 "compile_s": 40.0, "first_loss": 11.0, "last_loss": 10.7}  # fmt: skip
    _write(tmp_path / "train_throughput_x4.json", {
        "benchmark": "train_throughput", "device": "NVIDIA H200", "num_devices": 4,
        "jax": "0.11.2", "date": "2026-11-23T11:22:33.123456+00:00", "commit": "abc",
        "rows": [{"model": "1.4b", "batch": 8, "scan_impl": "auto",
                  "error": "XlaRuntimeError: RESOURCE_EXHAUSTED: out of memory"}, train_row],
    })  # fmt: skip
    # As benchmarks/decode.py writes it: wide rows, one per (model, batch).
    _write(tmp_path / "decode_2026-11-23.json", {
        "benchmark": "decode", "device": H100, "jax": "0.11.2", "date": "2026-11-23T09:00:00",
        "skipped": ["2.8b"],
        "rows": [
            {"model": "130m", "batch": 64, "mamba_params": 129e6, "mamba_decode_tok_s": 50000.0,
             "mamba_e2e_tok_s": 40000.0, "transformer_decode_tok_s": 9000.0,
             "transformer_e2e_tok_s": 8000, "mamba_generate_tok_s": 41000.0,
             "decode_speedup": 5.6},
            {"model": "1.4b", "batch": 64, "error": "RESOURCE_EXHAUSTED: out of memory"},
        ],
    })  # fmt: skip
    _write(tmp_path / "unrelated.json", {"foo": 1})
    return tmp_path


def test_load_and_normalise_scan(results_dir):
    results = br.load_results(results_dir)
    assert sorted(r.kind for r in results) == [
        "decode", "scan", "scan", "train_throughput", "train_throughput"]  # fmt: skip
    table = br.scan_table(results)
    rows = {(r["impl"], r["pass"], r["variant"], r["n"]): r for r in table}
    assert set(rows) == {
        ("pallas", "fwd", "", 16), ("pallas", "fwd+bwd", "", 16), ("associative", "fwd", "", 16),
        ("pallas", "fwd", "tile=32 sub=8 target_blocks=264", 16),
        ("pallas", "fwd+bwd", "tile=32 sub=8 target_blocks=264", 16),
        ("pallas", "fwd", V64, 16), ("pallas", "fwd+bwd", V64, 16),
        ("pallas", "fwd", "", 64), ("pallas", "fwd+bwd", "", 64),
        ("reference", "fwd", "", 16), ("reference", "fwd+bwd", "", 16),
    }  # fmt: skip
    # A named shape fills in (b, d, L); a (b, d, L) that is one of the shapes gets its name.
    long_fwd = rows["pallas", "fwd", "", 16]
    assert (long_fwd["length"], long_fwd["b"], long_fwd["ms"]) == (2048, 8, 0.3)
    assert rows["associative", "fwd", "", 16]["shape"] == "S2"
    assert (long_fwd["date"], long_fwd["device"]) == ("2026-11-23", H100)
    wide = rows["pallas", "fwd+bwd", V64, 16]
    assert (wide["ms"], wide["shape"], wide["device"], wide["date"]) == (
        1.7,
        "S1",
        "NVIDIA H200",
        "2026-11-24",
    )
    ref = rows["reference", "fwd+bwd", "", 16]
    assert (ref["ms"], ref["length"], ref["shape"]) == (7.5, 512, None)
    # The S4 associative row ran nothing, so it adds no point.
    assert not any(r["shape"] == "S4" for r in table)


def test_train_and_decode_tables(results_dir):
    results = br.load_results(results_dir)
    train = br.train_table(results)
    assert [(r["model"], r["gpus"], r["tokens_per_s"], r["mfu"]) for r in train] == [
        ("130m", 1, 200000.0, 0.13), ("130m", 2, 390000.0, None),
        ("1.4b", 4, 54613.3, 0.45)]  # fmt: skip
    big = train[2]
    assert (big["batch"], big["seq_len"], big["scan_impl"]) == (8, 2048, "associative")
    assert (big["device"], big["date"], big["file"]) == (
        "NVIDIA H200",
        "2026-11-23",
        "train_throughput_x4.json",
    )
    decode = br.decode_table(results)
    assert {(r["arch"], r["metric"], r["batch"], r["tokens_per_s"]) for r in decode} == {
        ("mamba", "e2e", 64, 40000.0), ("transformer", "e2e", 64, 8000.0),
        ("mamba", "decode", 64, 50000.0), ("transformer", "decode", 64, 9000.0),
        ("mamba", "generate", 64, 41000.0)}  # fmt: skip
    assert {r["date"] for r in decode} == {"2026-11-23"}


def test_missing_directory_and_bad_files(tmp_path):
    assert br.load_results(tmp_path / "nope") == []
    _write(tmp_path / "scan.json", {"device": H100, "numbers": [1, 2]})
    with pytest.raises(ValueError, match="list of rows"):
        br.load_results(tmp_path)
    (tmp_path / "scan.json").write_text("{not json")
    with pytest.raises(ValueError, match="scan.json"):
        br.load_results(tmp_path)


def test_anchors_match_benchmarks_md():
    anchors = {(r["shape"], r["pass"]): r["ms"] for r in br.mamba_ssm_scan_table()}
    assert anchors["S1", "fwd"] == 0.451 and anchors["S4", "fwd+bwd"] == 20.25
    assert all(r["device"] == br.ANCHOR_DEVICE for r in br.mamba_ssm_scan_table())


def test_plots_are_labelled_with_device_and_date(results_dir):
    results = br.load_results(results_dir)
    scan, anchors = br.scan_table(results), br.mamba_ssm_scan_table()
    ax = br.plot_scan([r for r in scan if r["device"] == H100], "fwd", anchors=anchors)
    title = ax.get_title()
    assert H100 in title and "2026-11-23" in title and "2026-11-22" in title
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {
        "pallas", "associative", "mamba_ssm"}  # fmt: skip
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["pallas"].get_ydata()) == [0.3]
    assert list(lines["mamba_ssm"].get_xdata()) == [2048, 2048, 16384, 131072]
    # Both devices: one line per (implementation, device). On the H200, S1 has two pallas fwd
    # times at n = 16 (0.40, 0.35) and one at n = 64: the fastest n = 16 one is drawn.
    ax = br.plot_scan(scan, "fwd", anchors=anchors)
    assert "NVIDIA H200, 2026-11-24" in ax.get_title()
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {f"pallas ({H100})", f"associative ({H100})", "pallas (NVIDIA H200)",
                          "reference (NVIDIA H200)", "mamba_ssm"}  # fmt: skip
    assert list(lines["pallas (NVIDIA H200)"].get_ydata()) == [0.35]
    assert list(lines["reference (NVIDIA H200)"].get_xdata()) == [512]
    ax = br.plot_scan(scan, "fwd+bwd", anchors=anchors)
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["pallas (NVIDIA H200)"].get_ydata()) == [1.5]
    ax = br.plot_train([r for r in br.train_table(results) if r["device"] == H100])
    assert "2026-11-23" in ax.get_title()
    labels = {t.get_text() for t in ax.get_legend().get_texts()}
    assert labels == {"mamba-jax, 1 GPU", "mamba-jax, 2 GPU", "mamba_ssm, 1 GPU"}
    # Two devices: every measured series names its device, and the title names both.
    ax = br.plot_train(br.train_table(results))
    labels = {t.get_text() for t in ax.get_legend().get_texts()}
    assert labels == {f"mamba-jax, 1 GPU ({H100})", f"mamba-jax, 2 GPU ({H100})",
                      "mamba-jax, 4 GPU (NVIDIA H200)", "mamba_ssm, 1 GPU"}  # fmt: skip
    assert "NVIDIA H200, 2026-11-23" in ax.get_title()
    ax = br.plot_decode(br.decode_table(results))
    assert H100 in ax.get_title()
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {
        "mamba", "transformer", "mamba_ssm"}  # fmt: skip


def test_missing_kinds_and_recorded_errors(results_dir, tmp_path_factory):
    results = br.load_results(results_dir)
    assert br.missing(results) == []
    failed = br.errors(results)
    assert [(e["kind"], e["field"], e["device"]) for e in failed] == [
        ("decode", "skipped", H100), ("decode", "error", H100),
        ("train_throughput", "error", "NVIDIA H200")]  # fmt: skip
    assert failed[0]["what"] == "2.8b" and "budget" in failed[0]["error"]
    assert "model=1.4b" in failed[2]["what"] and "RESOURCE_EXHAUSTED" in failed[2]["error"]
    only_scan = [r for r in results if r.kind == "scan"]
    notes = br.missing(only_scan)
    assert len(notes) == 2
    assert "train_throughput" in notes[0] and "benchmarks/train_throughput.py --out" in notes[0]
    assert "benchmarks/decode.py" in notes[1]
    empty = br.load_results(tmp_path_factory.mktemp("empty"))
    assert empty == [] and len(br.missing(empty)) == 3
    # With nothing measured, the plots still draw the mamba_ssm anchors, labelled as such.
    ax = br.plot_scan(br.scan_table(empty), "fwd", anchors=br.mamba_ssm_scan_table())
    assert [line.get_label() for line in ax.get_lines()] == ["mamba_ssm"]
    assert br.ANCHOR_DEVICE in ax.get_title()
    ax = br.plot_decode(br.decode_table(empty), "decode")
    assert "no results" in ax.get_title()


def test_git_commit_from_env_repo_or_none(tmp_path, monkeypatch):
    import subprocess

    from mamba_jax.bench_results import git_commit

    monkeypatch.delenv("MAMBA_JAX_COMMIT", raising=False)
    # A folder outside any repository, and a repository without commits, both give None (plain
    # `git rev-parse HEAD` prints "HEAD" for the latter).
    assert git_commit(str(tmp_path)) is None
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    assert git_commit(str(tmp_path)) is None
    monkeypatch.setenv("MAMBA_JAX_COMMIT", "abc1234")
    assert git_commit(str(tmp_path)) == "abc1234"
    monkeypatch.delenv("MAMBA_JAX_COMMIT")
    here = git_commit(os.path.dirname(os.path.abspath(__file__)))
    assert here is None or len(here) == 40
