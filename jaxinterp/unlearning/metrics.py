"""Concept-erasure metrics: innocence, specificity, seamlessness, robustness.

* ``mc_accuracy``: 4-choice multiple choice scored by the logits of the 4 candidate answer
  tokens at the prompt's last position (chance 25%). On the erased domain this is
  innocence (lower is better, chance is ideal); on kept domains, specificity.
* ``perplexity``: held-out text perplexity (specificity).
* ``seamlessness``: the erased model continues erased-topic prompts; the ORIGINAL model
  scores those continuations (perplexity), compared with the original model's perplexity
  on its own continuations of the same prompts; plus a repetition rate (share of repeated
  bigrams within a continuation). Given the ids of fact-object tokens it also splits the
  scored NLL into object tokens and all other tokens (``nll_split``): a model that does not
  know the facts pays for every wrong object under an original that is certain of them,
  while the other tokens measure fluency proper.
* ``innocent_floor``: the seamlessness ratio that no model innocent of the facts can beat on
  these prompts: the original model's own continuations with each erased fact object
  replaced by the least surprising other token (a strict bound at those slots) or by a
  random other object of the same relation (a typical innocent writer), scored by the
  original against its own continuations.
* Robustness = ``mc_accuracy`` on paraphrased prompts and with a hint prefix, and
  ``relearning_attack``: fine-tune every weight of the erased model for k steps on some text
  (other facts of the erased domain, or an unrelated domain) and measure held-out erased facts
  after each k (the standard test of unlearning: a shallow suppression comes back in a few
  steps, a model that never knew does not).
* ``scored_continuations``: a model's sampled continuations and their per-token NLL under an
  independent scorer (the retrain oracle: lower = as fluent as a model that never knew).
* ``ridge_probe``: a closed-form linear probe (ridge regression onto one-hot labels) for
  reading an attribute off the residual stream.

Every function takes ``logits_fn(tokens [B, L]) -> logits [B, L, V]`` so it serves a
``Model``, a ``LoraModel`` or anything else.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxinterp.generate import generate as generate_tokens
from jaxinterp.model import Model
from jaxinterp import train
from jaxinterp.unlearning.elm import guided_generate, next_token_nll, pad_batch

__all__ = ["mc_accuracy", "perplexity", "continuation_token_nll", "continuation_nll", "nll_split", "generate",
           "repetition_rate", "seamlessness", "innocent_floor", "lm_loss", "relearning_attack", "scored_continuations",
           "ridge_probe"]


def _chunks(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def mc_accuracy(logits_fn: Callable, prompts: Sequence[Sequence[int]], choice_ids: Sequence[Sequence[int]],
                correct: Sequence[int], *, pad_id: int = 0, batch_size: int = 64) -> float:
    """Share of questions whose correct choice has the largest logit among the candidates."""
    hits = []
    for sl in _chunks(len(prompts), batch_size):
        tokens, valid = pad_batch(prompts[sl], pad_id=pad_id)
        logits = np.asarray(logits_fn(jnp.asarray(tokens)))
        last = logits[np.arange(len(tokens)), valid.sum(1) - 1]                      # [b, V]
        cand = np.take_along_axis(last, np.asarray(choice_ids[sl]), axis=1)          # [b, 4]
        hits.append(cand.argmax(1) == np.asarray(correct[sl]))
    return float(np.concatenate(hits).mean())


def _continuation_logp(logits_fn: Callable, seqs: Sequence[Sequence[int]], starts: Sequence[int], *,
                       pad_id: int = 0, batch_size: int = 64):
    """Per sequence, in order: (log-probs [n, V] predicting each token at index >= ``starts[i]``, those n tokens)."""
    for sl in _chunks(len(seqs), batch_size):
        tokens, valid = pad_batch(seqs[sl], pad_id=pad_id)
        logp = np.asarray(jax.nn.log_softmax(logits_fn(jnp.asarray(tokens)).astype(jnp.float32), -1))
        for row_lp, row_tok, start, n in zip(logp, tokens, starts[sl], valid.sum(1)):
            first = max(start, 1)
            yield row_lp[first - 1:n - 1], row_tok[first:n]


def continuation_token_nll(logits_fn: Callable, seqs: Sequence[Sequence[int]], starts: Sequence[int], *,
                           pad_id: int = 0, batch_size: int = 64) -> list[np.ndarray]:
    """Per-sequence arrays of the NLL of each token at index >= ``starts[i]`` (in order)."""
    return [-np.take_along_axis(lp, tok[:, None], -1)[:, 0]
            for lp, tok in _continuation_logp(logits_fn, seqs, starts, pad_id=pad_id, batch_size=batch_size)]


def continuation_nll(logits_fn: Callable, seqs: Sequence[Sequence[int]], starts: Sequence[int], **kw) -> np.ndarray:
    """Per-sequence mean NLL of tokens at index >= ``starts[i]`` (everything after the first
    token when ``starts`` is all 1)."""
    return np.asarray([x.mean() if x.size else 0.0 for x in continuation_token_nll(logits_fn, seqs, starts, **kw)])


def nll_split(token_nll: Sequence[np.ndarray], tokens: Sequence[Sequence[int]], object_ids) -> dict[str, float]:
    """Token-weighted mean NLL over tokens whose id is in ``object_ids`` and over the rest.

    ``token_nll[i][j]`` is the NLL of ``tokens[i][j]``. Returns ``nll_obj``, ``nll_other``,
    ``obj_share`` (share of object tokens) and ``nll_all`` = share * obj + (1 - share) * other.
    """
    ids = np.asarray(sorted(set(int(i) for i in object_ids)))
    nll = np.concatenate([np.asarray(x, np.float64) for x in token_nll])
    toks = np.concatenate([np.asarray(t) for t in tokens])
    if nll.shape != toks.shape:
        raise ValueError(f"token_nll has {nll.size} entries but tokens has {toks.size}")
    is_obj = np.isin(toks, ids)
    mean = lambda m: float(nll[m].mean()) if m.any() else float("nan")
    return {"nll_obj": mean(is_obj), "nll_other": mean(~is_obj), "obj_share": float(is_obj.mean()),
            "nll_all": float(nll.mean())}


def perplexity(logits_fn: Callable, seqs: Sequence[Sequence[int]], **kw) -> float:
    """Token-weighted perplexity of whole sequences (first token is context)."""
    nll = continuation_nll(logits_fn, seqs, [1] * len(seqs), **kw)
    lengths = np.asarray([len(s) - 1 for s in seqs], float)
    return float(np.exp((nll * lengths).sum() / lengths.sum()))


def generate(logits_fn: Callable | Model, prompts: Sequence[Sequence[int]], n_new: int, key, *,
             temperature: float = 1.0, pad_id: int = 0) -> list[list[int]]:
    """Sampled continuations (``n_new`` tokens) of each prompt. A ``Model`` runs ``ji.generate``
    (cached, the same per-step keys as the loop over a logits function, so the same tokens)."""
    if isinstance(logits_fn, Model):
        out = generate_tokens(logits_fn, [list(p) for p in prompts], max_new_tokens=n_new, temperature=temperature,
                              seed=key, stop_at_eos=False)
        return [list(r) for r in out.tokens]
    tokens, valid = pad_batch(prompts, max(len(p) for p in prompts) + n_new, pad_id)
    new = guided_generate(jax.jit(logits_fn), jnp.asarray(tokens), jnp.asarray(valid.sum(1)), n_new, key,
                          temperature=temperature)
    return [list(r) for r in np.asarray(new)]


def repetition_rate(seqs: Sequence[Sequence[int]]) -> float:
    """Mean share of repeated bigrams within each sequence (0 = no bigram repeats)."""
    rates = []
    for s in seqs:
        bigrams = list(zip(s[:-1], s[1:]))
        if bigrams:
            rates.append(1.0 - len(set(bigrams)) / len(bigrams))
    return float(np.mean(rates)) if rates else 0.0


def innocent_floor(original_fn: Callable, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                   object_groups: Sequence[Sequence[int]], *, seed: int = 0, pad_id: int = 0) -> dict[str, float]:
    """How low a model that does not know the facts can push the seamlessness ratio.

    ``continuations`` are the original model's own continuations of ``prompts``;
    ``object_groups`` lists the token ids of each erased relation's objects (a token may be in
    one group only). Every continuation token found in a group is a fact the original states,
    and an innocent model must write something else there. Returns

    * ``floor_ratio_best_wrong``: the per-token NLL at each such slot replaced by
      -log max_{v != token} P(v | prefix), every other token's NLL kept, as a perplexity ratio
      against the original's own. No model that avoids the original's object at these slots
      scores lower there (later tokens keep their NLL given the original object);
    * ``floor_ratio_random_wrong``: each such token replaced by a uniformly drawn other object
      of its group and the whole continuation rescored: the ratio of a writer exactly as
      fluent as the original but at chance on the facts;
    * ``floor_obj_share``: share of continuation tokens that are erased-fact objects.

    Ratios use the per-sequence mean NLL, like ``seamlessness``'s ``ppl_ratio``.
    """
    group_of: dict[int, int] = {}
    for g, ids in enumerate(object_groups):
        for i in ids:
            if int(i) in group_of:
                raise ValueError(f"token {int(i)} is in object groups {group_of[int(i)]} and {g}")
            group_of[int(i)] = g
    if any(len(ids) < 2 for ids in object_groups):
        raise ValueError("every object group needs at least two tokens (a wrong object to write)")
    seqs = [list(p) + list(c) for p, c in zip(prompts, continuations)]
    starts = [len(p) for p in prompts]
    own, best, n_obj, n_tok = [], [], 0, 0
    for lp, tok in _continuation_logp(original_fn, seqs, starts, pad_id=pad_id):
        rows = np.arange(len(tok))
        nll = -lp[rows, tok]
        other = lp.copy()
        other[rows, tok] = -np.inf
        is_obj = np.asarray([int(t) in group_of for t in tok], bool)
        own.append(nll)
        best.append(np.where(is_obj, -other.max(-1), nll))
        n_obj, n_tok = n_obj + int(is_obj.sum()), n_tok + len(tok)
    rng = np.random.default_rng(seed)

    def wrong(t: int) -> int:
        options = [int(o) for o in object_groups[group_of[t]] if int(o) != t]
        return options[rng.integers(len(options))]

    swapped = [[wrong(int(t)) if int(t) in group_of else int(t) for t in c] for c in continuations]
    rand = continuation_token_nll(original_fn, [list(p) + s for p, s in zip(prompts, swapped)], starts, pad_id=pad_id)
    mean = lambda v: float(np.mean([x.mean() for x in v]))
    return {"floor_ratio_best_wrong": float(np.exp(mean(best) - mean(own))),
            "floor_ratio_random_wrong": float(np.exp(mean(rand) - mean(own))),
            "floor_obj_share": n_obj / max(n_tok, 1)}


def seamlessness(erased_fn: Callable, original_fn: Callable, prompts: Sequence[Sequence[int]], n_new: int,
                 key, *, pad_id: int = 0, object_ids=None, temperature: float = 1.0,
                 score_prefix: Sequence[int] | None = None,
                 erased_object_groups: Sequence[Sequence[int]] | None = None) -> dict[str, float]:
    """Original-model perplexity of the erased model's continuations vs of its own.

    Both sets of ``n_new``-token continuations are sampled at ``temperature`` from the same
    prompts and scored over the same positions (the continuation only). With ``object_ids``
    the scored NLL is also split into object / other tokens (``nll_obj_*``, ``nll_other_*``,
    ``obj_share_*`` for ``erased`` and ``original``) and ``ppl_ratio_other`` =
    exp(nll_other_erased - nll_other_original), the ratio on non-object tokens. With
    ``score_prefix`` (tokens that replace each prompt's first token, e.g. bos + a context tag)
    the same continuations are also scored after that prefix: ``prefixed_ppl_ratio`` (and
    ``prefixed_ppl_ratio_other`` with ``object_ids``). With ``erased_object_groups`` (the
    erased relations' object ids, one list per relation) it adds ``innocent_floor`` of the
    original's own continuations (``floor_*``).
    """
    k1, k2 = jax.random.split(key)
    erased = generate(erased_fn, prompts, n_new, k1, pad_id=pad_id, temperature=temperature)
    own = generate(original_fn, prompts, n_new, k2, pad_id=pad_id, temperature=temperature)
    starts = [len(p) for p in prompts]
    gens = {"erased": erased, "original": own}
    scored = {k: continuation_token_nll(original_fn, [list(p) + g for p, g in zip(prompts, v)], starts, pad_id=pad_id)
              for k, v in gens.items()}
    ppl = {k: float(np.exp(np.mean([x.mean() for x in v]))) for k, v in scored.items()}
    out = {"ppl_erased_gen": ppl["erased"], "ppl_original_gen": ppl["original"],
           "ppl_ratio": ppl["erased"] / ppl["original"],
           "repetition_erased": repetition_rate(erased), "repetition_original": repetition_rate(own)}
    if object_ids is not None:
        for name in gens:
            split = nll_split(scored[name], gens[name], object_ids)
            out.update({f"nll_obj_{name}": split["nll_obj"], f"nll_other_{name}": split["nll_other"],
                        f"obj_share_{name}": split["obj_share"]})
        out["ppl_ratio_other"] = float(np.exp(out["nll_other_erased"] - out["nll_other_original"]))
    if score_prefix is not None:
        pre = list(score_prefix)
        nll = {k: continuation_token_nll(original_fn, [pre + list(p[1:]) + g for p, g in zip(prompts, v)],
                                         [len(pre) + len(p) - 1 for p in prompts], pad_id=pad_id)
               for k, v in gens.items()}
        mean = {k: float(np.mean(np.concatenate(v))) for k, v in nll.items()}
        out["prefixed_ppl_ratio"] = float(np.exp(mean["erased"] - mean["original"]))
        if object_ids is not None:
            other = {k: nll_split(nll[k], gens[k], object_ids)["nll_other"] for k in nll}
            out["prefixed_ppl_ratio_other"] = float(np.exp(other["erased"] - other["original"]))
    if erased_object_groups is not None:
        seed = int(jax.random.randint(jax.random.fold_in(key, 3), (), 0, 2**31 - 1))
        out.update(innocent_floor(original_fn, prompts, own, erased_object_groups, seed=seed, pad_id=pad_id))
    return out


# ----------------------------------------------------------------------------- relearning


def lm_loss(params, skeleton: Model, batch: Mapping[str, jax.Array], key=None) -> jax.Array:
    """Mean next-token NLL of ``batch["tokens"] [B, T]`` over positions whose next token is
    ``batch["valid"]`` (the relearning attack's loss; ``skeleton`` = the model without params)."""
    logits = skeleton.replace(params=params).run(batch["tokens"]).logits   # [B, T, V]
    valid = jnp.asarray(batch["valid"], bool)
    pairs = valid & jnp.roll(valid, -1, axis=1)                              # [B, T]: t and t + 1 are tokens
    return next_token_nll(logits, batch["tokens"], pairs)


@functools.lru_cache(maxsize=8)
def _relearn_step(optimizer: optax.GradientTransformation):
    # one compiled step per optimizer object, shared by every model of the same shapes
    return train.make_train_step(train.loss_step(lm_loss, optimizer))


def relearning_attack(model: Model, batches: Callable[[int], Mapping[str, Any]], steps: Sequence[int],
                      evaluate: Callable[[Model], Any], *, optimizer: optax.GradientTransformation,
                      seed: int = 0) -> dict[int, Any]:
    """``{k: evaluate(model after k fine-tuning steps)}`` for each k in ``steps``.

    Every parameter of ``model`` is fine-tuned (``lm_loss``, the step of ``jaxinterp.train``)
    on ``batches(s)`` = ``{"tokens" [B, T] int32, "valid" [B, T] bool}`` for s = 0 .. max(steps) - 1;
    ``evaluate`` runs on the model after exactly k steps (k = 0: the model as given). ``model``
    itself is not changed. Pass one ``optimizer`` object to many calls to compile the step once.
    """
    ks = sorted({int(k) for k in steps})
    if not ks or ks[0] < 0:
        raise ValueError(f"relearning_attack needs step counts >= 0, got {list(steps)}")
    skeleton = model.replace(params={})
    out = {0: evaluate(model)} if ks[0] == 0 else {}
    if ks[-1] == 0:
        return out

    def at(step, state, metrics):
        if step in ks:
            out[step] = evaluate(model.replace(params=state["params"]))

    state = train.init_state(model.params, optimizer, jax.random.key(seed))
    train.fit(_relearn_step(optimizer), state, batches, train.LoopConfig(steps=ks[-1], quiet=True),
              frozen=skeleton, hooks=[train.Hook(1, at)], log=lambda msg: None)
    return out


# ----------------------------------------------------------------------------- fluency, probes


def scored_continuations(gen_fn: Callable | Model, scorer_fn: Callable, prompts: Sequence[Sequence[int]], n_new: int,
                         key, *, pad_id: int = 0, temperature: float = 1.0) -> tuple[list[list[int]], float]:
    """(``n_new``-token continuations sampled from ``gen_fn``, their mean per-token NLL under
    ``scorer_fn``), the NLL averaged over every continuation token (token-weighted)."""
    gens = generate(gen_fn, prompts, n_new, key, pad_id=pad_id, temperature=temperature)
    nll = continuation_token_nll(scorer_fn, [list(p) + g for p, g in zip(prompts, gens)], [len(p) for p in prompts],
                                 pad_id=pad_id)
    return gens, float(np.concatenate(nll).mean())


def ridge_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, n_classes: int,
                l2: float = 1e-2) -> np.ndarray:
    """Scores ``[N_test, n_classes]`` of a linear probe fit in closed form.

    Features are centred and scaled by the training set's mean and standard deviation, a bias
    column is appended, and ``W = (X^T X + l2 N I)^-1 X^T Y`` with ``Y`` the one-hot labels
    (the bias is not penalised); the predicted class is the argmax of ``X_test W``.
    """
    x_train, x_test = np.asarray(x_train, np.float64), np.asarray(x_test, np.float64)
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    feats = lambda x: np.concatenate([(x - mu) / sd, np.ones((len(x), 1))], 1)
    xt = feats(x_train)
    y = np.eye(n_classes)[np.asarray(y_train)]
    reg = l2 * len(xt) * np.eye(xt.shape[1])
    reg[-1, -1] = 0.0
    w = np.linalg.solve(xt.T @ xt + reg, xt.T @ y)
    return feats(x_test) @ w
