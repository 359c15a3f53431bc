"""``Arch``: what the shared decoder block computes, as flags (one block for every transformer family).

A family's config (``GPT2Config``, ``LlamaConfig``, ...) keeps the fields its Hugging Face
config has and maps them onto an ``Arch`` (its ``arch`` property); the block in ``model.py`` reads
only the ``Arch``. Adding a variant of an existing idea (another norm placement, a soft-cap) is a
flag here and a line in the block, not a new port.

Per-layer variation (sliding windows, local/global rotary, GPT-2's inverse-layer scaling) is kept
as tuples indexed by layer, so the scanned block reads them with the (traced) layer index.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from jaxinterp.models.common import ACTIVATIONS, NO_WINDOW, Rope

NORMS = ("layernorm", "rmsnorm")
PLACEMENTS = ("pre", "sandwich", "post")
PARALLEL = ("none", "separate", "shared")
POSITIONS = ("rotary", "learned")
QK_NORMS = ("none", "head", "full")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Arch:
    """The shared decoder's flags. Shapes first, then one group per sub-module.

    Norms: ``norm`` kind and ``norm_eps``; ``norm_bias`` (LayerNorm bias); ``norm_offset`` 1 for
    Gemma's ``(1 + w)`` RMSNorm; ``norm_scale_f32``: RMSNorm multiplies its weight in float32 before
    the cast (OLMo-2; Llama casts first, which differs in bfloat16 only). ``placement``: ``"pre"`` (norm before attention / MLP),
    ``"sandwich"`` (also after each, before the residual add: Gemma-2/3), ``"post"`` (only after:
    OLMo-2). ``parallel``: ``"none"`` (MLP reads ``resid_mid``), ``"separate"`` (attention and MLP
    both read ``resid_pre``, each with its own norm: GPT-NeoX), ``"shared"`` (one norm feeds both:
    GPT-J).

    Attention: ``qkv_bias`` / ``o_bias``; ``qk_norm`` RMSNorm of q and k per head (``"head"``:
    Qwen3, Gemma-3) or over all heads (``"full"``: OLMo-2); ``attn_scale`` multiplies q.k
    (default ``head_dim ** -0.5``); ``scale_by_inverse_layer`` divides it by ``layer + 1``
    (GPT-2's option); ``attn_softcap``: ``tanh`` soft-capping of scores; ``windows``: per-layer
    sliding window (``None`` = full causal); ``clip_qkv``: q, k and v clamped to ``[-c, c]`` after
    the projections (and a full q/k norm), as OLMo / OLMoE may.

    Positions: ``positions`` ``"rotary"`` or ``"learned"`` (a ``pos_embed`` table); ``rope`` the
    rotary spec, ``rope_local`` a second one for layers flagged in ``local_rope`` (Gemma-3).

    MLP: ``gated`` (``act(x W_gate) * x W_up``) or plain (``act(x W_up)``), ``activation``,
    ``mlp_bias``. Mixture of experts (``n_experts`` > 0, Mixtral / OLMoE): a linear router, softmax
    in float32, the ``top_k`` experts per token, their weights renormalised to sum to 1 when
    ``norm_topk``; each expert a gated MLP of width ``d_mlp``. Embeddings: ``embed_scale`` multiplies the token embeddings (Gemma: sqrt(D)),
    ``tie_embeddings``, ``lm_head_bias``, ``final_softcap`` on the logits.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_mlp: int
    max_seq_len: Optional[int] = None
    # norms
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    norm_bias: bool = False
    norm_offset: float = 0.0
    norm_scale_f32: bool = False
    placement: str = "pre"
    parallel: str = "none"
    # attention
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = "none"
    attn_scale: Optional[float] = None
    scale_by_inverse_layer: bool = False
    attn_softcap: Optional[float] = None
    windows: Optional[tuple[Optional[int], ...]] = None
    clip_qkv: Optional[float] = None
    # positions
    positions: str = "rotary"
    rope: Optional[Rope] = None
    rope_local: Optional[Rope] = None
    local_rope: Optional[tuple[bool, ...]] = None
    # mlp
    gated: bool = True
    activation: str = "silu"
    mlp_bias: bool = False
    # mixture of experts
    n_experts: int = 0
    top_k: int = 0
    norm_topk: bool = True
    # embeddings
    embed_scale: Optional[float] = None
    tie_embeddings: bool = False
    lm_head_bias: bool = False
    final_softcap: Optional[float] = None

    def __post_init__(self):
        for name, allowed in (("norm", NORMS), ("placement", PLACEMENTS), ("parallel", PARALLEL),
                              ("positions", POSITIONS), ("qk_norm", QK_NORMS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Arch.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"Arch.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.positions == "rotary" and self.rope is None:
            raise ValueError("rotary positions need a rope spec")
        if self.positions == "learned" and not self.max_seq_len:
            raise ValueError("learned positions need max_seq_len")
        if self.windows is not None and len(self.windows) != self.n_layers:
            raise ValueError(f"windows lists {len(self.windows)} layers, the model has {self.n_layers}")
        if self.local_rope is not None and (self.rope_local is None or len(self.local_rope) != self.n_layers):
            raise ValueError("local_rope needs rope_local and one flag per layer")
        if self.parallel != "none" and self.placement != "pre":
            raise ValueError("parallel attention/MLP is only defined with pre-norm placement")
        if self.n_experts and not (0 < self.top_k <= self.n_experts and self.gated and not self.mlp_bias):
            raise ValueError(f"experts need 0 < top_k <= n_experts and gated, bias-free experts; got top_k="
                             f"{self.top_k}, n_experts={self.n_experts}, gated={self.gated}, mlp_bias={self.mlp_bias}")
        if self.n_experts and self.parallel != "none":
            raise ValueError("mixture-of-experts layers are only defined without a parallel residual")

    # derived ---------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim ** -0.5

    @property
    def windowed(self) -> bool:
        return self.windows is not None and any(w is not None for w in self.windows)

    def window_table(self) -> np.ndarray:
        """Per-layer window (``NO_WINDOW`` where full), for indexing with a traced layer."""
        return np.asarray([NO_WINDOW if w is None else w for w in (self.windows or (None,) * self.n_layers)],
                          np.int32)

    @property
    def has_ln2(self) -> bool:
        return self.placement != "post" and self.parallel != "shared"

    @property
    def has_ln1(self) -> bool:
        return self.placement != "post"

    @property
    def post_norms(self) -> bool:
        """Sandwich / post-norm: attention and MLP outputs are normed before the residual add, so
        ``attn.out`` / ``mlp.out`` (the raw projections) differ from ``attn_out`` / ``mlp_out``."""
        return self.placement in ("sandwich", "post")

    def site_names(self) -> tuple[str, ...]:
        """DESIGN.md's transformer sites in forward order for these flags."""
        raw = self.post_norms
        attn = ["attn.q", "attn.k", "attn.v", "attn.scores", "attn.pattern", "attn.z", *(["attn.out"] if raw else [])]
        if self.n_experts:
            mlp = ["moe.router_logits", "moe.expert_out"]
        else:
            mlp = ["mlp.pre", "mlp.up", "mlp.post"] if self.gated else ["mlp.pre", "mlp.post"]
        mlp += ["mlp.out"] if raw else []
        per_layer = ["resid_pre", *(["ln1"] if self.has_ln1 else []), *attn, "attn_out",
                     *(["resid_mid"] if self.parallel == "none" else []), *(["ln2"] if self.has_ln2 else []),
                     *mlp, "mlp_out", "resid_post"]
        return ("embed", *(f"blocks.{i}.{s}" for i in range(self.n_layers) for s in per_layer), "final_norm")
