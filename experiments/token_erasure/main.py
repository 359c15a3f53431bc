"""Token erasure and the implicit vocabulary (Feucht et al., 2024) on a facts-world corpus.

    jaxinterp token-erasure                                           # facts-gpt, results/token_erasure/default/
    jaxinterp token-erasure --preset smoke --out /tmp/erasure         # seconds
    jaxinterp token-erasure --model /path/to/llama --set layers=1,9 train_docs=200   # any ji.load source

Trains linear probes (every probed hidden layer x offsets -3..+1, one stacked parameter, the one
training loop: resumable in ``<out>/probes``) to predict the token at ``t + i`` from the hidden state at
``t``, on the model's hidden states over facts-world documents. Then, on held-out documents:

- the erasure plot (``erasure.png``): probe accuracy per layer and offset at the last token of
  multi-token units, at their other tokens, and at single-token words. Units are the world's entity
  names (2-4 tokens each) and any word the model's tokenizer splits into several tokens;
- the readout: the erasure score between layers ``early`` and ``late``, each document segmented into
  non-overlapping high-scoring spans (Algorithm 1), the multi-token segments aggregated into a
  vocabulary; precision/recall of that vocabulary against the ground-truth units, next to the most
  frequent n-grams (the same number of entries) (``readout.png``).
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from pathlib import Path

import numpy as np

import jaxinterp as ji
from jaxinterp.checkpoint import OutputLock as locked  # re-entrant: the harness holds it too
from jaxinterp.experiments.common import UsageError, experiment_main, pyplot, save_figure
from jaxinterp.experiments.data.facts_world import FactsWorld
from jaxinterp.readout import erasure as er

from .config import ErasureConfig

PRESETS = {"default": ErasureConfig.default, "smoke": ErasureConfig.smoke}
CATEGORIES = ("last", "not_last", "single")
CATEGORY_TITLES = {"last": "last token of a multi-token unit", "not_last": "other tokens of multi-token units",
                   "single": "single-token words"}


# ----------------------------------------------------------------------------- corpus and ground truth


@dataclasses.dataclass(frozen=True)
class Documents:
    """Right-padded token rows and, per token, its unit (an entity name or a word) within the document."""

    tokens: np.ndarray      # [N, T] int32
    lengths: np.ndarray     # [N]
    unit_size: np.ndarray   # [N, T] tokens of the unit the token belongs to (0: padding)
    last: np.ndarray        # [N, T] the token ends its unit
    name: np.ndarray        # [N, T] the unit is an entity name

    def rows(self):
        return [self.tokens[i, :n] for i, n in enumerate(self.lengths)]

    def units(self) -> list[tuple[int, int, int, bool]]:
        """Every multi-token unit occurrence ``(doc, start, end, is_name)``."""
        out = []
        for d, n in enumerate(self.lengths):
            for t in range(n):
                size = int(self.unit_size[d, t])
                if self.last[d, t] and size >= 2:
                    out.append((d, t + 1 - size, t + 1, bool(self.name[d, t])))
        return out


def word_units(text: str, names: list[list[str]]) -> list[tuple[int, int, bool]]:
    """Character spans ``(start, end, is_name)`` of the units of ``text``: entity names (longest match
    first) and single whitespace-separated words."""
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    tokens = [text[a:b] for a, b in words]
    out, i = [], 0
    while i < len(words):
        match = next((len(n) for n in names if tokens[i:i + len(n)] == n), 0)
        width = max(match, 1)
        out.append((words[i][0], words[i + width - 1][1], match > 0))
        i += width
    return out


def tokenize(tokenizer, texts: list[str], names: list[str], seq_len: int) -> Documents:
    """``Documents`` of ``texts`` (BOS first when the tokenizer has one), each cut to ``seq_len`` tokens
    before the first unit that would not fit whole."""
    split_names = sorted((n.split() for n in names), key=len, reverse=True)
    n = len(texts)
    tokens = np.full((n, seq_len), tokenizer.pad_id if tokenizer.pad_id is not None else 0, np.int32)
    size, last, name = np.zeros((n, seq_len), np.int32), np.zeros((n, seq_len), bool), np.zeros((n, seq_len), bool)
    lengths = np.zeros(n, np.int32)
    for d, text in enumerate(texts):
        enc = tokenizer.backend.encode(text, add_special_tokens=False)
        spans = word_units(text, split_names)
        ends = np.array([b for _, b, _ in spans])
        unit = []  # unit index of each token: the unit holding its last character
        for a, b in enc.offsets:
            unit.append(int(np.searchsorted(ends, max(b - 1, a), side="right")) if b > a else (unit[-1] if unit else 0))
        ids, unit = list(enc.ids), unit
        if tokenizer.bos_id is not None:
            ids, unit = [tokenizer.bos_id] + ids, [-1] + unit
        keep = len(ids)
        if keep > seq_len:
            keep = seq_len
            while keep > 0 and unit[keep - 1] == unit[keep]:  # don't cut a unit
                keep -= 1
        ids, unit = ids[:keep], np.array(unit[:keep])
        counts = {u: int((unit == u).sum()) for u in set(unit.tolist())}
        tokens[d, :keep], lengths[d] = ids, keep
        size[d, :keep] = [counts[u] for u in unit]
        last[d, :keep] = np.append(unit[1:] != unit[:-1], True)
        name[d, :keep] = [u >= 0 and spans[u][2] for u in unit]
    return Documents(tokens, lengths, size, last, name)


def world_dir(source: str) -> Path:
    from jaxinterp.loading import embedded_dir, embedded_models

    path = embedded_dir(source) if source in embedded_models() else Path(source).expanduser()
    if not (path / "world.json").exists():
        raise UsageError(f"world {source!r} has no world.json (an embedded facts-world model: facts-gpt, "
                         f"facts-mamba, or a directory holding world.json)")
    return path


# ----------------------------------------------------------------------------- probes


def flat(docs: Documents, acts: np.ndarray, offsets) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hidden states ``[M, L', D]`` and labels ``[M, O]`` of the real positions, and their ``[N, T]`` mask."""
    keep = np.arange(docs.tokens.shape[1])[None, :] < docs.lengths[:, None]
    labels = er.offset_labels(docs.tokens, docs.lengths, offsets)
    return acts[keep], labels[keep], keep


