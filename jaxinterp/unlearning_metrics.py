"""Concept-erasure metrics: innocence, specificity, seamlessness, robustness.

* ``mc_accuracy``: 4-choice multiple choice scored by the logits of the 4 candidate answer
  tokens at the prompt's last position (chance 25%). On the erased domain this is
  innocence (lower is better, chance is ideal); on kept domains, specificity.
* ``perplexity``: held-out text perplexity (specificity).
* ``seamlessness``: the erased model continues erased-topic prompts; the ORIGINAL model
  scores those continuations (perplexity), compared with the original model's perplexity
  on its own continuations of the same prompts; plus a repetition rate (share of repeated
  bigrams within a continuation).
* Robustness = ``mc_accuracy`` on paraphrased prompts and with a hint prefix.

Every function takes ``logits_fn(tokens [B, L]) -> logits [B, L, V]`` so it serves a
``Model``, a ``LoraModel`` or anything else.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.elm import guided_generate, pad_batch

__all__ = ["mc_accuracy", "perplexity", "continuation_nll", "generate", "repetition_rate", "seamlessness"]


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


def continuation_nll(logits_fn: Callable, seqs: Sequence[Sequence[int]], starts: Sequence[int], *,
                     pad_id: int = 0, batch_size: int = 64) -> np.ndarray:
    """Per-sequence mean NLL of tokens at index >= ``starts[i]`` (everything after the first
    token when ``starts`` is all 1)."""
    out = []
    for sl in _chunks(len(seqs), batch_size):
        tokens, valid = pad_batch(seqs[sl], pad_id=pad_id)
        logp = np.asarray(jax.nn.log_softmax(logits_fn(jnp.asarray(tokens)).astype(jnp.float32), -1))
        tok_lp = np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0]    # [b, L-1]
        pos = np.arange(1, tokens.shape[1])[None]
        mask = valid[:, 1:] & (pos >= np.asarray(starts[sl])[:, None])
        out.append(-(tok_lp * mask).sum(1) / np.maximum(mask.sum(1), 1))
    return np.concatenate(out)


def perplexity(logits_fn: Callable, seqs: Sequence[Sequence[int]], **kw) -> float:
    """Token-weighted perplexity of whole sequences (first token is context)."""
    nll = continuation_nll(logits_fn, seqs, [1] * len(seqs), **kw)
    lengths = np.asarray([len(s) - 1 for s in seqs], float)
    return float(np.exp((nll * lengths).sum() / lengths.sum()))


def generate(logits_fn: Callable, prompts: Sequence[Sequence[int]], n_new: int, key, *, temperature: float = 1.0,
             pad_id: int = 0) -> list[list[int]]:
    """Sampled continuations (``n_new`` tokens) of each prompt."""
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


def seamlessness(erased_fn: Callable, original_fn: Callable, prompts: Sequence[Sequence[int]], n_new: int,
                 key, *, pad_id: int = 0) -> dict[str, float]:
    """Original-model perplexity of the erased model's continuations vs of its own."""
    k1, k2 = jax.random.split(key)
    erased = generate(erased_fn, prompts, n_new, k1, pad_id=pad_id)
    own = generate(original_fn, prompts, n_new, k2, pad_id=pad_id)
    starts = [len(p) for p in prompts]
    ppl = lambda gens: float(np.exp(np.mean(continuation_nll(original_fn, [list(p) + g for p, g in zip(prompts, gens)],
                                                             starts, pad_id=pad_id))))
    ppl_erased, ppl_own = ppl(erased), ppl(own)
    return {"ppl_erased_gen": ppl_erased, "ppl_original_gen": ppl_own, "ppl_ratio": ppl_erased / ppl_own,
            "repetition_erased": repetition_rate(erased), "repetition_original": repetition_rate(own)}
