"""The README and docs/ as a newcomer follows them, line by line.

Every shell command in a fenced bash block (and every `python ...` / `make ...` in inline code)
parses, and the files, modules, make targets, flags and config keys it names exist. Bare `python`
appears only after the page has said to activate .venv. Every relative link resolves, with its
#anchor. Every path or dotted module name written in inline code exists. The README's Python
blocks, and those of docs/, run top to bottom (on a tiny training run standing in for runs/tiny).
"""

import ast
import dataclasses
import functools
import glob
import importlib
import importlib.util
import os
import re
import shlex

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba_jax import MambaConfig, MambaLM, generate
from mamba_jax.training.run_config import Config
from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ACTIVATE = "source .venv/bin/activate"
# Paths a page may name that a fresh clone does not hold: what training and `make venv` create,
# and placeholders for the user's own files.
NOT_IN_CLONE = ("runs/", ".venv", "path/to/", "corpus/", "exported/", "state-spaces/")
SEPARATORS = {"&&", "||", ";", "|", "&"}
PATH_SUFFIXES = (".py", ".md", ".yaml", ".ipynb", ".json", ".sh", ".log", ".npz", ".toml")


def _page_id(path):
    return str(path.relative_to(ROOT))


def _read(path) -> str:
    return path.read_text()


