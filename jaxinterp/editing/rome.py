"""ROME: rank-one model editing (Meng et al. 2022), on any family's projections (the family declares
which: MLP down-projections of transformers, Mamba's ``out_proj`` and either half of ``in_proj``).

An edit makes ``subject -- relation -> target_new`` by changing one linear map ``W`` (layout
``[in, out]``, ``value = key @ W (+ b)``) at one layer:

1. ``C = E[k k^T]`` (uncentred) of the map's inputs over a text corpus (``key_covariances``);
2. ``k*`` = the map's input at the subject's last token, averaged over context templates
   (``contexts``: token prefixes; the empty prefix included);
3. ``v* = v_init + delta``, ``delta`` added to the map's output at the subject's last token and
   optimised with Adam on mean NLL(target_new | rewrite prompts in every context)
   + ``kl_weight`` * KL(original || edited) of the next token after the subject
   + ``weight_decay`` * ||delta|| / ||v_init||^2, clamped to ``clamp * ||v_init||``;
4. ``W <- W + u Lambda^T`` with ``u = C^-1 k*`` and ``Lambda = (v* - value(k)) / <k, u>``, so
   the edited map sends ``k`` exactly to ``v*``. As in the reference repo (kmeng01/rome,
   ``compute_v``), ``k`` is the key of the bare prompt, the prompt ``v*`` was optimised on
   without a prefix; ``RomeConfig(insert_key="mean")`` uses the averaged ``k*`` instead (the
   paper's equation).

``edit`` returns a new ``Model``; the original is untouched. ``counterfact_scores``
computes efficacy / paraphrase / neighbourhood scores and their harmonic mean.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxinterp.families import get_family
from jaxinterp.interventions import Add
from jaxinterp.model import Model, run

__all__ = [
    "RomeConfig", "EditTarget", "EditRequest", "EditResult", "edit_target", "rome_targets", "key_covariances",
    "compute_key", "compute_value", "rank_one_update", "edit", "sample_contexts", "target_logprobs",
    "counterfact_scores",
]


# ----------------------------------------------------------------------------- targets


@dataclasses.dataclass(frozen=True)
class EditTarget:
    """Where an edit writes: ``value = key @ W[layer][:, cols] (+ b[layer][cols])``.

    ``weight``/``bias``: paths in ``model.params`` of the layer-stacked kernel ``[L, in, out]`` and
    bias; ``cols``: a column slice of ``W`` (the gate or SSM half of Mamba's fused ``in_proj``) or
    None for all columns. ``key_site`` / ``value_site``: the full site names of the map's input and
    output at ``layer``.
    """

    name: str
    layer: int
    weight: tuple[str, ...]
    bias: Optional[tuple[str, ...]]
    key_site: str
    value_site: str
    cols: Optional[tuple[int, int]] = None


def rome_targets(model: Model) -> tuple[str, ...]:
    """The projections ROME can edit in this model's family, the default first."""
    return tuple(get_family(model.family).rome_targets(model.config))


def _target_name(model: Model, name: Optional[str]) -> str:
    options = rome_targets(model)
    if not options:
        raise ValueError(f"ROME has no edit targets for family {model.family!r} (no projection whose output is a "
                         f"site of its own)")
    if name is None:
        return options[0]
    if name in options:
        return name
    hits = [o for o in options if o.endswith(f".{name}") or o.startswith(f"{name}.")]
    if len(hits) != 1:
        raise ValueError(f"unknown ROME target {name!r} for {model.family}; valid: {list(options)}")
    return hits[0]


def edit_target(model: Model, layer: int, name: Optional[str] = None) -> EditTarget:
    """The ``EditTarget`` of projection ``name`` (default: the family's first ROME target) at ``layer``."""
    name = _target_name(model, name)
    if not 0 <= layer < model.config.n_layers:
        raise ValueError(f"layer {layer} out of range for a {model.config.n_layers}-layer model")
    p = get_family(model.family).projections(model.config)[name]
    return EditTarget(name, layer, p.kernel, p.bias, f"blocks.{layer}.{p.in_site}", f"blocks.{layer}.{p.out_site}",
                      p.cols)


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _has(tree, path) -> bool:
    try:
        _get(tree, path)
        return True
    except (KeyError, TypeError):
        return False


def _set(tree, path, value):
    """A copy of the nested dict ``tree`` with ``path`` replaced (other leaves shared)."""
    if not path:
        return value
    out = dict(tree)
    out[path[0]] = _set(tree[path[0]], path[1:], value)
    return out


def _weight(model: Model, target: EditTarget):
    w = _get(model.params, target.weight)[target.layer]  # [in, out]
    b = _get(model.params, target.bias)[target.layer] if target.bias and _has(model.params, target.bias) else None
    if target.cols is not None:
        w = w[:, target.cols[0]:target.cols[1]]
        b = None if b is None else b[target.cols[0]:target.cols[1]]
    return w, b


def _apply_map(model, target, k):
    w, b = _weight(model, target)
    v = k @ w
    return v if b is None else v + b


# ----------------------------------------------------------------------------- config & request


INSERT_KEYS = ("bare", "mean")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RomeConfig:
    """ROME hyper-parameters (defaults: the paper's GPT-2 XL settings).

    Attributes:
      target: edit target (a projection of ``rome_targets(model)``, or its unique short name such as
        ``"out_proj"``; None = the family's default).
      lr, steps, early_stop: Adam on ``delta`` (stop once the loss is below ``early_stop``).
      kl_weight: weight of KL(original || edited) on the KL prompts.
      weight_decay: weight of ``||delta|| / ||v_init||^2``.
      clamp: ``||delta|| <= clamp * ||v_init||``.
      cov_ridge: ``C + cov_ridge * mean(diag C) * I`` (keeps ``C`` invertible on small corpora).
      insert_key: the key the edited map sends exactly to ``v*``: ``"bare"`` (the reference repo:
        the bare prompt's key, with ``u = C^-1 k*`` from the context-averaged ``k*``) or ``"mean"``
        (the paper's equation: ``k*`` itself).
    """

    target: Optional[str] = None
    lr: float = 0.5
    steps: int = 20
    early_stop: float = 0.05
    kl_weight: float = 0.0625
    weight_decay: float = 0.5
    clamp: float = 4.0
    cov_ridge: float = 1e-3
    insert_key: str = "bare"

    def __post_init__(self):
        if self.insert_key not in INSERT_KEYS:
            raise ValueError(f"RomeConfig.insert_key must be one of {INSERT_KEYS}, got {self.insert_key!r}")
        for name in ("lr", "clamp"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RomeConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("kl_weight", "weight_decay", "cov_ridge", "early_stop"):
            if getattr(self, name) < 0:
                raise ValueError(f"RomeConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.steps < 1:
            raise ValueError(f"RomeConfig.steps must be >= 1, got {self.steps}")

    @classmethod
    def paper(cls, **kw) -> "RomeConfig":
        return cls(**kw)


@dataclasses.dataclass(frozen=True)
class EditRequest:
    """Token-level edit request.

    ``prompts``: rewrite prompts (token ids ending right before the object);
    ``subject_last``: index of the subject's last token in each; ``target_new``: the new
    object's token ids; ``kl_prompts`` / ``kl_subject_last``: prompts whose next-token
    distribution should stay (default: each rewrite prompt cut after its subject).
    """

    prompts: tuple[tuple[int, ...], ...]
    subject_last: tuple[int, ...]
    target_new: tuple[int, ...]
    kl_prompts: tuple[tuple[int, ...], ...] = ()
    kl_subject_last: tuple[int, ...] = ()

    def __post_init__(self):
        if not self.prompts or len(self.prompts) != len(self.subject_last):
            raise ValueError("EditRequest needs >= 1 prompt and one subject_last index per prompt")
        for p, s in zip(self.prompts, self.subject_last):
            if not 0 <= s < len(p):
                raise ValueError(f"subject_last {s} outside prompt of length {len(p)}")
        if not self.target_new:
            raise ValueError("EditRequest.target_new must hold at least one token id")
        if len(self.kl_prompts) != len(self.kl_subject_last):
            raise ValueError("kl_prompts and kl_subject_last must have the same length")

    def kl(self) -> tuple[list, list]:
        if self.kl_prompts:
            return [list(p) for p in self.kl_prompts], list(self.kl_subject_last)
        return [list(p[: s + 1]) for p, s in zip(self.prompts, self.subject_last)], list(self.subject_last)


@dataclasses.dataclass(frozen=True)
class EditResult:
    model: Model
    layer: int
    target: EditTarget
    k_star: np.ndarray
    v_star: np.ndarray
    v_init: np.ndarray
    losses: tuple[float, ...]
    k_insert: Optional[np.ndarray] = None  # the key mapped exactly to v* (bare prompt's, or k*)
    nll_losses: tuple[float, ...] = ()  # the NLL term of each entry of ``losses``


# ----------------------------------------------------------------------------- batching


def _pad(prompts: Sequence[Sequence[int]], multiple: int = 8, pad_id: int = 0) -> np.ndarray:
    """Right-pad to a multiple of ``multiple`` (few distinct shapes, few compiles)."""
    n = max(len(p) for p in prompts)
    n = -(-n // multiple) * multiple
    out = np.full((len(prompts), n), pad_id, np.int64)
    for i, p in enumerate(prompts):
        out[i, : len(p)] = p
    return out


def _clip_len(model: Model, tokens: np.ndarray) -> np.ndarray:
    max_len = getattr(model.config, "max_seq_len", None)
    return tokens if max_len is None else tokens[:, :max_len]


def _with_contexts(prompts, subject_last, contexts):
    out, idx = [], []
    for ctx in contexts:
        for p, s in zip(prompts, subject_last):
            out.append(list(ctx) + list(p))
            idx.append(len(ctx) + s)
    return out, idx


# ----------------------------------------------------------------------------- C, k*, v*


def key_covariances(model: Model, layers: Sequence[int], token_batches: Iterable, target: Optional[str] = None,
                    pad_id: Optional[int] = None) -> dict[int, np.ndarray]:
    """Uncentred second moments ``E[k k^T]`` of the edit target's inputs per layer.

    ``token_batches``: iterable of int arrays ``[B, T]`` (corpus text); positions holding
    ``pad_id`` are left out.
    """
    targets = {l: edit_target(model, l, target) for l in layers}
    sites = [t.key_site for t in targets.values()]
    capture = jax.jit(lambda m, x: run(m, x, capture=sites, logits_at=-1).cache)
    sums: dict[int, Any] = {}
    count = 0
    for tokens in token_batches:
        tokens = jnp.asarray(tokens)
        cache = capture(model, tokens)
        keep = np.ones(tokens.shape, bool) if pad_id is None else np.asarray(tokens) != pad_id
        count += int(keep.sum())
        for l, t in targets.items():
            k = np.asarray(cache[t.key_site], np.float64)[keep]  # [n, F]
            sums[l] = k.T @ k if l not in sums else sums[l] + k.T @ k
    if count == 0:
        raise ValueError("key_covariances got no tokens")
    return {l: s / count for l, s in sums.items()}


def compute_key(model: Model, target: EditTarget, prompts, subject_last) -> jax.Array:
    """Mean of the target's input at the subject's last token over ``prompts``: ``k* [F]``."""
    tokens = _clip_len(model, _pad(prompts))
    keys = run(model, jnp.asarray(tokens), capture=target.key_site).cache[target.key_site]  # [P, T, F]
    return keys[jnp.arange(len(prompts)), jnp.asarray(subject_last)].mean(0)


def _rewrite_batch(prompts, subject_last, target_new):
    """Prompt + target (teacher forced): tokens, subject index, target positions/ids."""
    seqs = [list(p) + list(target_new[:-1]) for p in prompts]
    tokens = _pad(seqs)
    k = len(target_new)
    pos = np.array([[len(p) - 1 + i for i in range(k)] for p in prompts])  # [P, K]
    return tokens, np.asarray(subject_last), pos, np.broadcast_to(np.asarray(target_new), pos.shape)


@functools.partial(jax.jit, static_argnames=("value_site", "kl_weight", "weight_decay"))
def _v_loss(delta, model, batch, kl_batch, kl_ref, v_init, *, value_site, kl_weight, weight_decay):
    tokens, subj, pos, tgt = batch
    kl_tokens, kl_subj = kl_batch

    def add_at(tok, idx):
        mask = jnp.arange(tok.shape[1])[None, :] == idx[:, None]  # [P, T]
        return Add(mask[:, :, None].astype(delta.dtype) * delta)

    logits = run(model, tokens, interventions={value_site: add_at(tokens, subj)}).logits  # [P, T, V]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = logp[jnp.arange(logp.shape[0])[:, None], pos]  # [P, K, V]
    nll = -jnp.take_along_axis(picked, tgt[:, :, None], axis=-1)[..., 0].mean(1).mean()
    kl_logits = run(model, kl_tokens, interventions={value_site: add_at(kl_tokens, kl_subj)}).logits
    kl_logp = jax.nn.log_softmax(kl_logits[jnp.arange(kl_tokens.shape[0]), kl_subj].astype(jnp.float32), -1)
    kl = (jnp.exp(kl_ref) * (kl_ref - kl_logp)).sum(-1).mean()
    decay = jnp.sqrt(jnp.sum(delta ** 2) + 1e-12) / jnp.sum(v_init ** 2)  # smooth at delta = 0 (starts there)
    return nll + kl_weight * kl + weight_decay * decay, (nll, kl)


def compute_value(model: Model, target: EditTarget, request: EditRequest, contexts, config: RomeConfig):
    """``(v*, v_init, losses, nll_losses)``: the value that makes the model say ``target_new``.

    ``losses`` is the full objective at each step, ``nll_losses`` its NLL term alone (the norm
    penalty ``weight_decay * ||delta|| / ||v_init||^2`` is not scale-free: on a model whose values
    have small norms it dominates the total even when the NLL is near zero).
    """
    prompts, subj = _with_contexts(request.prompts, request.subject_last, contexts)
    tokens, subj, pos, tgt = _rewrite_batch(prompts, subj, request.target_new)
    batch = tuple(jnp.asarray(a) for a in (_clip_len(model, tokens), subj, pos, tgt))
    kl_prompts, kl_subj = request.kl()
    kl_tokens = jnp.asarray(_clip_len(model, _pad(kl_prompts)))
    kl_subj = jnp.asarray(kl_subj)
    ref = run(model, kl_tokens).logits[jnp.arange(len(kl_prompts)), kl_subj]
    kl_ref = jax.nn.log_softmax(ref.astype(jnp.float32), -1)
    # v_init: the value at the subject's last token of the bare prompt (the first context, e.g. bos +
    # prompt), i.e. the very activation the optimised delta is added to in that prompt.
    bare, bare_idx = _with_contexts(request.prompts[:1], request.subject_last[:1], contexts[:1])
    first = run(model, jnp.asarray(_clip_len(model, _pad(bare))), capture=target.value_site)
    v_init = first.cache[target.value_site][0, bare_idx[0]]  # [D]
    max_norm = config.clamp * jnp.linalg.norm(v_init)
    opt = optax.adam(config.lr)
    delta = jnp.zeros_like(v_init)
    state = opt.init(delta)
    grad_fn = jax.value_and_grad(_v_loss, has_aux=True)
    losses, nlls = [], []
    for _ in range(config.steps):
        (loss, (nll, _kl)), g = grad_fn(delta, model, batch, (kl_tokens, kl_subj), kl_ref, v_init,
                                  value_site=target.value_site, kl_weight=config.kl_weight,
                                  weight_decay=config.weight_decay)
        losses.append(float(loss))
        nlls.append(float(nll))
        if losses[-1] < config.early_stop:
            break
        updates, state = opt.update(g, state, delta)
        delta = optax.apply_updates(delta, updates)
        norm = jnp.linalg.norm(delta)
        delta = jnp.where(norm > max_norm, delta * (max_norm / norm), delta)
    return v_init + delta, v_init, tuple(losses), tuple(nlls)


def rank_one_update(w, b, cov, k_star, v_star, k_insert=None):
    """``W + u Lambda^T`` with ``u = C^-1 k*``, ``Lambda = (v* - (k W + b)) / <k, u>``.

    ``k = k_insert`` (default ``k*``) is the key the edited map sends exactly to ``v*``; the
    update direction ``u`` always comes from ``k*``.
    """
    k_star = jnp.asarray(k_star, jnp.float32)
    k = k_star if k_insert is None else jnp.asarray(k_insert, jnp.float32)
    u = jnp.linalg.solve(jnp.asarray(cov, jnp.float32), k_star)  # [F]
    current = k @ w + (0 if b is None else b)
    lam = (v_star - current) / jnp.dot(k, u)  # [D]
    return w + jnp.outer(u, lam).astype(w.dtype)


def _regularise(cov: np.ndarray, ridge: float) -> np.ndarray:
    cov = np.asarray(cov, np.float64)
    return cov + ridge * np.mean(np.diag(cov)) * np.eye(cov.shape[0])


def edit(model: Model, request: EditRequest, layer: int, cov, *, contexts: Sequence[Sequence[int]] = ((),),
         config: RomeConfig = RomeConfig()) -> EditResult:
    """Apply one ROME edit at ``layer``; returns the edited model (a new pytree) and the vectors.

    ``cov``: ``E[k k^T]`` of the target's inputs at ``layer`` (``key_covariances``);
    ``contexts``: token prefixes for the templates, used as given (include ``()`` or the bare
    prefix, e.g. ``(bos,)``, for the untemplated prompt); the first one is the bare prompt.
    """
    target = edit_target(model, layer, config.target)
    contexts = [tuple(c) for c in contexts] or [()]
    k_prompts, k_idx = _with_contexts(request.prompts[:1], request.subject_last[:1], contexts)
    k_star = compute_key(model, target, k_prompts, k_idx)
    k_bare = compute_key(model, target, k_prompts[:1], k_idx[:1])  # the bare prompt's key
    k_insert = k_bare if config.insert_key == "bare" else k_star
    v_star, v_init, losses, nlls = compute_value(model, target, request, contexts, config)
    w, b = _weight(model, target)
    cov = _regularise(cov, config.cov_ridge)
    if cov.shape != (w.shape[0], w.shape[0]):
        raise ValueError(f"covariance of shape {cov.shape} does not match the target's input size {w.shape[0]}")
    new_w = rank_one_update(w, b, cov, k_star, v_star, k_insert)
    full = _get(model.params, target.weight)  # [L, in, out]
    if target.cols is not None:
        full = full.at[target.layer, :, target.cols[0]:target.cols[1]].set(new_w)
    else:
        full = full.at[target.layer].set(new_w)
    edited = model.replace(params=_set(model.params, target.weight, full))
    return EditResult(edited, layer, target, np.asarray(k_star), np.asarray(v_star), np.asarray(v_init), losses,
                      np.asarray(k_insert), nlls)


# ----------------------------------------------------------------------------- contexts


def sample_contexts(model: Model, start: Sequence[int], n: int, length: int, seed: int = 0,
                    suffix: Sequence[int] = ()) -> list[tuple[int, ...]]:
    """``n`` prefixes sampled from the model: ``start`` + ``length`` sampled tokens + ``suffix``.

    ROME's context templates are short generated texts ("<prefix>. {prompt}").
    """
    start = list(start)
    total = len(start) + length
    buf = np.zeros((n, total), np.int64)
    buf[:, : len(start)] = start
    tokens = jnp.asarray(buf)

    @jax.jit
    def step(tokens, i, key):
        logits = run(model, tokens, logits_at=i - 1).logits  # [n, V]
        nxt = jax.random.categorical(key, logits.astype(jnp.float32))
        return tokens.at[:, i].set(nxt)

    key = jax.random.PRNGKey(seed)
    for i in range(len(start), total):
        key, sub = jax.random.split(key)
        tokens = step(tokens, i, sub)
    return [tuple(row) + tuple(suffix) for row in np.asarray(tokens).tolist()]


# ----------------------------------------------------------------------------- evaluation


@jax.jit
def _logprob_batch(model, tokens, pos, tgt, mask):
    logp = jax.nn.log_softmax(run(model, tokens).logits.astype(jnp.float32), -1)  # [P, T, V]
    picked = logp[jnp.arange(logp.shape[0])[:, None], pos]  # [P, K, V]
    return (jnp.take_along_axis(picked, tgt[:, :, None], -1)[..., 0] * mask).sum(1)


def target_logprobs(model: Model, prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> np.ndarray:
    """``log P(target | prompt)`` (summed over the target's tokens) for every prompt x target: ``[P, N]``."""
    n = len(prompts)
    prompts = list(prompts) + [list(prompts[0])] * (-n % 8)  # rows padded to a multiple of 8: few compiles
    out = np.zeros((len(prompts), len(targets)))
    kmax = max(len(t) for t in targets)
    for j, tgt in enumerate(targets):
        seqs = [list(p) + list(tgt[:-1]) for p in prompts]
        tokens = _clip_len(model, _pad(seqs))
        pos = np.array([[min(len(p) - 1 + i, tokens.shape[1] - 1) for i in range(kmax)] for p in prompts])
        ids = np.zeros((len(prompts), kmax), np.int64)
        ids[:, : len(tgt)] = tgt
        mask = np.zeros((len(prompts), kmax), np.float32)
        mask[:, : len(tgt)] = 1
        out[:, j] = np.asarray(_logprob_batch(model, jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(ids),
                                              jnp.asarray(mask)))
    return out[:n]


def counterfact_scores(model: Model, records: Sequence[Mapping[str, Any]]) -> dict:
    """CounterFact metrics over records (percentages).

    Each record: ``prompts``, ``paraphrase_prompts``, ``neighborhood_prompts`` (token id lists)
    and ``target_true`` / ``target_new`` (token id lists). ES / PS: % prompts with
    P(new) > P(true); NS: % neighbourhood prompts with P(true) > P(new) (averaged per record,
    then over records); ``score`` = harmonic mean of the three.
    """
    per = {"efficacy": [], "paraphrase": [], "neighborhood": []}
    for r in records:
        targets = [r["target_true"], r["target_new"]]
        for key, field, sign in (("efficacy", "prompts", 1), ("paraphrase", "paraphrase_prompts", 1),
                                 ("neighborhood", "neighborhood_prompts", -1)):
            if not r[field]:
                continue
            lp = target_logprobs(model, r[field], targets)  # [P, 2]: true, new
            wins = (lp[:, 1] > lp[:, 0]) if sign > 0 else (lp[:, 0] > lp[:, 1])
            per[key].append(float(wins.mean()))
    out = {k: 100.0 * float(np.mean(v)) if v else float("nan") for k, v in per.items()}
    vals = [out["efficacy"], out["paraphrase"], out["neighborhood"]]
    out["score"] = float(3.0 / sum(1.0 / max(v, 1e-9) for v in vals)) if all(np.isfinite(vals)) else float("nan")
    return out
