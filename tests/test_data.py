"""Data: corpus discovery and errors, packing, deterministic shuffling, process sharding, resume."""

import numpy as np
import pytest

from mamba_jax.tokenizer import ByteTokenizer
from mamba_jax.training import data
from mamba_jax.training.run_config import DataConfig


def write_files(tmp_path, texts):
    for i, text in enumerate(texts):
        (tmp_path / f"doc{i}.txt").write_text(text)
    return str(tmp_path)


def test_missing_and_empty_corpora_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="data.train_path.*matched no files"):
        data.load_corpus(DataConfig(train_path=str(tmp_path / "nope" / "*.txt")))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    (empty / "b.txt").write_text("")
    with pytest.raises(ValueError, match="corpus is empty"):
        data.load_corpus(DataConfig(train_path=str(empty)))
    with pytest.raises(ValueError, match="needs >= 2 files"):
        data.load_corpus(DataConfig(train_path=str(empty / "a.txt")))
    with pytest.raises(ValueError, match="model.vocab_size=100"):
        data.load_corpus(DataConfig(train_path=str(empty)), vocab_size=100)


def test_split_by_file_is_deterministic_and_disjoint():
    files = [f"f{i}" for i in range(40)]
    train, val = data.split_by_file(files, 0.1, seed=0)
    assert len(val) == 4 and not set(train) & set(val) and set(train) | set(val) == set(files)
    assert (train, val) == data.split_by_file(files, 0.1, seed=0)
    assert val != data.split_by_file(files, 0.1, seed=1)[1]


def test_text_files_pack_into_windows(tmp_path):
    texts = ["hello world\n", "import this\n", "é ünïcode ✓\n", "x = 1\n"]
    directory = write_files(tmp_path, texts)
    corpus = data.load_corpus(DataConfig(train_path=directory, val_fraction=0.25, seed=0))
    # Every document becomes its UTF-8 bytes followed by eos (256), in file order.
    stream = np.concatenate([corpus.train_tokens, corpus.val_tokens])
    assert sorted(stream.tolist()) == sorted(sum((list(t.encode()) + [256] for t in texts), []))
    assert corpus.train_tokens.dtype == np.uint16
    assert corpus.bytes_per_token == pytest.approx(
        (len(corpus.val_tokens) - 1) / len(corpus.val_tokens)
    )
    windows = data.TokenWindows(corpus.train_tokens, 5)
    for i in range(len(windows)):
        w = windows[i]
        np.testing.assert_array_equal(w["inputs"], corpus.train_tokens[5 * i : 5 * i + 5])
        np.testing.assert_array_equal(w["targets"], corpus.train_tokens[5 * i + 1 : 5 * i + 6])


def test_token_files_memmap_and_tail_split(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16) % 50000
    tokens.tofile(tmp_path / "train.bin")
    corpus = data.load_corpus(DataConfig(train_path=str(tmp_path / "train.bin"), val_fraction=0.1))
    assert isinstance(corpus.train_tokens, np.memmap) and corpus.bytes_per_token is None
    np.testing.assert_array_equal(corpus.train_tokens, tokens[:900])
    np.testing.assert_array_equal(corpus.val_tokens, tokens[900:])
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        data.load_corpus(DataConfig(train_path=str(tmp_path / "empty.bin")))


def test_uint32_token_files_and_separate_validation_file(tmp_path):
    tokens = (np.arange(600, dtype=np.uint32) * 1009) % 100_000  # ids above uint16's range
    tokens[:300].tofile(tmp_path / "train.bin")
    tokens[300:].tofile(tmp_path / "val.bin")
    config = DataConfig(
        train_path=str(tmp_path / "train.bin"),
        val_path=str(tmp_path / "val.bin"),
        token_dtype="uint32",
    )
    corpus = data.load_corpus(config)
    assert corpus.train_tokens.dtype == np.uint32 and int(corpus.train_tokens.max()) > 65535
    np.testing.assert_array_equal(corpus.val_tokens, tokens[300:])
    batch = next(iter(data.train_dataset(corpus.train_tokens, 10, 2, seed=0)))
    assert batch["inputs"].dtype == np.int32 and int(batch["inputs"].max()) > 65535
    # format=tokens reads any suffix as a token file
    (tmp_path / "train.tok").write_bytes(tokens[:300].tobytes())
    forced = data.load_corpus(
        DataConfig(train_path=str(tmp_path / "train.tok"), format="tokens", token_dtype="uint32")
    )
    np.testing.assert_array_equal(forced.train_tokens, tokens[:285])  # 5% tail held out


