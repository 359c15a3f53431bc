"""Token erasure and the implicit vocabulary (Feucht, Atkinson, Wallace and Bau, 2024, "Token Erasure as
a Footprint of Implicit Vocabulary Items in LLMs", arXiv:2406.20086).

    acts = hidden_states(model, tokens, layers)                         # [N, T, L', D]
    params, history = train_probes(flat_acts, labels, ProbeConfig(layers=layers), directory=...)
    prob, correct = probe_targets(params, flat_acts, labels)            # [M, L', O] each
    delta = erasure_deltas(prob_doc, ProbeConfig(...), early=1, late=3)  # [T, 3]
    segments = segment(delta, max_len=6)                                # [(start, end, score)], end exclusive
    vocab = read_out(docs)                                              # entries: tokens, count, mean score

**Probes.** One linear map without bias per hidden layer ``l`` and offset ``i`` (the paper's
``p_i^(l): R^d -> R^|V|``), predicting the token at ``t + i`` from the hidden state at ``t``; offsets
-3..+1 by default. All probes are one stacked parameter ``w [L', O, D, V]`` trained together by the one
training loop (``jaxinterp.train.fit``: resumable, bit-identical resume). Hidden layer ``l`` uses the
Hugging Face ``hidden_states`` numbering: 0 is the embedding output (``blocks.0.resid_pre``), ``l >= 1``
is ``blocks.{l-1}.resid_post``.

**Erasure score** (paper Section 4). With ``P_i^(l)(s | h)`` the probability probe ``(l, i)`` gives the
token ``s``, the drop of a token's probability between an early layer ``l1`` and a later layer ``l2`` is

    delta(t, i) = P_i^(l1)(s_{t+i} | h_t^(l1)) - P_i^(l2)(s_{t+i} | h_t^(l2))

and the score of the span ``s_p .. s_q`` (``n = q - p + 1`` tokens) is

    psi(p, q) = [ delta(q, 0) + sum_{t=p..q} sum_{i=1,2} sign(t - i >= p) * delta(t, -i) ] / (1 + 2n)

(``sign``: +1 when the erased token lies inside the span, -1 when it lies before it): the last token
forgets itself, every token forgets the earlier tokens of its own span, and no token forgets tokens
before the span. Terms whose target precedes the document start do not exist; they are left out of
the sum and of the count (the denominator counts the terms present: ``1 + 2n`` away from the start).
The paper uses layers 1 and 9 of Llama-2-7b / Llama-3-8B.

**Segmentation and readout** (paper Algorithm 1). Every span of at most ``max_len`` tokens is scored;
spans are taken in decreasing score (ties: earlier start, then shorter), each kept when it overlaps no
span kept before. Single tokens are spans too, so the segments cover the document. The multi-token
segments of all documents, counted and averaged by score, are the read-out vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxinterp.model import Model, run
from jaxinterp.train import LoopConfig, fit, init_state, loss_step, make_train_step

__all__ = ["OFFSETS", "SCORE_OFFSETS", "ProbeConfig", "hidden_sites", "hidden_states", "offset_labels",
           "init_probes", "probe_loss", "train_probes", "probe_targets", "erasure_deltas", "span_score",
           "span_scores", "segment", "VocabEntry", "read_out", "frequent_ngrams"]

OFFSETS = (-3, -2, -1, 0, 1)
SCORE_OFFSETS = (0, -1, -2)  # the probes the erasure score reads: delta columns in this order


# ----------------------------------------------------------------------------- probes


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProbeConfig:
    """Stacked linear token probes, trained with Adam by ``fit``.

    Attributes:
      layers: hidden layers probed (0 = embeddings .. n_layers; checked against the model by
        ``hidden_sites``).
      offsets: target offsets ``i`` (the token at ``t + i``), distinct.
      steps, batch_size, lr, seed: Adam steps on batches of token positions drawn at random
        (a pure function of ``seed`` and the step).
    """

    layers: tuple[int, ...]
    offsets: tuple[int, ...] = OFFSETS
    steps: int = 500
    batch_size: int = 1024
    lr: float = 1e-2
    seed: int = 0

    def __post_init__(self):
        for name in ("layers", "offsets"):
            value = tuple(int(v) for v in getattr(self, name))
            if not value or len(set(value)) != len(value):
                raise ValueError(f"ProbeConfig.{name} must be a non-empty tuple of distinct ints, got {value}")
            object.__setattr__(self, name, value)
        if min(self.layers) < 0:
            raise ValueError(f"ProbeConfig.layers must be >= 0 (0 = embeddings), got {self.layers}")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ProbeConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"ProbeConfig.lr must be positive, got {self.lr}")

    def layer_index(self, layer: int) -> int:
        """Row of ``layer`` in the stacked probes; a layer not probed is refused naming the probed ones."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not probed; probed layers: {list(self.layers)}")
        return self.layers.index(layer)

    def offset_index(self, offset: int) -> int:
        if offset not in self.offsets:
            raise ValueError(f"offset {offset} was not probed; probed offsets: {list(self.offsets)}")
        return self.offsets.index(offset)


