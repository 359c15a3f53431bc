"""Causal tracing (Meng et al. 2022, "ROME") as one compiled program per prompt and kind.

Semantics follow the reference implementation (kmeng01/rome):

* the prompt is run once clean and ``N`` times corrupted (default ``N = 10``); corruption adds
  Gaussian noise ``3 * sigma * eps`` to the embedding output over the subject span ``[b, e)``
  (``sigma`` = std of subject-token embeddings over a dataset, ``embedding_sigma``), or swaps
  in another subject of the same token length (``alt_subject_corruption``, as the Mamba paper);
* the score is the softmax probability, at the last position, of the clean run's top token
  (or a given ``answer``), averaged over the corrupted rows;
* a cell ``(t, l)`` restores the clean value of the traced site at token ``t`` in layer ``l``
  (``kind="resid_post"``: the block output) or in a window of layers around ``l``
  (module outputs such as ``mlp_out`` / ``attn_out`` / ``mixer_out``: ``[l - w//2, l + w - w//2)``
  clipped, ``w = 10``);
* ``freeze=<site>`` gives the "severed" variant (ROME) and Mamba "path blocking": the freeze
  site at token ``t`` in every layer after ``l`` is held at its corrupted value.

Two engines produce the same tables: ``"full"`` (any family) vmaps a full forward pass over
restore masks, chunked with ``lax.map``; ``"incremental"`` (every family with a stepper) recomputes only what a
restoration can change (layers from the restored one on, positions from ``t`` on, keys and
values of earlier positions taken from the corrupted run, logits at the last position only).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxinterp.families import get_family
from jaxinterp.interventions import Add, ByLayer, Patch
from jaxinterp.model import Model, run
from jaxinterp.patching.cells import answer_prob, layer_window
from jaxinterp.patching.incremental import incremental_table

__all__ = [
    "TraceConfig",
    "Corruption",
    "TraceResult",
    "embedding_sigma",
    "gaussian_corruption",
    "alt_subject_corruption",
    "trace",
    "trace_batch",
    "prepare_batch",
    "TraceBatch",
    "TracePlan",
    "restore_probs",
    "layer_window",
    "trace_kinds",
    "TOKEN_CLASSES",
    "token_classes",
    "average_indirect_effect",
]

ENGINES = ("auto", "full", "incremental")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TraceConfig:
    """Causal-tracing settings (defaults: the ROME paper's).

    Attributes:
      n_samples: corrupted rows per prompt.
      noise_multiplier: noise std in units of the subject-embedding sigma (3 in ROME).
      noise_seed: numpy seed of the noise; ROME reseeds identically on every call.
      window: layers restored per cell for module-output kinds (10 in ROME); the residual
        kind ``resid_post`` always restores one layer.
      chunk: cells evaluated per ``lax.map`` step by the full engine (bounds memory).
      engine: ``"auto"`` (incremental where the family supports it), ``"full"`` or ``"incremental"``.
      position_buckets: incremental engine: groups of restored tokens sharing one suffix
        length (fewer groups = smaller program and faster compile, more padded compute;
        0 = one group per token).
    """

    n_samples: int = 10
    noise_multiplier: float = 3.0
    noise_seed: int = 1
    window: int = 10
    chunk: int = 16
    engine: str = "auto"
    position_buckets: int = 4

    def __post_init__(self):
        if self.n_samples < 1:
            raise ValueError(f"TraceConfig.n_samples must be >= 1, got {self.n_samples}")
        if self.window < 1:
            raise ValueError(f"TraceConfig.window must be >= 1, got {self.window}")
        if self.chunk < 1:
            raise ValueError(f"TraceConfig.chunk must be >= 1, got {self.chunk}")
        if self.position_buckets < 0:
            raise ValueError(f"TraceConfig.position_buckets must be >= 0, got {self.position_buckets}")
        if self.engine not in ENGINES:
            raise ValueError(f"TraceConfig.engine must be one of {ENGINES}, got {self.engine!r}")

    @classmethod
    def rome(cls, **kw) -> "TraceConfig":
        """ROME's causal-tracing defaults (N = 10, 3 sigma noise, 10-layer windows)."""
        return cls(**kw)

    @classmethod
    def quick(cls, **kw) -> "TraceConfig":
        """Fewer samples for smoke runs and tests."""
        return cls(**{"n_samples": 3, **kw})


@struct.dataclass
class Corruption:
    """Corrupted inputs: ``tokens [N, T]`` plus ``delta [N, T, D]`` added on the ``embed`` site."""

    tokens: jax.Array
    delta: jax.Array


@dataclasses.dataclass(frozen=True)
class TraceResult:
    """One prompt's trace: ``probs [T, L]`` (restored score per cell), ``p_clean``, ``p_corrupt``."""

    probs: np.ndarray
    p_clean: float
    p_corrupt: float
    answer: int
    kind: str
    subject: tuple[int, int]
    window: int
    freeze: Optional[str] = None

    @property
    def indirect_effect(self) -> np.ndarray:
        """IE(t, l) = p_restored - p_corrupt, ``[T, L]``."""
        return self.probs - self.p_corrupt

    @property
    def total_effect(self) -> float:
        return self.p_clean - self.p_corrupt

    def to_dict(self) -> dict:
        return {
            "kind": self.kind, "freeze": self.freeze, "window": self.window, "subject": list(self.subject),
            "answer": self.answer, "p_clean": self.p_clean, "p_corrupt": self.p_corrupt,
            "probs": self.probs.tolist(),
        }


# ----------------------------------------------------------------------------- helpers


def _n_layers(model: Model) -> int:
    return int(model.config.n_layers)


def trace_kinds(model: Model) -> list[str]:
    """Site suffixes that can be traced on this model (``blocks.0.<kind>``)."""
    return [s[len("blocks.0."):] for s in model.sites if s.startswith("blocks.0.")]


def _check_kind(model: Model, kind: str, what: str = "kind") -> None:
    if f"blocks.0.{kind}" not in model.sites:
        raise ValueError(f"unknown trace {what} {kind!r} for a {model.family} model; valid: {trace_kinds(model)}")


def _effective_window(kind: str, config: TraceConfig) -> int:
    return 1 if kind == "resid_post" else config.window


def _check_span(subject: Sequence[int], seq_len: int) -> tuple[int, int]:
    b, e = int(subject[0]), int(subject[1])
    if not 0 <= b < e <= seq_len:
        raise ValueError(f"subject span {(b, e)} must satisfy 0 <= b < e <= {seq_len} (the prompt length)")
    return b, e


def embedding_sigma(model: Model, subjects: Sequence[Sequence[int]]) -> float:
    """Std of all entries of the token embeddings of every subject token list (ROME's sigma).

    Uses the family's token-embedding table (the reference measures the word-embedding output,
    before position embeddings or any embedding scale). Unbiased std, as ``torch.std``.
    """
    if not subjects:
        raise ValueError("embedding_sigma needs at least one subject token list")
    table = get_family(model.family).embedding(model.params)
    rows = [np.asarray(jnp.take(table, jnp.asarray(toks, jnp.int32).reshape(-1), axis=0), np.float64)
            for toks in subjects]
    return float(np.concatenate(rows).std(ddof=1))


def _embed_dim(model: Model) -> int:
    return int(model.config.d_model)


def gaussian_corruption(model: Model, tokens, subject, sigma: float, config: TraceConfig = TraceConfig(),
                        noise=None) -> Corruption:
    """ROME's corruption: ``noise_multiplier * sigma * eps`` on the subject span of ``embed``.

    ``noise`` (``[N, e - b, D]``, unit scale) may be passed explicitly to match another
    implementation; by default it is ``numpy.random.RandomState(noise_seed).randn(N, e - b, D)``.
    """
    tokens = np.asarray(tokens)
    seq = tokens.shape[-1]
    b, e = _check_span(subject, seq)
    n, d = config.n_samples, _embed_dim(model)
    if noise is None:
        noise = np.random.RandomState(config.noise_seed).randn(n, e - b, d)
    noise = np.asarray(noise, np.float64)
    if noise.shape != (n, e - b, d):
        raise ValueError(f"noise must have shape (n_samples, e - b, d_model) = {(n, e - b, d)}, got {noise.shape}")
    delta = np.zeros((n, seq, d), np.float32)
    delta[:, b:e] = config.noise_multiplier * sigma * noise
    dtype = jax.tree_util.tree_leaves(model.params)[0].dtype
    return Corruption(jnp.asarray(np.broadcast_to(tokens, (n, seq)), jnp.int32), jnp.asarray(delta, dtype))


def alt_subject_corruption(model: Model, tokens, subject, alt_subjects: Sequence[Sequence[int]]) -> Corruption:
    """Replace the subject span with other subjects of the same token length (one row each)."""
    tokens = np.asarray(tokens)
    b, e = _check_span(subject, tokens.shape[-1])
    rows = []
    for alt in alt_subjects:
        alt = np.asarray(alt)
        if alt.shape != (e - b,):
            raise ValueError(f"alternative subject {alt.tolist()} has {alt.size} tokens; the subject has {e - b}")
        row = tokens.copy()
        row[b:e] = alt
        rows.append(row)
    if not rows:
        raise ValueError("alt_subject_corruption needs at least one alternative subject")
    toks = jnp.asarray(np.stack(rows), jnp.int32)
    return Corruption(toks, jnp.zeros(toks.shape + (_embed_dim(model),), jnp.float32))


# ----------------------------------------------------------------------------- cells


def _cell_masks(kind_window: int, n_layers: int, seq: int, freeze: Optional[str]):
    """Restore / freeze masks ``[T * L, L, T]`` for every cell ``(t, l)`` (row-major)."""
    restore = np.zeros((seq, n_layers, n_layers, seq), bool)
    frozen = np.zeros_like(restore)
    for t in range(seq):
        for l in range(n_layers):
            restore[t, l, list(layer_window(l, kind_window, n_layers)), t] = True
            if freeze is not None:
                frozen[t, l, l + 1:, t] = True
    return restore.reshape(seq * n_layers, n_layers, seq), frozen.reshape(seq * n_layers, n_layers, seq)


def _stack_layers(cache: dict, kind: str, n_layers: int) -> jax.Array:
    return jnp.stack([cache[f"blocks.{j}.{kind}"] for j in range(n_layers)])  # [L, B, T, ...]


def _restore_interventions(kind, freeze, clean_vals, corrupt_vals, restore, frozen, delta):
    """One stacked intervention per traced site: layer ``j`` patches ``clean_vals[j]`` where ``restore[j]``."""
    ivs: dict[str, Any] = {"embed": Add(delta), f"blocks.*.{kind}": ByLayer(Patch(clean_vals, mask=restore[:, None]))}
    if freeze is not None:
        ivs[f"blocks.*.{freeze}"] = ByLayer(Patch(corrupt_vals, mask=frozen[:, None]))
    return ivs


def _clean_and_corrupt(model, tokens, corruption, answer, capture_clean, capture_corrupt):
    clean = run(model, tokens[None], capture=capture_clean, logits_at=-1)
    top = jnp.argmax(clean.logits[0])
    answer = jnp.where(answer < 0, top, answer)
    p_clean = jax.nn.softmax(clean.logits[0].astype(jnp.float32))[answer]
    bad = run(model, corruption.tokens, capture=capture_corrupt, interventions={"embed": Add(corruption.delta)},
              logits_at=-1)
    p_corrupt = answer_prob(bad.logits, answer)
    return answer, p_clean, p_corrupt, clean.cache, bad.cache


def _full_probs(model, kind, freeze, chunk, corruption, answer, clean_vals, corrupt_vals, restore, frozen):
    """Scores for arbitrary cells given as masks ``restore/frozen [C, L, T]`` (full forwards)."""
    def one(masks):
        r, f = masks
        ivs = _restore_interventions(kind, freeze, clean_vals, corrupt_vals, r, f, corruption.delta)
        out = run(model, corruption.tokens, interventions=ivs, logits_at=-1)
        return answer_prob(out.logits, answer)

    return jax.lax.map(one, (restore, frozen), batch_size=chunk)


def _captures(kind, freeze, n_layers):
    clean = [f"blocks.{j}.{kind}" for j in range(n_layers)]
    bad = [f"blocks.{j}.{freeze}" for j in range(n_layers)] if freeze else []
    return clean, bad


def _restore_probs_impl(model, tokens, corruption, answer, restore, frozen, *, kind, freeze, chunk):
    n_layers = _n_layers(model)
    cap_clean, cap_bad = _captures(kind, freeze, n_layers)
    answer, p_clean, p_corrupt, cc, bc = _clean_and_corrupt(model, tokens, corruption, answer, cap_clean, cap_bad)
    clean_vals = _stack_layers(cc, kind, n_layers)
    corrupt_vals = _stack_layers(bc, freeze, n_layers) if freeze else None
    probs = _full_probs(model, kind, freeze, chunk, corruption, answer, clean_vals, corrupt_vals, restore, frozen)
    return probs, p_clean, p_corrupt, answer


_restore_probs_jit = jax.jit(_restore_probs_impl, static_argnames=("kind", "freeze", "chunk"))


def restore_probs(model: Model, tokens, corruption: Corruption, restore, *, kind: str = "resid_post",
                  frozen=None, freeze: Optional[str] = None, answer: int = -1, chunk: int = 16):
    """Scores of arbitrary restorations: ``restore [C, L, T]`` bool (layer, token) masks per cell.

    Returns ``(probs [C], p_clean, p_corrupt, answer)``. A mask of all ones restores every
    position of every layer (the score is then ``p_clean``); all zeros gives ``p_corrupt``.
    """
    _check_kind(model, kind)
    restore = jnp.asarray(restore, bool)
    if frozen is None:
        frozen = jnp.zeros_like(restore)
    if freeze is not None:
        _check_kind(model, freeze, "freeze site")
    return _restore_probs_jit(model, jnp.asarray(tokens, jnp.int32), corruption, jnp.asarray(answer, jnp.int32),
                              restore, jnp.asarray(frozen, bool), kind=kind, freeze=freeze, chunk=chunk)


# ----------------------------------------------------------------------------- the sweep


def _table_full(model, tokens, corruption, answer, *, kind, freeze, window, chunk):
    seq, n_layers = tokens.shape[-1], _n_layers(model)
    restore, frozen = _cell_masks(window, n_layers, seq, freeze)
    probs, p_clean, p_corrupt, answer = _restore_probs_impl(
        model, tokens, corruption, answer, jnp.asarray(restore), jnp.asarray(frozen), kind=kind, freeze=freeze,
        chunk=chunk)
    return probs.reshape(seq, n_layers), p_clean, p_corrupt, answer


def _select_engine(model: Model, config: TraceConfig) -> str:
    stepper = get_family(model.family).stepper
    if config.engine == "auto":
        return "incremental" if stepper is not None else "full"
    if config.engine == "incremental" and stepper is None:
        raise ValueError(f"the {model.family!r} family declares no per-layer stepper for the incremental engine;"
                         f" use engine='full'")
    return config.engine


def _trace_impl(model, tokens, corruption, answer, *, kind, freeze, window, chunk, engine, skip_before, buckets):
    if engine == "incremental":
        return incremental_table(model, tokens, corruption, answer, kind=kind, freeze=freeze, window=window,
                                 skip_before=skip_before, buckets=buckets)
    return _table_full(model, tokens, corruption, answer, kind=kind, freeze=freeze, window=window, chunk=chunk)


_STATIC = ("kind", "freeze", "window", "chunk", "engine", "skip_before", "buckets")
_trace_jit = jax.jit(_trace_impl, static_argnames=_STATIC)


def _make_corruption(model, tokens, subject, config, sigma, noise, alt_subjects):
    if alt_subjects is not None:
        return alt_subject_corruption(model, tokens, subject, alt_subjects)
    if sigma is None:
        raise ValueError("Gaussian corruption needs sigma (see embedding_sigma) or alt_subjects")
    return gaussian_corruption(model, tokens, subject, sigma, config, noise)


def trace(model: Model, tokens, subject: Sequence[int], *, kind: str = "resid_post", sigma: float | None = None,
          noise=None, alt_subjects=None, freeze: Optional[str] = None, answer: int | None = None,
          config: TraceConfig = TraceConfig()) -> TraceResult:
    """Causal trace of one prompt: the ``[T, L]`` table of restored scores, one compiled call.

    Args:
      model: any family; families with a stepper use the incremental engine by default.
      tokens: int ``[T]`` prompt.
      subject: token span ``(b, e)`` of the subject.
      kind: traced site suffix (``resid_post``, ``mlp_out``, ``attn_out``, ``mixer_out``,
        ``mixer.ssm_out``, ...; see ``trace_kinds``).
      sigma / noise: Gaussian corruption (``noise`` optional, ``[N, e - b, D]`` unit scale).
      alt_subjects: instead of noise, token lists of other subjects of the same length.
      freeze: severed variant / path blocking: site suffix held at its corrupted value at the
        restored token in every later layer.
      answer: token whose probability is read (default: the clean run's top token).
    """
    _check_kind(model, kind)
    if freeze is not None:
        _check_kind(model, freeze, "freeze site")
        if freeze == kind:
            raise ValueError(f"freeze site must differ from the traced kind ({kind!r})")
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"trace takes one prompt [T]; got shape {tokens.shape} (use trace_batch for [P, T])")
    b, e = _check_span(subject, tokens.shape[0])
    corruption = _make_corruption(model, tokens, (b, e), config, sigma, noise, alt_subjects)
    window = _effective_window(kind, config)
    engine = _select_engine(model, config)
    probs, p_clean, p_corrupt, ans = _trace_jit(
        model, jnp.asarray(tokens, jnp.int32), corruption, jnp.asarray(-1 if answer is None else answer, jnp.int32),
        kind=kind, freeze=freeze, window=window, chunk=config.chunk, engine=engine, skip_before=b,
        buckets=config.position_buckets)
    return TraceResult(np.asarray(probs), float(p_clean), float(p_corrupt), int(ans), kind, (b, e), window, freeze)


