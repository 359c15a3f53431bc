"""Hugging Face naming shared by the llama-like families: config dimensions, per-layer attention
types (sliding windows), and the ``self_attn.*_proj`` / ``mlp.*_proj`` checkpoint layout."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Sequence

from jaxinterp.hf import ConversionError
from jaxinterp.models.common import Entry, copy, linear

LAYER = "model.layers.{i}"
ATTN_LINEARS = (("q_proj", ("attn", "q")), ("k_proj", ("attn", "k")), ("v_proj", ("attn", "v")),
                ("o_proj", ("attn", "o")))
MLP_LINEARS = (("gate_proj", ("mlp", "gate")), ("up_proj", ("mlp", "up")), ("down_proj", ("mlp", "down")))
LAYER_TYPES = ("full_attention", "sliding_attention")
DIM_FIELDS = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "intermediate_size", "max_position_embeddings", "tie_word_embeddings"}


def read_dims(d: Mapping[str, Any], **defaults) -> dict[str, Any]:
    """The shape fields every llama-like config has, under our names (``defaults`` by our name)."""
    get = lambda key, ours: d.get(key) if d.get(key) is not None else defaults.get(ours)  # noqa: E731
    n_heads = get("num_attention_heads", "n_heads")
    d_model = get("hidden_size", "d_model")
    return dict(vocab_size=get("vocab_size", "vocab_size"), d_model=d_model, n_layers=get("num_hidden_layers", "n_layers"),
                n_heads=n_heads, n_kv_heads=get("num_key_value_heads", "n_kv_heads") or n_heads,
                head_dim=get("head_dim", "head_dim") or d_model // n_heads, d_mlp=get("intermediate_size", "d_mlp"),
                tie_embeddings=bool(get("tie_word_embeddings", "tie_embeddings")))


def dims_to_hf(cfg) -> dict[str, Any]:
    return {"vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
            "intermediate_size": cfg.d_mlp, "tie_word_embeddings": cfg.tie_embeddings}


def check_positive(owner: str, cfg, names: Iterable[str]) -> None:
    for name in names:
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{owner}.{name} must be positive, got {getattr(cfg, name)}")


def sliding_layers_of(model_type: str, layer_types: Sequence[str], n_layers: int) -> tuple[int, ...]:
    """The indices of ``sliding_attention`` layers of an HF ``layer_types`` list (validated)."""
    if len(layer_types) != n_layers or not set(layer_types) <= set(LAYER_TYPES):
        raise ConversionError(f"{model_type}: layer_types must list one of {list(LAYER_TYPES)} per layer "
                              f"({n_layers}), got {list(layer_types)}")
    return tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")


def layer_types(n_layers: int, sliding: Iterable[int]) -> list[str]:
    sliding = set(sliding)
    return [LAYER_TYPES[i in sliding] for i in range(n_layers)]


def windows(n_layers: int, window: Optional[int], sliding: Optional[Iterable[int]]) -> Optional[tuple]:
    """Arch.windows: ``window`` on the ``sliding`` layers (None: every layer), full attention elsewhere."""
    if window is None:
        return None
    sliding = set(range(n_layers)) if sliding is None else set(sliding)
    return tuple(window if i in sliding else None for i in range(n_layers))


def linear_entries(layer: str, module: str, names, bias: Mapping[str, bool] | bool = False) -> list[Entry]:
    """``{layer}.{module}.{hf}.weight`` (+ ``.bias``) <-> ``layers/<ours>/kernel`` (+ ``bias``)."""
    out = []
    for hf, ours in names:
        out.append(linear(f"{layer}.{module}.{hf}.weight", ("layers", *ours, "kernel")))
        if bias if isinstance(bias, bool) else bias.get(hf, False):
            out.append(copy(f"{layer}.{module}.{hf}.bias", ("layers", *ours, "bias")))
    return out


def norm_entries(layer: str, names: Mapping[str, str], bias: bool = False) -> list[Entry]:
    """``{layer}.{hf}.weight`` (+ ``.bias``) <-> ``layers/<ours>/scale`` (+ ``bias``)."""
    out = [copy(f"{layer}.{hf}.weight", ("layers", ours, "scale")) for hf, ours in names.items()]
    if bias:
        out += [copy(f"{layer}.{hf}.bias", ("layers", ours, "bias")) for hf, ours in names.items()]
    return out


def module_table(layer: str, module: str, names) -> dict[str, tuple]:
    """Projection -> (HF module template, None) for ``names`` (``hf_modules`` of a family)."""
    return {".".join(ours): (f"{layer}.{module}.{hf}", None) for hf, ours in names}


def qk_norm_entries(layer: str) -> list[Entry]:
    """``self_attn.{q,k}_norm.weight`` <-> ``layers/attn/{q,k}_norm/scale``."""
    return [copy(f"{layer}.self_attn.{n}.weight", ("layers", "attn", n, "scale")) for n in ("q_norm", "k_norm")]