def test_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<|endoftext|>": 1, "def": 2, "return": 3, "x": 4, "y": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "docs").mkdir()
    directory = write_files(tmp_path / "docs", ["def x return y", "def y", "x x z"])
    config = DataConfig(
        train_path=directory, tokenizer=str(tmp_path / "tokenizer.json"), val_fraction=0.34, seed=0
    )
    corpus = data.load_corpus(config, vocab_size=8)
    assert corpus.tokenizer.vocab_size == 6 and corpus.tokenizer.eos_id == 1
    stream = sorted(np.concatenate([corpus.train_tokens, corpus.val_tokens]).tolist())
    assert stream == sorted([2, 4, 3, 5, 1, 2, 5, 1, 4, 4, 0, 1])  # "z" is unknown
    with pytest.raises(ValueError, match="model.vocab_size=4"):
        data.load_corpus(config, vocab_size=4)


def _batches(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_shuffle_is_deterministic_and_processes_split_the_global_batch():
    tokens = np.arange(4000, dtype=np.uint32) % 257
    one = _batches(iter(data.train_dataset(tokens, 8, 8, seed=3)), 6)
    again = _batches(iter(data.train_dataset(tokens, 8, 8, seed=3)), 6)
    other = _batches(iter(data.train_dataset(tokens, 8, 8, seed=4)), 6)
    for a, b in zip(one, again):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert any((a["inputs"] != b["inputs"]).any() for a, b in zip(one, other))
    # Not in corpus order: shuffled windows.
    starts = [int(r[0]) for b in one for r in b["inputs"]]
    assert starts != sorted(starts)
    # Two processes: each reads half of every global batch, disjoint, together the same rows.
    halves = [_batches(iter(data.train_dataset(tokens, 8, 8, 3, p, 2)), 6) for p in range(2)]
    for step, whole in enumerate(one):
        a, b = halves[0][step]["inputs"], halves[1][step]["inputs"]
        assert a.shape == b.shape == (4, 8)
        got = sorted(map(tuple, np.concatenate([a, b]).tolist()))
        assert got == sorted(map(tuple, whole["inputs"].tolist()))
    with pytest.raises(ValueError, match="multiple of the process count"):
        data.train_dataset(tokens, 8, 9, 0, 0, 2)
    with pytest.raises(ValueError, match="seq_len"):
        data.train_dataset(tokens[:5], 8, 8, 0)


def test_iterator_state_resumes_the_same_batches():
    tokens = np.arange(3000, dtype=np.uint32) % 257
    it = iter(data.train_dataset(tokens, 16, 4, seed=0))
    _batches(it, 3)
    state = it.get_state()
    expected = _batches(it, 4)  # runs across an epoch boundary: 187 windows / 4 per batch
    fresh = iter(data.train_dataset(tokens, 16, 4, seed=0))
    fresh.set_state(state)
    for a, b in zip(_batches(fresh, 4), expected):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_eval_batches_are_fixed_and_split_by_process():
    tokens = np.arange(500, dtype=np.uint32)
    full = data.eval_batches(tokens, 10, 4, 2)
    parts = [data.eval_batches(tokens, 10, 4, 2, p, 2) for p in range(2)]
    for b in range(2):
        joined = np.concatenate([parts[0][b]["inputs"], parts[1][b]["inputs"]])
        np.testing.assert_array_equal(joined, full[b]["inputs"])
    np.testing.assert_array_equal(full[1]["targets"][0], np.arange(41, 51))


def test_default_corpus_is_the_stdlib():
    files = data.stdlib_files()
    assert len(files) > 100 and all(f.endswith(".py") for f in files)
    assert ByteTokenizer().vocab_size == 257


def test_packed_windows_carry_segment_ids_that_start_at_each_eos():
    eos = 9
    tokens = np.asarray([1, 2, eos, 3, 4, 5, eos, 6, eos, eos, 7, 8, 1], np.uint16)
    windows = data.TokenWindows(tokens, 6, eos_id=eos)
    first, second = windows[0], windows[1]
    np.testing.assert_array_equal(first["inputs"], [1, 2, eos, 3, 4, 5])
    np.testing.assert_array_equal(first["segment_ids"], [0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(second["inputs"], [eos, 6, eos, eos, 7, 8])
    np.testing.assert_array_equal(second["segment_ids"], [1, 1, 2, 3, 3, 3])
    assert "segment_ids" not in data.TokenWindows(tokens, 6)[0]  # packing "none"
    batch = next(iter(data.train_dataset(tokens, 4, 2, seed=0, eos_id=eos)))
    assert batch["segment_ids"].shape == (2, 4) and batch["segment_ids"].dtype == np.int32
    val = data.eval_batches(tokens, 4, 2, 1, eos_id=eos)
    assert set(val[0]) == {"inputs", "targets", "segment_ids"}


def test_stream_windows_give_each_row_its_own_contiguous_lane():
    """State passing: row r of batch k is window k of lane r, so row r of batch k + 1 starts
    where row r of batch k ended; carry is 0 at a lane's first window and where a window opens
    with end-of-text, 1 elsewhere; two processes read the global batch's rows between them; the
    iterator resumes; a corpus too short for the lanes is refused."""
    eos, rows, length = 7, 4, 5
    tokens = (np.arange(203, dtype=np.uint32) % 50) + 10
    tokens[[26, 61, 100]] = eos  # lane 1's 2nd window (tokens 50 + 5 .. 55 + 5) starts at 55
    tokens[55] = eos
    lane = (len(tokens) - 1) // rows  # 50 tokens, 10 windows per lane
    it = iter(data.stream_dataset(tokens, length, rows, eos_id=eos))
    batches = _batches(it, 12)  # past the end of the lanes: they start over
    for k, batch in enumerate(batches):
        w = k % (lane // length)
        for r in range(rows):
            start = r * lane + w * length
            np.testing.assert_array_equal(batch["inputs"][r], tokens[start : start + length])
            np.testing.assert_array_equal(
                batch["targets"][r], tokens[start + 1 : start + length + 1]
            )
            want = float(w > 0 and tokens[start] != eos)
            assert set(batch["carry"][r].tolist()) == {want}, (k, r)
    assert batches[1]["carry"][1, 0] == 0.0  # lane 1's second window opens a new document
    assert batches[1]["carry"][0, 0] == 1.0 and batches[10]["carry"][0, 0] == 0.0
    np.testing.assert_array_equal(batches[5]["segment_ids"][2], [0, 0, 0, 0, 0])
    halves = [_batches(iter(data.stream_dataset(tokens, length, rows, p, 2, eos)), 3)
              for p in range(2)]  # fmt: skip
    for k in range(3):
        np.testing.assert_array_equal(halves[0][k]["inputs"], batches[k]["inputs"][0::2])
        np.testing.assert_array_equal(halves[1][k]["inputs"], batches[k]["inputs"][1::2])
    fresh = iter(data.stream_dataset(tokens, length, rows, eos_id=eos))
    _batches(fresh, 2)
    state = fresh.get_state()
    resumed = iter(data.stream_dataset(tokens, length, rows, eos_id=eos))
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["inputs"], batches[2]["inputs"])
    with pytest.raises(ValueError, match="lanes of 3 tokens, shorter than train.seq_len=5"):
        data.stream_dataset(tokens[:13], length, rows)
