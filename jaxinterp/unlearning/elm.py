"""ELM: Erasure of Language Memory (Gandikota et al. 2024) with LoRA adapters.

For erase text x, the frozen model gives three next-token distributions at every
position t (logits divided by the temperature T, then log-softmax):

    log P(x_t | x_<t),  log P(x_t | c+, x_<t)  (expert context),  log P(x_t | c-, x_<t)  (novice)

and the erasure target is

    log P~(x_t) = log P(x_t | x_<t) - eta_t [log P(x_t | c+, x_<t) - log P(x_t | c-, x_<t)]

with eta_t ramped linearly from 1 at the first position to ``eta`` at the last valid one,
truncated to its ``top_k`` largest entries and renormalised (softmax).

Losses (each weighted, 1 by default):

* erase   -- cross-entropy of the LoRA model's next-token distribution on x against P~;
* retain  -- cross-entropy on keep-domain text against the frozen model's predictions
  (its argmax by default, as the reference code; ``retain_soft`` uses the full distribution);
* fluency -- NLL of the LoRA model on continuations of (erase text + a topic-switch suffix)
  that the frozen model generated with guidance toward the novice context
  (``guided_generate``); only the appended tokens are scored;
* template (optional, weight 0 by default) -- the retain loss on the erase text itself at the
  positions whose next token is not a fact object (``erase_template_mask``): keeps the
  erased domain's sentence frames, names and punctuation while the objects are erased.

Batches are dicts of int/bool arrays (``make_elm_batch``). ``elm_loss`` and the baselines'
losses (``unlearning.baselines``) share the signature ``loss(adapters, base, batch, key)``: the
LoRA adapters train through ``jaxinterp.train`` (``loss_step`` + ``fit``, the frozen base passed
as the step's frozen argument), with orbax checkpoints and resume.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp import lora as lora_lib
from jaxinterp.model import Model, run

__all__ = [
    "ElmConfig", "elm_target_logprobs", "eta_ramp", "aligned_logits", "elm_losses", "elm_loss",
    "guided_generate", "pad_batch", "make_elm_batch",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ElmConfig:
    """ELM objective and optimisation settings (reference defaults where they apply).

    Attributes:
      eta: final erasure strength of the linear ramp (reference 1000 for 7B models; tiny
        models need far less).
      temperature: divides all three frozen logits before the log-softmax (1.2).
      top_k: entries kept in the target distribution (50; None keeps all).
      erase_weight, retain_weight, fluency_weight: loss weights (1 each).
      template_weight: weight of the template term (retain on erase text with the positions
        that predict a fact object masked; 0 = off, as in the reference).
      retain_soft: retain against the frozen distribution instead of its argmax.
      guidance: eta of the guided sampler that writes the fluency continuations (3).
      lr, weight_decay: AdamW (the step count and batch size are the caller's: the training
        loop's ``LoopConfig.steps`` and the batches it is given).
      lora_mode: forward of the adapted model ("auto", "merged", "unmerged").
    """

    eta: float = 1000.0
    temperature: float = 1.2
    top_k: int | None = 50
    erase_weight: float = 1.0
    retain_weight: float = 1.0
    fluency_weight: float = 1.0
    template_weight: float = 0.0
    retain_soft: bool = False
    guidance: float = 3.0
    lr: float = 5e-5
    weight_decay: float = 0.01
    lora_mode: str = "auto"

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"ElmConfig.temperature must be positive, got {self.temperature}")
        if self.top_k is not None and self.top_k <= 0:
            raise ValueError(f"ElmConfig.top_k must be positive or None, got {self.top_k}")
        for name in ("erase_weight", "retain_weight", "fluency_weight", "template_weight", "lr", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"ElmConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.lora_mode not in ("auto", "merged", "unmerged"):
            raise ValueError(f"ElmConfig.lora_mode must be 'auto', 'merged' or 'unmerged', got {self.lora_mode!r}")

    @classmethod
    def paper(cls, **kw) -> "ElmConfig":
        """The reference repository's defaults (7B-scale models)."""
        return cls(**kw)

    @classmethod
    def tiny(cls, **kw) -> "ElmConfig":
        """Settings for the few-MB facts-world models (small eta, larger learning rate)."""
        defaults = dict(eta=4.0, lr=2e-3, top_k=50)
        return cls(**{**defaults, **kw})


# ----------------------------------------------------------------------------- the target


def eta_ramp(valid: jax.Array, eta: float) -> jax.Array:
    """``[B, T]`` eta_t rising linearly from 1 to ``eta`` over each row's valid positions."""
    valid = valid.astype(jnp.float32)
    idx = jnp.cumsum(valid, axis=1) - 1.0                       # 0 .. n-1 on valid positions
    n = jnp.maximum(valid.sum(axis=1, keepdims=True) - 1.0, 1.0)
    return (1.0 + (eta - 1.0) * idx / n) * valid


def elm_target_logprobs(base_logits, expert_logits, novice_logits, valid, *, eta: float,
                        temperature: float = 1.2, top_k: int | None = 50) -> jax.Array:
    """log P~ ``[B, T, V]`` from three aligned frozen logit tensors ``[B, T, V]``.

    Entries outside the top-k are ``-inf``; rows of invalid positions are meaningless.
    """
    lp = lambda z: jax.nn.log_softmax(z.astype(jnp.float32) / temperature, axis=-1)
    etas = eta_ramp(valid, eta)[..., None]                       # [B, T, 1]
    edit = lp(base_logits) - etas * (lp(expert_logits) - lp(novice_logits))
    if top_k is not None and top_k < edit.shape[-1]:
        kth = jax.lax.top_k(edit, top_k)[0][..., -1:]             # [B, T, 1]
        edit = jnp.where(edit >= kth, edit, -jnp.inf)
    return jax.nn.log_softmax(edit, axis=-1)


def aligned_logits(model, tokens, index) -> jax.Array:
    """Logits of ``model`` on ``tokens [B, L]`` gathered at ``index [B, T]`` -> ``[B, T, V]``."""
    logits = run(model, tokens).logits
    return jnp.take_along_axis(logits, index[..., None], axis=1)


# ----------------------------------------------------------------------------- losses


def _masked_mean(x, mask):
    mask = mask.astype(jnp.float32)
    return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def soft_cross_entropy(logits, target_logprobs, mask):
    """Mean over masked positions of ``-sum_v P~_v log softmax(logits)_v``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    probs = jnp.exp(target_logprobs)                            # exact zeros outside the top-k
    return _masked_mean(-(probs * logp).sum(-1), mask)


def next_token_nll(logits, tokens, mask):
    """Mean NLL of ``tokens[:, t+1]`` from ``logits[:, t]`` where ``mask[:, t]``."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return _masked_mean(nll, mask[:, :-1])


def elm_targets(teacher: Model, batch: Mapping[str, jax.Array], cfg: ElmConfig, *, with_base: bool = False):
    """The frozen-model target log P~ for ``batch["erase"]`` (three forward passes); with
    ``with_base`` also the frozen logits on the erase text ``[B, T, V]``."""
    teacher = jax.lax.stop_gradient(teacher)
    base = jax.lax.stop_gradient(run(teacher, batch["erase"]).logits)
    expert = aligned_logits(teacher, batch["expert"], batch["expert_index"])
    novice = aligned_logits(teacher, batch["novice"], batch["novice_index"])
    target = jax.lax.stop_gradient(elm_target_logprobs(base, expert, novice, batch["erase_valid"], eta=cfg.eta,
                                                       temperature=cfg.temperature, top_k=cfg.top_k))
    return (target, base) if with_base else target


def retain_loss(run_student: Callable, teacher: Model, tokens, valid, *, soft: bool) -> jax.Array:
    """Cross-entropy of the student on retain text against the frozen model (argmax or soft)."""
    teacher_logits = jax.lax.stop_gradient(run(jax.lax.stop_gradient(teacher), tokens).logits)
    return distill_loss(run_student(tokens), teacher_logits, valid, soft=soft)


def distill_loss(logits, teacher_logits, mask, *, soft: bool) -> jax.Array:
    """Cross-entropy of ``logits`` against the frozen ``teacher_logits`` (argmax or soft) on ``mask``."""
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    if soft:
        return soft_cross_entropy(logits, jax.nn.log_softmax(teacher_logits, -1), mask)
    labels = jnp.argmax(teacher_logits, -1)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    return _masked_mean(-jnp.take_along_axis(logp, labels[..., None], -1)[..., 0], mask)


def elm_losses(adapters: lora_lib.Lora, base: Model, batch: Mapping[str, jax.Array], key, cfg: ElmConfig,
               teacher: Model | None = None) -> dict[str, jax.Array]:
    """The ELM terms (unweighted): erase, retain, fluency and template (the last only when
    ``cfg.template_weight`` > 0). ``teacher`` defaults to ``base`` (always frozen)."""
    teacher = base if teacher is None else teacher
    student = lora_lib.combine(adapters, base)
    keys = jax.random.split(key, 3)
    run_student = lambda tokens, k: student.run(tokens, mode=cfg.lora_mode, dropout_key=k).logits
    target, teacher_erase = elm_targets(teacher, batch, cfg, with_base=True)
    student_erase = run_student(batch["erase"], keys[0])
    erase = soft_cross_entropy(student_erase, target, batch["erase_valid"])
    retain = retain_loss(lambda t: run_student(t, keys[1]), teacher, batch["retain"], batch["retain_valid"],
                         soft=cfg.retain_soft)
    fluency = next_token_nll(run_student(batch["fluency"], keys[2]), batch["fluency"], batch["fluency_mask"])
    terms = {"erase": erase, "retain": retain, "fluency": fluency}
    if cfg.template_weight > 0:
        terms["template"] = distill_loss(student_erase, teacher_erase, batch["erase_template_mask"], soft=cfg.retain_soft)
    return terms


def elm_loss(adapters, base, batch, key, cfg: ElmConfig):
    """Weighted sum of ``elm_losses`` and the terms (for logging)."""
    terms = elm_losses(adapters, base, batch, key, cfg)
    total = cfg.erase_weight * terms["erase"] + cfg.retain_weight * terms["retain"] + cfg.fluency_weight * terms["fluency"]
    if "template" in terms:
        total = total + cfg.template_weight * terms["template"]
    return total, terms


# ----------------------------------------------------------------------------- guided sampling


def _last_logprobs(logits_fn, buf, lens, temperature):
    logits = logits_fn(buf)                                      # [B, L, V]
    last = jnp.take_along_axis(logits, (lens - 1)[:, None, None], axis=1)[:, 0]
    return jax.nn.log_softmax(last.astype(jnp.float32) / temperature, -1)


def guided_generate(logits_fn: Callable[[jax.Array], jax.Array], prompt, lens, n_new: int, key, *,
                    temperature: float = 1.0, guidance: float = 0.0, expert=None, expert_lens=None,
                    novice=None, novice_lens=None) -> jax.Array:
    """Sample ``n_new`` tokens after each row's prompt; returns the ``[B, n_new]`` new tokens.

    ``prompt [B, L]`` holds each row's prompt in ``[:lens]`` and room for the new tokens.
    With ``guidance`` g > 0 the sampler draws from
    ``log P(.|x) - g (log P(.|c+, x) - log P(.|c-, x))``, the expert/novice buffers holding
    ``c+ x`` and ``c- x`` (lengths ``expert_lens``/``novice_lens``), i.e. away from the expert
    and toward the novice context (ELM's fluency data).
    """
    b = prompt.shape[0]
    rows = jnp.arange(b)
    guided = guidance != 0.0
    bufs = (prompt, expert, novice) if guided else (prompt,)
    lens_all = (lens, expert_lens, novice_lens) if guided else (lens,)
    for buf, ln in zip(bufs, lens_all):
        if int(np.max(np.asarray(ln))) + n_new > buf.shape[1]:
            raise ValueError(f"buffer of length {buf.shape[1]} cannot hold prompts of length up to "
                             f"{int(np.max(np.asarray(ln)))} plus {n_new} new tokens")

    def body(s, carry):
        bufs, lens_all, out = carry
        lp = _last_logprobs(logits_fn, bufs[0], lens_all[0], 1.0)
        if guided:
            lp = lp - guidance * (_last_logprobs(logits_fn, bufs[1], lens_all[1], 1.0)
                                  - _last_logprobs(logits_fn, bufs[2], lens_all[2], 1.0))
        tok = jax.random.categorical(jax.random.fold_in(key, s), lp / temperature).astype(prompt.dtype)
        bufs = tuple(buf.at[rows, ln].set(tok) for buf, ln in zip(bufs, lens_all))
        lens_all = tuple(ln + 1 for ln in lens_all)
        return bufs, lens_all, out.at[:, s].set(tok)

    out = jnp.zeros((b, n_new), prompt.dtype)
    _, _, out = jax.lax.fori_loop(0, n_new, body, (bufs, tuple(jnp.asarray(l) for l in lens_all), out))
    return out


# ----------------------------------------------------------------------------- batches


def pad_batch(seqs: Sequence[Sequence[int]], length: int | None = None, pad_id: int = 0, *,
              side: str = "right") -> tuple[np.ndarray, np.ndarray]:
    """Pad int sequences on ``side`` (``"right"`` or ``"left"``: right-aligned) -> (tokens ``[B, L]``,
    valid ``[B, L]``)."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    length = max(len(s) for s in seqs) if length is None else length
    tokens = np.full((len(seqs), length), pad_id, np.int32)
    valid = np.zeros((len(seqs), length), bool)
    for i, s in enumerate(seqs):
        if len(s) > length:
            raise ValueError(f"sequence {i} has {len(s)} tokens, more than the batch length {length}")
        cols = slice(0, len(s)) if side == "right" else slice(length - len(s), length)
        tokens[i, cols] = s
        valid[i, cols] = True
    return tokens, valid


def _prefixed(prefix: Sequence[int], bodies, erase_len: int, pad_id: int):
    """``prefix + x[1:]`` per row and, for each position j of x, its index there.

    x's bos (position 0) aligns with the last prefix token, x_j with ``len(prefix) - 1 + j``.
    """
    length = erase_len + len(prefix) - 1
    tokens, _ = pad_batch([list(prefix) + list(s) for s in bodies], length, pad_id)
    index = np.broadcast_to(len(prefix) - 1 + np.arange(erase_len), (len(bodies), erase_len))
    return tokens, index.astype(np.int32)


def make_elm_batch(erase: Sequence[Sequence[int]], expert_prefix: Sequence[int], novice_prefix: Sequence[int],
                   retain: Sequence[Sequence[int]], fluency: Sequence[Sequence[int]], fluency_start: Sequence[int],
                   *, erase_len: int, retain_len: int, fluency_len: int, pad_id: int = 0,
                   object_ids: Sequence[int] = ()) -> dict[str, np.ndarray]:
    """Arrays of one ELM batch.

    ``erase``: token lists of erase text (with bos); ``expert_prefix``/``novice_prefix``:
    context tokens put before each (the bos stays first: prefix = bos + context);
    ``fluency``: erase text + suffix + continuation; ``fluency_start[i]``: index of the first
    appended token of row i (loss on predicting tokens >= fluency_start);
    ``object_ids``: token ids of fact objects: ``erase_template_mask[i, t]`` is set where
    position t of the erase text predicts a valid token that is not one of them.
    """
    erase_tokens, erase_valid = pad_batch(erase, erase_len, pad_id)
    next_ok = np.roll(erase_valid, -1, axis=1) & ~np.isin(np.roll(erase_tokens, -1, axis=1), np.asarray(object_ids, int))
    next_ok[:, -1] = False
    template_mask = erase_valid & next_ok                       # [B, T]: predicts a non-object token
    # the contexts replace the bos: [bos, context..., x_1, ...] with x aligned on x's positions
    body = [list(s[1:]) for s in erase]
    expert_tokens, expert_index = _prefixed(expert_prefix, body, erase_len, pad_id)
    novice_tokens, novice_index = _prefixed(novice_prefix, body, erase_len, pad_id)
    retain_tokens, retain_valid = pad_batch(retain, retain_len, pad_id)
    fluency_tokens, fluency_valid = pad_batch(fluency, fluency_len, pad_id)
    pos = np.arange(fluency_len)[None]
    # position t predicts t+1: score predictions of tokens at index >= start
    fluency_mask = (pos + 1 >= np.asarray(fluency_start)[:, None]) & np.roll(fluency_valid, -1, axis=1)
    fluency_mask[:, -1] = False
    return {"erase": erase_tokens, "erase_valid": erase_valid, "erase_template_mask": template_mask,
            "expert": expert_tokens,
            "expert_index": expert_index, "novice": novice_tokens, "novice_index": novice_index, "retain": retain_tokens, "retain_valid": retain_valid,
            "fluency": fluency_tokens, "fluency_mask": fluency_mask}
