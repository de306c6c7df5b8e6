"""`python -m mamba_jax.generate`: the fixture's transformers continuation, end to end."""

import os
import shutil
import sys
import types

import numpy as np
import pytest

from mamba_jax.cli import generate_main, load_model
from mamba_jax.convert import load_pretrained
from mamba_jax.tokenizer import load_tokenizer

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "mamba_tiny")
HF, ORIGINAL = os.path.join(FIXTURE, "hf"), os.path.join(FIXTURE, "original")


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(os.path.join(FIXTURE, "expected.npz")))


def test_greedy_continuation_matches_transformers(expected, capsys):
    prompt = str(expected["prompt"])
    tok = load_tokenizer(HF)
    assert tok.encode(prompt) == expected["prompt_ids"][0].tolist()
    text = generate_main(["--model", HF, "--prompt", prompt, "--max-new-tokens", "8"])
    assert text == tok.decode(expected["prompt_greedy"][0].tolist())
    out, err = capsys.readouterr()
    assert out.strip() == text
    assert "8 new tokens" in err and "tokens/s" in err and "compile" in err


def test_original_dir_with_explicit_tokenizer(expected):
    prompt, tok_file = str(expected["prompt"]), os.path.join(HF, "tokenizer.json")
    args = ["--model", ORIGINAL, "--prompt", prompt, "--max-new-tokens", "8"]
    text = generate_main(args + ["--tokenizer", tok_file])
    assert text == load_tokenizer(tok_file).decode(expected["prompt_greedy"][0].tolist())
    # Without tokenizer.json the default is bytes, whose ids overrun this 97-token vocab.
    with pytest.raises(SystemExit, match="wrong tokenizer"):
        generate_main(args)


def test_sampling_is_seeded(capsys):
    args = ["--model", HF, "--prompt", "the lazy dog", "--max-new-tokens", "12"]
    sample = args + ["--temperature", "1.0", "--top-p", "0.95"]
    a = generate_main(sample + ["--seed", "1"])
    b = generate_main(sample + ["--seed", "1"])
    c = generate_main(sample + ["--seed", "2"])
    assert a == b and a != c
    capsys.readouterr()


def test_training_dir_goes_through_restore_model(tmp_path, monkeypatch):
    (tmp_path / "100").mkdir()
    model = load_pretrained(HF)
    calls = []

    def restore_model(path):
        calls.append(path)
        return model, model.config

    def read_config(path):
        run = types.SimpleNamespace(data=types.SimpleNamespace(tokenizer="tok.json"))
        return run, 100

    fake = types.SimpleNamespace(restore_model=restore_model, read_config=read_config)
    monkeypatch.setitem(sys.modules, "mamba_jax.checkpoint", fake)
    monkeypatch.setattr("mamba_jax.checkpoint", fake, raising=False)
    got, tok = load_model(str(tmp_path))
    assert got is model and tok == "tok.json" and calls == [str(tmp_path)]


def test_unknown_dirs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="must be a directory"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="neither an HF/mamba_ssm checkpoint"):
        load_model(str(tmp_path))
    shutil.copy(os.path.join(HF, "config.json"), tmp_path)  # config.json but no weights
    with pytest.raises(ValueError, match="neither"):
        load_model(str(tmp_path))