def fenced_blocks(text: str):
    """(language, body, offset of the block in the text) for every ``` block."""
    for m in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```", text, re.M | re.S):
        yield m.group(1), m.group(2), m.start()


def prose(text: str) -> str:
    """The text without its fenced blocks."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def shell_commands(body: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, a quoted string may span lines,
    comment lines dropped."""
    commands, pending = [], ""
    for line in body.splitlines():
        pending = f"{pending}\n{line}" if pending else line
        if pending.rstrip().endswith("\\"):
            pending = pending.rstrip()[:-1]
            continue
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        if pending.strip() and not pending.lstrip().startswith("#"):
            commands.append(pending)
        pending = ""
    assert not pending, f"unterminated command: {pending!r}"
    return commands


def simple_commands(command: str) -> list[list[str]]:
    """`a && b | c` -> [[a...], [b...], [c...]], each without leading VAR=value assignments and
    without redirections."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    out, current, skip_next = [], [], False
    for token in lexer:
        if skip_next:
            skip_next = False
            continue
        if token in SEPARATORS:
            out.append(current)
            current = []
        elif token in (">", ">>", "<", "2>"):
            skip_next = True
        else:
            current.append(token)
    out.append(current)
    cleaned = []
    for argv in out:
        while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):
            argv = argv[1:]
        if argv:
            cleaned.append(argv)
    return cleaned


@functools.cache
def make_targets() -> tuple[set, str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:", text, re.M)), text


@functools.cache
def script_flags(path: str) -> frozenset:
    """The --flags a script declares with argparse's add_argument."""
    tree = ast.parse(open(path).read())
    flags = {"--help", "-h"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    flags.add(arg.value)
    return frozenset(flags)


def config_keys() -> set[str]:
    return {
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(Config)
        for f in dataclasses.fields(section.default_factory)
    }


def check_path(token: str, cwd, where: str):
    """A token that looks like a repository path must exist (relative to cwd)."""
    if token.startswith(("/", "~", "-", "$")) or "=" in token or "://" in token:
        return
    if token.startswith(NOT_IN_CLONE) or "*" in token:
        return
    if "/" in token or token.endswith(PATH_SUFFIXES):
        assert os.path.exists(os.path.join(cwd, token)), f"{where}: {token!r} does not exist"


def check_python(argv: list[str], cwd, where: str):
    """python [-m module | script.py] args: the module or script exists, its flags exist, and
    train.py's overrides name real config keys."""
    if len(argv) < 2 or argv[1] == "-c":
        return
    if argv[1] == "-m":
        module, args = argv[2], argv[3:]
        spec = importlib.util.find_spec(module)
        assert spec is not None, f"{where}: no module {module!r}"
        origin = spec.origin or ""
        if not origin.startswith(str(ROOT)) or origin.startswith(str(ROOT / ".venv")):
            return  # pytest, pip: only that they exist
        script = origin
    else:
        script, args = os.path.join(cwd, argv[1]), argv[2:]
        assert os.path.isfile(script), f"{where}: no script {argv[1]!r}"
    flags = script_flags(script)
    out_value = False
    for arg in args:
        if out_value:
            out_value = False
            continue
        if arg.startswith("-"):
            name = arg.split("=", 1)[0]
            assert name in flags, f"{where}: {os.path.basename(script)} has no flag {name}"
            out_value = name == "--out"
            continue
        if os.path.basename(script) == "train.py" and re.match(r"^\w+\.\w+=", arg):
            key = arg.split("=", 1)[0]
            assert key in config_keys(), f"{where}: train.py has no config key {key!r}"
            continue
        check_path(arg, cwd, where)


def check_command(command: str, where: str):
    cwd = ROOT
    for argv in simple_commands(command):
        name = os.path.basename(argv[0])
        if argv[0] == "cd":
            cwd = cwd / argv[1]
            assert cwd.is_dir(), f"{where}: cd {argv[1]}: no such directory"
        elif argv[0] == "make":
            targets, text = make_targets()
            for arg in argv[1:]:
                if "=" in arg:
                    var = arg.split("=", 1)[0]
                    assert f"$({var})" in text, f"{where}: the Makefile does not read {var}"
                else:
                    assert arg in targets, f"{where}: no make target {arg!r}"
        elif argv[0] == "srun":
            check_command(shlex.join(argv[1:]), where)
        elif name.startswith("python"):
            check_python(argv, cwd, where)
        elif argv[0] == "source":
            assert argv[1] == ".venv/bin/activate", f"{where}: source {argv[1]}"
        else:
            for arg in argv[1:]:
                if arg.startswith("--command="):  # gcloud ... --command='cd x && python ...'
                    inner = arg.split("=", 1)[1].replace("cd mamba-jax && ", "")
                    check_command(inner, where)
                else:
                    check_path(arg, cwd, where)


def page_commands(path):
    """(offset, command) for every bash command of a page, and inline `python ...`/`make ...`."""
    text = _read(path)
    found = []
    for lang, body, offset in fenced_blocks(text):
        if lang in ("bash", "sh", "shell"):
            found += [(offset, c) for c in shell_commands(body)]
    for m in re.finditer(r"`((?:python|make|\.venv/bin/python) [^`]+)`", text):
        found.append((m.start(), m.group(1)))
    return sorted(found)


@pytest.mark.parametrize("path", PAGES, ids=_page_id)
def test_shell_commands_parse_and_name_what_exists(path):
    commands = page_commands(path)
    if path.name == "README.md":
        assert any("make train" in c for _, c in commands)
    for _, command in commands:
        check_command(command, f"{_page_id(path)}: {command.strip()[:80]!r}")


@pytest.mark.parametrize("path", PAGES, ids=_page_id)
def test_bare_python_only_after_the_page_says_to_activate_the_venv(path):
    text = _read(path)
    activate = text.find(ACTIVATE)
    for offset, command in page_commands(path):
        for argv in simple_commands(command):
            if argv[0] in ("python", "python3", "pip"):
                assert 0 <= activate < offset, (
                    f"{_page_id(path)}: {command.strip()[:60]!r} runs a bare {argv[0]} before "
                    f"the page says `{ACTIVATE}`"
                )


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@pytest.mark.parametrize("path", PAGES, ids=_page_id)
def test_links_resolve(path):
    text = prose(_read(path))
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        assert resolved.exists(), f"{_page_id(path)}: link {target!r} leads nowhere"
        if anchor and resolved.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", prose(resolved.read_text()), re.M)
            assert anchor in {_slug(h) for h in headings}, f"{_page_id(path)}: no #{anchor}"


def _resolve_dotted(name: str) -> bool:
    """mamba_jax.a.b.attr: the longest importable module prefix, then attributes."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("path", PAGES, ids=_page_id)
def test_inline_names_exist(path):
    for span in re.findall(r"`([^`\n]+)`", prose(_read(path))):
        where = f"{_page_id(path)}: `{span}`"
        if re.fullmatch(r"(mamba_jax|pallas_kernels)(\.\w+)+", span):
            assert _resolve_dotted(span), f"{where} does not exist"
        elif any(c in span for c in " <=") or span.startswith(NOT_IN_CLONE):
            continue
        elif "::" in span:
            file, test = span.split("::", 1)
            assert test in (ROOT / file).read_text(), f"{where} does not exist"
        elif "*" in span and "/" in span:
            assert glob.glob(str(ROOT / span)), f"{where} matches no file"
        elif re.fullmatch(r"[\w.\-]+(/[\w.\-]+)+/?", span) or span.endswith(PATH_SUFFIXES):
            if "/" not in span and not (ROOT / span).exists():
                continue  # a bare file name is described in its folder's context
            assert (ROOT / span).exists(), f"{where} does not exist"


# ----------------------------------------------------------------------------------------------
# The Python blocks, run.


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A train.py-style run directory (one checkpoint of a small byte-level model)."""
    import jax

    from mamba_jax import sharding as shd
    from mamba_jax.training import trainer
    from mamba_jax.training.checkpoint import Checkpointer
    from mamba_jax.training.run_config import load_config

    directory = tmp_path_factory.mktemp("runs") / "tiny"
    config = load_config(
        str(ROOT / "configs" / "tiny.yaml"),
        ["model.d_model=32", "model.n_layer=1", f"checkpoint.dir={directory}"],
    )
    mesh = shd.make_mesh(config.mesh, jax.devices()[:1])
    tx = trainer.make_optimizer(config.train)
    _, state, _ = trainer.init_state(config.model, tx, mesh, seed=0)
    ckpt = Checkpointer(config.checkpoint, with_data=False)
    for step in (100, 200):  # the step folders `make train` leaves
        ckpt.save(step, state, config=config, force=True)
    ckpt.close()
    return directory


@pytest.mark.slow  # half a minute of eager calls and compiles on 2 idle cores
@pytest.mark.parametrize("path", [p for p in PAGES if "```python" in _read(p)], ids=_page_id)
def test_python_blocks_run(path, tiny_run, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    namespace = {}
    for lang, body, _ in fenced_blocks(_read(path)):
        if lang != "python":
            continue
        code = body.replace('"/tmp/', f'"{tmp_path}/').replace('"runs/tiny', f'"{tiny_run}')
        exec(compile(code, f"{_page_id(path)} block", "exec"), namespace)


def test_the_readme_promise_on_out_of_vocabulary_ids():
    """Eager calls and generate's prompt raise, naming the id and the vocabulary; inside jit
    nothing is checked and an id past the padded table gives NaN logits."""
    readme = _read(ROOT / "README.md")
    assert "ValueError" in readme and "inside `jax.jit`" in readme.lower()
    model = MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=100), rngs=nnx.Rngs(0))
    for bad in (150, -1, 100):
        match = rf"token id {bad}\b.*\[0, 100\)"
        with pytest.raises(ValueError, match=match):
            model(jnp.array([[1, bad]], jnp.int32))
        with pytest.raises(ValueError, match=match):
            model.step(jnp.array([bad], jnp.int32), model.init_cache(1))
        with pytest.raises(ValueError, match=match):
            generate(model, np.array([[bad, 2]], np.int32), 2)
    # Two rows: a NaN embedding poisons the scan's state for the rest of its own row.
    logits = nnx.jit(lambda m, ids: m(ids))(model, jnp.array([[150, 1], [-1, 1]], jnp.int32))
    assert np.isnan(np.asarray(logits[0])).all() and np.isfinite(np.asarray(logits[1])).all()


@pytest.mark.parametrize(
    "command, complaint",
    [
        ("python train.py --config configs/nope.yaml", "does not exist"),
        ("python train.py --config configs/tiny.yaml train.stpes=3", "no config key"),
        ("python -m mamba_jax.generate --model runs/x --max-tokens 3", "no flag --max-tokens"),
        ("python -m mamba_jax.training.eval_tasks_gone --task x", "no module"),
        ("make test-slow", "no make target"),
        ("cd notebooks && jupyter execute 09_missing.ipynb", "does not exist"),
    ],
)
def test_the_command_check_catches_stale_commands(command, complaint):
    with pytest.raises(AssertionError, match=complaint):
        check_command(command, "a stale page")