def resolve_layers(cfg: ErasureConfig, model) -> tuple[tuple[int, ...], int, int]:
    n = model.config.n_layers
    layers = tuple(cfg.layers) or tuple(range(n + 1))
    er.hidden_sites(model, layers)  # a layer outside the model: one line naming 0..n
    late = layers[-1] if cfg.late == -1 else cfg.late
    for which, layer in (("early", cfg.early), ("late", late)):
        if layer not in layers:
            raise UsageError(f"{which}={layer} is not a probed layer; probed layers: {list(layers)} "
                             f"(hidden layers 0..{n})")
    if late <= cfg.early:
        raise UsageError(f"late ({late}) must be a later layer than early ({cfg.early})")
    return layers, cfg.early, late


def category_accuracy(docs: Documents, keep: np.ndarray, correct: np.ndarray, bos: int | None) -> dict:
    """``{category: [L'][O] accuracy}`` and token counts over the real positions."""
    size, last, tok = docs.unit_size[keep], docs.last[keep], docs.tokens[keep]
    masks = {"last": last & (size >= 2), "not_last": ~last & (size >= 2), "single": (size == 1) & (tok != bos)}
    acc = {}
    for cat, m in masks.items():
        acc[cat] = (correct[m].sum(0) / np.maximum(correct[m].shape[0], 1)).tolist()  # [L', O]
    return acc, {cat: int(m.sum()) for cat, m in masks.items()}


# ----------------------------------------------------------------------------- readout vs ground truth


def precision_recall(found: list[tuple[int, ...]], truth: set) -> dict:
    hits = sum(1 for f in found if f in truth)
    return {"entries": len(found), "hits": hits, "precision": hits / max(len(found), 1),
            "recall": hits / max(len(truth), 1)}


def entry_kinds(found: list[tuple[int, ...]], truth: set) -> dict:
    """How many read-out entries are a ground-truth unit, a piece of one (or pieces of a unit plus
    neighbours), or neither (multi-word phrases of the corpus, e.g. a relation template's words)."""
    def inside(f, u):
        return any(u[a:a + len(f)] == f for a in range(len(u) - len(f) + 1))

    kinds = {"unit": 0, "unit_fragment": 0, "other": 0}
    for f in found:
        kind = "unit" if f in truth else "unit_fragment" if any(inside(f, u) for u in truth) else "other"
        kinds[kind] += 1
    return kinds


