"""Hugging Face Phi3ForCausalLM checkpoints <-> the shared block's parameters.

``qkv_proj`` (torch ``[(H + 2 Hkv) Dh, D]``: q, then k, then v) and ``gate_up_proj`` (``[2F, D]``:
gate, then up) are split into the block's kernels on load and joined on export; for LoRA / PEFT
they stay one module each, whose output ranges are the projections' ``hf_cols``.
"""

from __future__ import annotations

from jaxinterp.models.common import Entry, copy, linear, split_columns
from jaxinterp.models.transformer.convert import LAYER, norm_entries
from .config import Phi3Config

IGNORABLE = (".rotary_emb.inv_freq",)


def _sizes(cfg: Phi3Config) -> tuple[int, int, int]:
    return cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim


def entries(cfg: Phi3Config) -> list[Entry]:
    qkv = [("layers", "attn", n, "kernel") for n in ("q", "k", "v")]
    gate_up = [("layers", "mlp", n, "kernel") for n in ("gate", "up")]
    out = [copy("model.embed_tokens.weight", ("embed",)),
           *norm_entries(LAYER, {"input_layernorm": "ln1", "post_attention_layernorm": "ln2"}),
           split_columns(f"{LAYER}.self_attn.qkv_proj.weight", qkv, _sizes(cfg), transpose=True),
           linear(f"{LAYER}.self_attn.o_proj.weight", ("layers", "attn", "o", "kernel")),
           split_columns(f"{LAYER}.mlp.gate_up_proj.weight", gate_up, (cfg.d_mlp, cfg.d_mlp), transpose=True),
           linear(f"{LAYER}.mlp.down_proj.weight", ("layers", "mlp", "down", "kernel")),
           copy("model.norm.weight", ("final_norm", "scale"))]
    if not cfg.tie_embeddings:
        out.append(linear("lm_head.weight", ("lm_head", "kernel")))
    return out


def hf_modules(cfg: Phi3Config) -> dict[str, tuple]:
    q, k, v = _sizes(cfg)
    qkv, gate_up, f = f"{LAYER}.self_attn.qkv_proj", f"{LAYER}.mlp.gate_up_proj", cfg.d_mlp
    return {"attn.q": (qkv, ((0, q),)), "attn.k": (qkv, ((q, q + k),)), "attn.v": (qkv, ((q + k, q + k + v),)),
            "attn.o": (f"{LAYER}.self_attn.o_proj", None), "mlp.gate": (gate_up, ((0, f),)),
            "mlp.up": (gate_up, ((f, 2 * f),)), "mlp.down": (f"{LAYER}.mlp.down_proj", None)}
