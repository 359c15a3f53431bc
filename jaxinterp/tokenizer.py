"""Text in and out: a checkpoint's ``tokenizer.json`` through the ``tokenizers`` library.

``Tokenizer.from_dir`` reads ``tokenizer.json`` plus the special tokens named in
``tokenizer_config.json`` / ``special_tokens_map.json`` (BOS, EOS, PAD, and ``add_bos_token``);
a directory with an Othello ``token_map.json`` (the embedded othello-gpt) gets a word-level
tokenizer over its move names. ``encode_batch`` pads to a rectangle (left padding by default, as
generation wants) and returns the attention mask with it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

__all__ = ["Tokenizer", "TOKENIZER_FILES", "check_vocab"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
PADDING_SIDES = ("left", "right")


def _token_text(value) -> Optional[str]:
    """A special token as written in tokenizer_config.json (a string or an AddedToken dict)."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the special-token ids and BOS policy of one checkpoint."""

    def __init__(self, backend, *, bos: Optional[str] = None, eos: Optional[str] = None, pad: Optional[str] = None,
                 add_bos: bool = False, source: Optional[Path] = None):
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token = bos, eos, pad
        self.bos_id = self._id(bos)
        self.eos_id = self._id(eos)
        self.pad_id = self._id(pad)
        self.add_bos = bool(add_bos) and self.bos_id is not None
        self.source = source

    def _id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # construction -----------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Optional["Tokenizer"]:
        """The tokenizer stored in a checkpoint directory, or None when it has none."""
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        if (path / "tokenizer.json").exists():
            special: dict = {}
            for name in ("special_tokens_map.json", "tokenizer_config.json"):
                if (path / name).exists():
                    special.update(json.loads((path / name).read_text()))
            model_cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
            backend = Backend.from_file(str(path / "tokenizer.json"))
            bos = _token_text(special.get("bos_token"))
            if bos is None and model_cfg.get("bos_token_id") is not None:
                bos = backend.id_to_token(int(model_cfg["bos_token_id"]))
            eos = _token_text(special.get("eos_token"))
            if eos is None and isinstance(model_cfg.get("eos_token_id"), int):
                eos = backend.id_to_token(int(model_cfg["eos_token_id"]))
            return cls(backend, bos=bos, eos=eos, pad=_token_text(special.get("pad_token")),
                       add_bos=bool(special.get("add_bos_token", False)), source=path)
        if (path / "token_map.json").exists():
            return cls._from_token_map(path)
        return None

    @classmethod
    def _from_token_map(cls, path: Path) -> "Tokenizer":
        """A word-level tokenizer over an Othello ``token_map.json`` (move names such as ``c4``)."""
        from tokenizers import Tokenizer as Backend, models, pre_tokenizers

        data = json.loads((path / "token_map.json").read_text())
        vocab = {name: int(i) for i, name in data["tokens"].items()}
        pad = data["tokens"][str(data.get("pad_token", 0))]
        backend = Backend(models.WordLevel(vocab, unk_token=pad))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        from tokenizers import decoders

        backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
        return cls(backend, pad=pad, source=path)

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer files to ``path`` (copies of the source files where there are some)."""
        path = Path(path)
        if self.source is not None and (self.source / "tokenizer.json").exists():
            for name in TOKENIZER_FILES:
                if (self.source / name).exists() and (self.source / name).resolve() != (path / name).resolve():
                    shutil.copy(self.source / name, path / name)
            return
        self.backend.save(str(path / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
                  "eos_token": self.eos_token, "pad_token": self.pad_token, "add_bos_token": self.add_bos}
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    # encoding ---------------------------------------------------------------------------
    def encode(self, text: str, add_bos: Optional[bool] = None) -> list[int]:
        """Ids of one text; ``add_bos`` None follows the checkpoint (``add_bos_token`` or its template)."""
        if not isinstance(text, str):
            raise TypeError(f"texts must be strings, got {type(text).__name__}")
        if add_bos is None and self.add_bos is False:
            return list(self.backend.encode(text, add_special_tokens=True).ids)
        ids = list(self.backend.encode(text, add_special_tokens=False).ids)
        want = self.add_bos if add_bos is None else add_bos
        if want:
            if self.bos_id is None:
                raise ValueError("add_bos=True but this tokenizer has no BOS token")
            ids = [self.bos_id] + ids
        return ids

    def encode_batch(self, texts, *, padding_side: str = "left", add_bos: Optional[bool] = None):
        """``(tokens [B, T] int32, attention_mask [B, T] bool)`` of a text or a list of texts."""
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("no texts to tokenize")
        rows = [self.encode(t, add_bos) for t in texts]
        empty = [i for i, r in enumerate(rows) if not r]
        if empty:
            raise ValueError(f"texts {empty[:5]} tokenize to nothing")
        width = max(len(r) for r in rows)
        pad = self.pad_id if self.pad_id is not None else (self.eos_id if self.eos_id is not None else 0)
        tokens = np.full((len(rows), width), pad, np.int32)
        mask = np.zeros((len(rows), width), bool)
        for i, r in enumerate(rows):
            sl = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
            tokens[i, sl], mask[i, sl] = r, True
        return tokens, mask

    # decoding ---------------------------------------------------------------------------
    def decode(self, ids, skip_special_tokens: bool = False):
        arr = np.asarray(ids)
        if arr.ndim == 2:
            return [self.decode(r, skip_special_tokens) for r in arr]
        return self.backend.decode([int(i) for i in arr.reshape(-1)], skip_special_tokens=skip_special_tokens)

    def token_strings(self, ids):
        arr = np.asarray(ids)
        if arr.ndim == 2:
            return [self.token_strings(r) for r in arr]
        return [self.backend.id_to_token(int(i)) or "" for i in arr.reshape(-1)]

    def __repr__(self) -> str:
        return f"Tokenizer(vocab={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, pad={self.pad_token!r})"

    # tokenizers.Tokenizer is not hashable-by-value; identity is what jit's static data needs.
    def __hash__(self):
        return id(self)

    def __eq__(self, other):
        return self is other


def check_vocab(tokenizer: Tokenizer, vocab_size: int, where: str) -> None:
    """A tokenizer that can emit ids the embedding does not have is refused."""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding only "
                         f"{vocab_size}; they do not belong together")