def occurrence_scores(docs: Documents, segments: list[list[tuple[int, int, float]]]) -> dict:
    """Of the multi-token unit occurrences, the share read out as exactly one segment; of the multi-token
    segments, the share that are exactly a unit occurrence."""
    units = {(d, a, b) for d, a, b, _ in docs.units()}
    multi = {(d, a, b) for d, segs in enumerate(segments) for a, b, _ in segs if b - a >= 2}
    return {"unit_occurrences": len(units), "multi_token_segments": len(multi),
            "unit_recall": len(units & multi) / max(len(units), 1),
            "segment_precision": len(units & multi) / max(len(multi), 1)}


def readout(cfg: ErasureConfig, docs: Documents, prob_docs: list[np.ndarray], probe_cfg, early: int, late: int,
            bos: int | None) -> tuple[dict, list, list]:
    """Segment every held-out document, read out its vocabulary and score it and the frequency baseline:
    ``(summary, vocabulary entries, segments per document)``."""
    deltas = [er.erasure_deltas(p, probe_cfg, early=early, late=late) for p in prob_docs]
    rows = docs.rows()
    segments = [er.segment(d, cfg.max_span) for d in deltas]
    vocab = [e for e in er.read_out(list(zip(rows, deltas)), max_len=cfg.max_span) if e.count >= cfg.min_count]
    truth = {tuple(int(x) for x in docs.tokens[d, a:b]) for d, a, b, _ in docs.units()}
    names = {tuple(int(x) for x in docs.tokens[d, a:b]) for d, a, b, is_name in docs.units() if is_name}
    baseline = er.frequent_ngrams(rows, lengths=range(2, cfg.max_span + 1), k=len(vocab),
                                  exclude=() if bos is None else (bos,))
    at_truth = er.frequent_ngrams(rows, lengths=range(2, cfg.max_span + 1), k=len(truth),
                                  exclude=() if bos is None else (bos,))
    found = [e.tokens for e in vocab]
    out = {"ground_truth_units": len(truth), "ground_truth_names": len(names),
           "readout": precision_recall(found, truth), "frequency_baseline": precision_recall([g for g, _ in baseline],
                                                                                             truth),
           "readout_top_truth_size": precision_recall(found[:len(truth)], truth),
           "frequency_baseline_top_truth_size": precision_recall([g for g, _ in at_truth], truth),
           "occurrences": occurrence_scores(docs, segments), "entry_kinds": entry_kinds(found, truth)}
    return out, vocab, segments


# ----------------------------------------------------------------------------- plots


def plot_erasure(layers, offsets, acc: dict, counts: dict, title: str, png: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(CATEGORIES), figsize=(11, 3.4), sharey=True)
    for ax, cat in zip(axes, CATEGORIES):
        a = np.asarray(acc[cat])  # [L', O]
        for j, off in enumerate(offsets):
            ax.plot(layers, a[:, j], "o-", label=f"i = {off:+d}" if off else "i = 0")
        ax.set_title(f"{CATEGORY_TITLES[cat]} ({counts[cat]} tokens)", fontsize=8)
        ax.set_xlabel("hidden layer")
        ax.set_xticks(layers)
    axes[0].set_ylabel("probe accuracy (token at t + i)")
    axes[0].set_ylim(-0.02, 1.02)
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(title, fontsize=9)
    save_figure(fig, png)


