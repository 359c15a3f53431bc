"""Export faults: ``ji.save_pretrained`` replaces its directory atomically, never leaves stale shards,
and a full disk, an interrupt, a failed rename or a killed process leave the previous export intact."""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

import jaxinterp as ji
import jaxinterp.hf as hf
from tests.faults.faults_io import Interrupt, WriteFault
from tests.faults.harness import Case, Raises, Returns, expect
from tests.faults.models import tiny, warm

SHARD = 4_000  # bytes: the tiny model below exports as ~6 shards with this limit
REPO = Path(__file__).resolve().parents[2]


def assert_export_is(path: Path, seed: int) -> None:
    """``path`` loads back to exactly ``tiny(seed)``'s parameters."""
    loaded = ji.load(path)
    want = jax.tree_util.tree_leaves_with_path(tiny(seed).params)
    got = dict(jax.tree_util.tree_leaves_with_path(loaded.params))
    for p, v in want:
        np.testing.assert_array_equal(np.asarray(got[p]), np.asarray(v), err_msg=jax.tree_util.keystr(p))


def no_leftovers(path: Path) -> None:
    """Nothing but the export itself in its parent (no partial or old directories)."""
    others = sorted(p.name for p in path.parent.iterdir() if p.name != path.name and p.name.startswith(f".{path.name}"))
    expect(not others, f"leftovers next to {path.name}: {others}")


def previous(tmp: Path, **kw) -> Path:
    """A good export of tiny(1) at tmp/out (the artefact that must survive every fault)."""
    ji.save_pretrained(tiny(1), tmp / "out", **kw)
    return tmp / "out"


def intact(tmp: Path) -> None:
    assert_export_is(tmp / "out", 1)
    no_leftovers(tmp / "out")


def files(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def _resave(first: dict, second: dict):
    def run(tmp: Path):
        previous(tmp, **first)
        ji.save_pretrained(tiny(2), tmp / "out", **second)
        return tmp / "out"

    def check(path, tmp):
        assert_export_is(path, 2)
        no_leftovers(path)
        shards = [f for f in files(path) if f.endswith(".safetensors")]
        limit = second.get("max_shard_bytes")
        if limit is None:
            expect(files(path) == ["config.json", "model.safetensors"], files(path))
        else:
            n = len(shards)
            expect(shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)], shards)
            expect("model.safetensors.index.json" in files(path), files(path))
    return run, Returns(check)


def resave(case_id: str, first: dict, second: dict) -> Case:
    return Case(f"export-resave-{case_id}", *_resave(first, second))


def _export_bytes() -> int:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        ji.save_pretrained(tiny(2), Path(d) / "x", max_shard_bytes=SHARD)
        return sum(p.stat().st_size for p in (Path(d) / "x").iterdir())


def _faulty_save(budget_fraction: float, on_exhausted=None, tokenizer=False):
    def run(tmp: Path):
        previous(tmp)
        tok = _tokenizer_dir(tmp) if tokenizer else None
        budget = int(budget_fraction * _EXPORT_BYTES())
        with WriteFault(budget, on_exhausted):
            ji.save_pretrained(tiny(2), tmp / "out", max_shard_bytes=SHARD, tokenizer_dir=tok)
    return run


_EXPORT_BYTES = functools.lru_cache(maxsize=None)(_export_bytes)


def _setup() -> None:
    warm()
    _EXPORT_BYTES()


@functools.lru_cache(maxsize=None)
def _tokenizer_json() -> str:
    """A real 32-word WordLevel tokenizer (``ji.load`` reads it), padded to > 4 KB so writes of it can fail midway."""
    from tokenizers import Tokenizer, models

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, 32)}}
    return Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).to_str() + " " * 4000


def _tokenizer_dir(tmp: Path) -> Path:
    tok = tmp / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text(_tokenizer_json())
    (tok / "tokenizer_config.json").write_text('{"model_max_length": 8}')
    return tok


