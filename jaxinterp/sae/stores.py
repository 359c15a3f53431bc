"""Activation stores for SAE training.

* ``OnlineStore``: activations computed on the fly. The model forward (capturing one or
  several sites), a shuffling buffer kept on device, and the SAE step run as one jitted
  program (``fused_step``): each call writes the fresh activations into random slots of
  the buffer and trains on the rows they evict, so consecutive training batches mix
  tokens from many forwards.
* ``DiskStore``: a tensorstore zarr array ``[rows, D]`` on disk, chunked (and sharded
  with zarr v3's sharding codec), written chunk by chunk with a progress bar and a
  ``progress.json`` that makes an interrupted write resumable, and read back in shuffled
  order (chunks permuted per epoch, rows shuffled within a window of chunks) by a
  deterministic ``batch(step)`` so training from it resumes exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["OnlineStore", "DiskStore", "fused_step", "fit_online"]


# ----------------------------------------------------------------------------- on the fly


class OnlineStore:
    """Captures ``sites`` from ``model`` and keeps a device buffer of ``buffer_factor`` forwards per site.

    ``positions``: optional slice of sequence positions to keep (e.g. ``slice(1, None)`` to drop BOS).
    """

    def __init__(self, sites: str | Sequence[str], buffer_factor: int = 8, positions: slice | None = None):
        self.sites = (sites,) if isinstance(sites, str) else tuple(sites)
        if not self.sites:
            raise ValueError("OnlineStore needs at least one site")
        if buffer_factor < 1:
            raise ValueError(f"buffer_factor must be >= 1, got {buffer_factor}")
        self.buffer_factor = buffer_factor
        self.positions = positions or slice(None)

    def acts(self, model, tokens: jax.Array, attention_mask=None) -> tuple[dict, jax.Array]:
        """``({site: [B * T', D]}, keep [B * T'])`` of one forward (T' = kept positions); ``keep`` is False
        at padding (``attention_mask`` 0). Only the layers up to the deepest harvested site run."""
        layers = [int(s.split(".")[1]) for s in self.sites if s.startswith("blocks.")]
        stop = None if "final_norm" in self.sites or not layers else max(layers) + 1
        cache = model.run(tokens, capture=list(self.sites), attention_mask=attention_mask, stop_at=stop).cache
        mask = jnp.ones(tokens.shape, bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
        keep = mask[:, self.positions].reshape(-1)
        acts = {s: cache[s][:, self.positions].reshape(-1, cache[s].shape[-1]).astype(jnp.float32) for s in self.sites}
        return acts, keep

    def fill(self, model, token_batches: Sequence, masks: Sequence | None = None) -> dict:
        """A full buffer ``{site: [rows, D]}`` from ``buffer_factor`` token batches (padding rows left out)."""
        if len(token_batches) != self.buffer_factor:
            raise ValueError(f"fill needs {self.buffer_factor} token batches, got {len(token_batches)}")
        fwd = jax.jit(self.acts)
        masks = [None] * len(token_batches) if masks is None else list(masks)
        parts = [fwd(model, jnp.asarray(t), m) for t, m in zip(token_batches, masks)]
        keep = np.concatenate([np.asarray(k) for _, k in parts])
        return {s: jnp.concatenate([p[s] for p, _ in parts])[keep] for s in self.sites}

    def exchange(self, buffer: dict, fresh: dict, key: jax.Array, keep=None) -> tuple[dict, dict]:
        """Swap ``fresh`` rows into random buffer slots; return (buffer, the evicted rows = the batch).

        Rows with ``keep`` False (padding) are not written: their slot keeps its row, so the buffer
        only ever holds real tokens.
        """
        n_buf = next(iter(buffer.values())).shape[0]
        n = next(iter(fresh.values())).shape[0]
        if n > n_buf:
            raise ValueError(f"a forward gives {n} rows but the buffer holds only {n_buf}; raise buffer_factor")
        idx = jax.random.permutation(key, n_buf)[:n]
        batch = {s: buffer[s][idx] for s in self.sites}
        if keep is None:
            buffer = {s: buffer[s].at[idx].set(fresh[s]) for s in self.sites}
        else:
            buffer = {s: buffer[s].at[idx].set(jnp.where(keep[:, None], fresh[s], batch[s])) for s in self.sites}
        return buffer, batch


def fused_step(trainers: Mapping[str, "object"], store: OnlineStore):
    """One jitted program: forward + buffer exchange + the SAE steps of every site's trainer.

    ``trainers``: ``{site: SAETrainer}``. Returns ``step(states, buffer, model, tokens, key, mask=None)
    -> (states, buffer, metrics)`` with ``states = {site: trainer states}``; padding positions of ``mask``
    never enter the buffer.
    """
    missing = sorted(set(trainers) - set(store.sites))
    if missing:
        raise ValueError(f"trainers for sites {missing} that the store does not capture ({list(store.sites)})")

    def step(states, buffer, model, tokens, key, mask=None):
        fresh, keep = store.acts(model, tokens, mask)
        buffer, batch = store.exchange(buffer, fresh, key, None if mask is None else keep)
        out, metrics = {}, {}
        for site, trainer in trainers.items():
            out[site], metrics[site] = trainer._multi_step(states[site], batch[site])
        return out, buffer, metrics

    return jax.jit(step, donate_argnums=(0, 1))


def fit_online(trainers: Mapping[str, "object"], store: OnlineStore, model, states: dict, token_fn: Callable,
               steps: int, seed: int = 0, progress: bool = True) -> tuple[dict, list]:
    """Fill the buffer from ``token_fn(-1), ..., token_fn(-buffer_factor)``, then train ``steps``
    fused steps on ``token_fn(t)``. Returns ``(states, history)``."""
    from tqdm import tqdm

    buffer = store.fill(model, [token_fn(-i - 1) for i in range(store.buffer_factor)])
    step = fused_step(trainers, store)
    base = jax.random.PRNGKey(seed)
    history = []
    for t in tqdm(range(steps), desc="sae (online)", disable=not progress):
        states, buffer, metrics = step(states, buffer, model, jnp.asarray(token_fn(t)), jax.random.fold_in(base, t))
        if (t + 1) % 50 == 0 or t + 1 == steps:
            history.append((t + 1, jax.tree_util.tree_map(lambda a: np.asarray(a).tolist(), metrics)))
    return states, history


# ----------------------------------------------------------------------------- on disk


class DiskStore:
    """A ``[n_rows, d]`` float32 zarr (v3) array in ``path`` (chunks of ``chunk_rows`` rows,
    ``chunks_per_shard`` chunks per shard file)."""

    def __init__(self, path: str | os.PathLike, n_rows: int, d: int, chunk_rows: int = 4096,
                 chunks_per_shard: int = 8):
        if n_rows <= 0 or d <= 0 or chunk_rows <= 0:
            raise ValueError(f"n_rows, d and chunk_rows must be positive, got {n_rows}, {d}, {chunk_rows}")
        if n_rows % chunk_rows:
            raise ValueError(f"n_rows ({n_rows}) must be a multiple of chunk_rows ({chunk_rows})")
        self.path = Path(path)
        self.n_rows, self.d, self.chunk_rows = n_rows, d, chunk_rows
        self.chunks_per_shard = max(1, min(chunks_per_shard, n_rows // chunk_rows))
        self._array = None
        self._window_cache: tuple | None = None

    @property
    def n_chunks(self) -> int:
        return self.n_rows // self.chunk_rows

    def _spec(self) -> dict:
        shard = self.chunk_rows * self.chunks_per_shard
        return {
            "driver": "zarr3",
            "kvstore": {"driver": "file", "path": str(self.path / "acts.zarr")},
            "metadata": {
                "shape": [self.n_rows, self.d],
                "data_type": "float32",
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [shard, self.d]}},
                "codecs": [{"name": "sharding_indexed", "configuration": {
                    "chunk_shape": [self.chunk_rows, self.d],
                    "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                               {"name": "zstd", "configuration": {"level": 1}}]}}],
            },
        }

    def array(self):
        import tensorstore as ts

        if self._array is None:
            self.path.mkdir(parents=True, exist_ok=True)
            exists = (self.path / "acts.zarr" / "zarr.json").exists()
            spec = self._spec()
            if exists:  # the layout on disk wins; only the shape is checked
                spec = {k: v for k, v in spec.items() if k != "metadata"}
            self._array = ts.open(spec, create=not exists, open=exists).result()
            if tuple(self._array.shape) != (self.n_rows, self.d):
                raise ValueError(f"{self.path} holds an array of shape {tuple(self._array.shape)}, "
                                 f"expected {(self.n_rows, self.d)}")
        return self._array

    # writing ---------------------------------------------------------------------------
    def rows_written(self) -> int:
        p = self.path / "progress.json"
        return json.loads(p.read_text())["rows_written"] if p.exists() else 0

    def complete(self) -> bool:
        return self.rows_written() >= self.n_rows

    def _set_progress(self, rows: int) -> None:
        tmp = self.path / "progress.json.tmp"
        tmp.write_text(json.dumps({"rows_written": rows, "n_rows": self.n_rows, "d": self.d}))
        os.replace(tmp, self.path / "progress.json")

    def write(self, chunk_fn: Callable[[int], np.ndarray], progress: bool = True) -> "DiskStore":
        """Fill the array with ``chunk_fn(i) -> [chunk_rows, d]`` for every chunk not yet written.

        ``chunk_fn`` must be deterministic in ``i`` (seed it by ``i``) so a resumed write
        produces the same store as an uninterrupted one.
        """
        from tqdm import tqdm

        arr = self.array()
        start = self.rows_written() // self.chunk_rows
        for i in tqdm(range(start, self.n_chunks), desc=f"writing {self.path.name}", disable=not progress,
                      initial=start, total=self.n_chunks):
            rows = np.asarray(chunk_fn(i), np.float32)
            if rows.shape != (self.chunk_rows, self.d):
                raise ValueError(f"chunk_fn({i}) returned shape {rows.shape}, expected {(self.chunk_rows, self.d)}")
            arr[i * self.chunk_rows:(i + 1) * self.chunk_rows].write(rows).result()
            self._set_progress((i + 1) * self.chunk_rows)
        return self

    # reading ---------------------------------------------------------------------------
    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` in storage order."""
        self._check_complete()
        return np.asarray(self.array()[start:stop].read().result())

    def _check_complete(self) -> None:
        if not self.complete():
            raise RuntimeError(f"{self.path}: only {self.rows_written()} of {self.n_rows} rows are written; "
                               f"call write() again to finish")

    def batch(self, step: int, batch_size: int, seed: int = 0, window_chunks: int = 8) -> np.ndarray:
        """The training batch for ``step``: a deterministic shuffled pass, epoch after epoch.

        Each epoch permutes the chunks; each window of ``window_chunks`` consecutive
        (permuted) chunks is read once and its rows shuffled; batches walk through it.
        """
        self._check_complete()
        w = max(1, min(window_chunks, self.n_chunks))
        rows_per_window = w * self.chunk_rows
        if rows_per_window % batch_size:
            raise ValueError(f"batch_size ({batch_size}) must divide window_chunks * chunk_rows ({rows_per_window})")
        per_window = rows_per_window // batch_size
        windows_per_epoch = self.n_chunks // w
        g = step // per_window
        epoch, win = divmod(g, windows_per_epoch)
        key = (seed, epoch, win, w)
        if self._window_cache is None or self._window_cache[0] != key:
            chunks = np.random.default_rng([seed, epoch]).permutation(self.n_chunks)[win * w:(win + 1) * w]
            arr = self.array()
            rows = np.concatenate([np.asarray(arr[c * self.chunk_rows:(c + 1) * self.chunk_rows].read().result())
                                   for c in chunks])
            rows = rows[np.random.default_rng([seed, epoch, win]).permutation(len(rows))]
            self._window_cache = (key, rows)
        b = step % per_window
        return self._window_cache[1][b * batch_size:(b + 1) * batch_size]
