"""Reconstruction and downstream metrics of an SAE.

* ``reconstruction_metrics``: L0, MSE, fraction of variance explained, cosine
  similarity, dead / dense latent fractions and relative reconstruction bias (gamma,
  Rajamanoharan et al. 2024: the scale minimising ``||x_hat / gamma - x||^2``; < 1 means
  shrinkage).
* ``downstream_metrics``: next-token cross-entropy with the SAE spliced in at a site,
  against the clean model and zero-ablation of the site (the floor); "loss recovered" =
  ``(CE_zero - CE_sae) / (CE_zero - CE_clean)``, and the KL divergence of the spliced
  from the clean next-token distribution.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxinterp.interventions import ZeroAblate
from .families import SAE
from .splice import Splice

__all__ = ["reconstruction_metrics", "downstream_metrics", "latent_acts"]


def latent_acts(sae: SAE, x: np.ndarray, batch: int = 8192) -> np.ndarray:
    """``[N, F]`` inference-mode latents of ``x [N, D]`` (computed in chunks)."""
    enc = jax.jit(lambda s, a: s.encode(a))
    return np.concatenate([np.asarray(enc(sae, jnp.asarray(x[i:i + batch]))) for i in range(0, len(x), batch)])


def reconstruction_metrics(sae: SAE, x: np.ndarray, batch: int = 8192, dense_frac: float = 0.1) -> dict:
    """Metrics over ``x [N, D]`` raw activations. Dead: never fires on ``x``; dense: fires on > ``dense_frac``."""

    @jax.jit
    def chunk(s, a):
        f = s.encode(a)
        x_hat = s.decode(f, a)
        err = jnp.square(a - x_hat).sum(-1)
        cos = jnp.sum(a * x_hat, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(x_hat, axis=-1) + 1e-12)
        return {"l0": (f != 0).sum(-1).sum(), "sq_err": err.sum(), "cos": cos.sum(), "fires": (f != 0).sum(0),
                "xhat_sq": jnp.square(x_hat).sum(), "xhat_x": jnp.sum(x_hat * a)}

    x = np.asarray(x, np.float32)
    n = len(x)
    tot = None
    for i in range(0, n, batch):
        out = jax.tree_util.tree_map(np.asarray, chunk(sae, jnp.asarray(x[i:i + batch])))
        tot = out if tot is None else jax.tree_util.tree_map(np.add, tot, out)
    total_var = np.square(x - x.mean(0)).sum()
    freq = tot["fires"] / n
    return {
        "l0": float(tot["l0"] / n),
        "mse": float(tot["sq_err"] / n),
        "fve": float(1 - tot["sq_err"] / total_var),
        "cosine": float(tot["cos"] / n),
        "dead_frac": float(np.mean(freq == 0)),
        "dense_frac": float(np.mean(freq > dense_frac)),
        "rel_recon_bias": float(tot["xhat_sq"] / tot["xhat_x"]),
    }


def _ce_and_logprobs(logits, tokens):
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)  # [B, T-1, V]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), tokens[:, 1:])
    return ce, logp


def downstream_metrics(model, tokens: np.ndarray, site: str, sae: SAE, batch: int = 64) -> dict:
    """CE loss recovered and KL when splicing ``sae`` at ``site`` (zero-ablation is the floor).

    ``tokens [N, T]``: next-token targets are ``tokens[:, 1:]``.
    """

    @jax.jit
    def chunk(m, s, t):
        clean = m.run(t).logits
        spliced = m.run(t, interventions={site: Splice(s)}).logits
        zero = m.run(t, interventions={site: ZeroAblate()}).logits
        ce_c, lp_c = _ce_and_logprobs(clean, t)
        ce_s, lp_s = _ce_and_logprobs(spliced, t)
        ce_z, _ = _ce_and_logprobs(zero, t)
        kl = jnp.sum(jnp.exp(lp_c) * (lp_c - lp_s), -1)
        return jnp.stack([ce_c.sum(), ce_s.sum(), ce_z.sum(), kl.sum(), jnp.asarray(ce_c.size, jnp.float32)])

    tot = sum(np.asarray(chunk(model, sae, jnp.asarray(tokens[i:i + batch]))) for i in range(0, len(tokens), batch))
    ce_clean, ce_sae, ce_zero, kl, n = tot
    return {"ce_clean": float(ce_clean / n), "ce_sae": float(ce_sae / n), "ce_zero": float(ce_zero / n),
            "loss_recovered": float((ce_zero - ce_sae) / (ce_zero - ce_clean)), "kl": float(kl / n)}
