"""Linear relational embeddings (LRE): how linearly a model decodes a relation from its subject.

Hernandez et al., 2023, "Linearity of Relation Decoding in Transformer Language Models". For one
relation (``"{} lives in"``), ``F`` maps the state ``s`` of the subject's last token at layer ``l``
(the residual stream entering block ``l``: site ``blocks.{l}.resid_pre``, Hugging Face's
``hidden_states[l]``) to the final state ``o`` at the prompt's last token (``blocks.{L-1}.resid_post``,
before the final norm), the rest of the prompt held fixed. The LRE is its first-order
approximation averaged over ``n`` examples, with the paper's slope scale ``beta``:

    W = mean_i dF/ds(s_i)        b = mean_i (F(s_i) - dF/ds(s_i) s_i)        LRE(s) = beta W s + b

and is read through the model's own final norm and unembedding (``Family.stepper.head``).

- **Faithfulness** (``faithfulness``): the LRE's top token equals the model's, per held-out subject.
- **Causality** (``causality``): ``ds = W_k^+ (o' - o)`` with ``W_k^+`` the rank-``k`` pseudo-inverse of
  ``W`` and ``o``, ``o'`` the final states of a subject and a target subject; the edit succeeds
  when the model run with ``s + ds`` patched in at layer ``l`` predicts the target's object.

The Jacobians are exact: ``jax.jacfwd`` through ``ji.run`` with a ``ji.Patch`` replacing the subject
state, so every family (transformers, Mamba) works. All ``n`` examples go through one batched run
with ``D`` tangents: rows of a batch are independent, so the Jacobian of the batched map with
respect to one shift added to every row's subject state is the stack of per-example Jacobians.

Inputs are token ids left-padded to one length (``model.to_tokens`` pads left): ``tokens [N, T]``,
``attention_mask [N, T]`` and ``subject_pos [N]`` (the subject's last token in each padded row);
the object is predicted at the last column.

    op = lre.estimate(model, tokens[:8], subject_pos[:8], layer=2, n=8, beta=2.0, attention_mask=mask[:8])
    hit = lre.faithfulness(model, op, tokens[8:], subject_pos[8:], attention_mask=mask[8:])   # [N - 8] bool
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxinterp.interventions import Patch
from jaxinterp.lens.logit import apply_head
from jaxinterp.model import Model, prepare_inputs, run

__all__ = ["LRE", "States", "layer_sites", "states", "jacobians", "estimate", "predict", "faithfulness",
           "low_rank_pinv", "patched_logits", "edit_logits", "causality"]


@struct.dataclass
class LRE:
    """``LRE(s) = beta * W s + b`` for subject states ``s [..., D]`` taken at ``layer``."""

    weight: jax.Array  # [D_out, D_in]: the mean Jacobian W
    bias: jax.Array    # [D]
    beta: float = 1.0
    layer: int = struct.field(pytree_node=False, default=0)
    svd: Optional[tuple] = None  # (u, sv, vt) of weight, computed once by ``with_svd`` (``estimate`` does)

    def __call__(self, s: jax.Array) -> jax.Array:
        return self.beta * (s @ self.weight.T) + self.bias  # [..., D]

    def with_beta(self, beta: float) -> "LRE":
        return self.replace(beta=beta)

    def with_svd(self) -> "LRE":
        u, sv, vt = np.linalg.svd(np.asarray(self.weight, np.float64), full_matrices=False)  # host LAPACK
        return self.replace(svd=(u, sv, vt))

    def inverse(self, rank: int) -> jax.Array:
        """``W_k^+ [D_in, D_out]``: the pseudo-inverse of ``W`` on its top-``rank`` singular directions."""
        d = min(self.weight.shape)
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 1 <= rank <= d:
            raise ValueError(f"rank must be an int in [1, {d}], got {rank!r}")
        u, sv, vt = (self if self.svd is not None else self.with_svd()).svd
        return jnp.asarray((vt[:rank].T / sv[:rank]) @ u[:, :rank].T, self.weight.dtype)


class States(NamedTuple):
    s: jax.Array       # [N, D] subject states at the layer
    o: jax.Array       # [N, D] final states at the last position (before the final norm)
    logits: jax.Array  # [N, V] the model's logits at the last position


def layer_sites(model: Model, layer) -> tuple[str, str]:
    """``(subject-state site, final-state site)`` for ``layer``; refuses a layer outside the model."""
    n = model.config.n_layers
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < n:
        raise ValueError(f"layer must be an int in [0, {n}) for this {n}-layer model (the residual stream "
                         f"entering that block), got {layer!r}")
    return f"blocks.{int(layer)}.resid_pre", f"blocks.{n - 1}.resid_post"


def _prepare(model: Model, tokens, subject_pos, attention_mask, layer):
    layer_sites(model, layer)
    tokens, mask, positions, _ = prepare_inputs(model, tokens, attention_mask)
    pos = np.asarray(subject_pos)
    if pos.shape != (tokens.shape[0],) or not np.issubdtype(pos.dtype, np.integer):
        raise ValueError(f"subject_pos must be ints of shape [{tokens.shape[0]}] (one per row), got "
                         f"{pos.dtype} {pos.shape}")
    if pos.size and not (0 <= pos.min() and pos.max() < tokens.shape[1]):
        raise ValueError(f"subject_pos must lie in [0, {tokens.shape[1]}), got {pos.min()}..{pos.max()}")
    if not np.asarray(mask)[:, -1].all():
        raise ValueError("prompts must be left-padded: the object is read at the last column, which is padding in "
                         "some rows (model.to_tokens pads left)")
    if pos.size and not np.asarray(mask)[np.arange(pos.size), pos].all():
        raise ValueError("subject_pos points at padding in some rows (expected the subject's last real token)")
    return tokens, mask, positions, jnp.asarray(pos, jnp.int32)


@functools.partial(jax.jit, static_argnames=("layer",))
def _states(model, tokens, mask, positions, pos, *, layer: int) -> States:
    s_site, o_site = layer_sites(model, layer)
    out = run(model, tokens, capture=[s_site, o_site], attention_mask=mask, positions=positions, logits_at=-1)
    rows = jnp.arange(tokens.shape[0])
    return States(out.cache[s_site][rows, pos], out.cache[o_site][:, -1], out.logits)


def _patched(model, tokens, mask, positions, pos, s_new, layer: int):
    """``(final states [N, D], logits [N, V])`` with each row's subject state replaced by ``s_new [N, D]``."""
    s_site, o_site = layer_sites(model, layer)
    where = jnp.arange(tokens.shape[1])[None] == pos[:, None]  # [N, T]
    patch = Patch(values=s_new[:, None, :], mask=where)
    out = run(model, tokens, capture=o_site, interventions={s_site: patch}, attention_mask=mask,
              positions=positions, logits_at=-1)
    return out.cache[o_site][:, -1], out.logits


