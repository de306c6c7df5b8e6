"""Loss by position (length generalisation): per-document losses against each document run
alone, the buckets, the CLI on a trained run, and bad input."""

import json

import numpy as np
import optax
import pytest
from flax import nnx

from mamba_jax import MambaConfig, MambaLM
from mamba_jax.training import length_eval
from tests.conftest import run_train
from tests.conftest import train_args as args


def test_documents_split_at_eos_and_are_cut_to_max_len():
    tokens = np.asarray([1, 2, 9, 3, 9, 4, 5, 6, 7, 9, 8], np.uint16)  # trailing 8: no eos yet
    docs = length_eval.documents(tokens, 9, max_len=3)
    assert [d.tolist() for d in docs] == [[1, 2, 9], [3, 9], [4, 5, 6, 7]]
    assert length_eval.bucket_edges(300) == [0, 64, 128, 256, 300]
    assert length_eval.bucket_edges(40) == [0, 40]


def test_position_losses_equal_each_document_alone():
    """Documents of 1 .. 12 scored positions, in padded batches of 3 (the last one filled with
    an uncounted row): the summed loss at each position equals that of every document run
    alone through the model, and the counts say how many documents reach each position."""
    cfg = MambaConfig(d_model=16, n_layer=2, vocab_size=23, scan_impl="reference")
    model = MambaLM(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 23, n + 1) for n in (12, 1, 5, 9, 7, 2, 12)]
    total, count = length_eval.position_losses(model, docs, 10, batch_size=3, progress=False)
    want_total, want_count = np.zeros(10), np.zeros(10)
    for doc in docs:
        doc = doc[:11]
        logits = model(doc[None, :-1])[0, :, :23]
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, doc[1:])
        want_total[: len(losses)] += np.asarray(losses)
        want_count[: len(losses)] += 1
    np.testing.assert_allclose(total, want_total, rtol=1e-5)
    np.testing.assert_array_equal(count, want_count)
    rows = length_eval.by_bucket(total, count, [0, 4, 10])
    assert [r["tokens"] for r in rows] == [int(want_count[:4].sum()), int(want_count[4:].sum())]
    np.testing.assert_allclose(rows[1]["loss"], want_total[4:].sum() / want_count[4:].sum())
    with pytest.raises(ValueError, match="max_len must be >= 1"):
        length_eval.position_losses(model, docs, 0)
    with pytest.raises(ValueError, match="no held-out documents"):
        length_eval.position_losses(model, [], 8)


@pytest.mark.slow
def test_cli_on_a_trained_run(tmp_path, capsys):
    run = tmp_path / "run"
    run_train(args(tmp_path, run, **{"train.steps": 2, "train.state_passing": True}))
    out_json, out_png = tmp_path / "length.json", tmp_path / "length.png"
    result = length_eval.main([str(run), "--max-len", "96", "--batch-size", "4",
                               "--json", str(out_json), "--plot", str(out_png)])  # fmt: skip
    printed = capsys.readouterr().out
    assert result["train_len"] == 32 and result["max_len"] == 96
    assert [(r["start"], r["end"]) for r in result["buckets"]] == [(0, 64), (64, 96)]
    assert all(r["tokens"] > 0 and np.isfinite(r["loss"]) for r in result["buckets"])
    assert "(beyond training length)" in printed
    assert json.loads(out_json.read_text())["buckets"] == result["buckets"]
    assert out_png.stat().st_size > 1000
