"""Sparse autoencoder families as small pytrees with ``encode``, ``decode`` and ``loss``.

Every family stores

* ``params``: the trainable arrays, ``W_enc [D, F]``, ``b_enc [F]``, ``W_dec [F, D]``
  (rows are dictionary directions, kept unit-norm by the trainer), ``b_dec [D]``, plus the
  family's own (``log_threshold`` for JumpReLU; ``r_mag``, ``b_mag`` for Gated);
* ``buffers``: non-trainable arrays, ``input_scale`` (activations are multiplied by it
  before encoding, so that ``E||x||^2 = D`` on the training distribution, and divided by
  it after decoding), ``fired_ago [F]`` (tokens since each latent last fired, for
  dead-latent statistics and AuxK), ``k`` (TopK / BatchTopK) and ``threshold``
  (BatchTopK's inference threshold).

``encode``/``decode`` work on raw activations ``[..., D]``; ``loss(x, hp)`` takes a batch
``[B, D]`` of raw activations and per-SAE hyperparameters ``hp`` and returns
``(loss, aux)`` where ``aux`` holds the terms and what ``update_buffers`` needs. All
hyperparameters that vary across a grid (``k`` included) are arrays, so a stack of SAEs
of one family is trained by ``jax.vmap``.

Families (``FAMILIES``): ``relu`` (L1), ``panneal`` (Lp^p penalty, p annealed by the
trainer), ``topk``, ``batchtopk``, ``jumprelu`` (L0 with a straight-through threshold
estimator), ``gated``.

``topk`` and ``batchtopk`` train on a sparse path when the dictionary is large relative to
``k_max`` (field ``sparse``: None auto, True, False): only the encoder's forward GEMM is
dense, decoding and every backward product touch the kept latents only. Same loss, metrics
and gradients as the dense path up to float32 summation order (``tests/sae/test_sparse.py``).

Two static fields describe SAEs that come from elsewhere (``jaxinterp.sae.io``); a trained SAE
keeps their defaults. ``reads`` (``Reads``): the site the SAE reads and how (one head, or the
heads flattened), used by ``Splice``; ``act_norm``: a per-input normalisation applied before
``input_scale`` (SAELens ``normalize_activations``): ``"constant_norm_rescale"`` scales each
input to norm ``sqrt(D)``, ``"layer_norm"`` centres it and divides by its standard deviation;
``decode(f, x)`` then needs the input ``x`` whose statistics it undoes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import struct

__all__ = ["SAE", "Reads", "ACT_NORMS", "ReLUSAE", "PAnnealSAE", "TopKSAE", "BatchTopKSAE", "JumpReLUSAE", "GatedSAE", "FAMILIES",
           "Hparams", "get_family", "init_sae", "sae_from_params", "family_param_shapes", "lp_penalty", "step_fn", "jumprelu"]


@struct.dataclass
class Hparams:
    """Per-SAE training hyperparameters (scalar arrays; stacked along a grid axis)."""

    lr: jax.Array
    sparsity_coeff: jax.Array  # lambda: L1 / Lp / L0 / gate-L1 weight, before warmup
    p: jax.Array  # exponent of the Lp^p penalty (1 = L1)
    bandwidth: jax.Array  # JumpReLU straight-through kernel width (normalised units)
    aux_coeff: jax.Array  # AuxK weight (0 disables)
    aux_k: jax.Array  # int: latents AuxK may use
    dead_tokens: jax.Array  # int: a latent that has not fired for this many tokens is dead

    @classmethod
    def make(cls, *, lr=3e-4, sparsity_coeff=0.0, p=1.0, bandwidth=1e-3, aux_coeff=0.0, aux_k=256,
             dead_tokens=1_000_000) -> "Hparams":
        f = lambda v: jnp.asarray(v, jnp.float32)
        i = lambda v: jnp.asarray(v, jnp.int32)
        return cls(lr=f(lr), sparsity_coeff=f(sparsity_coeff), p=f(p), bandwidth=f(bandwidth),
                   aux_coeff=f(aux_coeff), aux_k=i(aux_k), dead_tokens=i(dead_tokens))


# ----------------------------------------------------------------------------- helpers


def lp_penalty(f: jax.Array, p: jax.Array) -> jax.Array:
    """``sum_i f_i^p`` per row for ``f >= 0`` (gradient 0 where ``f = 0``, also for p < 1). ``[..., F] -> [...]``."""
    pos = f > 0
    safe = jnp.where(pos, f, 1.0)
    return jnp.where(pos, safe ** p, 0.0).sum(-1)


@jax.custom_vjp
def step_fn(z: jax.Array, threshold: jax.Array, bandwidth: jax.Array) -> jax.Array:
    """Heaviside ``H(z - threshold)`` with a rectangle-kernel pseudo-derivative for ``threshold``."""
    return (z > threshold).astype(z.dtype)


def _step_fwd(z, threshold, bandwidth):
    return step_fn(z, threshold, bandwidth), (z, threshold, bandwidth)


def _step_bwd(res, g):
    z, threshold, bandwidth = res
    kernel = (jnp.abs((z - threshold) / bandwidth) < 0.5).astype(z.dtype) / bandwidth
    d_threshold = -(g * kernel)
    d_threshold = d_threshold.reshape(-1, *threshold.shape).sum(0) if d_threshold.shape != threshold.shape else d_threshold
    return jnp.zeros_like(z), d_threshold, jnp.zeros_like(bandwidth)


step_fn.defvjp(_step_fwd, _step_bwd)


@jax.custom_vjp
def jumprelu(z: jax.Array, threshold: jax.Array, bandwidth: jax.Array) -> jax.Array:
    """``z * H(z - threshold)``; d/dz = H, d/dthreshold = -(threshold / bandwidth) K((z - threshold) / bandwidth)."""
    return z * (z > threshold).astype(z.dtype)


def _jr_fwd(z, threshold, bandwidth):
    return jumprelu(z, threshold, bandwidth), (z, threshold, bandwidth)


def _jr_bwd(res, g):
    z, threshold, bandwidth = res
    kernel = (jnp.abs((z - threshold) / bandwidth) < 0.5).astype(z.dtype) / bandwidth
    d_threshold = -(g * threshold * kernel)
    d_threshold = d_threshold.reshape(-1, *threshold.shape).sum(0) if d_threshold.shape != threshold.shape else d_threshold
    return g * (z > threshold).astype(z.dtype), d_threshold, jnp.zeros_like(bandwidth)


jumprelu.defvjp(_jr_fwd, _jr_bwd)


@jax.custom_vjp
def centred_linear(xn: jax.Array, b: jax.Array, w: jax.Array) -> jax.Array:
    """``(xn - b) @ w``. ``[..., D], [D], [D, F] -> [..., F]``.

    The gradient for ``b`` is ``-(sum of the output cotangent over rows) @ w.T`` (a
    matrix-vector product) rather than autodiff's ``[B, F] x [F, D]`` matrix product
    followed by a row sum, which would be one sixth of an SAE step's FLOPs for a bias.
    """
    return (xn - b) @ w


def _cl_fwd(xn, b, w):
    centred = xn - b
    return centred @ w, (centred, w)


def _cl_bwd(res, g):
    centred, w = res
    g2 = g.reshape(-1, g.shape[-1])  # [N, F]
    d_w = centred.reshape(-1, centred.shape[-1]).T @ g2  # [D, F]
    d_b = -(w @ g2.sum(0))  # [D]
    d_xn = g @ w.T  # dead code (removed by XLA) unless inputs are differentiated
    return d_xn, d_b, d_w


centred_linear.defvjp(_cl_fwd, _cl_bwd)


def _topk_rows(acts: jax.Array, k: jax.Array, k_max: int) -> jax.Array:
    """Keep each row's ``k`` largest entries (``k`` traced, ``<= k_max``), zero the rest. ``[B, F]``."""
    vals, idx = jax.lax.top_k(acts, k_max)  # [B, k_max]
    keep = jnp.arange(k_max) < k
    rows = jnp.arange(acts.shape[0])[:, None]
    return jnp.zeros_like(acts).at[rows, idx].set(jnp.where(keep, vals, 0.0))


