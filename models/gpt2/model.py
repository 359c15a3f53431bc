"""GPT-2 as a Flax module that emits every named site.

Parameter tree (mirrors HF names): ``wte [V, D]``, ``wpe [P, D]``, ``h_{i}/{ln_1, attn/{c_attn,
c_proj}, ln_2, mlp/{c_fc, c_proj}}``, ``ln_f``, and ``lm_head [D, V]`` when untied. The
fused ``c_attn`` kernel ``[D, 3D]`` is kept as HF stores it and split in the forward.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxinterp.models.common import ACTIVATIONS, LayerNorm, causal_attention, transformer_site_names, unembed
from .config import GPT2Config

_init = nn.initializers.normal(0.02)


def site_names(cfg: GPT2Config) -> tuple[str, ...]:
    return transformer_site_names(cfg.n_layers)


def attn_out_weights(cfg: GPT2Config, params, layer: int):
    """Per-head output projection ``[H, Dh, D]`` and bias ``[D]`` of layer ``layer``."""
    proj = params[f"h_{layer}"]["attn"]["c_proj"]
    return proj["kernel"].reshape(cfg.n_heads, cfg.head_dim, cfg.d_model), proj["bias"]


class Attention(nn.Module):
    cfg: GPT2Config
    layer: int

    @nn.compact
    def __call__(self, x, sites):
        cfg = self.cfg
        b, t, _ = x.shape
        qkv = nn.Dense(3 * cfg.d_model, kernel_init=_init, name="c_attn")(x)  # [B, T, 3D]
        q, k, v = (a.reshape(b, t, cfg.n_heads, cfg.head_dim) for a in jnp.split(qkv, 3, axis=-1))
        scale = cfg.head_dim ** -0.5
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= self.layer + 1
        z = causal_attention(sites, f"blocks.{self.layer}.attn", q, k, v, scale=scale)
        return nn.Dense(cfg.d_model, kernel_init=_init, name="c_proj")(z.reshape(b, t, cfg.d_model))


class MLP(nn.Module):
    cfg: GPT2Config
    layer: int

    @nn.compact
    def __call__(self, x, sites):
        p = f"blocks.{self.layer}.mlp"
        pre = sites(f"{p}.pre", nn.Dense(self.cfg.d_mlp, kernel_init=_init, name="c_fc")(x))
        post = sites(f"{p}.post", ACTIVATIONS[self.cfg.activation](pre))
        return nn.Dense(self.cfg.d_model, kernel_init=_init, name="c_proj")(post)


class Block(nn.Module):
    cfg: GPT2Config
    layer: int

    @nn.compact
    def __call__(self, x, sites):
        b = f"blocks.{self.layer}"
        x = sites(f"{b}.resid_pre", x)
        h = sites(f"{b}.ln1", LayerNorm(self.cfg.ln_eps, name="ln_1")(x))
        attn = sites(f"{b}.attn_out", Attention(self.cfg, self.layer, name="attn")(h, sites))
        x = sites(f"{b}.resid_mid", x + attn)
        h = sites(f"{b}.ln2", LayerNorm(self.cfg.ln_eps, name="ln_2")(x))
        mlp = sites(f"{b}.mlp_out", MLP(self.cfg, self.layer, name="mlp")(h, sites))
        return sites(f"{b}.resid_post", x + mlp)


class GPT2(nn.Module):
    cfg: GPT2Config

    @nn.compact
    def __call__(self, tokens, sites, logits_at=None):
        cfg = self.cfg
        wte = self.param("wte", _init, (cfg.vocab_size, cfg.d_model))
        wpe = self.param("wpe", nn.initializers.normal(0.01), (cfg.max_seq_len, cfg.d_model))
        t = tokens.shape[1]
        x = sites("embed", jnp.take(wte, tokens, axis=0) + wpe[None, :t])  # [B, T, D]
        for i in range(cfg.n_layers):
            x = Block(cfg, i, name=f"h_{i}")(x, sites)
        x = sites("final_norm", LayerNorm(cfg.ln_eps, name="ln_f")(x))
        return unembed(x, wte, logits_at, tied=cfg.tie_embeddings, vocab_size=cfg.vocab_size, kernel_init=_init,
                       name="lm_head")
