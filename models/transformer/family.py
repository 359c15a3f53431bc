"""What every transformer family shares: the parameter-axes table, the projection table, the
per-layer stepper, and ``transformer_family`` which assembles a ``Family`` from a family's own
config class and checkpoint mapping."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.families import Family, Projection, layer_slice, register_family
from jaxinterp.hf import ConversionError
from jaxinterp.models.common import Entry, drop_tied_copy, params_from_hf, params_to_hf
from .arch import Arch
from .model import Block, Transformer, make_norm, rotary_env

# (regex on the "/"-joined parameter path, logical axes of the unstacked parameter)
AXES_TABLE = [
    (r"^embed$", ("vocab", "embed")),
    (r"^pos_embed$", (None, "embed")),
    (r"(ln1|ln2|post_attn_norm|post_mlp_norm|final_norm)/(scale|bias)$", ("embed",)),
    (r"attn/q/kernel$", ("embed", "heads")),
    (r"attn/q/bias$", ("heads",)),
    (r"attn/(k|v)/kernel$", ("embed", "kv_heads")),
    (r"attn/(k|v)/bias$", ("kv_heads",)),
    (r"attn/o/kernel$", ("heads", "embed")),
    (r"attn/o/bias$", ("embed",)),
    (r"attn/(q|k)_norm/scale$", (None,)),
    (r"mlp/(gate|up)/kernel$", ("embed", "mlp")),
    (r"mlp/(gate|up)/bias$", ("mlp",)),
    (r"mlp/down/kernel$", ("mlp", "embed")),
    (r"mlp/down/bias$", ("embed",)),
    (r"moe/router/kernel$", ("embed", "experts")),
    (r"moe/experts/(gate|up)$", ("experts", "embed", "mlp")),
    (r"moe/experts/down$", ("experts", "mlp", "embed")),
    (r"^lm_head/kernel$", ("embed", "vocab")),
    (r"^lm_head/bias$", ("vocab",)),
]


def param_shapes(arch: Arch) -> Any:
    """The params tree of ``arch`` as ``jax.ShapeDtypeStruct`` (nothing allocated)."""
    from jaxinterp.sites import SiteContext

    def init():
        ctx = SiteContext(arch.site_names())
        return Transformer(arch).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32), ctx,
                                      positions=jnp.zeros((1, 2), jnp.int32), k_valid=jnp.ones((1, 2), bool))["params"]

    return jax.eval_shape(init)


def projections(arch: Arch, hf: Mapping[str, tuple], fan_in_fan_out: bool = False) -> dict[str, Projection]:
    """The block's linear maps. ``hf``: projection -> (HF module template, HF output ranges or None)."""
    h = "ln1" if arch.has_ln1 else "resid_pre"
    h2 = "ln2" if arch.has_ln2 else ("ln1" if arch.parallel == "shared" else "resid_mid")
    # With post-norms the raw projection outputs are their own sites (attn.out / mlp.out).
    attn_out, mlp_out = ("attn.out", "mlp.out") if arch.post_norms else ("attn_out", "mlp_out")
    table = {
        "attn.q": (("attn", "q"), arch.qkv_bias, h, "attn.q"),
        "attn.k": (("attn", "k"), arch.qkv_bias, h, "attn.k"),
        "attn.v": (("attn", "v"), arch.qkv_bias, h, "attn.v"),
        "attn.o": (("attn", "o"), arch.o_bias, "attn.z", attn_out),
    }
    if arch.n_experts:  # the experts' stacked kernels are not [in, out] maps of their own: router only
        table["moe.router"] = (("moe", "router"), False, h2, "moe.router_logits")
    else:
        table["mlp.up"] = (("mlp", "up"), arch.mlp_bias, h2, "mlp.up" if arch.gated else "mlp.pre")
        table["mlp.down"] = (("mlp", "down"), arch.mlp_bias, "mlp.post", mlp_out)
        if arch.gated:
            table["mlp.gate"] = (("mlp", "gate"), arch.mlp_bias, h2, "mlp.pre")
    out = {}
    for name, (path, bias, in_site, out_site) in table.items():
        module, hf_cols = hf[name]
        out[name] = Projection(kernel=("layers", *path, "kernel"), bias=("layers", *path, "bias") if bias else None,
                               in_site=in_site, out_site=out_site, hf_module=module,
                               hf_fan_in_fan_out=fan_in_fan_out, hf_cols=hf_cols)
    return out


