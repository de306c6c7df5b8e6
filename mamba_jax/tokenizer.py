"""Tokenizers: a byte-level default that needs no download, and `tokenizer.json` files.

Both expose `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size` and `eos_id`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

TOKENIZER_FILE = "tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus an end-of-text token 256."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizer.json` loaded through the `tokenizers` library (e.g. GPT-NeoX-20B's)."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as err:  # tokenizers raises a bare Exception for malformed files
            raise ValueError(f"{path} is not a readable tokenizer.json: {err}") from None
        self.path = path
        self.vocab_size = self._tok.get_vocab_size()
        eos = None
        for name in ("<|endoftext|>", "</s>", "<eos>"):
            eos = self._tok.token_to_id(name)
            if eos is not None:
                break
        self.eos_id = eos if eos is not None else 0

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


def find_tokenizer(directory: str) -> str | None:
    """`directory/tokenizer.json` when it exists, else None."""
    candidate = os.path.join(directory, TOKENIZER_FILE)
    return candidate if os.path.isfile(candidate) else None


def load_tokenizer(path: str | None = None) -> ByteTokenizer | HFTokenizer:
    """`path` may be None (bytes), a `tokenizer.json` file, or a directory: its tokenizer.json
    through `tokenizers` if it holds one, else bytes."""
    if path is None:
        return ByteTokenizer()
    path = os.fspath(path)
    if os.path.isdir(path):
        found = find_tokenizer(path)
        return HFTokenizer(found) if found else ByteTokenizer()
    if not os.path.exists(path):
        raise ValueError(f"tokenizer path {path!r} does not exist (expected a tokenizer.json file)")
    return HFTokenizer(path)