def disk_full(fraction: float, **kw) -> Case:
    return Case(f"export-disk-full-at-{fraction:.2f}{'-with-tokenizer' if kw.get('tokenizer') else ''}",
                _faulty_save(fraction, **kw), Raises(OSError, r"No space left"), after=intact)


def _swap_fails(err: int, fallback_rename_fails: bool = False):
    def run(tmp: Path):
        previous(tmp)
        real_exchange, real_rename = hf._exchange, os.rename
        calls = []

        def exchange(a, b):
            raise OSError(err, os.strerror(err))

        def rename(a, b):
            calls.append((a, b))
            if fallback_rename_fails and len(calls) == 2:  # old moved away; moving the new one in fails
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return real_rename(a, b)

        hf._exchange, os.rename = exchange, rename
        try:
            ji.save_pretrained(tiny(2), tmp / "out")
        finally:
            hf._exchange, os.rename = real_exchange, real_rename
        return tmp / "out"
    return run


def _killed_mid_write(tmp: Path):
    """A writer process SIGKILLed halfway through its export (no cleanup runs)."""
    previous(tmp, max_shard_bytes=SHARD)
    family = ji.get_family("gpt2")
    np.savez(tmp / "new.npz", **{k: np.asarray(v) for k, v in family.to_hf(tiny(2).config, tiny(2).params).items()})
    (tmp / "config.json").write_text(json.dumps({**tiny(2).config.to_hf(), "torch_dtype": "float32"}))
    script = (
        "import json, sys; import numpy as np; sys.path.insert(0, sys.argv[1]);"
        "from jaxinterp.hf import write_hf_dir; from tests.faults.faults_io import WriteFault, kill_self;"
        "t = dict(np.load(sys.argv[3])); c = json.load(open(sys.argv[4]));"
        f"WriteFault({_EXPORT_BYTES() // 2}, kill_self).__enter__();"
        f"write_hf_dir(sys.argv[2], c, t, max_shard_bytes={SHARD})"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(REPO), str(tmp / "out"), str(tmp / "new.npz"),
                           str(tmp / "config.json")], env={**os.environ, "JAX_PLATFORMS": "cpu"},
                          capture_output=True, timeout=120)
    expect(proc.returncode == -9, (proc.returncode, proc.stderr[-2000:]))
    assert_export_is(tmp / "out", 1)  # the previous export survives the kill ...
    partial = [p.name for p in tmp.iterdir() if p.name.startswith(".out")]
    expect(partial, "the killed writer should have left its partial directory")  # (so the kill was mid-write)
    ji.save_pretrained(tiny(2), tmp / "out")  # ... and the next export cleans up after the dead writer
    return tmp / "out"


def _check_new(path, tmp):
    assert_export_is(path, 2)
    no_leftovers(path)


def _refuse(case_id: str, prepare, match: str) -> Case:
    def run(tmp: Path):
        prepare(tmp)
        before = _snapshot(tmp / "out")
        tmp.joinpath("before.txt").write_text(repr(before))
        ji.save_pretrained(tiny(2), tmp / "out")

    def after(tmp: Path):
        expect(repr(_snapshot(tmp / "out")) == tmp.joinpath("before.txt").read_text(), "refused target was changed")
    return Case(f"export-refuse-{case_id}", run, Raises((ValueError, FileExistsError, NotADirectoryError), match),
                after=after)


def _snapshot(path: Path):
    if path.is_file():
        return path.read_bytes()
    return sorted((str(p.relative_to(path)), p.read_bytes() if p.is_file() else None) for p in path.rglob("*"))


def _user_dir(tmp: Path) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("my notes")


def _export_with_ckpt(tmp: Path) -> None:
    previous(tmp)
    (tmp / "out" / "ckpt").mkdir()
    (tmp / "out" / "ckpt" / "step_1").write_text("hours of training")


def _symlinked(tmp: Path):
    previous(tmp)
    (tmp / "link").symlink_to(tmp / "out")
    ji.save_pretrained(tiny(2), tmp / "link")
    expect((tmp / "link").is_symlink(), "the symlink was replaced by a directory")
    return tmp / "out"