# Sparse training path (TopK / BatchTopK). Gao et al. 2024 ("Scaling and evaluating sparse
# autoencoders") decode from the k kept latents only: the decoder product is a gather + weighted
# sum of B k rows of W_dec, and every backward product is sparse too (d W_dec a scatter-add of
# B k rows, d vals a gather-dot, d W_enc a scatter-add of B k input rows into W_enc's columns).
# Only the encoder's forward GEMM stays dense. The math equals the dense path; sums run in a
# different order, so results agree to float32 rounding.
#
# Layout: the kept entries of the [B, F] latent matrix are ``S`` "slots" of ``B`` entries,
# ``vals``/``cols`` ``[S, B]`` (latent index), ``rows`` ``[S, B]`` (example index) or None when
# slot entry ``b`` belongs to example ``b`` (TopK: slot j = each row's j-th largest). The
# products loop over slots (``fori_loop``): on XLA:CPU one [B, D] row gather / scatter per slot
# is several times faster than a single [B, S, D] gather or scatter, and nothing of size
# B x S x D is materialised.

_IN = "promise_in_bounds"  # indices come from top_k: always valid


@jax.custom_vjp
def _gather_pre(xn: jax.Array, b_dec: jax.Array, w_enc: jax.Array, b_enc: jax.Array, pre: jax.Array,
                rows: jax.Array | None, cols: jax.Array) -> jax.Array:
    """``pre[rows, cols]`` where ``pre = (xn - b_dec) @ w_enc + b_enc`` (given, computed densely),
    differentiated sparsely in ``b_dec, w_enc, b_enc`` (``pre`` itself gets no gradient). ``[S, B]``."""
    r = jnp.arange(cols.shape[1])[None, :] if rows is None else rows
    return pre.at[r, cols].get(mode=_IN)