def hidden_sites(model: Model, layers: Sequence[int]) -> tuple[str, ...]:
    """Site of each hidden layer (0: ``blocks.0.resid_pre``, ``l``: ``blocks.{l-1}.resid_post``)."""
    n = model.config.n_layers
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer <= n:
            raise ValueError(f"layer {layer!r} is outside the model: hidden layers are 0..{n} "
                             f"(0 = embeddings) for a {n}-layer model")
    return tuple("blocks.0.resid_pre" if l == 0 else f"blocks.{l - 1}.resid_post" for l in layers)


@functools.lru_cache(maxsize=16)
def _states_program(sites: tuple[str, ...], stop: int):
    @jax.jit
    def states(model, tokens):
        cache = run(model, tokens, capture=list(sites), stop_at=stop).cache
        return jnp.stack([cache[s].astype(jnp.float32) for s in sites], axis=2)  # [B, T, L', D]

    return states


def hidden_states(model: Model, tokens: np.ndarray, layers: Sequence[int], *, batch: int = 32) -> np.ndarray:
    """``[N, T, L', D]`` float32 hidden states of ``tokens [N, T]`` at ``layers`` (rows run in chunks;
    the forward pass stops after the last block needed)."""
    states = _states_program(hidden_sites(model, layers), max(max(layers), 1))
    tokens = np.asarray(tokens, np.int32)
    return np.concatenate([np.asarray(states(model, tokens[i:i + batch])) for i in range(0, len(tokens), batch)])


def offset_labels(tokens: np.ndarray, lengths: np.ndarray, offsets: Sequence[int]) -> np.ndarray:
    """``[N, T, O]`` the token at ``t + i`` for each offset, -1 where ``t + i`` falls outside the document
    (``tokens [N, T]`` right-padded, row ``n`` holding ``lengths[n]`` tokens) or ``t`` is padding."""
    n, t = tokens.shape
    pos = np.arange(t)[None, :, None] + np.asarray(offsets)[None, None, :]  # [1, T, O]
    inside = (pos >= 0) & (pos < np.asarray(lengths)[:, None, None]) & \
        (np.arange(t)[None, :, None] < np.asarray(lengths)[:, None, None])  # [N, T, O]
    picked = np.take_along_axis(tokens[:, :, None].repeat(len(offsets), 2), np.clip(pos, 0, t - 1)
                                .repeat(n, 0), axis=1)
    return np.where(inside, picked, -1).astype(np.int32)


def init_probes(d_model: int, vocab: int, cfg: ProbeConfig) -> dict:
    """``{"w": zeros [L', O, D, V]}``: every probe starts at the uniform distribution (the problem is convex)."""
    return {"w": jnp.zeros((len(cfg.layers), len(cfg.offsets), d_model, vocab), jnp.float32)}


def _log_probs(params: dict, acts: jax.Array) -> jax.Array:
    logits = jnp.einsum("bld,lodv->blov", acts, params["w"])  # [B, L', O, V]
    return jax.nn.log_softmax(logits, axis=-1)


