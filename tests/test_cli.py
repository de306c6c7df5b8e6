"""`python -m mamba_jax.generate`: the fixture's transformers continuation, end to end."""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba_jax import MambaLM, generate, load_model
from mamba_jax.generate import find_model_tokenizer, generate_main, main
from mamba_jax.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

cli = sys.modules["mamba_jax.generate"]  # the command-line module (see mamba_jax/__init__.py)

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
    # The continuation stops at the tokenizer's end-of-text token unless --ignore-eos.
    greedy = expected["prompt_greedy"][0].tolist()
    tok.eos_id = greedy[3]
    cli_load = cli.load_tokenizer
    try:
        cli.load_tokenizer = lambda path: tok
        args = ["--model", HF, "--prompt", prompt, "--max-new-tokens", "8"]
        assert generate_main(args) == tok.decode(greedy[:3])
        assert "shown up to end-of-text (3)" in capsys.readouterr().err
        assert generate_main(args + ["--ignore-eos"]) == text
    finally:
        cli.load_tokenizer = cli_load


def test_original_dir_with_explicit_tokenizer(expected):
    prompt, tok_file = str(expected["prompt"]), os.path.join(HF, "tokenizer.json")
    args = ["--model", ORIGINAL, "--prompt", prompt, "--max-new-tokens", "8"]
    text = generate_main(args + ["--tokenizer", tok_file])
    assert text == load_tokenizer(tok_file).decode(expected["prompt_greedy"][0].tolist())
    # Without tokenizer.json the default is bytes, whose ids overrun this 97-token vocab.
    with pytest.raises(ValueError, match="token id 120 >= the model's vocab_size 97"):
        generate_main(args)


def test_sampling_is_seeded(capsys):
    args = ["--model", HF, "--prompt", "the lazy dog", "--max-new-tokens", "12"]
    sample = args + ["--temperature", "1.0", "--top-p", "0.95"]
    a = generate_main(sample + ["--seed", "1"])
    b = generate_main(sample + ["--seed", "1"])
    c = generate_main(sample + ["--seed", "2"])
    assert a == b and a != c
    capsys.readouterr()


def test_training_checkpoint_dir(tmp_path, capsys):
    """A real train.py-style Orbax checkpoint: the run's config names the tokenizer."""
    from mamba_jax.config import MambaConfig
    from mamba_jax.training.checkpoint import Checkpointer
    from mamba_jax.training.run_config import CheckpointConfig, Config, DataConfig
    from mamba_jax.training.trainer import pure

    model_cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=97, scan_impl="reference")
    tok_file = os.path.join(HF, "tokenizer.json")
    params = pure(nnx.state(MambaLM(model_cfg, rngs=nnx.Rngs(7)), nnx.Param))
    # train.py's items; restoring a model reads only the params and the run's config.
    state = {
        "params": params,
        "opt_state": {"count": jnp.zeros((), jnp.int32)},
        "step": jnp.asarray(5, jnp.int32),
        "rng": jax.random.key_data(jax.random.key(0)),
    }
    run = Config(model=model_cfg, data=DataConfig(tokenizer=tok_file))
    ckpt = Checkpointer(CheckpointConfig(dir=str(tmp_path / "run")), with_data=False)
    ckpt.save(5, state, config=run, force=True)
    ckpt.close()

    model = load_model(str(tmp_path / "run"))
    assert find_model_tokenizer(str(tmp_path / "run")) == tok_file  # the run's data.tokenizer
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, value in jax.tree_util.tree_leaves_with_path(state["params"]):
        key = tuple(k.key for k in path)
        np.testing.assert_array_equal(np.asarray(params[key].get_value()), np.asarray(value))
    tok = load_tokenizer(tok_file)
    ids = tok.encode("the lazy dog")
    want = np.asarray(generate(model, jnp.asarray([ids]), 6))[0, len(ids) :].tolist()
    args = ["--prompt", "the lazy dog", "--max-new-tokens", "6"]
    assert generate_main(["--model", str(tmp_path / "run"), *args]) == tok.decode(want)
    # One step folder of the run, cast to bf16 on the way (A_log and D stay fp32).
    model = load_model(str(tmp_path / "run" / "5"), dtype="bfloat16")
    assert find_model_tokenizer(str(tmp_path / "run" / "5")) == tok_file
    assert model.layers.mixer.in_proj.kernel.get_value().dtype == jnp.bfloat16
    assert model.layers.mixer.A_log.get_value().dtype == jnp.float32
    capsys.readouterr()
    # A run whose tokenizer file is not on this machine says so.
    gone = Config(model=model_cfg, data=DataConfig(tokenizer=str(tmp_path / "gone.json")))
    ckpt = Checkpointer(CheckpointConfig(dir=str(tmp_path / "other")), with_data=False)
    ckpt.save(1, state, config=gone, force=True)
    ckpt.close()
    with pytest.raises(ValueError, match="gone.json', which does not exist here; pass --tokenizer"):
        find_model_tokenizer(str(tmp_path / "other"))


def test_tokenizer_choice(tmp_path):
    assert isinstance(load_tokenizer(HF), HFTokenizer)  # the model dir's tokenizer.json
    assert isinstance(load_tokenizer(ORIGINAL), ByteTokenizer)  # none there: bytes
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "tokenizer.json").write_text("{not a tokenizer")
    with pytest.raises(ValueError, match="tokenizer.json is not a readable tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_unknown_dirs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="path must be a model directory"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="neither an HF/mamba_ssm checkpoint"):
        load_model(str(tmp_path))
    shutil.copy(os.path.join(HF, "config.json"), tmp_path)  # config.json but no weights
    with pytest.raises(ValueError, match="neither"):
        load_model(str(tmp_path))


def test_command_line_errors_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match="^error: --model must be a directory"):
        main(["--model", str(tmp_path / "missing"), "--prompt", "x"])
    with pytest.raises(SystemExit, match="^error: --max-new-tokens must be >= 1, got 0"):
        main(["--model", HF, "--prompt", "x", "--max-new-tokens", "0"])
    # The module entry point itself: exit status 1 and the message, no traceback.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mamba_jax.generate",
            "--model",
            str(tmp_path / "x"),
            "--prompt",
            "hi",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr  # nor runpy's note on the module name
    assert "error: --model must be a directory" in proc.stderr


def test_the_package_attribute_generate_stays_the_function():
    import mamba_jax
    from mamba_jax import sampling

    assert mamba_jax.generate is sampling.generate is generate
    assert callable(cli.main) and cli is not mamba_jax.generate