def _gp_fwd(xn, b_dec, w_enc, b_enc, pre, rows, cols):
    return _gather_pre(xn, b_dec, w_enc, b_enc, pre, rows, cols), (xn - b_dec, w_enc, rows, cols)


def _gp_bwd(res, g):
    centred, w_enc, rows, cols = res  # g [S, B]
    d, f = w_enc.shape

    def body(j, d_wt):  # d_wt [F, D]: W_enc's gradient, transposed
        x_rows = centred if rows is None else centred.at[rows[j]].get(mode=_IN)
        return d_wt.at[cols[j]].add(g[j][:, None] * x_rows, mode=_IN)

    def body_x(j, d_x):  # dead code (removed by XLA) unless inputs are differentiated
        contrib = g[j][:, None] * w_enc.T.at[cols[j]].get(mode=_IN)
        return d_x + contrib if rows is None else d_x.at[rows[j]].add(contrib, mode=_IN)

    d_w_enc = jax.lax.fori_loop(0, cols.shape[0], body, jnp.zeros((f, d), g.dtype)).T
    d_b_enc = jnp.zeros(f, g.dtype).at[cols.reshape(-1)].add(g.reshape(-1), mode=_IN)
    d_b_dec = -(w_enc @ d_b_enc)
    d_xn = jax.lax.fori_loop(0, cols.shape[0], body_x, jnp.zeros_like(centred))
    return d_xn, d_b_dec, d_w_enc, d_b_enc, None, None, None  # pre (given, not recomputed) gets none


_gather_pre.defvjp(_gp_fwd, _gp_bwd)


@jax.custom_vjp
def _sparse_decode(vals: jax.Array, rows: jax.Array | None, cols: jax.Array, w_dec: jax.Array) -> jax.Array:
    """``f @ w_dec`` for the sparse ``f [B, F]`` holding ``vals`` at ``(rows, cols)`` (``[S, B]``). ``[B, D]``."""
    def body(j, acc):
        contrib = vals[j][:, None] * w_dec.at[cols[j]].get(mode=_IN)  # [B, D]
        return acc + contrib if rows is None else acc.at[rows[j]].add(contrib, mode=_IN)

    return jax.lax.fori_loop(0, cols.shape[0], body, jnp.zeros((cols.shape[1], w_dec.shape[-1]), w_dec.dtype))


def _sd_fwd(vals, rows, cols, w_dec):
    return _sparse_decode(vals, rows, cols, w_dec), (vals, rows, cols, w_dec)


def _sd_bwd(res, g):
    vals, rows, cols, w_dec = res  # g [B, D]

    g_rows = lambda j: g if rows is None else g.at[rows[j]].get(mode=_IN)  # [B, D]

    def body_vals(j, d_vals):
        return d_vals.at[j].set((g_rows(j) * w_dec.at[cols[j]].get(mode=_IN)).sum(-1))

    def body_w(j, d_w):  # a separate loop: carrying both made XLA copy d_w every iteration
        return d_w.at[cols[j]].add(vals[j][:, None] * g_rows(j), mode=_IN)

    d_vals = jax.lax.fori_loop(0, cols.shape[0], body_vals, jnp.zeros_like(vals))
    d_w = jax.lax.fori_loop(0, cols.shape[0], body_w, jnp.zeros_like(w_dec))
    return d_vals, None, None, d_w


_sparse_decode.defvjp(_sd_fwd, _sd_bwd)


def _scatter_dense(vals: jax.Array, rows: jax.Array | None, cols: jax.Array, shape: tuple) -> jax.Array:
    """The dense ``[B, F]`` latents of the slots (for callers that read ``aux["f"]``)."""
    r = jnp.broadcast_to(jnp.arange(cols.shape[1])[None, :], cols.shape) if rows is None else rows
    return jnp.zeros(shape, vals.dtype).at[r, cols].add(vals, mode=_IN)


