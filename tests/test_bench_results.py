"""bench_results: loading benchmark JSON in its several spellings, tables, and labelled plots."""

import json

import matplotlib
import pytest

from mamba_jax import bench_results as br

matplotlib.use("Agg")

H100 = "NVIDIA H100 80GB HBM3"


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
            {**row, "block_sizes": {"tile": 32, "sub": 8, "chunks": None}, "rel_err": 1e-3,
             "fwd_ms": 0.40, "fwd_bwd_ms": 1.5},
            {**row, "block_sizes": {"tile": 64, "sub": 8, "chunks": None},
             "fwd_ms": 0.35, "fwd_bwd_ms": 1.7},
            {**row, "n": 64, "fwd_ms": 1.0, "fwd_bwd_ms": 4.0},
            dict(shape="S4", b=1, d=1536, L=131072, n=16, impl="associative", fwd_ms=None,
                 fwd_bwd_ms=None),
            {"implementation": "reference", "batch": 1, "d_inner": 64, "seq_len": 512,
             "fwd_ms": 2.0, "fwd_bwd_ms": 7.5},
        ],
    })  # fmt: skip
    _write(tmp_path / "train_throughput.json", {
        "benchmark": "train_throughput", "device": H100, "date": "2026-11-23",
        "results": [{"model": "130m", "n_gpus": 1, "tokens_per_sec": 200000.0, "mfu": 0.13},
                    {"model": "130m", "n_gpus": 2, "tokens_per_sec": 390000.0}],
    })  # fmt: skip
    # As benchmarks/decode.py writes it: wide rows, one per (model, batch).
    _write(tmp_path / "decode_2026-11-23.json", {
        "benchmark": "decode", "device": H100, "jax": "0.11.2", "date": "2026-11-23T09:00:00",
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
    assert sorted(r.kind for r in results) == ["decode", "scan", "scan", "train_throughput"]
    table = br.scan_table(results)
    rows = {(r["impl"], r["pass"], r["variant"], r["n"]): r for r in table}
    assert set(rows) == {
        ("pallas", "fwd", "", 16), ("pallas", "fwd+bwd", "", 16), ("associative", "fwd", "", 16),
        ("pallas", "fwd", "tile=32 sub=8", 16), ("pallas", "fwd+bwd", "tile=32 sub=8", 16),
        ("pallas", "fwd", "tile=64 sub=8", 16), ("pallas", "fwd+bwd", "tile=64 sub=8", 16),
        ("pallas", "fwd", "", 64), ("pallas", "fwd+bwd", "", 64),
        ("reference", "fwd", "", 16), ("reference", "fwd+bwd", "", 16),
    }  # fmt: skip
    # A named shape fills in (b, d, L); a (b, d, L) that is one of the shapes gets its name.
    long_fwd = rows["pallas", "fwd", "", 16]
    assert (long_fwd["length"], long_fwd["b"], long_fwd["ms"]) == (2048, 8, 0.3)
    assert rows["associative", "fwd", "", 16]["shape"] == "S2"
    assert (long_fwd["date"], long_fwd["device"]) == ("2026-11-23", H100)
    wide = rows["pallas", "fwd+bwd", "tile=64 sub=8", 16]
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
    assert [(r["gpus"], r["tokens_per_s"], r["mfu"]) for r in train] == [
        (1, 200000.0, 0.13), (2, 390000.0, None)]  # fmt: skip
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
    ax = br.plot_scan(br.scan_table(results), "fwd", anchors=br.mamba_ssm_scan_table())
    title = ax.get_title()
    assert H100 in title and "2026-11-23" in title and "2026-11-22" in title
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {
        "pallas", "associative", "reference", "mamba_ssm"}  # fmt: skip
    lines = {line.get_label(): line for line in ax.get_lines()}
    # S1 has three pallas fwd times at n = 16 (0.3, 0.40, 0.35) and one at n = 64: the fastest
    # n = 16 one is drawn.
    assert list(lines["pallas"].get_ydata()) == [0.3]
    assert list(lines["mamba_ssm"].get_xdata()) == [2048, 2048, 16384, 131072]
    ax = br.plot_train(br.train_table(results))
    assert "2026-11-23" in ax.get_title()
    labels = {t.get_text() for t in ax.get_legend().get_texts()}
    assert labels == {"mamba-jax, 1 GPU", "mamba-jax, 2 GPU", "mamba_ssm, 1 GPU"}
    ax = br.plot_decode(br.decode_table(results))
    assert H100 in ax.get_title()
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {
        "mamba", "transformer", "mamba_ssm"}  # fmt: skip