_patched_program = jax.jit(_patched, static_argnames=("layer",))


@functools.partial(jax.jit, static_argnames=("layer",))
def _jacobians(model, tokens, mask, positions, pos, s, *, layer: int) -> jax.Array:
    def final(shift):  # [D] -> [N, D]: one shift added to every row's subject state
        return _patched(model, tokens, mask, positions, pos, s + shift, layer)[0]

    return jax.jacfwd(final)(jnp.zeros(s.shape[-1], s.dtype))  # [N, D_out, D_in]


def states(model: Model, tokens, subject_pos, *, layer: int, attention_mask=None) -> States:
    """Subject states, final states and the model's logits of a batch of relation prompts (one run)."""
    tokens, mask, positions, pos = _prepare(model, tokens, subject_pos, attention_mask, layer)
    return _states(model, tokens, mask, positions, pos, layer=int(layer))


def jacobians(model: Model, tokens, subject_pos, *, layer: int, attention_mask=None) -> tuple[jax.Array, States]:
    """``(J [N, D, D], states)``: ``J[i] = dF_i/ds`` at each row's own subject state."""
    tokens, mask, positions, pos = _prepare(model, tokens, subject_pos, attention_mask, layer)
    st = _states(model, tokens, mask, positions, pos, layer=int(layer))
    return _jacobians(model, tokens, mask, positions, pos, st.s, layer=int(layer)), st