# Auto mode trains sparsely when d_sae >= SPARSE_MIN_RATIO * k_max. On a 2-core CPU (XLA:CPU gathers and
# scatters cost ~20x a GEMM multiply-add per element) the TopK step broke even near d_sae / k = 20: 0.82x
# the dense step's speed at 16 and 1.5x at 32 (d_in 256, d_sae 2048, batch 2048), 1.9x at 192 (768, 6144, 4096).
SPARSE_MIN_RATIO = 32


# ----------------------------------------------------------------------------- base

ACT_NORMS = ("none", "constant_norm_rescale", "layer_norm")
LAYER_NORM_EPS = 1e-5  # SAELens's layer_norm: (x - mean) / (std + eps) in, y * std + mean out


@dataclasses.dataclass(frozen=True, kw_only=True)
class Reads:
    """Where an SAE reads a model: ``site`` (None: unknown), and for per-head sites ``[..., H, Dh]``
    either one ``head`` (the SAE reads ``x[..., head, :]``) or ``flatten_heads`` (``[..., H * Dh]``)."""

    site: str | None = None
    head: int | None = None
    flatten_heads: bool = False

    def __post_init__(self):
        if self.head is not None and (self.head < 0 or self.flatten_heads):
            raise ValueError(f"Reads: head must be a non-negative index and excludes flatten_heads, got head={self.head}, "
                             f"flatten_heads={self.flatten_heads}")