def plot_readout(summary: dict, png: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    keys = [("readout", "erasure\nreadout"), ("frequency_baseline", "frequent\nn-grams"),
            ("readout_top_truth_size", "readout,\ntop |truth|"),
            ("frequency_baseline_top_truth_size", "n-grams,\ntop |truth|")]
    x = np.arange(len(keys))
    for j, metric in enumerate(("precision", "recall")):
        ax.bar(x + (j - 0.5) * 0.38, [summary[k][metric] for k, _ in keys], 0.38, label=metric)
    ax.set_xticks(x, [f"{label}\n({summary[k]['entries']})" for k, label in keys], fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    ax.set_title(f"read-out vocabulary vs {summary['ground_truth_units']} ground-truth multi-token units "
                 f"(entries in brackets)", fontsize=8)
    save_figure(fig, png)


def show(tokenizer, ids, segments) -> str:
    """A document with its multi-token segments in brackets."""
    parts = []
    for a, b, _ in segments:
        text = " ".join(tokenizer.token_strings(ids[a:b]))
        parts.append(f"[{text}]" if b - a >= 2 else text)
    return " ".join(parts)


# ----------------------------------------------------------------------------- the run


def run(cfg: ErasureConfig, out: Path) -> dict:
    with locked(out):
        model = ji.load(cfg.model)
        if model.tokenizer is None:
            raise UsageError(f"model {cfg.model!r} has no tokenizer; this experiment reads text")
        world = FactsWorld.from_dir(world_dir(cfg.world))
        layers, early, late = resolve_layers(cfg, model)
        probe_cfg = er.ProbeConfig(layers=layers, offsets=cfg.offsets, steps=cfg.steps, batch_size=cfg.batch_size,
                                   lr=cfg.lr, seed=cfg.seed)
        names = [e.name for e in world.entities]
        tok, bos = model.tokenizer, model.tokenizer.bos_id
        train = tokenize(tok, world.documents(cfg.train_docs, seed=cfg.seed + 1), names, cfg.seq_len)
        held = tokenize(tok, world.documents(cfg.eval_docs, seed=cfg.seed + 2), names, cfg.seq_len)
        t0 = time.time()
        acts, labels, _ = flat(train, er.hidden_states(model, train.tokens, layers), cfg.offsets)
        t_harvest = time.time() - t0
        params, history = er.train_probes(acts, labels, model.config.vocab_size, probe_cfg, directory=out / "probes",
                                          run_config={"model": cfg.model, "world": cfg.world, "seq_len": cfg.seq_len,
                                                      "train_docs": cfg.train_docs}, quiet=False)
        t_train = time.time() - t0 - t_harvest
        acts, labels, keep = flat(held, er.hidden_states(model, held.tokens, layers), cfg.offsets)
        prob, correct = er.probe_targets(params, acts, labels)
        acc, counts = category_accuracy(held, keep, correct, bos)
        splits = np.cumsum(held.lengths)[:-1]
        summary, vocab, segments = readout(cfg, held, np.split(prob, splits), probe_cfg, early, late, bos)
        plot_erasure(layers, cfg.offsets, acc, counts, f"{cfg.model}: probes on {len(acts)} held-out tokens",
                     out / "erasure.png")
        plot_readout(summary, out / "readout.png")
    overall = (correct.sum(0) / np.maximum((labels >= 0).sum(0), 1)[None, :]).tolist()
    rows = held.rows()
    results = {"layers": list(layers), "offsets": list(cfg.offsets), "early": early, "late": late,
               "accuracy": acc, "accuracy_all": overall, "tokens": counts, **summary,
               "vocabulary": [{"text": " ".join(tok.token_strings(e.tokens)), "count": e.count, "score": e.score}
                              for e in vocab[:40]],
               "examples": [show(tok, rows[i], segments[i]) for i in range(min(3, len(rows)))],
               "probe_loss_first": history[0]["loss"], "probe_loss_last": history[-1]["loss"],
               "train_positions": int(len(labels)), "harvest_seconds": t_harvest, "train_seconds": t_train}
    report(results)
    return results


def report(r: dict) -> None:
    offs = r["offsets"]
    for cat in CATEGORIES:
        print(f"probe accuracy, {CATEGORY_TITLES[cat]} ({r['tokens'][cat]} tokens); columns offsets {offs}:")
        for layer, row in zip(r["layers"], r["accuracy"][cat]):
            print(f"  layer {layer}: " + "  ".join(f"{a:.3f}" for a in row))
    for key in ("readout", "frequency_baseline", "readout_top_truth_size", "frequency_baseline_top_truth_size"):
        x = r[key]
        print(f"{key}: {x['entries']} entries, precision {x['precision']:.3f}, recall {x['recall']:.3f} "
              f"(ground truth {r['ground_truth_units']} units)")
    print(f"read-out entries: {r['entry_kinds']}")
    o = r["occurrences"]
    print(f"unit occurrences read out as one segment: {o['unit_recall']:.3f} of {o['unit_occurrences']}; "
          f"multi-token segments that are a unit: {o['segment_precision']:.3f} of {o['multi_token_segments']}")


main = experiment_main("token_erasure", PRESETS, run, doc=__doc__)

if __name__ == "__main__":
    sys.exit(main())
