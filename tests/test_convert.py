"""Checkpoint conversion against a tiny transformers MambaForCausalLM (tests/fixtures/mamba_tiny).

The fixture's logits and greedy tokens come from transformers' CPU path (make_hf_fixture.py);
these tests need neither torch nor transformers, except the last, which is skipped without them.
"""

import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from mamba_jax import MambaConfig, MambaLM, convert, generate, load_pretrained, save_pretrained
from mamba_jax.convert import config_from_hf_dict
from mamba_jax.model import with_config
from mamba_jax.torch_bin import read_torch_bin

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "mamba_tiny")
HF, ORIGINAL = os.path.join(FIXTURE, "hf"), os.path.join(FIXTURE, "original")
VOCAB = 97


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(os.path.join(FIXTURE, "expected.npz")))


@pytest.fixture(scope="module")
def hf_model():
    return load_pretrained(HF)


def _params(model):
    return {
        ".".join(map(str, p)): np.asarray(v.get_value())
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def _assert_logits(actual, expected):
    """Within 1e-5 of the fixture, relative to its largest logit (fp32 sums reorder)."""
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("fmt", ["hf", "original"])
def test_logits_and_greedy_tokens_match_transformers(fmt, expected):
    model = load_pretrained(os.path.join(FIXTURE, fmt))
    assert model.config.vocab_size == VOCAB and model.config.padded_vocab_size == 104
    logits = np.asarray(model(jnp.asarray(expected["input_ids"])))
    _assert_logits(logits[..., :VOCAB], expected["logits"])
    tokens = generate(model, jnp.asarray(expected["input_ids"]), 16)  # prefill + cached steps
    np.testing.assert_array_equal(np.asarray(tokens[:, 11:]), expected["greedy"])


def test_padding_rows_hf_zero_original_kept(hf_model):
    emb_hf = np.asarray(hf_model.embedding.embedding.get_value())
    assert emb_hf.shape == (104, 48) and not emb_hf[VOCAB:].any()
    stored = read_torch_bin(os.path.join(ORIGINAL, "pytorch_model.bin"))
    orig = load_pretrained(ORIGINAL)
    emb_orig = np.asarray(orig.embedding.embedding.get_value())
    np.testing.assert_array_equal(emb_orig, stored["backbone.embedding.weight"])
    np.testing.assert_array_equal(emb_orig[:VOCAB], emb_hf[:VOCAB])
    a, b = _params(hf_model), _params(orig)
    assert a.keys() == b.keys()
    for k in a:
        if k != "embedding.embedding":
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_original_format_in_safetensors(tmp_path):
    """mamba_ssm's keys and config stored as safetensors (lm_head tied, pad rows kept)."""
    stored = read_torch_bin(os.path.join(ORIGINAL, "pytorch_model.bin"))
    save_file(stored, tmp_path / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(f"{ORIGINAL}/config.json", tmp_path)
    a, b = _params(load_pretrained(ORIGINAL)), _params(load_pretrained(tmp_path))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_layouts_follow_pytorch(hf_model):
    sd = load_file(os.path.join(HF, "model.safetensors"))
    p = _params(hf_model)
    w = sd["backbone.layers.1.mixer.conv1d.weight"]  # (e, 1, w)
    np.testing.assert_array_equal(p["layers.mixer.conv1d.kernel"][1], w[:, 0, :].T)
    x = sd["backbone.layers.0.mixer.x_proj.weight"]  # (r + 2n, e)
    np.testing.assert_array_equal(p["layers.mixer.x_proj.kernel"][0], x.T)
    assert p["layers.mixer.x_proj.kernel"].shape == (2, 96, 3 + 32)


def test_save_matches_fixture_and_round_trips_bitwise(hf_model, tmp_path):
    save_pretrained(hf_model, tmp_path)
    ours, theirs = load_file(tmp_path / "model.safetensors"), load_file(f"{HF}/model.safetensors")
    assert ours.keys() == theirs.keys() and "lm_head.weight" not in ours
    for k in ours:
        assert ours[k].shape == theirs[k].shape and ours[k].dtype == theirs[k].dtype, k
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    cfg, ref = (
        json.loads((tmp_path / "config.json").read_text()),
        json.load(open(f"{HF}/config.json")),
    )
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "vocab_size",
        "state_size",
        "conv_kernel",
        "expand",
        "intermediate_size",
        "time_step_rank",
        "layer_norm_epsilon",
        "use_bias",
        "use_conv_bias",
        "tie_word_embeddings",
        "model_type",
        "rescale_prenorm_residual",
    ):
        assert cfg[key] == ref[key], key
    again = load_pretrained(tmp_path)
    a, b = _params(hf_model), _params(again)
    for k in a:
        assert a[k].dtype == b[k].dtype
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def random_model():
    cfg = MambaConfig(
        d_model=24, n_layer=3, vocab_size=37, d_state=5, expand=3, bias=True, conv_bias=False
    )
    return MambaLM(cfg, rngs=nnx.Rngs(3))


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_random_model_round_trips(param_dtype, random_model, tmp_path):
    model = with_config(random_model, dtype=param_dtype, param_dtype=param_dtype)
    if param_dtype == "bfloat16":  # the cast keeps the SSM's sensitive parameters in fp32
        assert model.layers.mixer.in_proj.bias.get_value().dtype == jnp.bfloat16
        assert model.layers.mixer.dt_proj.bias.get_value().dtype == jnp.float32
        assert model.config.dtype == "bfloat16"
    save_pretrained(model, tmp_path)
    again = load_pretrained(tmp_path)
    assert again.config.d_inner == 72 and again.config.dt_rank == 2
    a, b = _params(model), _params(again)
    assert a.keys() == b.keys() and "layers.mixer.in_proj.bias" in a
    for k in a:
        rows = slice(0, 37) if k == "embedding.embedding" else slice(None)  # pad rows not saved
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k][rows], b[k][rows], err_msg=k)
    ids = jax.random.randint(jax.random.key(0), (2, 7), 0, 37)
    np.testing.assert_array_equal(
        np.asarray(model(ids))[..., :37], np.asarray(again(ids))[..., :37]
    )