def _norm_stats(act_norm: str, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(shift, in_scale, out_scale)`` of a per-input normalisation: ``(x - shift) / in_scale`` on the way in,
    ``y * out_scale + shift`` on the way out. ``[..., D] -> [..., 1]`` each."""
    if act_norm == "constant_norm_rescale":
        norm = jnp.linalg.norm(x, axis=-1, keepdims=True) / jnp.sqrt(x.shape[-1])
        return jnp.zeros_like(norm), norm, norm
    if act_norm == "layer_norm":
        mu = x.mean(-1, keepdims=True)
        std = jnp.std(x - mu, axis=-1, keepdims=True, ddof=1)  # torch's default (unbiased) std
        return mu, std + LAYER_NORM_EPS, std
    raise ValueError(f"unknown act_norm {act_norm!r}; choose one of {list(ACT_NORMS)}")


@struct.dataclass
class SAE:
    """Shared encoder/decoder plumbing; subclasses define the activation and the penalty."""

    params: dict
    buffers: dict
    family: ClassVar[str] = "base"
    k_max: int = struct.field(pytree_node=False, default=0)
    # Training path of TopK / BatchTopK: True sparse (decode from the kept latents only), False
    # dense, None auto (sparse when d_sae >= SPARSE_MIN_RATIO * k_max). Same loss and gradients.
    sparse: bool | None = struct.field(pytree_node=False, default=None)
    reads: Reads = struct.field(pytree_node=False, default=Reads())
    act_norm: str = struct.field(pytree_node=False, default="none")

    def __post_init__(self):
        if self.act_norm not in ACT_NORMS:
            raise ValueError(f"unknown act_norm {self.act_norm!r}; choose one of {list(ACT_NORMS)}")

    @property
    def site(self) -> str | None:
        """The site this SAE reads, where its source named one (``reads.site``)."""
        return self.reads.site

    @property
    def sparse_training(self) -> bool:
        """Whether ``loss`` takes the sparse path (see ``sparse``)."""
        if self.sparse is None:
            return self.family in SPARSE_FAMILIES and 0 < self.k_max and self.d_sae >= SPARSE_MIN_RATIO * self.k_max
        check_sparse(self.family, self.sparse)
        return bool(self.sparse)

    @property
    def d_in(self) -> int:
        return self.params["W_dec"].shape[-1]

    @property
    def d_sae(self) -> int:
        return self.params["W_dec"].shape[-2]

    def normalize(self, x: jax.Array) -> jax.Array:
        """Raw activations to the SAE's units: ``act_norm`` (if any), then ``* input_scale``."""
        if self.act_norm != "none":
            shift, in_scale, _ = _norm_stats(self.act_norm, x)
            x = (x - shift) / in_scale
        return x * self.buffers["input_scale"]

    def pre_acts(self, xn: jax.Array) -> jax.Array:
        """Encoder pre-activations of normalised inputs. ``[..., D] -> [..., F]``."""
        p = self.params
        return centred_linear(xn, p["b_dec"], p["W_enc"]) + p["b_enc"]

    def activate(self, pre: jax.Array) -> jax.Array:  # inference activation
        return jax.nn.relu(pre)

    def encode(self, x: jax.Array) -> jax.Array:
        """Latents of raw activations (inference mode). ``[..., D] -> [..., F]``."""
        xn = self.normalize(x)
        return self.activate(self.pre_acts(xn))

    def decode_normalized(self, f: jax.Array) -> jax.Array:
        return f @ self.params["W_dec"] + self.params["b_dec"]

    def decode(self, f: jax.Array, x: jax.Array | None = None) -> jax.Array:
        """Reconstruction in raw units. ``[..., F] -> [..., D]``.

        ``x``: the input whose latents ``f`` are; needed (only) when ``act_norm`` normalises each input.
        """
        out = self.decode_normalized(f) / self.buffers["input_scale"]
        if self.act_norm == "none":
            return out
        if x is None:
            raise ValueError(f"this SAE normalises each input (act_norm={self.act_norm!r}); decode needs that input: "
                             f"sae.decode(f, x)")
        shift, _, out_scale = _norm_stats(self.act_norm, x)
        return out * out_scale + shift

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x), x)

    # training ------------------------------------------------------------------------
    def train_acts(self, xn: jax.Array, hp: Hparams) -> tuple[jax.Array, jax.Array, dict]:
        """``(f, pre, extra)`` used by the loss (batch-dependent families override)."""
        pre = self.pre_acts(xn)
        return self.activate(pre), pre, {}

    def penalty(self, f: jax.Array, pre: jax.Array, xn: jax.Array, hp: Hparams) -> jax.Array:
        """Sparsity (and family-specific auxiliary) terms, mean over the batch, *unweighted by warmup*."""
        return jnp.zeros(())

    def loss(self, x: jax.Array, hp: Hparams, sparsity_scale: jax.Array = 1.0,
             use_auxk: bool = True, any_dead: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """``mse + sparsity_scale * penalty + aux_coeff * auxk``; ``x [B, D]`` raw activations.

        ``mse`` is the squared error summed over ``D`` and averaged over the batch, on
        normalised activations. ``use_auxk=False`` (static) skips the AuxK term entirely;
        ``any_dead`` (an unbatched bool, e.g. "some SAE of the grid has a dead latent") lets
        the AuxK top-k be skipped by a ``lax.cond`` in steps where it would be 0 anyway.
        """
        xn = self.normalize(x)
        if self.sparse_training:
            return self._sparse_loss(xn, hp, use_auxk, any_dead)
        f, pre, extra = self.train_acts(xn, hp)
        x_hat = self.decode_normalized(f)
        mse = jnp.square(xn - x_hat).sum(-1).mean()
        sparsity = self.penalty(f, pre, xn, hp)
        auxk = self.auxk_loss(xn - x_hat, pre, hp, any_dead=any_dead) if use_auxk else jnp.zeros(())
        total = mse + sparsity_scale * sparsity + hp.aux_coeff * auxk + extra.get("extra_loss", 0.0)
        active = f != 0  # [B, F]
        aux = {"mse": mse, "sparsity": sparsity, "auxk": auxk, "l0": active.sum() / active.shape[0],
               "fired": active.any(0), "f": f, **{k: v for k, v in extra.items() if k != "extra_loss"}}
        return total, aux

    def sparse_select(self, pre: jax.Array, hp: Hparams) -> tuple[jax.Array | None, jax.Array, jax.Array, dict]:
        """Sparse path: the kept entries of ``pre [B, F]`` as slots ``(rows, cols, keep, extra)``.

        ``cols [S, B]`` latent indices; ``rows [S, B]`` example indices, or None when entry
        ``b`` of every slot belongs to example ``b``; ``keep`` (broadcastable to ``cols``) masks
        out the slots beyond the traced ``k``.
        """
        raise NotImplementedError(f"{self.family} SAEs have no sparse training path")

    def _sparse_loss(self, xn: jax.Array, hp: Hparams, use_auxk: bool, any_dead) -> tuple[jax.Array, dict]:
        """``loss`` of a family whose latents are a selection of ``ReLU(pre)`` (TopK, BatchTopK: no
        sparsity penalty, no extra loss), with the kept entries as slots (see ``sparse_select``)."""
        p = self.params
        b, f = xn.shape[0], self.d_sae
        pre = jax.lax.stop_gradient(self.pre_acts(xn))  # gradients flow through _gather_pre only
        rows, cols, keep, extra = self.sparse_select(pre, hp)
        kept_pre = _gather_pre(xn, p["b_dec"], p["W_enc"], p["b_enc"], pre, rows, cols)
        vals = jnp.where(keep, jax.nn.relu(kept_pre), 0.0)  # [S, B]
        x_hat = _sparse_decode(vals, rows, cols, p["W_dec"]) + p["b_dec"]
        mse = jnp.square(xn - x_hat).sum(-1).mean()
        auxk = self.auxk_loss(xn - x_hat, None, hp, any_dead=any_dead, xn=xn) if use_auxk else jnp.zeros(())
        active = vals != 0
        fired = jnp.zeros(f, jnp.int32).at[cols.reshape(-1)].add(active.reshape(-1).astype(jnp.int32), mode=_IN) > 0
        aux = {"mse": mse, "sparsity": jnp.zeros(()), "auxk": auxk, "l0": active.sum() / b, "fired": fired,
               "f": _scatter_dense(vals, rows, cols, (b, f)), **extra}  # "f" is dead code under jit unless read
        return mse + hp.aux_coeff * auxk, aux

    def auxk_loss(self, err: jax.Array, pre: jax.Array | None, hp: Hparams, any_dead: jax.Array | None = None,
                  xn: jax.Array | None = None) -> jax.Array:
        """AuxK (Gao et al. 2024): reconstruct the residual from the top ``aux_k`` dead latents.

        Normalised by the residual's squared norm; 0 when no latent is dead. ``any_dead``:
        an unbatched flag that is False only when no latent is dead (then the top-k is skipped).
        ``pre=None``: recompute the pre-activations from ``xn`` inside the term (the sparse path
        does, so that AuxK's dense encoder gradient is only computed when some latent is dead).
        """
        dead = self.buffers["fired_ago"] >= hp.dead_tokens  # [F]

        def term(operands):
            err, pre, w_dec = operands
            pre = self.pre_acts(xn) if pre is None else pre
            acts = jnp.where(dead, jax.nn.relu(pre), 0.0)
            k_max = min(self.d_sae, 512)
            z = _topk_rows(acts, jnp.minimum(hp.aux_k, dead.sum()), k_max)
            err = jax.lax.stop_gradient(err)
            e_hat = z @ w_dec
            denom = jnp.square(err).sum(-1).mean() + 1e-12
            return jnp.where(dead.any(), jnp.square(err - e_hat).sum(-1).mean() / denom, 0.0)

        operands = (err, pre, self.params["W_dec"])
        if any_dead is None:
            return term(operands)
        return jax.lax.cond(any_dead, term, lambda _: jnp.zeros((), err.dtype), operands)

    def update_buffers(self, aux: dict) -> "SAE":
        """After an optimiser step: count tokens since each latent fired."""
        n = aux["f"].shape[0]
        fired_ago = jnp.where(aux["fired"], 0, self.buffers["fired_ago"] + n)
        return self.replace(buffers={**self.buffers, "fired_ago": fired_ago})


@struct.dataclass
class ReLUSAE(SAE):
    """Standard SAE: ``f = ReLU(W_e (x - b_d) + b_e)``, L1 penalty (``hp.p`` = 1)."""

    family: ClassVar[str] = "relu"

    def penalty(self, f, pre, xn, hp):
        return hp.sparsity_coeff * f.sum(-1).mean()  # f >= 0, so this is the L1 norm


@struct.dataclass
class PAnnealSAE(SAE):
    """ReLU SAE with the ``sum_i f_i^p`` penalty; the trainer steps ``p`` and rescales lambda."""

    family: ClassVar[str] = "panneal"

    def penalty(self, f, pre, xn, hp):
        return hp.sparsity_coeff * lp_penalty(f, hp.p).mean()


@struct.dataclass
class TopKSAE(SAE):
    """``f = TopK_k(ReLU(pre))`` with ``k`` a buffer (traced; ``<= k_max``); no sparsity penalty."""

    family: ClassVar[str] = "topk"

    def activate(self, pre):
        return _topk_rows(jax.nn.relu(pre.reshape(-1, pre.shape[-1])), self.buffers["k"], self.k_max).reshape(pre.shape)

    def sparse_select(self, pre, hp):
        _, idx = jax.lax.top_k(jax.nn.relu(pre), self.k_max)  # [B, k_max]; slot j = each row's j-th largest
        return None, idx.T, (jnp.arange(self.k_max) < self.buffers["k"])[:, None], {}


@struct.dataclass
class BatchTopKSAE(SAE):
    """Keeps the ``k * B`` largest activations of a batch in training; at inference a
    JumpReLU with the scalar ``threshold`` (running mean of the smallest kept activation)."""

    family: ClassVar[str] = "batchtopk"

    def activate(self, pre):
        relu = jax.nn.relu(pre)
        return jnp.where(relu > self.buffers["threshold"], relu, 0.0)

    def train_acts(self, xn, hp):
        pre = self.pre_acts(xn)
        b, f = pre.shape
        flat = jax.nn.relu(pre).reshape(1, b * f)
        kept = _topk_rows(flat, self.buffers["k"] * b, self.k_max * b).reshape(b, f)
        min_kept = jnp.min(jnp.where(kept > 0, kept, jnp.inf))
        return kept, pre, {"min_kept": min_kept}

    def sparse_select(self, pre, hp):
        b, f = pre.shape
        vals, flat = jax.lax.top_k(jax.nn.relu(pre).reshape(b * f), self.k_max * b)  # exact: no per-row cap
        keep = jnp.arange(self.k_max * b) < self.buffers["k"] * b
        min_kept = jnp.min(jnp.where(keep & (vals > 0), vals, jnp.inf))
        slots = lambda a: a.reshape(self.k_max, b)  # k_max slots of b entries (in value order)
        return slots(flat // f), slots(flat % f), slots(keep), {"min_kept": min_kept}

    def update_buffers(self, aux):
        new = super().update_buffers(aux)
        old = self.buffers["threshold"]
        seen = jnp.isfinite(aux["min_kept"])
        thr = jnp.where(old < 0, aux["min_kept"], 0.99 * old + 0.01 * aux["min_kept"])
        return new.replace(buffers={**new.buffers, "threshold": jnp.where(seen, thr, old)})


@struct.dataclass
class JumpReLUSAE(SAE):
    """``f = pre * H(pre - theta)``, ``theta = exp(log_threshold)``; L0 penalty via straight-through estimators."""

    family: ClassVar[str] = "jumprelu"

    def threshold(self):
        return jnp.exp(self.params["log_threshold"])

    def activate(self, pre):
        return jnp.where(pre > self.threshold(), pre, 0.0)

    def train_acts(self, xn, hp):
        pre = self.pre_acts(xn)
        return jumprelu(pre, self.threshold(), hp.bandwidth), pre, {}

    def penalty(self, f, pre, xn, hp):
        l0 = step_fn(pre, self.threshold(), hp.bandwidth).sum(-1).mean()
        return hp.sparsity_coeff * l0


@struct.dataclass
class GatedSAE(SAE):
    """Gated SAE (Rajamanoharan et al. 2024): gate ``H(pi_gate > 0)``, magnitude ``ReLU(W_mag x + b_mag)``
    with ``W_mag = W_enc * exp(r_mag)``; penalty ``L1(ReLU(pi_gate))`` plus the auxiliary
    reconstruction of ``ReLU(pi_gate)`` through the frozen decoder."""

    family: ClassVar[str] = "gated"

    def _paths(self, xn):
        p = self.params
        centred = xn - p["b_dec"]
        pi_gate = centred @ p["W_enc"] + p["b_enc"]
        mag = jax.nn.relu(centred @ (p["W_enc"] * jnp.exp(p["r_mag"])) + p["b_mag"])
        return pi_gate, mag

    def encode(self, x):
        pi_gate, mag = self._paths(self.normalize(x))
        return jnp.where(pi_gate > 0, mag, 0.0)

    def train_acts(self, xn, hp):
        pi_gate, mag = self._paths(xn)
        frozen = jax.lax.stop_gradient(self.params)
        x_gate = jax.nn.relu(pi_gate) @ frozen["W_dec"] + frozen["b_dec"]
        gate_aux = jnp.square(xn - x_gate).sum(-1).mean()
        return jnp.where(pi_gate > 0, mag, 0.0), pi_gate, {"extra_loss": gate_aux, "gate_aux": gate_aux}

    def penalty(self, f, pre, xn, hp):
        return hp.sparsity_coeff * jax.nn.relu(pre).sum(-1).mean()


SPARSE_FAMILIES = ("topk", "batchtopk")


def check_sparse(family: str, sparse: bool | None) -> None:
    """``sparse=True`` (the sparse training path) exists only for ``SPARSE_FAMILIES``."""
    if sparse and family not in SPARSE_FAMILIES:
        raise ValueError(f"sparse=True needs family in {list(SPARSE_FAMILIES)}, got {family!r}; "
                         f"use sparse=None or False")
FAMILIES: dict[str, type[SAE]] = {c.family: c for c in (ReLUSAE, PAnnealSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE, GatedSAE)}


def get_family(name: str) -> type[SAE]:
    if name not in FAMILIES:
        raise ValueError(f"unknown SAE family {name!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def init_sae(family: str, key: jax.Array, d_in: int, d_sae: int, *, k: int = 0, k_max: int | None = None,
             input_scale: float = 1.0, b_dec: jax.Array | None = None, threshold: float = 1e-3,
             sparse: bool | None = None) -> SAE:
    """A fresh SAE: unit-norm random decoder rows, encoder = decoder transpose, zero biases.

    ``k``: active latents for ``topk``/``batchtopk`` (``k_max`` defaults to ``k``).
    ``sparse``: training path of ``topk``/``batchtopk`` (True sparse, False dense, None auto).
    ``threshold``: JumpReLU's initial threshold. ``b_dec``: initial decoder bias (normalised units).
    """
    cls = get_family(family)
    check_sparse(family, sparse)
    if d_in <= 0 or d_sae <= 0:
        raise ValueError(f"d_in and d_sae must be positive, got {d_in}, {d_sae}")
    if family in ("topk", "batchtopk"):
        k_max = k if k_max is None else k_max
        if not 0 < k <= k_max <= d_sae:
            raise ValueError(f"{family}: need 0 < k <= k_max <= d_sae, got k={k}, k_max={k_max}, d_sae={d_sae}")
    w = jax.random.normal(key, (d_sae, d_in), jnp.float32)
    w = w / jnp.linalg.norm(w, axis=-1, keepdims=True)
    params = {"W_enc": w.T, "b_enc": jnp.zeros(d_sae), "W_dec": w,
              "b_dec": jnp.zeros(d_in) if b_dec is None else jnp.asarray(b_dec, jnp.float32)}
    if family == "jumprelu":
        params["log_threshold"] = jnp.full(d_sae, jnp.log(threshold), jnp.float32)
    if family == "gated":
        params["r_mag"] = jnp.zeros(d_sae)
        params["b_mag"] = jnp.zeros(d_sae)
    buffers = _fresh_buffers(family, d_sae, k=k, input_scale=input_scale)
    return cls(params=params, buffers=buffers, k_max=int(k_max or 0), sparse=sparse)


def _fresh_buffers(family: str, d_sae: int, *, k: int, input_scale: float, batch_threshold: float = -1.0) -> dict:
    """Untrained buffers: ``input_scale``, ``fired_ago`` (0), ``k`` (TopK, BatchTopK), ``threshold`` (BatchTopK; < 0 = unset)."""
    buffers = {"input_scale": jnp.asarray(input_scale, jnp.float32), "fired_ago": jnp.zeros(d_sae, jnp.int32)}
    if family in ("topk", "batchtopk"):
        buffers["k"] = jnp.asarray(k, jnp.int32)
    if family == "batchtopk":
        buffers["threshold"] = jnp.asarray(batch_threshold, jnp.float32)
    return buffers


def family_param_shapes(family: str, d_in: int, d_sae: int) -> dict[str, tuple[int, ...]]:
    """The parameter names and shapes of one SAE of ``family``."""
    get_family(family)
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if family == "jumprelu":
        shapes["log_threshold"] = (d_sae,)
    if family == "gated":
        shapes.update(r_mag=(d_sae,), b_mag=(d_sae,))
    return shapes


def sae_from_params(family: str, params: dict, *, k: int = 0, input_scale: float = 1.0, batch_threshold: float = -1.0,
                    reads: Reads = Reads(), act_norm: str = "none") -> SAE:
    """An inference-ready SAE of ``family`` from given parameters (names and shapes checked) and untrained buffers.

    ``k``: TopK / BatchTopK's k; ``batch_threshold``: BatchTopK's inference threshold.
    """
    cls = get_family(family)
    d_sae, d_in = params["W_dec"].shape if "W_dec" in params and params["W_dec"].ndim == 2 else (0, 0)
    want = family_param_shapes(family, d_in, d_sae)
    got = {name: tuple(params[name].shape) for name in params}
    if d_in == 0 or got != want:
        raise ValueError(f"{family} SAE parameters must be {want} (W_dec [d_sae, d_in]), got {got}")
    if family in ("topk", "batchtopk") and not 0 < k <= d_sae:
        raise ValueError(f"{family}: need 0 < k <= d_sae={d_sae}, got k={k}")
    buffers = _fresh_buffers(family, d_sae, k=k, input_scale=input_scale, batch_threshold=batch_threshold)
    params = {name: jnp.asarray(v, jnp.float32) for name, v in params.items()}
    return cls(params=params, buffers=buffers, k_max=k if family in ("topk", "batchtopk") else 0, reads=reads,
               act_norm=act_norm)
