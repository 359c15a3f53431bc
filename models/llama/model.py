"""Llama-family decoder (Llama, Mistral, Qwen2) as a Flax module that emits every named site.

Parameter tree (mirrors HF names): ``embed_tokens [V, D]``, ``layers_{i}/{input_layernorm,
self_attn/{q_proj, k_proj, v_proj, o_proj}, post_attention_layernorm, mlp/{gate_proj, up_proj,
down_proj}}``, ``norm``, and ``lm_head [D, V]`` when untied.

Sites per layer follow DESIGN.md. The SwiGLU MLP maps onto the two MLP sites as:
``mlp.pre`` = the gate projection before the activation ``[B, T, F]``; ``mlp.post`` =
``act(gate) * up`` ``[B, T, F]``, the input of ``down_proj`` (so ablating or patching ``mlp.post``
acts on exactly what the output projection reads). The up projection is not a site of its own.
``attn.k``/``attn.v`` keep the kv-head count ``[B, T, Hkv, Dh]`` under grouped/multi-query
attention; ``attn.q``/``attn.k`` are after rotary.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxinterp.models.common import (
    ACTIVATIONS, RMSNorm, apply_rotary, causal_attention, transformer_site_names, unembed, rotary_tables,
)
from .config import LlamaConfig

_init = nn.initializers.normal(0.02)


def site_names(cfg: LlamaConfig) -> tuple[str, ...]:
    return transformer_site_names(cfg.n_layers)


def attn_out_weights(cfg: LlamaConfig, params, layer: int):
    """Per-head output projection ``[H, Dh, D]`` and bias ``[D]`` (None unless ``o_bias``)."""
    o_proj = params[f"layers_{layer}"]["self_attn"]["o_proj"]
    return o_proj["kernel"].reshape(cfg.n_heads, cfg.head_dim, cfg.d_model), o_proj.get("bias")


class Attention(nn.Module):
    cfg: LlamaConfig
    layer: int

    @nn.compact
    def __call__(self, x, cos, sin, sites):
        cfg = self.cfg
        b, t, _ = x.shape
        dense = lambda n, name, bias: nn.Dense(n, use_bias=bias, kernel_init=_init, name=name)
        q = dense(cfg.n_heads * cfg.head_dim, "q_proj", cfg.qkv_bias)(x).reshape(b, t, cfg.n_heads, cfg.head_dim)
        k = dense(cfg.n_kv_heads * cfg.head_dim, "k_proj", cfg.qkv_bias)(x).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        v = dense(cfg.n_kv_heads * cfg.head_dim, "v_proj", cfg.qkv_bias)(x).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # [B, T, H(kv), Dh]
        z = causal_attention(sites, f"blocks.{self.layer}.attn", q, k, v, scale=cfg.head_dim ** -0.5,
                             sliding_window=cfg.window_for(self.layer))  # [B, T, H, Dh]
        return dense(cfg.d_model, "o_proj", cfg.o_bias)(z.reshape(b, t, cfg.n_heads * cfg.head_dim))


class MLP(nn.Module):
    cfg: LlamaConfig
    layer: int

    @nn.compact
    def __call__(self, x, sites):
        cfg = self.cfg
        p = f"blocks.{self.layer}.mlp"
        dense = lambda n, name: nn.Dense(n, use_bias=cfg.mlp_bias, kernel_init=_init, name=name)
        gate = sites(f"{p}.pre", dense(cfg.d_mlp, "gate_proj")(x))  # [B, T, F]
        up = dense(cfg.d_mlp, "up_proj")(x)  # [B, T, F]
        post = sites(f"{p}.post", ACTIVATIONS[cfg.activation](gate) * up)
        return dense(cfg.d_model, "down_proj")(post)


class Block(nn.Module):
    cfg: LlamaConfig
    layer: int

    @nn.compact
    def __call__(self, x, cos, sin, sites):
        cfg, b = self.cfg, f"blocks.{self.layer}"
        x = sites(f"{b}.resid_pre", x)
        h = sites(f"{b}.ln1", RMSNorm(cfg.rms_eps, name="input_layernorm")(x))
        attn = sites(f"{b}.attn_out", Attention(cfg, self.layer, name="self_attn")(h, cos, sin, sites))
        x = sites(f"{b}.resid_mid", x + attn)
        h = sites(f"{b}.ln2", RMSNorm(cfg.rms_eps, name="post_attention_layernorm")(x))
        mlp = sites(f"{b}.mlp_out", MLP(cfg, self.layer, name="mlp")(h, sites))
        return sites(f"{b}.resid_post", x + mlp)


class Llama(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, tokens, sites, logits_at=None):
        cfg = self.cfg
        embed = self.param("embed_tokens", _init, (cfg.vocab_size, cfg.d_model))
        x = sites("embed", jnp.take(embed, tokens, axis=0))  # [B, T, D]
        cos, sin = rotary_tables(jnp.arange(tokens.shape[1]), cfg.head_dim, cfg.rope_theta)  # [T, Dh]
        for i in range(cfg.n_layers):
            x = Block(cfg, i, name=f"layers_{i}")(x, cos, sin, sites)
        x = sites("final_norm", RMSNorm(cfg.rms_eps, name="norm")(x))
        return unembed(x, embed, logits_at, tied=cfg.tie_embeddings, vocab_size=cfg.vocab_size, kernel_init=_init,
                       name="lm_head")
