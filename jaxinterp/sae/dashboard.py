"""Feature dashboards: one static, self-contained HTML page for an SAE spliced at a model site.

    stats = feature_stats(model, sae, tokens, mask=tokens != bos)        # one pass, then histograms
    ctx = context_latents(model, sae, tokens, stats, features)
    html = render_dashboard(stats, logit_weights(model, sae), tokens, token_strings(tokenizer_json, V), ctx)
    build_dashboard(model, sae, tokens, vocab, "out/index.html", mask=...)  # all of it, written atomically

Per feature: its firing frequency and largest activation, the contexts where it fires most
(the ``top_contexts`` sequences with the largest activation, a window around that token, every
token shaded by the feature's activation and the maximum outlined), a histogram of its
non-zero activations, and the output tokens its decoder direction promotes and suppresses
through the unembedding (``W_dec[f] @ W_U``: the direction put in place of the final norm's
output; only for SAEs reading a residual-width site). The page opens with an index of the
features shown, each linking to its section; it needs no script, font or file besides itself.
"""

from __future__ import annotations

import dataclasses
import html
import os
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .families import SAE
from .io.common import atomic_write_text
from .splice import Splice

__all__ = ["DashboardConfig", "FeatureStats", "feature_stats", "logit_weights", "token_strings", "context_latents",
           "render_dashboard", "build_dashboard"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DashboardConfig:
    """What the page shows. ``features``: latent indices (None: the first ``n_features`` that fire)."""

    features: tuple[int, ...] | None = None
    n_features: int = 32
    top_contexts: int = 8
    context_before: int = 12
    context_after: int = 4
    bins: int = 24
    top_tokens: int = 8
    batch: int = 32

    def __post_init__(self):
        for name in ("n_features", "top_contexts", "bins", "top_tokens", "batch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DashboardConfig.{name} must be positive, got {getattr(self, name)}")
        if self.context_before < 0 or self.context_after < 0:
            raise ValueError(f"context_before / context_after must be >= 0, got {self.context_before}, "
                             f"{self.context_after}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FeatureStats:
    """Per-latent statistics over ``n_tokens`` tokens (``K`` = top contexts kept, ``B`` = histogram bins).

    ``top_value / top_seq / top_pos [F, K]``: the K sequences where the latent is largest (descending;
    value 0 where it fired in fewer sequences) and the position of that maximum; ``counts [F, B]``:
    histogram of the non-zero activations on ``[0, max_act]``.
    """

    site: str
    n_tokens: int
    freq: np.ndarray  # [F] fraction of tokens where the latent is non-zero
    max_act: np.ndarray  # [F]
    top_value: np.ndarray
    top_seq: np.ndarray
    top_pos: np.ndarray
    counts: np.ndarray


def _site_of(sae: SAE, site: str | None) -> str:
    site = site or sae.site
    if site is None:
        raise ValueError("the SAE names no site (sae.site is None); pass site=")
    return site


def _latents_fn(sae: SAE, site: str):
    """jitted ``(model, tokens [b, T]) -> latents [b, T, F]`` of the SAE reading ``site``."""
    reader = Splice(sae)

    @jax.jit
    def latents(model, tokens):
        x = model.run(tokens, capture=site).cache[site]
        return sae.encode(reader.sae_input(x).astype(jnp.float32))

    return latents


def _batches(tokens: np.ndarray, mask: np.ndarray, batch: int):
    for i in range(0, len(tokens), batch):
        yield i, jnp.asarray(tokens[i:i + batch]), mask[i:i + batch]


def _merge_top(best: tuple, cand: tuple, k: int) -> tuple:
    """Keep, per latent, the ``k`` largest of (values, seqs, positions) ``[n, F]`` stacked over candidates."""
    vals, seqs, pos = (np.concatenate([a, b]) for a, b in zip(best, cand))
    order = np.argsort(-vals, axis=0, kind="stable")[:k]  # [k, F]
    return tuple(np.take_along_axis(a, order, 0) for a in (vals, seqs, pos))


def feature_stats(model, sae: SAE, tokens: np.ndarray, *, site: str | None = None, mask: np.ndarray | None = None,
                  top_contexts: int = 8, bins: int = 24, batch: int = 32) -> FeatureStats:
    """Statistics of every latent over ``tokens [N, T]`` (positions where ``mask [N, T]`` is False are skipped)."""
    site = _site_of(sae, site)
    tokens = np.asarray(tokens)
    mask = np.ones(tokens.shape, bool) if mask is None else np.asarray(mask, bool)
    if mask.shape != tokens.shape:
        raise ValueError(f"mask must have the tokens' shape {tokens.shape}, got {mask.shape}")
    latents = _latents_fn(sae, site)
    f = sae.d_sae
    best = (np.zeros((0, f), np.float32), np.zeros((0, f), np.int64), np.zeros((0, f), np.int64))
    fires = np.zeros(f, np.int64)
    for i, toks, m in _batches(tokens, mask, batch):
        a = np.where(m[..., None], np.asarray(latents(model, toks)), 0.0)  # [b, T, F]
        fires += (a != 0).sum((0, 1))
        cand = (a.max(1), np.broadcast_to(np.arange(i, i + len(a))[:, None], (len(a), f)), a.argmax(1))
        best = _merge_top(best, cand, top_contexts)
    max_act = best[0][0] if len(best[0]) else np.zeros(f, np.float32)
    counts = np.zeros(f * bins, np.int64)
    width = np.where(max_act > 0, max_act, 1.0) / bins
    for _, toks, m in _batches(tokens, mask, batch):  # second pass: bins on [0, max_act] per latent
        a = np.where(m[..., None], np.asarray(latents(model, toks)), 0.0).reshape(-1, f)
        rows, cols = np.nonzero(a)
        b = np.minimum((a[rows, cols] / width[cols]).astype(np.int64), bins - 1)
        counts += np.bincount(cols * bins + b, minlength=f * bins)
    return FeatureStats(site=site, n_tokens=int(mask.sum()), freq=fires / max(int(mask.sum()), 1), max_act=max_act,
                        top_value=best[0].T, top_seq=best[1].T, top_pos=best[2].T, counts=counts.reshape(f, bins))


def logit_weights(model, sae: SAE, batch: int = 256) -> np.ndarray | None:
    """``[F, V]``: each decoder direction (raw units) through the unembedding, ``W_dec[f] / input_scale @ W_U``.

    Computed with the model itself: the direction replaces the final norm's output of a one-token run
    (less a run with zeros there, which removes any unembedding bias). None when the SAE's width differs
    from the final norm's (the direction is not a residual-stream vector) or it reads per-head sites.
    """
    d_model = model.run(np.zeros((1, 1), np.int32), capture="final_norm").cache["final_norm"].shape[-1]
    if sae.d_in != d_model or sae.reads.head is not None or sae.reads.flatten_heads:
        return None
    dirs = np.asarray(sae.params["W_dec"] / sae.buffers["input_scale"], np.float32)  # [F, D]

    @jax.jit
    def unembed(model, d):  # d [b, D] -> [b, V]
        run = lambda v: model.run(jnp.zeros((len(d), 1), jnp.int32),
                                  interventions={"final_norm": lambda x: v[:, None, :].astype(x.dtype)}).logits[:, 0]
        return run(d) - run(jnp.zeros_like(d))

    return np.concatenate([np.asarray(unembed(model, jnp.asarray(dirs[i:i + batch])))
                           for i in range(0, len(dirs), batch)])


def token_strings(tokenizer_json: str | os.PathLike, vocab_size: int) -> list[str]:
    """Display string of every token id ``< vocab_size`` (``tokenizers``' decode of the single id)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    return [tok.decode([i], skip_special_tokens=False) or f"<{i}>" for i in range(vocab_size)]


# ----------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#1b1b1b;background:#fafafa;max-width:1100px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:0 0 6px} .meta{color:#555;font-size:13px}
table{border-collapse:collapse;font-size:13px} td,th{padding:2px 8px;border-bottom:1px solid #e3e3e3;text-align:left}
th{background:#eee} .num{text-align:right;font-variant-numeric:tabular-nums}
section{background:#fff;border:1px solid #ddd;border-radius:6px;padding:12px 16px;margin:16px 0}
.cols{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}
.ctx{font-family:ui-monospace,monospace;font-size:13px;line-height:1.9;margin:2px 0;white-space:nowrap;overflow:hidden}
.ctx span{padding:1px 2px;border-radius:2px} .ctx .max{outline:2px solid #b03000}
.ctx .v{color:#777;display:inline-block;width:56px;text-align:right;margin-right:8px}
.pos{color:#0a6a2a} .neg{color:#a01818} a{color:#1a4fb0}
"""


def _histogram_svg(counts: np.ndarray, max_act: float, width: int = 300, height: int = 110) -> str:
    top = max(int(counts.max()), 1)
    bar = width / len(counts)
    rects = "".join(
        f'<rect x="{i * bar:.1f}" y="{height - 18 - (height - 24) * c / top:.1f}" width="{max(bar - 1, 1):.1f}" '
        f'height="{(height - 24) * c / top:.1f}" fill="#e07020"><title>{c}</title></rect>'
        for i, c in enumerate(counts))
    axis = (f'<line x1="0" y1="{height - 18}" x2="{width}" y2="{height - 18}" stroke="#888"/>'
            f'<text x="0" y="{height - 4}" font-size="10">0</text>'
            f'<text x="{width}" y="{height - 4}" font-size="10" text-anchor="end">{max_act:.3g}</text>'
            f'<text x="{width}" y="10" font-size="10" text-anchor="end">max count {top}</text>')
    return f'<svg width="{width}" height="{height}" role="img" aria-label="activation histogram">{rects}{axis}</svg>'


def _token_table(title: str, ids: np.ndarray, values: np.ndarray, vocab: Sequence[str], cls: str) -> str:
    rows = "".join(f'<tr><td>{html.escape(vocab[i])}</td><td class="num {cls}">{v:+.3f}</td></tr>'
                   for i, v in zip(ids, values))
    return f"<table><tr><th>{title}</th><th>logit</th></tr>{rows}</table>"


def _context_html(tokens: np.ndarray, acts: np.ndarray, pos: int, max_act: float, vocab: Sequence[str],
                  cfg: DashboardConfig) -> str:
    """One context line: tokens ``pos - before .. pos + after``, shaded by activation, ``pos`` outlined."""
    lo, hi = max(0, pos - cfg.context_before), min(len(tokens), pos + cfg.context_after + 1)
    spans = []
    for t in range(lo, hi):
        alpha = float(np.clip(acts[t] / max_act, 0, 1)) if max_act > 0 else 0.0
        cls = ' class="max"' if t == pos else ""
        spans.append(f'<span{cls} style="background:rgba(240,110,20,{alpha:.2f})" title="{acts[t]:.4g}">'
                     f'{html.escape(vocab[int(tokens[t])]).replace(" ", "&nbsp;") or "&nbsp;"}</span>')
    return f'<div class="ctx"><span class="v">{acts[pos]:.3g}</span>{" ".join(spans)}</div>'


def _selected(stats: FeatureStats, cfg: DashboardConfig) -> list[int]:
    if cfg.features is not None:
        bad = [i for i in cfg.features if not 0 <= i < len(stats.freq)]
        if bad:
            raise ValueError(f"features {bad} out of range: the SAE has {len(stats.freq)} latents")
        return list(cfg.features)
    return [int(i) for i in np.flatnonzero(stats.freq > 0)[:cfg.n_features]]


def _feature_section(i: int, stats: FeatureStats, logits: np.ndarray | None, ctx_acts: dict, tokens: np.ndarray,
                     vocab: Sequence[str], cfg: DashboardConfig) -> str:
    lines = [_context_html(tokens[s], ctx_acts[s][:, i], int(p), float(stats.max_act[i]), vocab, cfg)
             for v, s, p in zip(stats.top_value[i], stats.top_seq[i], stats.top_pos[i]) if v > 0]
    if logits is None:
        logit_html = '<p class="meta">no output tokens: the SAE does not read a residual-width site</p>'
    else:
        order = np.argsort(logits[i])
        up, down = order[::-1][:cfg.top_tokens], order[:cfg.top_tokens]
        logit_html = (_token_table("promoted", up, logits[i][up], vocab, "pos")
                      + _token_table("suppressed", down, logits[i][down], vocab, "neg"))
    return (f'<section id="f{i}"><h2>Feature {i}</h2>'
            f'<p class="meta">fires on {100 * stats.freq[i]:.3f}% of tokens; max activation {stats.max_act[i]:.4g}; '
            f'<a href="#index">index</a></p><div class="cols"><div>{_histogram_svg(stats.counts[i], stats.max_act[i])}'
            f'</div>{logit_html}</div><h3 style="font-size:14px">Top contexts</h3>'
            + ("".join(lines) or '<p class="meta">never fires</p>') + "</section>")


def render_dashboard(stats: FeatureStats, logits: np.ndarray | None, tokens: np.ndarray, vocab: Sequence[str],
                     ctx_acts: dict, cfg: DashboardConfig = DashboardConfig(), *, title: str = "SAE features",
                     meta: str = "") -> str:
    """The page. ``ctx_acts``: ``{sequence: latents [T, F]}`` of every sequence named in ``stats.top_seq``."""
    features = _selected(stats, cfg)
    dead = int((stats.freq == 0).sum())
    rows = []
    for i in features:
        top = "" if logits is None else ", ".join(html.escape(vocab[j]) for j in np.argsort(-logits[i])[:3])
        rows.append(f'<tr><td><a href="#f{i}">{i}</a></td><td class="num">{100 * stats.freq[i]:.3f}%</td>'
                    f'<td class="num">{stats.max_act[i]:.3g}</td><td>{top}</td></tr>')
    index = ('<section id="index"><h2>Index</h2><table><tr><th>feature</th><th>frequency</th><th>max</th>'
             f'<th>top promoted</th></tr>{"".join(rows)}</table></section>')
    body = "".join(_feature_section(i, stats, logits, ctx_acts, tokens, vocab, cfg) for i in features)
    head = (f"<h1>{html.escape(title)}</h1><p class=\"meta\">site {html.escape(stats.site)}; {stats.n_tokens:,} tokens; "
            f"{len(stats.freq)} latents, {dead} never fire; {len(features)} shown. {html.escape(meta)}</p>")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>{head}{index}{body}</body></html>\n")


def context_latents(model, sae: SAE, tokens: np.ndarray, stats: FeatureStats, features: Sequence[int],
                    mask: np.ndarray | None = None) -> dict:
    """``{sequence: latents [T, F]}`` for the top-context sequences of ``features`` (masked positions zeroed)."""
    seqs = sorted({int(s) for i in features for v, s in zip(stats.top_value[i], stats.top_seq[i]) if v > 0})
    if not seqs:
        return {}
    a = np.asarray(_latents_fn(sae, stats.site)(model, jnp.asarray(np.asarray(tokens)[seqs])))
    if mask is not None:
        a = np.where(np.asarray(mask, bool)[seqs][..., None], a, 0.0)
    return dict(zip(seqs, a))


def build_dashboard(model, sae: SAE, tokens: np.ndarray, vocab: Sequence[str], path: str | os.PathLike, *,
                    site: str | None = None, mask: np.ndarray | None = None, cfg: DashboardConfig = DashboardConfig(),
                    title: str = "SAE features", meta: str = "") -> tuple[Path, FeatureStats]:
    """Compute everything and write the page to ``path`` (atomically); returns ``(path, stats)``."""
    stats = feature_stats(model, sae, tokens, site=site, mask=mask, top_contexts=cfg.top_contexts, bins=cfg.bins,
                          batch=cfg.batch)
    ctx = context_latents(model, sae, tokens, stats, _selected(stats, cfg), mask)
    page = render_dashboard(stats, logit_weights(model, sae), np.asarray(tokens), vocab, ctx, cfg, title=title,
                            meta=meta)
    return atomic_write_text(path, page), stats