def test_dtype_argument(expected):
    model = load_pretrained(HF, dtype=jnp.bfloat16)
    p = _params(model)
    assert p["layers.mixer.in_proj.kernel"].dtype == jnp.bfloat16
    for k in ("layers.mixer.A_log", "layers.mixer.D", "layers.mixer.dt_proj.bias"):
        assert p[k].dtype == np.float32, k  # the SSM's sensitive parameters stay fp32
    logits = np.asarray(model(jnp.asarray(expected["input_ids"])))[..., :VOCAB]
    scale = np.abs(expected["logits"]).max()
    np.testing.assert_allclose(logits, expected["logits"], rtol=0.1, atol=0.05 * scale)
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_pretrained(HF, dtype="int8")


def test_sharded_safetensors_with_index(hf_model, tmp_path):
    sd = load_file(f"{HF}/model.safetensors")
    keys = sorted(sd)
    shards = {
        "model-00001-of-00002.safetensors": keys[::2],
        "model-00002-of-00002.safetensors": keys[1::2],
    }
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, tmp_path / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in ks})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(f"{HF}/config.json", tmp_path)
    a, b = _params(hf_model), _params(load_pretrained(tmp_path))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_sharded_bin_with_index(hf_model, tmp_path):
    shard = "pytorch_model-00001-of-00001.bin"
    shutil.copy(f"{ORIGINAL}/pytorch_model.bin", tmp_path / shard)
    shutil.copy(f"{ORIGINAL}/config.json", tmp_path)
    keys = read_torch_bin(str(tmp_path / shard))
    index = {"weight_map": {k: shard for k in keys}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    a, b = _params(hf_model), _params(load_pretrained(tmp_path))
    for k in a:
        if k != "embedding.embedding":  # the original format keeps its random pad rows
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    index["weight_map"]["backbone.norm_f.weight"] = "pytorch_model-00002-of-00002.bin"
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="names the shard 'pytorch_model-00002-of-00002.bin'"):
        load_pretrained(tmp_path)