def _tokenizer_in_place(tmp: Path):
    out = previous(tmp, tokenizer_dir=_tokenizer_dir(tmp))
    before = (out / "tokenizer.json").read_bytes()
    ji.save_pretrained(tiny(2), out, tokenizer_dir=out)  # re-export keeping its own tokenizer
    expect((out / "tokenizer.json").read_bytes() == before, "tokenizer changed")
    expect((out / "tokenizer_config.json").exists(), files(out))
    return out


def _memmap_reader_survives(tmp: Path):
    out = previous(tmp)
    _, old = hf.read_hf_dir(out)  # memory-mapped views into the old files
    snapshot = {k: np.array(v) for k, v in old.items()}
    ji.save_pretrained(tiny(2), out)
    for k, v in snapshot.items():
        np.testing.assert_array_equal(np.asarray(old[k]), v, err_msg=f"{k} changed under a reader")
    return out


def _mode_follows_umask(tmp: Path):
    out = previous(tmp)
    mask = os.umask(0)
    os.umask(mask)
    expect(stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask, oct(out.stat().st_mode))
    return out


def _nested_new(tmp: Path):
    ji.save_pretrained(tiny(2), tmp / "a" / "b" / "out")
    return tmp / "a" / "b" / "out"


CASES = [
    resave("sharded-then-single", {"max_shard_bytes": SHARD}, {}),
    resave("single-then-sharded", {}, {"max_shard_bytes": SHARD}),
    resave("many-then-fewer-shards", {"max_shard_bytes": SHARD}, {"max_shard_bytes": 3 * SHARD}),
    resave("fewer-then-many-shards", {"max_shard_bytes": 3 * SHARD}, {"max_shard_bytes": SHARD}),
    Case("export-resave-drops-old-tokenizer", lambda t: (previous(t, tokenizer_dir=_tokenizer_dir(t)), ji.save_pretrained(
        tiny(2), t / "out"))[1], Returns(lambda p, t: (_check_new(p, t), expect(files(p) == [
            "config.json", "model.safetensors"], files(p))))),
    *[disk_full(f) for f in (0.0, 0.02, 0.2, 0.4, 0.6, 0.8, 0.95, 0.999)],
    disk_full(0.6, tokenizer=True),
    disk_full(0.999, tokenizer=True),
    Case("export-interrupted-mid-write", _faulty_save(0.5, Interrupt()), Raises(KeyboardInterrupt, r""), after=intact),
    Case("export-swap-fails", _swap_fails(errno.EIO), Raises(OSError, r"Input/output error"), after=intact),
    Case("export-swap-unsupported-falls-back", _swap_fails(errno.EINVAL), Returns(_check_new)),
    Case("export-fallback-rename-fails", _swap_fails(errno.ENOSYS, fallback_rename_fails=True),
         Raises(OSError, r"Input/output error"), after=intact),
    Case("export-killed-mid-write", _killed_mid_write, Returns(_check_new), timeout=150),
    _refuse("target-is-file", lambda t: (t / "out").write_text("not a model"), r"out.*not a directory"),
    _refuse("user-directory", _user_dir, r"out.*notes\.txt"),
    _refuse("export-with-subdirectory", _export_with_ckpt, r"out.*ckpt"),
    Case("export-into-symlink", _symlinked, Returns(_check_new)),
    Case("export-tokenizer-in-place", _tokenizer_in_place, Returns(_check_new)),
    Case("export-memmap-reader-survives", _memmap_reader_survives, Returns(_check_new)),
    Case("export-mode-follows-umask", _mode_follows_umask, Returns(lambda p, t: assert_export_is(p, 1))),
    Case("export-nested-new-directory", _nested_new, Returns(_check_new)),
    Case("export-into-empty-directory", lambda t: ((t / "out").mkdir(), ji.save_pretrained(tiny(2), t / "out"))[1],
         Returns(_check_new)),
]
CASES = [dataclasses.replace(c, setup=_setup) for c in CASES]
