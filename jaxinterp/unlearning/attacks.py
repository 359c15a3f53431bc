"""Prompt attacks on an erased model: a GCG-style adversarial suffix search (Zou et al. 2023).

``gcg_suffix`` looks for ``k`` tokens that, appended to every prompt of a training set (each
prompt ends where its answer token must come), maximise the mean log-probability of the
answers. Each iteration (greedy coordinate gradient):

1. the gradient of the objective with respect to a one-hot encoding of the current suffix
   (``[k, V]``; the suffix's token embeddings are replaced by ``one_hot @ E`` at the ``embed``
   site, so the gradient flows through the family's embedding table);
2. per suffix position the ``top_k`` tokens with the largest gradient (the linearised gain of
   swapping to that token), restricted to ``allowed`` tokens;
3. ``candidates`` suffixes, each the current one with one uniformly drawn position set to a
   uniformly drawn token of that position's top-k;
4. every candidate scored exactly (one compiled program for the whole candidate batch), and
   the best becomes the current suffix. The best suffix seen so far is returned.

Prompts are left-padded so that the k tokens occupy the same columns in every row and the
answer is read at the last column (``logits_at=-1``). ``placement="prefix"`` (default) puts the
k tokens right after the prompt's bos (the question still ends where the answer comes: on a
base model the question is its own answer template, and GCG's suffix sits between the request
and the answer); ``"suffix"`` after the whole prompt.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.families import get_family
from jaxinterp.model import Model
from jaxinterp.unlearning.elm import pad_batch

__all__ = ["GCGConfig", "GCGResult", "gcg_suffix", "suffix_objective", "with_suffix", "PLACEMENTS"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class GCGConfig:
    """Budget of the search: ``iterations`` x ``candidates`` exact evaluations.

    Attributes:
      suffix_len: k, tokens in the suffix.
      iterations: greedy coordinate steps.
      candidates: suffixes scored per step (one compiled batch).
      top_k: tokens per position kept from the one-hot gradient.
      seed: the candidate sampler's seed.
    """

    suffix_len: int = 5
    iterations: int = 64
    candidates: int = 64
    top_k: int = 32
    seed: int = 0

    def __post_init__(self):
        for name in ("suffix_len", "iterations", "candidates", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"GCGConfig.{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class GCGResult:
    suffix: list[int]          # the best suffix found
    objective: float           # its mean answer log-prob on the training prompts
    history: list[float]       # best-so-far objective after each iteration (index 0: the initial suffix)


def _answer_logp(model: Model, parts, suffix, answers, embed_delta=None):
    """Mean over rows of log p(answer | head + suffix + tail): ``parts`` = (head, head_valid, tail, tail_valid)
    ([N, H], [N, T]), suffix [k], answers [N]; the answer is read at the last column."""
    head, head_valid, tail, tail_valid = parts
    n, k = head.shape[0], suffix.shape[0]
    full = jnp.concatenate([head, jnp.broadcast_to(suffix, (n, k)), tail], 1)                    # [N, H + k + T]
    mask = jnp.concatenate([head_valid, jnp.ones((n, k), bool), tail_valid], 1)
    interventions = None
    if embed_delta is not None:   # [k, D] added to the suffix's embeddings
        start = head.shape[1]
        interventions = {"embed": lambda x: x.at[:, start:start + k].add(embed_delta.astype(x.dtype))}
    logits = model.run(full, interventions=interventions, attention_mask=mask, logits_at=-1).logits   # [N, V]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    return jnp.take_along_axis(logp, answers[:, None], 1).mean()


@jax.jit
def _one_hot_grad(model: Model, parts, suffix, answers):
    """d objective / d one_hot(suffix): [k, V]."""
    table = get_family(model.family).embedding(model.params)                                      # [V, D]
    base = jnp.take(table, suffix, axis=0)                                                        # [k, D]

    def objective(one_hot):
        return _answer_logp(model, parts, suffix, answers, one_hot @ table - base)

    return jax.grad(objective)(jax.nn.one_hot(suffix, table.shape[0], dtype=table.dtype))


@jax.jit
def _score_candidates(model: Model, parts, cands, answers):
    """Objective of each candidate suffix: cands [C, k] -> [C] (one program for the batch)."""
    return jax.vmap(lambda s: _answer_logp(model, parts, s, answers))(cands)


PLACEMENTS = ("prefix", "suffix")


def _parts(prompts: Sequence[Sequence[int]], placement: str, pad_id: int):
    """(head, head_valid, tail, tail_valid): ``suffix`` puts the k tokens after each whole prompt; ``prefix``
    after its first token (bos), so the prompt still ends where the answer must come."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if placement == "suffix":
        head, head_valid = pad_batch(prompts, pad_id=pad_id, side="left")
        tail, tail_valid = np.zeros((len(prompts), 0), np.int32), np.zeros((len(prompts), 0), bool)
    else:
        if len({p[0] for p in prompts}) != 1 or min(len(p) for p in prompts) < 2:
            raise ValueError("placement='prefix' needs prompts of >= 2 tokens sharing their first token (bos)")
        head, head_valid = np.asarray([[p[0]] for p in prompts], np.int32), np.ones((len(prompts), 1), bool)
        tail, tail_valid = pad_batch([p[1:] for p in prompts], pad_id=pad_id, side="left")
    return tuple(jnp.asarray(x) for x in (head, head_valid, tail, tail_valid))