def estimate(model: Model, tokens, subject_pos, *, layer: int, n: int, beta: float = 1.0,
             attention_mask=None) -> LRE:
    """The LRE of a relation from its first ``n`` example prompts (mean Jacobian and bias)."""
    count = np.shape(tokens)[0]
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive int (examples averaged), got {n!r}")
    if count < n:
        raise ValueError(f"the relation has {count} example prompts, fewer than n={n} needed to estimate its LRE")
    mask = None if attention_mask is None else np.asarray(attention_mask)[:n]
    jac, st = jacobians(model, np.asarray(tokens)[:n], np.asarray(subject_pos)[:n], layer=layer, attention_mask=mask)
    bias = (st.o - jnp.einsum("nij,nj->ni", jac, st.s)).mean(0)  # [D]
    return LRE(weight=jac.mean(0), bias=bias, beta=beta, layer=int(layer)).with_svd()


def predict(model: Model, op: LRE, s: jax.Array) -> jax.Array:
    """Logits ``[..., V]`` of the LRE's object state for subject states ``s [..., D]``."""
    return apply_head(model, op(s).astype(s.dtype))


def faithfulness(model: Model, op: LRE, tokens, subject_pos, *, attention_mask=None,
                 precomputed: Optional[States] = None) -> jax.Array:
    """Per row (bool ``[N]``): the LRE's top token equals the model's own top token. ``precomputed``:
    these rows' ``states`` at ``op.layer`` (saves the run)."""
    st = _states_of(model, op, tokens, subject_pos, attention_mask, precomputed)
    return jnp.argmax(predict(model, op, st.s), -1) == jnp.argmax(st.logits, -1)


def low_rank_pinv(weight: jax.Array, rank: int) -> jax.Array:
    """The pseudo-inverse ``[D_in, D_out]`` of ``weight`` restricted to its top-``rank`` singular directions."""
    return LRE(weight=weight, bias=jnp.zeros(weight.shape[0], weight.dtype)).inverse(rank)


def patched_logits(model: Model, tokens, subject_pos, s_new, *, layer: int, attention_mask=None) -> jax.Array:
    """The model's logits ``[N, V]`` at the last position with each subject state replaced by ``s_new [N, D]``."""
    tokens, mask, positions, pos = _prepare(model, tokens, subject_pos, attention_mask, layer)
    return _patched_program(model, tokens, mask, positions, pos, jnp.asarray(s_new), layer=int(layer))[1]


def edit_logits(model: Model, op: LRE, tokens, subject_pos, targets, *, rank: int, attention_mask=None,
                precomputed: Optional[States] = None) -> jax.Array:
    """Logits ``[N, V]`` after the LRE-inverse edit ``s + W_k^+ (o[targets] - o)`` of every row."""
    targets = _check_targets(targets, np.shape(tokens)[0])
    st = _states_of(model, op, tokens, subject_pos, attention_mask, precomputed)
    delta = (st.o[targets] - st.o) @ op.inverse(rank).T  # [N, D]
    return patched_logits(model, tokens, subject_pos, st.s + delta, layer=op.layer, attention_mask=attention_mask)


def causality(model: Model, op: LRE, tokens, subject_pos, targets, *, rank: int, attention_mask=None,
              precomputed: Optional[States] = None) -> jax.Array:
    """Per row (bool ``[N]``): the edit toward row ``targets[i]`` makes the model predict that row's object
    (its own top token). Pair rows whose predictions differ: a pair that already agrees counts as a hit."""
    st = _states_of(model, op, tokens, subject_pos, attention_mask, precomputed)
    goal = jnp.argmax(st.logits, -1)[_check_targets(targets, np.shape(tokens)[0])]
    edited = edit_logits(model, op, tokens, subject_pos, targets, rank=rank, attention_mask=attention_mask,
                         precomputed=st)
    return jnp.argmax(edited, -1) == goal


def _states_of(model, op: LRE, tokens, subject_pos, attention_mask, precomputed: Optional[States]) -> States:
    if precomputed is not None:
        return precomputed
    return states(model, tokens, subject_pos, layer=op.layer, attention_mask=attention_mask)


def _check_targets(targets, rows: int) -> jax.Array:
    t = np.asarray(targets)
    if t.shape != (rows,) or not np.issubdtype(t.dtype, np.integer) or (t.size and not 0 <= t.min() <= t.max() < rows):
        raise ValueError(f"targets must be {rows} row indices in [0, {rows}), got {t.dtype} {t.shape}")
    return jnp.asarray(t)
