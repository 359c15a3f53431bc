"""GPT-NeoX / Pythia as a Flax module that emits every named site.

Parameter tree (mirrors HF names): ``embed_in [V, D]``, ``layers_{i}/{input_layernorm,
attention/{query_key_value, dense}, post_attention_layernorm, mlp/{dense_h_to_4h, dense_4h_to_h}}``,
``final_layer_norm``, and ``embed_out [D, V]`` when untied. The fused ``query_key_value`` kernel
``[D, 3D]`` is kept as HF stores it, whose output features are interleaved per head as
``[H, 3, Dh]`` (q, k, v of head 0, then head 1, ...), and split in the forward.

With ``parallel_residual`` both branches read ``resid_pre`` (``ln2`` normalises ``resid_pre``) and
``resid_post = resid_pre + attn_out + mlp_out``; there is no ``resid_mid`` site. Rotary acts on
the first ``rotary_dim`` features of each q/k head; ``attn.q``/``attn.k`` are after rotary.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxinterp.models.common import (
    ACTIVATIONS, LayerNorm, apply_rotary, causal_attention, transformer_site_names, unembed, rotary_tables,
)
from .config import GPTNeoXConfig

_init = nn.initializers.normal(0.02)


def site_names(cfg: GPTNeoXConfig) -> tuple[str, ...]:
    return transformer_site_names(cfg.n_layers, cfg.parallel_residual)


def attn_out_weights(cfg: GPTNeoXConfig, params, layer: int):
    """Per-head output projection ``[H, Dh, D]`` and bias ``[D]`` (None without ``attention_bias``)."""
    dense = params[f"layers_{layer}"]["attention"]["dense"]
    return dense["kernel"].reshape(cfg.n_heads, cfg.head_dim, cfg.d_model), dense.get("bias")


class Attention(nn.Module):
    cfg: GPTNeoXConfig
    layer: int

    @nn.compact
    def __call__(self, x, cos, sin, sites):
        cfg = self.cfg
        b, t, _ = x.shape
        qkv = nn.Dense(3 * cfg.d_model, use_bias=cfg.attention_bias, kernel_init=_init, name="query_key_value")(x)
        qkv = qkv.reshape(b, t, cfg.n_heads, 3, cfg.head_dim)  # [B, T, H, 3, Dh]
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]  # [B, T, H, Dh]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        z = causal_attention(sites, f"blocks.{self.layer}.attn", q, k, v, scale=cfg.head_dim ** -0.5)
        return nn.Dense(cfg.d_model, use_bias=cfg.attention_bias, kernel_init=_init, name="dense")(
            z.reshape(b, t, cfg.d_model))


class MLP(nn.Module):
    cfg: GPTNeoXConfig
    layer: int

    @nn.compact
    def __call__(self, x, sites):
        p = f"blocks.{self.layer}.mlp"
        pre = sites(f"{p}.pre", nn.Dense(self.cfg.d_mlp, kernel_init=_init, name="dense_h_to_4h")(x))  # [B, T, F]
        post = sites(f"{p}.post", ACTIVATIONS[self.cfg.activation](pre))
        return nn.Dense(self.cfg.d_model, kernel_init=_init, name="dense_4h_to_h")(post)


class Block(nn.Module):
    cfg: GPTNeoXConfig
    layer: int

    @nn.compact
    def __call__(self, x, cos, sin, sites):
        cfg, b = self.cfg, f"blocks.{self.layer}"
        x = sites(f"{b}.resid_pre", x)
        h = sites(f"{b}.ln1", LayerNorm(cfg.ln_eps, name="input_layernorm")(x))
        attn = sites(f"{b}.attn_out", Attention(cfg, self.layer, name="attention")(h, cos, sin, sites))
        if cfg.parallel_residual:
            mlp_in = x
        else:
            x = mlp_in = sites(f"{b}.resid_mid", x + attn)
        h = sites(f"{b}.ln2", LayerNorm(cfg.ln_eps, name="post_attention_layernorm")(mlp_in))
        mlp = sites(f"{b}.mlp_out", MLP(cfg, self.layer, name="mlp")(h, sites))
        if cfg.parallel_residual:
            return sites(f"{b}.resid_post", x + attn + mlp)
        return sites(f"{b}.resid_post", x + mlp)


class GPTNeoX(nn.Module):
    cfg: GPTNeoXConfig

    @nn.compact
    def __call__(self, tokens, sites, logits_at=None):
        cfg = self.cfg
        embed = self.param("embed_in", _init, (cfg.vocab_size, cfg.d_model))
        x = sites("embed", jnp.take(embed, tokens, axis=0))  # [B, T, D]
        cos, sin = rotary_tables(jnp.arange(tokens.shape[1]), cfg.rotary_dim, cfg.rope_theta)  # [T, rotary_dim]
        for i in range(cfg.n_layers):
            x = Block(cfg, i, name=f"layers_{i}")(x, cos, sin, sites)
        x = sites("final_norm", LayerNorm(cfg.ln_eps, name="final_layer_norm")(x))
        return unembed(x, embed, logits_at, tied=cfg.tie_embeddings, vocab_size=cfg.vocab_size, kernel_init=_init,
                       name="embed_out")