@dataclasses.dataclass(frozen=True)
class TracePlan:
    """The static settings of one sweep (kind, freeze site, window, engine, ...): ``table`` maps
    one prompt's arrays to its trace table and is traceable, so callers can ``vmap`` it, jit it,
    or map it over devices (``jaxinterp.sharding.runner.causal_trace_tables``)."""

    kind: str
    freeze: Optional[str]
    window: int
    chunk: int
    engine: str
    skip_before: int
    buckets: int

    def table(self, model: Model, tokens, corruption: Corruption, answer):
        """``(probs [T, L], p_clean, p_corrupt, answer)`` of one prompt ``tokens [T]`` with its
        ``corruption`` (``[N, T]`` tokens, ``[N, T, D]`` delta) and ``answer`` (-1 = clean top token)."""
        return _trace_impl(model, tokens, corruption, answer, **dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class TraceBatch:
    """Inputs of a batched trace: ``tokens [P, T]``, ``corruption`` (``[P, N, T]`` tokens and
    ``[P, N, T, D]`` delta), ``answers [P]`` (-1 = clean top token), checked subject ``spans``,
    and the ``plan`` applying to every prompt."""

    tokens: np.ndarray
    corruption: Corruption
    answers: np.ndarray
    spans: list
    plan: TracePlan


def prepare_batch(model: Model, tokens, subjects: Sequence[Sequence[int]], *, kind: str = "resid_post",
                  sigma: float | None = None, alt_subjects=None, freeze: Optional[str] = None, answers=None,
                  config: TraceConfig = TraceConfig()) -> TraceBatch:
    """Validate ``P`` prompts of equal length and build their corruptions and sweep plan.

    ``alt_subjects``, if given, is one list of alternative subjects per prompt; otherwise the
    Gaussian corruption needs ``sigma``. ``trace_batch`` is ``prepare_batch`` + ``vmap(plan.table)``.
    """
    _check_kind(model, kind)
    if freeze is not None:
        _check_kind(model, freeze, "freeze site")
        if freeze == kind:
            raise ValueError(f"freeze site must differ from the traced kind ({kind!r})")
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or len(subjects) != tokens.shape[0]:
        raise ValueError(f"trace_batch takes tokens [P, T] and P subject spans; got {tokens.shape} and "
                         f"{len(subjects)} spans")
    if alt_subjects is not None and len(alt_subjects) != len(subjects):
        raise ValueError(f"alt_subjects needs one list per prompt: {len(alt_subjects)} lists for {len(subjects)} "
                         f"prompts")
    spans = [_check_span(s, tokens.shape[1]) for s in subjects]
    corrs = [_make_corruption(model, tokens[i], spans[i], config, sigma, None,
                              None if alt_subjects is None else alt_subjects[i]) for i in range(len(spans))]
    corruption = Corruption(jnp.stack([c.tokens for c in corrs]), jnp.stack([c.delta for c in corrs]))
    answers = np.full(len(spans), -1) if answers is None else np.asarray(answers)
    if answers.shape != (len(spans),):
        raise ValueError(f"answers must have one token id per prompt ({len(spans)}), got shape {answers.shape}")
    plan = TracePlan(kind=kind, freeze=freeze, window=_effective_window(kind, config), chunk=config.chunk,
                     engine=_select_engine(model, config), skip_before=min(b for b, _ in spans),
                     buckets=config.position_buckets)
    return TraceBatch(tokens.astype(np.int32), corruption, answers.astype(np.int32), spans, plan)


def _trace_batch_impl(model, tokens, corruption, answer, *, plan):
    return jax.vmap(plan.table, in_axes=(None, 0, 0, 0))(model, tokens, corruption, answer)


_trace_batch_jit = jax.jit(_trace_batch_impl, static_argnames=("plan",))


def trace_batch(model: Model, tokens, subjects: Sequence[Sequence[int]], *, kind: str = "resid_post",
                sigma: float | None = None, alt_subjects=None, freeze: Optional[str] = None, answers=None,
                config: TraceConfig = TraceConfig()) -> list[TraceResult]:
    """Causal traces of ``P`` prompts of equal length ``tokens [P, T]`` as one vmapped program.

    ``alt_subjects``, if given, is one list of alternative subjects per prompt.
    """
    batch = prepare_batch(model, tokens, subjects, kind=kind, sigma=sigma, alt_subjects=alt_subjects,
                          freeze=freeze, answers=answers, config=config)
    probs, p_clean, p_corrupt, ans = _trace_batch_jit(
        model, jnp.asarray(batch.tokens), batch.corruption, jnp.asarray(batch.answers), plan=batch.plan)
    probs, p_clean, p_corrupt, ans = map(np.asarray, (probs, p_clean, p_corrupt, ans))
    return [TraceResult(probs[i], float(p_clean[i]), float(p_corrupt[i]), int(ans[i]), kind, batch.spans[i],
                        batch.plan.window, freeze) for i in range(len(batch.spans))]


# ----------------------------------------------------------------------------- AIE

TOKEN_CLASSES = ("first_subject", "middle_subject", "last_subject", "first_subsequent", "further", "last")


def token_classes(subject: Sequence[int], seq_len: int) -> dict[str, list[int]]:
    """ROME's token classes of a prompt: positions of each (empty lists where a class is absent).

    The last token is its own class; "first subsequent" is the token right after the subject
    unless that is the last token; "further" are the tokens between it and the last token.
    """
    b, e = _check_span(subject, seq_len)
    last = seq_len - 1
    classes = {
        "first_subject": [b],
        "middle_subject": list(range(b + 1, e - 1)),
        "last_subject": [e - 1],
        "first_subsequent": [e] if e < last else [],
        "further": list(range(e + 1, last)),
        "last": [last],
    }
    return classes


def average_indirect_effect(results: Sequence[TraceResult]) -> dict:
    """AIE per token class ``[L]`` over traces (each trace averages its class's positions first).

    Returns ``{"classes": {name: [L] or None}, "n": {name: count}, "p_clean", "p_corrupt"}``.
    """
    sums: dict[str, Any] = {}
    counts = {c: 0 for c in TOKEN_CLASSES}
    for r in results:
        ie = r.indirect_effect
        for name, pos in token_classes(r.subject, ie.shape[0]).items():
            if not pos:
                continue
            row = ie[pos].mean(0)
            sums[name] = row if name not in sums else sums[name] + row
            counts[name] += 1
    classes = {c: (sums[c] / counts[c]).tolist() if counts[c] else None for c in TOKEN_CLASSES}
    return {
        "classes": classes,
        "n": counts,
        "p_clean": float(np.mean([r.p_clean for r in results])) if results else None,
        "p_corrupt": float(np.mean([r.p_corrupt for r in results])) if results else None,
    }
