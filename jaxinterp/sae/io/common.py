"""Helpers shared by the SAE format readers and writers."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from ..families import Reads
from .hooks import site_for_hook

__all__ = ["FormatError", "check_tensors", "centre_free_b_enc", "jumprelu_log_threshold", "reads_for",
           "atomic_dir", "atomic_write_text", "PER_HEAD_SITES"]

PER_HEAD_SITES = ("attn.q", "attn.k", "attn.v", "attn.z")  # laid out [..., heads, head_dim]


class FormatError(ValueError):
    """A file that does not hold what its format requires (one line: what is wrong, what was expected)."""


def check_tensors(where: str, tensors: Mapping[str, np.ndarray], want: Mapping[str, tuple],
                  optional: Mapping[str, tuple] = ()) -> None:
    """Refuse missing, mis-shaped or unexpected tensors (``want`` / ``optional``: name -> shape)."""
    optional = dict(optional)
    missing = [n for n in want if n not in tensors]
    unexpected = sorted(set(tensors) - set(want) - set(optional))
    shapes = {**want, **optional}
    wrong = [f"{n} {tuple(tensors[n].shape)} (want {shapes[n]})" for n in shapes
             if n in tensors and tuple(tensors[n].shape) != tuple(shapes[n])]
    problems = ([f"missing {missing}"] if missing else []) + ([f"unexpected {unexpected}"] if unexpected else []) \
        + ([f"mis-shaped {', '.join(wrong)}"] if wrong else [])
    if problems:
        raise FormatError(f"{where}: " + "; ".join(problems) + f" (expected {sorted(want)}"
                          + (f", optionally {sorted(optional)})" if optional else ")"))


def centre_free_b_enc(b_enc: np.ndarray, b_dec: np.ndarray, w_enc: np.ndarray) -> np.ndarray:
    """Encoder bias for inputs centred by ``b_dec`` that computes ``x @ W_enc + b_enc`` (a format that does not
    subtract ``b_dec`` before encoding): ``(x - b_dec) @ W_enc + b_enc + b_dec @ W_enc``."""
    return (np.asarray(b_enc, np.float64) + np.asarray(b_dec, np.float64) @ np.asarray(w_enc, np.float64)).astype(
        np.float32)


def jumprelu_log_threshold(threshold: np.ndarray) -> np.ndarray:
    """``log(threshold)`` for jaxinterp's JumpReLU (``threshold = exp(log_threshold)``; 0 -> -inf)."""
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(threshold, np.float64)).astype(np.float32)


def reads_for(hook_or_site: str | None, head: int | None = None, flatten_heads: bool | None = None) -> Reads:
    """``Reads`` of an SAE reading ``hook_or_site`` (a TransformerLens hook or a site name).

    ``flatten_heads=None``: a per-head site read without a head index is read with its heads flattened
    (``[..., H * Dh]``, as SAELens's ``hook_z`` SAEs and Gemma Scope's attention SAEs do).
    """
    if hook_or_site is None:
        return Reads(head=head, flatten_heads=bool(flatten_heads))
    site = site_for_hook(hook_or_site)
    per_head = site.endswith(PER_HEAD_SITES)
    if head is not None and not per_head:
        raise FormatError(f"head index {head} given for {site!r}, which has no heads axis (per-head sites: "
                          f"blocks.L.{{{', '.join(PER_HEAD_SITES)}}})")
    if flatten_heads is None:
        flatten_heads = per_head and head is None
    return Reads(site=site, head=head, flatten_heads=bool(flatten_heads))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory to write into; on success it replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 -> what mkdir would give
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would give
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