def test_mesh_load_places_shards(hf_model, expected, monkeypatch):
    auto = (jax.sharding.AxisType.Auto,) * 3
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=auto)
    reads = []
    original_read = convert._Reader.read

    def recording_read(self, key, index=None):
        out = original_read(self, key, index)
        reads.append((key, out.shape))
        return out

    monkeypatch.setattr(convert._Reader, "read", recording_read)
    model = load_pretrained(HF, mesh=mesh)
    kernel = model.layers.mixer.in_proj.kernel.get_value()  # (layers, d, 2e)
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (2, 24, 96)
    assert {s.device for s in kernel.addressable_shards} == set(mesh.devices.flat)
    # The file is read one device shard at a time: each read of the (2e, d) = (192, 48) PyTorch
    # tensor is one (96, 24) block, never the whole tensor.
    in_proj = [shape for key, shape in reads if key.endswith("mixer.in_proj.weight")]
    assert in_proj and set(in_proj) == {(96, 24)}
    emb = [shape for key, shape in reads if key == "backbone.embeddings.weight"]
    assert emb and all(rows * cols < 97 * 48 for rows, cols in emb)
    a, b = _params(hf_model), _params(model)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    logits = np.asarray(model(jnp.asarray(expected["input_ids"])))
    _assert_logits(logits[..., :VOCAB], expected["logits"])
    with pytest.raises(ValueError, match="mesh must have the axes"):
        load_pretrained(HF, mesh=jax.make_mesh((8,), ("x",)))


# ----------------------------------------------------------------------------- untrusted input

_EXECUTED = []


def _side_effect():
    _EXECUTED.append(True)
    return {}


class _Evil:
    def __reduce__(self):
        return (_side_effect, ())