def with_suffix(prompt: Sequence[int], suffix: Sequence[int], placement: str = "prefix") -> list[int]:
    """The prompt as the search scores it: ``prompt + suffix`` or ``prompt[:1] + suffix + prompt[1:]``."""
    return list(prompt) + list(suffix) if placement == "suffix" else list(prompt[:1]) + list(suffix) + list(prompt[1:])


def suffix_objective(model: Model, prompts: Sequence[Sequence[int]], answers: Sequence[int], suffix: Sequence[int],
                     *, placement: str = "prefix", pad_id: int = 0) -> float:
    """Mean log p(answer | prompt with the suffix placed) over the prompts."""
    cands = jnp.asarray([list(suffix)], jnp.int32)
    return float(_score_candidates(model, _parts(prompts, placement, pad_id), cands, jnp.asarray(answers, jnp.int32))[0])


def _sample(rng: np.random.Generator, current: np.ndarray, top: np.ndarray, n: int) -> np.ndarray:
    """``n`` copies of ``current`` [k], each with one random position set to a random top-k token there."""
    cands = np.repeat(current[None], n, 0)
    pos = rng.integers(0, current.shape[0], n)
    cands[np.arange(n), pos] = top[pos, rng.integers(0, top.shape[1], n)]
    return cands


def gcg_suffix(model: Model, prompts: Sequence[Sequence[int]], answers: Sequence[int], cfg: GCGConfig = GCGConfig(),
               *, allowed: Sequence[int] | None = None, init: Sequence[int] | None = None,
               placement: str = "prefix", pad_id: int = 0) -> GCGResult:
    """Greedy coordinate gradient search for the suffix that maximises the answers' mean log-prob.

    Args:
      model: the attacked model (a ``Model``; merge LoRA adapters first).
      prompts: token ids, each ending where its answer must come.
      answers: the answer token id of each prompt.
      allowed: token ids the suffix may use (default every token except ``pad_id``).
      init: the initial suffix (default ``allowed[0]`` repeated).
      placement: ``"prefix"`` (default): the k tokens go right after each prompt's first token (bos), so
        the prompt still ends where the answer comes (on a base model whose question is its own answer
        template this is where GCG's suffix sits: after the request, before the answer); ``"suffix"``:
        after the whole prompt.
    """
    if len(prompts) != len(answers) or not prompts:
        raise ValueError(f"gcg_suffix needs one answer per prompt, got {len(prompts)} prompts, {len(answers)} answers")
    vocab = get_family(model.family).embedding(model.params).shape[0]
    allowed = np.asarray(sorted(set(allowed) if allowed is not None else set(range(vocab)) - {pad_id}), np.int32)
    if allowed.size == 0 or allowed.min() < 0 or allowed.max() >= vocab:
        raise ValueError(f"allowed tokens must be non-empty ids in [0, {vocab}), got {allowed.tolist()[:5]}...")
    top_k = min(cfg.top_k, allowed.size)
    current = np.asarray(init if init is not None else [allowed[0]] * cfg.suffix_len, np.int32)
    if current.shape != (cfg.suffix_len,):
        raise ValueError(f"init must have suffix_len={cfg.suffix_len} tokens, got {current.tolist()}")
    parts, ans = _parts(prompts, placement, pad_id), jnp.asarray(answers, jnp.int32)
    banned = np.ones(vocab, bool)
    banned[allowed] = False
    rng = np.random.default_rng([cfg.seed, 3])
    best = current.copy()
    best_obj = float(_score_candidates(model, parts, jnp.asarray(current[None]), ans)[0])
    history = [best_obj]
    for _ in range(cfg.iterations):
        grad = np.array(_one_hot_grad(model, parts, jnp.asarray(current), ans))                # [k, V]
        grad[:, banned] = -np.inf
        top = np.argsort(-grad, axis=1)[:, :top_k]                                                      # [k, top_k]
        cands = _sample(rng, current, top, cfg.candidates)
        scores = np.asarray(_score_candidates(model, parts, jnp.asarray(cands), ans))
        i = int(scores.argmax())
        current = cands[i]
        if scores[i] > best_obj:
            best, best_obj = current.copy(), float(scores[i])
        history.append(best_obj)
    return GCGResult(suffix=best.tolist(), objective=best_obj, history=history)
