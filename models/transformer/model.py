"""The shared decoder: one Flax block for every transformer family, stacked with ``nn.scan``.

Parameter tree (per-layer parameters stacked on a leading ``layers`` axis)::

    embed [V, D]            pos_embed [P, D] (learned positions)
    layers/ ln1, attn/{q, k, v, o, q_norm, k_norm}, post_attn_norm, ln2, mlp/{gate, up, down}, post_mlp_norm
            moe/{router [D, E], experts/{gate, up [E, D, F], down [E, F, D]}}   (instead of mlp/ with experts)
    final_norm              lm_head/{kernel [D, V], bias} (untied; a tied model keeps only the bias, GPT-J)

Kernels are ``[in, out]`` (``q``: ``[D, H*Dh]``, ``o``: ``[H*Dh, D]``). Every Dense in a block goes
through ``sites.adapt(projection, x, y)``, where LoRA adds its side path.

``Transformer.__call__`` returns ``(logits, cache)``: with a ``cache`` (stacked per-layer key and
value buffers ``[L, B, S, Hkv, Dh]``) the new keys/values are written at slot ``write_index`` and
the updated buffers come back; without one, keys and values are those of the call's own tokens.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.models.common import (
    ACTIVATIONS, INIT, LayerNorm, RMSNorm, apply_rotary, attention_core, attention_mask, gather_positions,
    rotary_tables, write_cache,
)
from .arch import Arch

REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


def make_norm(a: Arch, name: Optional[str], eps: Optional[float] = None):
    eps = a.norm_eps if eps is None else eps
    if a.norm == "layernorm":
        return LayerNorm(eps, use_bias=a.norm_bias, name=name)
    return RMSNorm(eps, offset=a.norm_offset, scale_in_f32=a.norm_scale_f32, name=name)


class Attention(nn.Module):
    arch: Arch

    def _dense(self, sites, name, x, features, bias):
        y = nn.Dense(features, use_bias=bias, kernel_init=INIT, name=name)(x)
        return sites.adapt(f"attn.{name}", x, y)

    @nn.compact
    def __call__(self, x, sites, layer, env, cache, stacked: bool = False):
        """``cache``: this layer's ``{k, v} [B, S, Hkv, Dh]``, or with ``stacked`` every layer's
        ``[L, B, S, Hkv, Dh]`` (generation: written in place at ``layer``, returned whole)."""
        a = self.arch
        b, t, _ = x.shape
        q = self._dense(sites, "q", x, a.n_heads * a.head_dim, a.qkv_bias)
        k = self._dense(sites, "k", x, a.n_kv_heads * a.head_dim, a.qkv_bias)
        v = self._dense(sites, "v", x, a.n_kv_heads * a.head_dim, a.qkv_bias)
        if a.qk_norm == "full":  # OLMo-2: RMSNorm over all heads' features
            q = RMSNorm(a.norm_eps, scale_in_f32=a.norm_scale_f32, name="q_norm")(q)
            k = RMSNorm(a.norm_eps, scale_in_f32=a.norm_scale_f32, name="k_norm")(k)
        if a.clip_qkv is not None:
            q, k, v = (jnp.clip(t, -a.clip_qkv, a.clip_qkv) for t in (q, k, v))
        q = q.reshape(b, t, a.n_heads, a.head_dim)
        k = k.reshape(b, t, a.n_kv_heads, a.head_dim)
        v = v.reshape(b, t, a.n_kv_heads, a.head_dim)
        if a.qk_norm == "head":  # Qwen3 / Gemma-3: RMSNorm over each head's features
            q = RMSNorm(a.norm_eps, offset=a.norm_offset, name="q_norm")(q)
            k = RMSNorm(a.norm_eps, offset=a.norm_offset, name="k_norm")(k)
        if a.positions == "rotary":
            cos, sin = env["cos"], env["sin"]
            if a.local_rope is not None:
                local = jnp.asarray(np.asarray(a.local_rope))[layer]
                cos, sin = jnp.where(local, env["cos_local"], cos), jnp.where(local, env["sin_local"], sin)
            q = apply_rotary(q, cos, sin, a.rope.interleaved)
            k = apply_rotary(k, cos, sin, a.rope.interleaved)
        q = sites("attn.q", q)  # [B, T, H, Dh]
        k = sites("attn.k", k)  # [B, T, Hkv, Dh]
        v = sites("attn.v", v)
        new_cache = None
        if stacked:  # one slot range of one layer written in the loop-carried buffer: no copy of the cache
            at = (layer, 0, env["write_index"], 0, 0)
            new_cache = {n: jax.lax.dynamic_update_slice(cache[n], new[None].astype(cache[n].dtype), at)
                         for n, new in (("k", k), ("v", v))}
            k, v = (jax.lax.dynamic_index_in_dim(new_cache[n], layer, 0, keepdims=False) for n in ("k", "v"))
        elif cache is not None:
            k = write_cache(cache["k"], k, env["write_index"])  # [B, S, Hkv, Dh]
            v = write_cache(cache["v"], v, env["write_index"])
            new_cache = {"k": k, "v": v}
        window = jnp.asarray(a.window_table())[layer] if a.windowed else None
        mask = attention_mask(env["q_index"], env["k_valid"], window)  # [B, 1, T, S]
        scale = a.scale
        if a.scale_by_inverse_layer:
            scale = scale / (jnp.asarray(layer, jnp.float32) + 1)
        z = attention_core(sites, q, k.astype(q.dtype), v.astype(q.dtype), mask, scale=scale,
                           softcap=a.attn_softcap)  # [B, T, H, Dh]
        out = self._dense(sites, "o", z.reshape(b, t, a.n_heads * a.head_dim), a.d_model, a.o_bias)
        return out, new_cache


class MLP(nn.Module):
    arch: Arch

    def _dense(self, sites, name, x, features):
        y = nn.Dense(features, use_bias=self.arch.mlp_bias, kernel_init=INIT, name=name)(x)
        return sites.adapt(f"mlp.{name}", x, y)

    @nn.compact
    def __call__(self, x, sites):
        a = self.arch
        act = ACTIVATIONS[a.activation]
        if a.gated:
            gate = sites("mlp.pre", self._dense(sites, "gate", x, a.d_mlp))  # [B, T, F]
            up = sites("mlp.up", self._dense(sites, "up", x, a.d_mlp))
            post = sites("mlp.post", act(gate) * up)
        else:
            pre = sites("mlp.pre", self._dense(sites, "up", x, a.d_mlp))
            post = sites("mlp.post", act(pre))
        return self._dense(sites, "down", post, a.d_model)


class Experts(nn.Module):
    """``n_experts`` gated MLPs; their stacked kernels ``gate``/``up [E, D, F]``, ``down [E, F, D]``."""

    arch: Arch

    @nn.compact
    def __call__(self, x, weights, keep_each: bool):
        """``sum_e weights[..., e] * expert_e(x)`` ``[B, T, D]``, and with ``keep_each`` the terms
        ``[B, T, E, D]`` (else None). Every expert runs on every token (exact and vmappable; the cost is
        ``n_experts / top_k`` times a routed dispatch), one expert at a time so the hidden activations
        of only one are alive. Each term is formed in float32 and cast to ``x.dtype`` before the sum,
        as transformers does."""
        a = self.arch
        act = ACTIVATIONS[a.activation]
        gate = self.param("gate", INIT, (a.n_experts, a.d_model, a.d_mlp))
        up = self.param("up", INIT, (a.n_experts, a.d_model, a.d_mlp))
        down = self.param("down", INIT, (a.n_experts, a.d_mlp, a.d_model))

        def one(total, expert):
            wg, wu, wd, w = expert
            y = (act(x @ wg.astype(x.dtype)) * (x @ wu.astype(x.dtype))) @ wd.astype(x.dtype)  # [B, T, D]
            term = (y.astype(jnp.float32) * w[..., None]).astype(x.dtype)
            return total + term, (term if keep_each else None)

        xs = (gate, up, down, jnp.moveaxis(weights, -1, 0))
        total, each = jax.lax.scan(one, jnp.zeros_like(x), xs)
        return total, (None if each is None else jnp.moveaxis(each, 0, -2))


class MoE(nn.Module):
    """Router + top-k routing + experts. Sites: ``moe.router_logits [B, T, E]`` (interventions there
    change the routing) and, only when observed, ``moe.expert_out [B, T, E, D]``: each expert's
    routing-weighted output (zero where the token is not routed to it), which sums to ``mlp_out``."""

    arch: Arch

    @nn.compact
    def __call__(self, x, sites):
        a = self.arch
        logits = nn.Dense(a.n_experts, use_bias=False, kernel_init=INIT, name="router")(x)
        logits = sites("moe.router_logits", sites.adapt("moe.router", x, logits))  # [B, T, E]
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        top, idx = jax.lax.top_k(probs, a.top_k)  # [B, T, k]
        if a.norm_topk:
            top = top / top.sum(-1, keepdims=True)
        weights = jnp.einsum("btke,btk->bte", jax.nn.one_hot(idx, a.n_experts, dtype=jnp.float32), top)
        keep = sites.wants("moe.expert_out")
        total, each = Experts(a, name="experts")(x, weights, keep)
        if keep:
            total = sites("moe.expert_out", each).sum(-2)  # [B, T, D]
        return total


class Block(nn.Module):
    """One decoder layer; ``__call__`` has ``nn.scan``'s signature ``(carry, xs, env) -> (carry, ys)``.

    ``xs``: ``{"layer": index, "cache": {k, v} or absent}``; ``ys``: ``(captured sites, new cache)``.
    For generation the carry is ``{"x": x, "cache": stacked cache}`` instead: each layer writes its new
    keys and values into the loop-carried ``[L, B, S, Hkv, Dh]`` buffers in place (as ``xs``/``ys`` the
    cache was sliced, re-stacked and copied back whole at every decode step).
    ``sites_ctx`` is any object with ``at_layer(layer)`` returning a per-layer ``sites`` callable.
    """

    arch: Arch
    sites_ctx: Any

    @nn.compact
    def __call__(self, carry, xs, env):
        a = self.arch
        layer = xs["layer"]
        stacked = isinstance(carry, dict)
        x, cache = (carry["x"], carry["cache"]) if stacked else (carry, xs.get("cache"))
        s = self.sites_ctx.at_layer(layer)
        sandwich = a.placement in ("sandwich", "post")
        x = s("resid_pre", x)
        h = s("ln1", make_norm(a, "ln1")(x)) if a.has_ln1 else x
        attn, new_cache = Attention(a, name="attn")(h, s, layer, env, cache, stacked=stacked)
        if sandwich:  # the raw projection, then the norm whose output joins the residual
            attn = make_norm(a, "post_attn_norm")(s("attn.out", attn))
        attn = s("attn_out", attn)
        if a.parallel == "none":
            x = s("resid_mid", x + attn)
            h2 = s("ln2", make_norm(a, "ln2")(x)) if a.has_ln2 else x
        elif a.parallel == "separate":
            h2 = s("ln2", make_norm(a, "ln2")(x))
        else:  # shared: GPT-J feeds the MLP the attention's input norm
            h2 = h
        mlp = MoE(a, name="moe")(h2, s) if a.n_experts else MLP(a, name="mlp")(h2, s)
        if sandwich:
            mlp = make_norm(a, "post_mlp_norm")(s("mlp.out", mlp))
        mlp = s("mlp_out", mlp)
        x = s("resid_post", x + attn + mlp if a.parallel != "none" else x + mlp)
        if stacked:
            return {"x": x, "cache": new_cache}, (s.captured, None)
        return x, (s.captured, new_cache)


def scan_layers(block_cls, arch_n_layers: int, remat: Optional[str], **block_kw):
    """``nn.scan`` of a block over stacked parameters (optionally rematerialised)."""
    if remat is not None:
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat policy must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
        block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[remat], prevent_cse=False)
    return nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=(0, nn.broadcast), length=arch_n_layers)(**block_kw)


class Transformer(nn.Module):
    """The decoder. ``n_run``: run only the first ``n_run`` layers (their parameters sliced by the
    caller) and return no logits (``run(..., stop_at=)``)."""

    arch: Arch
    remat: Optional[str] = None
    n_run: Optional[int] = None

    @nn.compact
    def __call__(self, tokens, sites, *, positions, k_valid, logits_at=None, cache=None, write_index=0):
        a = self.arch
        embed = self.param("embed", INIT, (a.vocab_size, a.d_model))
        x = jnp.take(embed, tokens, axis=0)  # [B, T, D]
        if a.positions == "learned":
            pos = self.param("pos_embed", nn.initializers.normal(0.01), (a.max_seq_len, a.d_model))
            x = x + jnp.take(pos, positions, axis=0)
        if a.embed_scale is not None:
            x = x * jnp.asarray(a.embed_scale, x.dtype)
        x = sites("embed", x)
        env = {"q_index": write_index + jnp.arange(tokens.shape[1]), "k_valid": k_valid, "write_index": write_index}
        if a.positions == "rotary":
            env.update(rotary_env(a, positions))
        n_run = a.n_layers if self.n_run is None else self.n_run
        xs = {"layer": jnp.arange(n_run)}
        layers = scan_layers(Block, n_run, self.remat, arch=a, sites_ctx=sites, name="layers")
        new_cache = None
        if cache is None:
            x, (captured, _) = layers(x, xs, env)
        else:  # the stacked cache rides in the carry, updated in place (see Block)
            carry, (captured, _) = layers({"x": x, "cache": cache}, xs, env)
            x, new_cache = carry["x"], carry["cache"]
        sites.finish_layers(captured, n_run)
        if n_run < a.n_layers:
            return None, new_cache
        x = sites("final_norm", make_norm(a, "final_norm")(x))
        return unembed(self, a, x, embed, logits_at), new_cache


def rotary_env(a: Arch, positions, length=None) -> dict:
    """cos/sin tables of the block's rotary embedding(s) for ``positions [B, T]`` (``length``: the
    sequence length a length-dependent rope scales for; default that of the positions)."""
    env = dict(zip(("cos", "sin"), rotary_tables(positions, a.rope, length)))
    if a.local_rope is not None:
        env["cos_local"], env["sin_local"] = rotary_tables(positions, a.rope_local, length)
    return env


class HeadBias(nn.Module):
    """The unembedding bias of a model whose unembedding is tied to the embedding (GPT-J can be)."""

    size: int

    @nn.compact
    def __call__(self, logits):
        return logits + self.param("bias", nn.initializers.zeros, (self.size,)).astype(logits.dtype)


def unembed(module: nn.Module, a: Arch, x, embed, logits_at):
    """Logits at ``logits_at`` (all positions if None) from the final-norm output."""
    x = gather_positions(x, logits_at).astype(embed.dtype)
    if a.tie_embeddings:
        logits = jnp.einsum("...d,vd->...v", x, embed)
        if a.lm_head_bias:
            logits = HeadBias(a.vocab_size, name="lm_head")(logits)
    else:
        logits = nn.Dense(a.vocab_size, use_bias=a.lm_head_bias, kernel_init=INIT, name="lm_head")(x)
    if a.final_softcap is not None:
        logits = jnp.tanh(logits / a.final_softcap) * a.final_softcap
    return logits