def _torch_zip(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")  # what torch.load looks for before unpickling
        z.writestr("archive/.format_version", "1")


def _torch_available():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize(
    "use_torch",
    [
        False,
        pytest.param(True, marks=pytest.mark.skipif(not _torch_available(), reason="no torch")),
    ],
)
def test_bin_with_code_is_refused_unexecuted(use_torch, tmp_path):
    _torch_zip(tmp_path / "pytorch_model.bin", pickle.dumps(_Evil(), protocol=2))
    with pytest.raises(ValueError, match="safetensors"):
        read_torch_bin(str(tmp_path / "pytorch_model.bin"), use_torch=use_torch)
    (tmp_path / "legacy.bin").write_bytes(pickle.dumps({"w": _Evil()}))  # not a zip archive
    with pytest.raises(ValueError, match="safetensors|readable"):
        read_torch_bin(str(tmp_path / "legacy.bin"), use_torch=use_torch)
    assert not _EXECUTED
    shutil.copy(f"{ORIGINAL}/config.json", tmp_path)
    with pytest.raises(ValueError, match="refused"):
        load_pretrained(tmp_path)
    assert not _EXECUTED


def test_bin_reader_rejects_out_of_bounds_views(tmp_path):
    src = zipfile.ZipFile(f"{ORIGINAL}/pytorch_model.bin")
    data = src.read("pytorch_model/data.pkl")
    # The embedding is (104, 48) in storage 0; claim (105, 48) so the view overruns the storage.
    bad = data.replace(b"K\x00KhK0\x86", b"K\x00KiK0\x86", 1)
    assert bad != data
    with zipfile.ZipFile(tmp_path / "pytorch_model.bin", "w") as z:
        for name in src.namelist():
            z.writestr(name, bad if name.endswith("data.pkl") else src.read(name))
    with pytest.raises(ValueError, match="out of bounds"):
        read_torch_bin(str(tmp_path / "pytorch_model.bin"), use_torch=False)


def _edited_hf_dir(tmp_path, edit=None, config=None):
    sd = load_file(f"{HF}/model.safetensors")
    if edit:
        edit(sd)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    cfg = json.load(open(f"{HF}/config.json"))
    cfg.update(config or {})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize(
    "edit, config, match",
    [
        (
            lambda sd: sd.pop("backbone.layers.1.mixer.A_log"),
            None,
            "missing the key 'backbone.layers.1.mixer.A_log'",
        ),
        (
            lambda sd: sd.update({"backbone.layers.0.mixer.D": np.ones(5, np.float32)}),
            None,
            r"'backbone.layers.0.mixer.D' must have shape \(96,\), got \(5,\)",
        ),
        (
            lambda sd: sd.update({"backbone.layers.0.mixer.dt_bias": np.ones(96, np.float32)}),
            None,
            "does not use.*dt_bias",
        ),
        (
            lambda sd: sd.update({"lm_head.weight": sd["backbone.embeddings.weight"] + 1}),
            None,
            "only tied heads",
        ),
        (
            lambda sd: sd.update({"backbone.embeddings.weight": np.zeros((50, 48), np.float32)}),
            None,
            "embeddings.weight' must have shape",
        ),
        (
            lambda sd: sd.update({"backbone.norm_f.weight": np.ones(48, np.int32)}),
            None,
            "must be a float tensor",
        ),
        (None, {"state_size": 8}, "must have shape"),
        (None, {"model_type": "mamba2"}, "model_type must be 'mamba'"),
        (None, {"hidden_act": "gelu"}, "hidden_act"),
        (None, {"intermediate_size": 100}, "intermediate_size=100"),
    ],
)
def test_malformed_hf_dirs_raise_clear_errors(tmp_path, edit, config, match):
    with pytest.raises(ValueError, match=match):
        load_pretrained(_edited_hf_dir(tmp_path, edit, config))


def test_malformed_files_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="must be a checkpoint directory"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="has no config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"n_embd": 4}))
    with pytest.raises(ValueError, match="neither an HF Mamba config"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 48, "vocab_size": 97}))
    with pytest.raises(ValueError, match="missing the field 'n_layer'"):
        load_pretrained(tmp_path)
    shutil.copy(f"{HF}/config.json", tmp_path)
    with pytest.raises(ValueError, match="holds no weights: expected one of model.safetensors"):
        load_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage")
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors"):
        load_pretrained(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    index = {"weight_map": {"backbone.norm_f.weight": "../../etc/passwd"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="must be a plain file name"):
        load_pretrained(tmp_path)


def test_config_of_the_released_hf_checkpoints():
    # The fields of state-spaces/mamba-130m-hf's config.json (it carries both naming schemes).
    raw = {
        "architectures": ["MambaForCausalLM"],
        "model_type": "mamba",
        "d_model": 768,
        "hidden_size": 768,
        "n_layer": 24,
        "num_hidden_layers": 24,
        "d_inner": 1536,
        "intermediate_size": 1536,
        "expand": 2,
        "conv_kernel": 4,
        "state_size": 16,
        "time_step_rank": 48,
        "layer_norm_epsilon": 1e-05,
        "use_bias": False,
        "use_conv_bias": True,
        "vocab_size": 50280,
        "pad_vocab_size_multiple": 8,
        "ssm_cfg": {},
        "rms_norm": True,
        "fused_add_norm": True,
        "residual_in_fp32": True,
        "torch_dtype": "float32",
        "hidden_act": "silu",
        "time_step_floor": 0.0001,
    }
    cfg, fmt = config_from_hf_dict(raw)
    assert fmt == "hf" and (cfg.d_model, cfg.n_layer, cfg.vocab_size) == (768, 24, 50280)
    assert cfg.dt_rank == 48 and cfg.d_inner == 1536 and cfg.padded_vocab_size == 50280


def test_original_config_fields():
    cfg, fmt = config_from_hf_dict(
        {"d_model": 64, "n_layer": 3, "vocab_size": 50277, "ssm_cfg": {"d_state": 8, "expand": 3}}
    )
    assert fmt == "original" and cfg.d_state == 8 and cfg.d_inner == 192
    assert cfg.padded_vocab_size == 50280
    with pytest.raises(ValueError, match="only Mamba1"):
        config_from_hf_dict(
            {"d_model": 64, "n_layer": 3, "vocab_size": 9, "ssm_cfg": {"layer": "Mamba2"}}
        )
    with pytest.raises(ValueError, match="hybrid"):
        config_from_hf_dict({"d_model": 64, "n_layer": 3, "vocab_size": 9, "attn_layer_idx": [1]})


# ----------------------------------------------------------------------------- transformers


def _torch_python():
    """An interpreter with torch + transformers: this one, or $MAMBA_JAX_TORCH_PYTHON."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401

        return sys.executable, None
    except ImportError as err:
        other = os.environ.get("MAMBA_JAX_TORCH_PYTHON")
        if other:
            return other, None
        return None, (
            f"torch/transformers not importable ({err}) and MAMBA_JAX_TORCH_PYTHON is unset; "
            "tests/fixtures/check_export_with_transformers.py runs this check under another Python"
        )


def test_transformers_loads_the_export(tmp_path):
    """transformers' MambaForCausalLM.from_pretrained on our exports: same logits and greedy
    tokens (fp32 within 1e-5 of the largest logit). Runs where torch + transformers import here
    or in $MAMBA_JAX_TORCH_PYTHON (they are not project dependencies); skipped otherwise."""
    python, reason = _torch_python()
    if python is None:
        pytest.skip(reason)
    script = os.path.join(
        os.path.dirname(__file__), "fixtures", "check_export_with_transformers.py"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, script, "export", str(tmp_path)], check=True, timeout=600)
    proc = subprocess.run(
        [python, script, "check", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0 and "PASS" in proc.stdout, proc.stdout + proc.stderr[-2000:]