def probe_loss(params: dict, acts: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean over probes of each probe's cross-entropy on its valid targets (``acts [B, L', D]``,
    ``labels [B, O]``, -1 = none)."""
    logp = _log_probs(params, acts)  # [B, L', O, V]
    valid = labels >= 0  # [B, O]
    nll = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[:, None, :, None], axis=-1)[..., 0]  # [B, L', O]
    per_probe = (nll * valid[:, None, :]).sum(0) / jnp.maximum(valid.sum(0), 1)[None, :]  # [L', O]
    return per_probe.mean()


def train_probes(acts: np.ndarray, labels: np.ndarray, vocab: int, cfg: ProbeConfig, *,
                 directory: str | Path | None = None, run_config: Mapping | None = None,
                 quiet: bool = True) -> tuple[dict, list[dict]]:
    """Train the stacked probes on ``acts [M, L', D]`` / ``labels [M, O]`` with ``fit`` (checkpoints,
    metrics and resume in ``directory``); returns ``(params, metrics rows)``."""
    acts, labels = np.asarray(acts, np.float32), np.asarray(labels, np.int32)
    if acts.ndim != 3 or acts.shape[1] != len(cfg.layers) or labels.shape != (len(acts), len(cfg.offsets)):
        raise ValueError(f"expected acts [M, {len(cfg.layers)}, D] and labels [M, {len(cfg.offsets)}], "
                         f"got {acts.shape} and {labels.shape}")
    optimizer = optax.adam(cfg.lr)

    def loss_fn(params, data, idx, key):
        return probe_loss(params, data["acts"][idx], data["labels"][idx])

    step = make_train_step(loss_step(loss_fn, optimizer))
    state = init_state(init_probes(acts.shape[2], vocab, cfg), optimizer, jax.random.key(cfg.seed))
    m = len(acts)
    batches = lambda s: np.random.default_rng([cfg.seed, s]).integers(0, m, min(cfg.batch_size, m))
    config = {**dataclasses.asdict(cfg), "positions": m, "vocab": vocab, **(run_config or {})}
    state, rows = fit(step, state, batches, LoopConfig(steps=cfg.steps, save_every=max(cfg.steps // 2, 1),
                                                        log_every=max(cfg.steps // 20, 1), desc="probes",
                                                        quiet=quiet),
                      directory=directory, frozen={"acts": jnp.asarray(acts), "labels": jnp.asarray(labels)},
                      run_config=config if directory is not None else None, may_change=("steps",),
                      log=(lambda _: None) if quiet else print)
    return state["params"], rows


@jax.jit
def _targets(params: dict, acts: jax.Array, labels: jax.Array):
    logp = _log_probs(params, acts)  # [B, L', O, V]
    idx = jnp.maximum(labels, 0)[:, None, :, None]
    prob = jnp.exp(jnp.take_along_axis(logp, idx, axis=-1)[..., 0])  # [B, L', O]
    correct = logp.argmax(-1) == idx[..., 0]
    valid = (labels >= 0)[:, None, :]
    return jnp.where(valid, prob, jnp.nan), correct & valid


def probe_targets(params: dict, acts: np.ndarray, labels: np.ndarray, *, chunk: int = 2048):
    """``(prob [M, L', O], correct [M, L', O])``: each probe's probability of its true target and whether
    its argmax is that target (NaN / False where the target does not exist)."""
    out = [_targets(params, jnp.asarray(acts[i:i + chunk], jnp.float32), jnp.asarray(labels[i:i + chunk]))
           for i in range(0, len(acts), chunk)]
    return np.concatenate([np.asarray(p) for p, _ in out]), np.concatenate([np.asarray(c) for _, c in out])


# ----------------------------------------------------------------------------- erasure score


def erasure_deltas(prob: np.ndarray, cfg: ProbeConfig, *, early: int, late: int) -> np.ndarray:
    """``delta [T, 3]`` of one document from ``prob [T, L', O]`` (``probe_targets`` of its positions):
    columns ``SCORE_OFFSETS`` (0, -1, -2), ``P_early - P_late``, NaN where the target does not exist.
    ``early`` / ``late`` must be probed layers (``late > early``)."""
    e, l = cfg.layer_index(early), cfg.layer_index(late)
    if late <= early:
        raise ValueError(f"late layer ({late}) must come after early layer ({early})")
    cols = [cfg.offset_index(i) for i in SCORE_OFFSETS]
    prob = np.asarray(prob, np.float64)
    return prob[:, e, cols] - prob[:, l, cols]


def _check_delta(delta: np.ndarray) -> np.ndarray:
    delta = np.asarray(delta, np.float64)
    if delta.ndim != 2 or delta.shape[1] != len(SCORE_OFFSETS):
        raise ValueError(f"delta must be [T, {len(SCORE_OFFSETS)}] (offsets {SCORE_OFFSETS}), got {delta.shape}")
    return delta


def span_score(delta: np.ndarray, start: int, end: int) -> float:
    """``psi`` of the span ``[start, end)`` (tokens start..end-1), a plain loop over its terms."""
    delta = _check_delta(delta)
    t_len = len(delta)
    if not 0 <= start < end <= t_len:
        raise ValueError(f"span [{start}, {end}) ({end - start} tokens) does not fit the document of {t_len} "
                         f"tokens: valid spans are 0 <= start < end <= {t_len}")
    terms = [delta[end - 1, 0]]
    for t in range(start, end):
        for i in (1, 2):
            terms.append((1.0 if t - i >= start else -1.0) * delta[t, i])
    terms = [x for x in terms if not np.isnan(x)]
    return float(sum(terms) / len(terms)) if terms else 0.0


def span_scores(delta: np.ndarray, max_len: int) -> np.ndarray:
    """``[T, max_len]``: entry ``[p, n-1]`` is ``psi`` of ``[p, p + n)`` (NaN past the document end),
    vectorised over starts."""
    delta = _check_delta(delta)
    t_len = len(delta)
    if not 1 <= max_len <= t_len:
        raise ValueError(f"max_len {max_len} does not fit the document of {t_len} tokens: valid 1..{t_len}")
    present = ~np.isnan(delta)
    d = np.nan_to_num(delta)
    starts = np.arange(t_len)
    out = np.full((t_len, max_len), np.nan)
    total, count = np.zeros(t_len), np.zeros(t_len)  # running sums of the +-delta(t, -i) terms per start
    for n in range(1, max_len + 1):
        t = starts + n - 1  # the span's newest token
        ok = t < t_len
        tt = np.minimum(t, t_len - 1)
        for i in (1, 2):
            sign = np.where(tt - i >= starts, 1.0, -1.0)
            total += np.where(ok, sign * d[tt, i], 0.0)
            count += np.where(ok, present[tt, i], 0)
        num = total + d[tt, 0]
        den = count + present[tt, 0]
        out[:, n - 1] = np.where(ok, np.where(den > 0, num / np.maximum(den, 1), 0.0), np.nan)
    return out


def segment(delta: np.ndarray, max_len: int) -> list[tuple[int, int, float]]:
    """Non-overlapping spans ``(start, end, score)`` covering the document, taken in decreasing score
    (Algorithm 1); ``max_len`` is capped at the document length. Returned in document order."""
    delta = _check_delta(delta)
    scores = span_scores(delta, min(max_len, len(delta)))  # [T, n]
    p, n = np.nonzero(~np.isnan(scores))
    order = np.lexsort((n, p, -scores[p, n]))  # by score desc, then start, then length
    taken = np.zeros(len(delta), bool)
    out = []
    for k in order:
        a, b = p[k], p[k] + n[k] + 1
        if not taken[a:b].any():
            taken[a:b] = True
            out.append((int(a), int(b), float(scores[p[k], n[k]])))
    return sorted(out)


# ----------------------------------------------------------------------------- readout


class VocabEntry(NamedTuple):
    tokens: tuple[int, ...]
    count: int
    score: float  # mean erasure score over its occurrences


def read_out(documents: Sequence[tuple[Sequence[int], np.ndarray]], *, max_len: int = 6,
             min_tokens: int = 2) -> list[VocabEntry]:
    """The read-out vocabulary of ``documents`` (``(token ids [T], delta [T, 3])`` each): every segment
    of ``>= min_tokens`` tokens, with its count and mean score; most frequent first (ties: higher score)."""
    counts: Counter = Counter()
    sums: dict[tuple[int, ...], float] = {}
    for tokens, delta in documents:
        if len(tokens) != len(delta):
            raise ValueError(f"a document has {len(tokens)} tokens but {len(delta)} delta rows")
        for a, b, score in segment(delta, max_len):
            if b - a >= min_tokens:
                key = tuple(int(x) for x in tokens[a:b])
                counts[key] += 1
                sums[key] = sums.get(key, 0.0) + score
    entries = [VocabEntry(k, c, sums[k] / c) for k, c in counts.items()]
    return sorted(entries, key=lambda e: (-e.count, -e.score, e.tokens))


def frequent_ngrams(documents: Sequence[Sequence[int]], *, lengths: Sequence[int], k: int,
                    exclude: Sequence[int] = ()) -> list[tuple[tuple[int, ...], int]]:
    """The frequency baseline: the ``k`` most frequent n-grams (``n`` in ``lengths``) of ``documents``
    with their counts (ties: shorter, then lower ids); n-grams holding an ``exclude`` token are skipped."""
    skip = set(int(x) for x in exclude)
    counts: Counter = Counter()
    for doc in documents:
        doc = [int(x) for x in doc]
        for n in lengths:
            for a in range(len(doc) - n + 1):
                gram = tuple(doc[a:a + n])
                if not skip.intersection(gram):
                    counts[gram] += 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], len(kv[0]), kv[0]))[:k]