class TransformerStepper:
    """One layer at a time on the positions ``[s0, s0 + S)`` of rows whose earlier positions are
    summarised by the keys and values of a reference run (incremental causal tracing)."""

    state_sites = ("attn.k", "attn.v")
    # Restoring these at token t changes no other position of the same layer.
    per_position = ("attn.out", "attn_out", "resid_mid", "ln2", "mlp.pre", "mlp.up", "mlp.post", "mlp.out",
                    "moe.router_logits", "moe.expert_out", "mlp_out")

    @staticmethod
    def prefix_state(config, captures: Mapping[str, jax.Array], s0: int) -> dict:
        return {"k": captures["attn.k"], "v": captures["attn.v"]}  # [N, T, Hkv, Dh]; slots >= s0 rewritten

    @staticmethod
    def layer(model, layer: int, x, sites_ctx, state, s0: int):
        arch: Arch = model.config.arch
        m, s = x.shape[:2]
        positions = jnp.broadcast_to(s0 + jnp.arange(s, dtype=jnp.int32), (m, s))
        env = {"q_index": s0 + jnp.arange(s), "k_valid": jnp.ones((m, state["k"].shape[1]), bool),
               "write_index": s0}
        if arch.positions == "rotary":  # a length-dependent rope scales for the whole reference run
            env.update(rotary_env(arch, positions, length=state["k"].shape[1]))
        params = layer_slice(model.params["layers"], layer)
        out, _ = Block(arch, sites_ctx).apply({"params": params}, x, {"layer": layer, "cache": state}, env)
        return out

    @staticmethod
    def head(model, x):
        return head(model.config.arch, model.params, x)


def head(arch: Arch, params, x):
    """Final norm + unembedding of ``x [..., D]`` (the last steps of ``Transformer``)."""
    h = make_norm(arch, "final_norm").apply({"params": params["final_norm"]}, x)
    embed = params["embed"]
    if arch.tie_embeddings:
        logits = jnp.einsum("...d,vd->...v", h.astype(embed.dtype), embed)
    else:
        logits = h.astype(embed.dtype) @ params["lm_head"]["kernel"]
    if arch.lm_head_bias:
        logits = logits + params["lm_head"]["bias"]
    if arch.final_softcap is not None:
        logits = jnp.tanh(logits / arch.final_softcap) * arch.final_softcap
    return logits


def transformer_family(*, name: str, config_cls: type, hf_model_types: tuple[str, ...],
                       entries: Callable[[Any], list[Entry]], hf_modules: Callable[[Any], Mapping[str, tuple]],
                       fan_in_fan_out: bool = False, ignorable: Iterable[str] = (),
                       rename: Optional[Callable[[str], str]] = None,
                       tied: Optional[tuple[str, str]] = None,
                       pack: Optional[Callable[[Any, dict], dict]] = None,
                       unpack: Optional[Callable[[Any, dict], dict]] = None,
                       trace_kinds=("resid_post", "mlp_out", "attn_out"),
                       trace_freeze=("mlp_out", "attn_out")) -> Family:
    """Register a transformer family whose config has an ``arch`` property.

    ``entries(config)``: the checkpoint mapping; ``hf_modules(config)``: projection -> (HF module
    template, fused output ranges or None); ``tied``: (head tensor, embedding tensor) names whose
    duplicate copy tied checkpoints may carry; ``pack(config, tensors)`` / ``unpack(config, tensors)``:
    checkpoint-wide regrouping before ``entries`` reads the tensors and after it writes them (one
    tensor per expert <-> one stacked tensor per layer).
    """
    ignorable = tuple(ignorable)

    def from_hf(config, tensors, dtype=np.float32, placer=None):
        if rename is not None:
            renamed = {}
            for k, v in tensors.items():
                if rename(k) in renamed:
                    raise ConversionError(f"{name} checkpoint holds two names for {rename(k)!r}; expected one")
                renamed[rename(k)] = v
            tensors = renamed
        if tied is not None and config.arch.tie_embeddings:
            tensors = dict(tensors)
            drop_tied_copy(name, tensors, *tied)
        if pack is not None:
            tensors = pack(config, tensors)
        return params_from_hf(name, entries(config), param_shapes(config.arch), tensors, config.n_layers, dtype,
                              ignorable, placer=placer)

    def to_hf(config, params):
        tensors = params_to_hf(entries(config), params, config.n_layers)
        return tensors if unpack is None else unpack(config, tensors)

    def rome_targets(config) -> tuple[str, ...]:
        return () if config.arch.n_experts else ("mlp.down",)

    return register_family(Family(
        name=name,
        config_cls=config_cls,
        hf_model_types=hf_model_types,
        module=lambda config: Transformer(config.arch),
        site_names=lambda config: config.arch.site_names(),
        from_hf=from_hf,
        to_hf=to_hf,
        param_axes=tuple(AXES_TABLE),
        projections=lambda config: projections(config.arch, hf_modules(config), fan_in_fan_out),
        rome_targets=rome_targets,
        embedding=lambda params: params["embed"],
        attention=True,
        stepper=TransformerStepper(),
        trace_kinds=trace_kinds,
        trace_freeze=trace_freeze,
    ))
