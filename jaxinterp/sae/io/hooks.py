"""TransformerLens hook names <-> jaxinterp site names, written down once (``TL_HOOKS``).

SAELens (and most public SAEs) name the activation an SAE reads by its TransformerLens hook,
``blocks.5.hook_resid_post``. ``TL_HOOKS`` maps every hook template (``{L}`` = layer) to the
site template it corresponds to, or to ``None`` where no single site holds that activation,
with a note. Where TransformerLens and jaxinterp differ in what the activation contains the
note says so; the values agree for a TransformerLens model loaded without weight processing
(``from_pretrained_no_processing``; TransformerLens's default ``fold_ln`` /
``center_writing_weights`` change the LayerNorm outputs and centre the residual stream).

A site name of our own (``blocks.5.resid_post``) is accepted as well (jaxinterp writes
``hook_name`` as the TransformerLens name and keeps its site under ``metadata.jaxinterp_site``).
"""

from __future__ import annotations

import difflib
import re

__all__ = ["TL_HOOKS", "site_for_hook", "hook_for_site", "UnknownHookError"]

# TransformerLens hook template -> (site template or None, note)
TL_HOOKS: dict[str, tuple[str | None, str]] = {
    "hook_embed": ("embed", "equal for models without learned position embeddings (rotary position embeddings); "
                            "with learned positions (GPT-2) our embed = hook_embed + hook_pos_embed"),
    "hook_pos_embed": (None, "our embed holds token + position embeddings summed; no site holds the position "
                             "embeddings alone (blocks.0.resid_pre = hook_embed + hook_pos_embed)"),
    "blocks.{L}.hook_resid_pre": ("blocks.{L}.resid_pre", ""),
    "blocks.{L}.ln1.hook_scale": (None, "LayerNorm scale factors are not a site"),
    "blocks.{L}.ln1.hook_normalized": ("blocks.{L}.ln1", "ours is after the LayerNorm's weight and bias"),
    "blocks.{L}.hook_attn_in": (None, "split-qkv inputs are not a site: every head reads blocks.{L}.ln1"),
    "blocks.{L}.hook_q_input": (None, "split-qkv inputs are not a site: every head reads blocks.{L}.ln1"),
    "blocks.{L}.hook_k_input": (None, "split-qkv inputs are not a site: every head reads blocks.{L}.ln1"),
    "blocks.{L}.hook_v_input": (None, "split-qkv inputs are not a site: every head reads blocks.{L}.ln1"),
    "blocks.{L}.attn.hook_q": ("blocks.{L}.attn.q", "ours is after rotary where the model has it (TL: hook_rot_q)"),
    "blocks.{L}.attn.hook_k": ("blocks.{L}.attn.k", "ours is after rotary where the model has it (TL: hook_rot_k)"),
    "blocks.{L}.attn.hook_rot_q": ("blocks.{L}.attn.q", ""),
    "blocks.{L}.attn.hook_rot_k": ("blocks.{L}.attn.k", ""),
    "blocks.{L}.attn.hook_v": ("blocks.{L}.attn.v", ""),
    "blocks.{L}.attn.hook_attn_scores": ("blocks.{L}.attn.scores", "masked entries: ours hold the dtype's minimum"),
    "blocks.{L}.attn.hook_pattern": ("blocks.{L}.attn.pattern", ""),
    "blocks.{L}.attn.hook_z": ("blocks.{L}.attn.z", ""),
    "blocks.{L}.attn.hook_result": (None, "per-head outputs are not a site: ji.heads.head_contributions(model, z, L) "
                                          "computes them from blocks.{L}.attn.z"),
    "blocks.{L}.hook_attn_out": ("blocks.{L}.attn_out", ""),
    "blocks.{L}.hook_resid_mid": ("blocks.{L}.resid_mid", "absent in parallel-residual models"),
    "blocks.{L}.ln2.hook_scale": (None, "LayerNorm scale factors are not a site"),
    "blocks.{L}.ln2.hook_normalized": ("blocks.{L}.ln2", "ours is after the LayerNorm's weight and bias"),
    "blocks.{L}.hook_mlp_in": (None, "split MLP inputs are not a site: the MLP reads blocks.{L}.ln2"),
    "blocks.{L}.mlp.hook_pre": ("blocks.{L}.mlp.pre", ""),
    "blocks.{L}.mlp.hook_pre_linear": ("blocks.{L}.mlp.up", "gated MLPs only"),
    "blocks.{L}.mlp.hook_post": ("blocks.{L}.mlp.post", ""),
    "blocks.{L}.hook_mlp_out": ("blocks.{L}.mlp_out", ""),
    "blocks.{L}.hook_resid_post": ("blocks.{L}.resid_post", ""),
    "ln_final.hook_scale": (None, "LayerNorm scale factors are not a site"),
    "ln_final.hook_normalized": ("final_norm", "ours is after the final norm's weight and bias"),
}

# Our own site names (any layer), accepted as they are.
_OWN_SITE = re.compile(r"^(embed|final_norm|blocks\.\d+\.[a-z_]+(\.[a-zA-Z_]+)?)$")


class UnknownHookError(ValueError):
    """A hook name that maps to no site."""


def _template(name: str) -> tuple[str, str | None]:
    """``blocks.5.hook_resid_post`` -> (``blocks.{L}.hook_resid_post``, ``"5"``)."""
    m = re.match(r"^blocks\.(\d+)\.(.+)$", name)
    return (f"blocks.{{L}}.{m.group(2)}", m.group(1)) if m else (name, None)


def site_for_hook(name: str) -> str:
    """The site a TransformerLens hook name (or one of our site names) reads; a one-line error otherwise."""
    template, layer = _template(name)
    if template in TL_HOOKS:
        site, note = TL_HOOKS[template]
        if site is None:
            raise UnknownHookError(f"hook {name!r} has no jaxinterp site: {note.replace('{L}', layer or '')}")
        return site.replace("{L}", layer or "")
    if "hook_" not in name and _OWN_SITE.match(name):
        return name
    close = difflib.get_close_matches(template, list(TL_HOOKS), n=3, cutoff=0.5)
    hint = f"; closest: {', '.join(c.replace('{L}', layer or '0') for c in close)}" if close else ""
    raise UnknownHookError(f"unknown hook name {name!r}{hint} (valid: the TransformerLens hooks in "
                           f"jaxinterp.sae.io.hooks.TL_HOOKS, e.g. blocks.0.hook_resid_post, or a jaxinterp site name)")


# site template -> the TransformerLens hook written on save: the first hook of TL_HOOKS that maps to it, except
# hook_embed (GPT-2's embed is not TransformerLens's hook_embed, so "embed" is written as it is).
_SITE_TO_HOOK: dict[str, str] = {}
for _hook, (_site, _) in TL_HOOKS.items():
    if _site is not None and _hook != "hook_embed":
        _SITE_TO_HOOK.setdefault(_site, _hook)


def hook_for_site(site: str) -> str:
    """The TransformerLens hook name of a site (the site itself where TransformerLens has none, e.g. Mamba sites)."""
    template, layer = _template(site)
    hook = _SITE_TO_HOOK.get(template)
    return site if hook is None else hook.replace("{L}", layer or "")
