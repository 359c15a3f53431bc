"""Unsupervised behaviours of facts-gpt: contexts clustered by the gradient of the next-token loss, a sparse
feature circuit per cluster, and a browsable static HTML index (Marks et al. 2024, section 5).

    jaxinterp behaviours                          # results/behaviours/default/index.html
    jaxinterp behaviours --set k=12 n_contexts=1024

Contexts are ``context_len``-token windows cut at random points of facts-world documents; the target is
the token that follows. Each context's gradient of its next-token loss with respect to every parameter is
compressed to a count sketch and the contexts are clustered spectrally by the sketches' cosine similarity
(``jaxinterp.circuits.clusters``). Per cluster: node effects (integrated gradients, SAE features and
errors zero-patched) at every attn_out / mlp_out / resid_post SAE (``jaxinterp train-saes``) on the mean
log-probability of the true next token, and the thresholded feature graph (JSON, PNG, SVG).
``index.html`` lists the clusters (size, most common next tokens and preceding tokens, accuracy); each
cluster page shows example contexts (the true next token highlighted, the model's prediction beside it),
the circuit drawing and its top nodes.
"""

from __future__ import annotations

import collections
import html
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.checkpoint import OutputLock as locked  # re-entrant: the harness holds it too
from jaxinterp.checkpoint import write_atomic
from jaxinterp.circuits import discover, gradient_sketches, spectral_clusters
from jaxinterp.experiments.circuits.main import node_labels
from jaxinterp.experiments.common import experiment_main
from jaxinterp.experiments.data.facts_world import load_world_model
from jaxinterp.experiments.train_saes.main import ensure_saes

from .config import BehavioursConfig

PRESETS = {"default": BehavioursConfig.default, "smoke": BehavioursConfig.smoke}
TOP_NODES = 12  # rows of a cluster page's node table


def sample_contexts(world, n: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``tokens [n, length]`` windows cut at a random point of each of ``n`` documents, ``targets [n]``
    the token after each window."""
    rng = np.random.default_rng([seed, 3])
    tokens, targets = [], []
    for doc in world.documents(2 * n, seed=seed):
        ids = world.encode(doc)
        if len(ids) <= length:
            continue
        t = int(rng.integers(length, len(ids)))
        tokens.append(ids[t - length:t])
        targets.append(ids[t])
        if len(tokens) == n:
            break
    if len(tokens) < n:
        raise ValueError(f"only {len(tokens)} documents are longer than context_len={length}; lower n_contexts")
    return np.asarray(tokens, np.int32), np.asarray(targets, np.int32)


def true_logprob(logits, targets):
    """Mean over rows of ``log p(target)`` (``logits [B, V]`` at the last position)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    return jnp.mean(logp[jnp.arange(logits.shape[0]), targets])


def predictions(model, tokens: np.ndarray, targets: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The model's argmax next token ``[N]`` and ``log p(target)`` ``[N]`` at each context's last position."""
    @jax.jit
    def fwd(t, y):
        logp = jax.nn.log_softmax(model.run(t, logits_at=-1).logits.astype(jnp.float32), -1)  # [B, V]
        return jnp.argmax(logp, -1), logp[jnp.arange(t.shape[0]), y]

    outs = [fwd(jnp.asarray(tokens[i:i + batch]), jnp.asarray(targets[i:i + batch]))
            for i in range(0, len(tokens), batch)]
    return (np.concatenate([np.asarray(o[0]) for o in outs]), np.concatenate([np.asarray(o[1]) for o in outs]))


def describe(ids: np.ndarray, vocab, top: int = 3) -> list[tuple[str, float]]:
    """The ``top`` most common tokens of ``ids`` with their shares."""
    counts = collections.Counter(int(i) for i in ids).most_common(top)
    return [(str(vocab[i]), c / len(ids)) for i, c in counts]


def cluster_summary(members: np.ndarray, tokens, targets, pred, logp, vocab) -> dict:
    nxt, prev = describe(targets[members], vocab), describe(tokens[members, -1], vocab)
    text = ("next " + ", ".join(f"'{t}' {s:.0%}" for t, s in nxt) + "; after " +
            ", ".join(f"'{t}' {s:.0%}" for t, s in prev))
    return {"size": int(len(members)), "description": text, "next_tokens": nxt, "previous_tokens": prev,
            "accuracy": float(np.mean(pred[members] == targets[members])),
            "mean_logprob": float(np.mean(logp[members]))}


def cluster_circuit(cfg: BehavioursConfig, model, saes, tokens, targets, c: int, out: Path) -> dict:
    """The feature circuit of one cluster's contexts: ``<out>/cluster_<c>_circuit.{json,png,svg}``."""
    t0 = time.time()
    circuit, effects = discover(model, saes, tokens, true_logprob, metric_args=(jnp.asarray(targets),),
                                method=cfg.method, steps=cfg.steps, node_threshold=cfg.node_threshold,
                                edge_threshold=cfg.edge_threshold, max_nodes_per_site=cfg.max_nodes_per_site)
    circuit.labels = node_labels(model, effects, circuit.nodes, tokens)
    circuit.info.update(title=f"{cfg.model}: cluster {c} circuit (SAE features; {cfg.method}, {cfg.steps} steps, "
                              f"zero patch)", metric_name="log p(next)")
    paths = [circuit.save_json(out / f"cluster_{c}_circuit.json"), circuit.render(out / f"cluster_{c}_circuit.png"),
             circuit.render(out / f"cluster_{c}_circuit.svg")]
    nodes = [{"node": str(n), "label": circuit.labels.get(n, "SAE error" if n.is_error else str(n.index)),
              "effect": float(v)} for n, v in sorted(circuit.nodes.items(), key=lambda kv: -abs(kv[1]))]
    return {**circuit.info, "nodes": nodes, "files": [p.name for p in paths], "seconds": time.time() - t0}


# ----------------------------------------------------------------------------- HTML

STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:70em;color:#222}
table{border-collapse:collapse;margin:0.8em 0}td,th{border:1px solid #ccc;padding:0.25em 0.5em;text-align:left}
th{background:#eef}.ctx{font-family:monospace;white-space:pre-wrap}.tgt{background:#ffd54f;font-weight:bold}
.ok{color:#1b7a1b}.bad{color:#b22}img{max-width:100%;border:1px solid #ddd}.num{text-align:right}"""


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


def index_html(cfg: BehavioursConfig, clusters: list[dict]) -> str:
    rows = "".join(
        f"<tr><td><a href=\"cluster_{c['id']}.html\">cluster {c['id']}</a></td><td class=\"num\">{c['size']}</td>"
        f"<td>{html.escape(c['description'])}</td><td class=\"num\">{c['accuracy']:.0%}</td>"
        f"<td class=\"num\">{c['mean_logprob']:.2f}</td><td class=\"num\">{c['circuit']['n_nodes']}</td></tr>\n"
        for c in clusters)
    intro = (f"<p>{cfg.n_contexts} contexts of {cfg.context_len} tokens from facts-world documents, clustered "
             f"(k = {cfg.k}, spectral) by count sketches ({cfg.sketch_dim} dims) of the gradient of {cfg.model}'s "
             f"next-token loss. Each cluster's circuit: SAE features by {cfg.method} node effects on the mean "
             f"log-probability of the true next token.</p>")
    return _page(f"{cfg.model}: behaviours by loss-gradient clusters", intro +
                 "<table><tr><th>cluster</th><th>size</th><th>description</th><th>top-1 acc.</th>"
                 f"<th>mean log p</th><th>circuit nodes</th></tr>\n{rows}</table>")


def cluster_html(cfg: BehavioursConfig, c: dict, members, tokens, targets, pred, logp, vocab) -> str:
    def ctx(i):
        words = " ".join(html.escape(str(vocab[t])) for t in tokens[i])
        ok = "ok" if pred[i] == targets[i] else "bad"
        return (f"<tr><td class=\"ctx\">{words} <span class=\"tgt\">{html.escape(str(vocab[targets[i]]))}</span></td>"
                f"<td class=\"{ok}\">{html.escape(str(vocab[pred[i]]))}</td><td class=\"num\">{logp[i]:.2f}</td></tr>")

    examples = "\n".join(ctx(i) for i in members[:cfg.examples])
    nodes = "\n".join(f"<tr><td>{html.escape(n['node'])}</td><td>{html.escape(n['label'])}</td>"
                      f"<td class=\"num\">{n['effect']:+.3f}</td></tr>" for n in c["circuit"]["nodes"][:TOP_NODES])
    circ = c["circuit"]
    body = (f"<p><a href=\"index.html\">&larr; all clusters</a></p><p>{c['size']} contexts; "
            f"{html.escape(c['description'])}; top-1 accuracy {c['accuracy']:.0%}, mean log p {c['mean_logprob']:.2f}"
            f"</p>\n<h2>Example contexts</h2><table><tr><th>context <span class=\"tgt\">true next token</span></th>"
            f"<th>predicted</th><th>log p(true)</th></tr>\n{examples}</table>\n"
            f"<h2 id=\"circuit\">Circuit</h2><p>metric on {circ['n_contexts']} contexts: {circ['m_clean']:.3f} clean, "
            f"{circ['m_patch']:.3f} with every SAE node zero-patched; {circ['n_nodes']} nodes, {circ['n_edges']} edges "
            f"(<a href=\"cluster_{c['id']}_circuit.json\">JSON</a>, <a href=\"cluster_{c['id']}_circuit.png\">PNG</a>)."
            f"</p><img src=\"cluster_{c['id']}_circuit.svg\" alt=\"cluster {c['id']} circuit\">\n"
            f"<h3>Top nodes</h3><table><tr><th>node</th><th>label (feature index, token where largest)</th>"
            f"<th>effect</th></tr>\n{nodes}</table>")
    return _page(f"{cfg.model}: cluster {c['id']}", body)


# ----------------------------------------------------------------------------- run


def run(cfg: BehavioursConfig, out: Path) -> dict:
    with locked(out):
        t0 = time.time()
        model, world = load_world_model(cfg.model)
        saes = ensure_saes(cfg.saes, cfg.model)
        vocab = model.to_str_tokens(np.arange(model.config.vocab_size))
        tokens, targets = sample_contexts(world, cfg.pool, cfg.context_len, cfg.seed)
        pred, logp = predictions(model, tokens, targets)
        keep = np.flatnonzero(-logp < cfg.max_loss)[:cfg.n_contexts]  # the predictable contexts (quanta)
        if len(keep) < cfg.n_contexts:
            raise ValueError(f"only {len(keep)} of {cfg.pool} contexts have loss < max_loss={cfg.max_loss}; raise "
                             f"pool or max_loss")
        tokens, targets, pred, logp = tokens[keep], targets[keep], pred[keep], logp[keep]
        t1 = time.time()
        sketches = gradient_sketches(model, tokens, targets, dim=cfg.sketch_dim, seed=cfg.seed)
        labels = spectral_clusters(sketches, cfg.k, seed=cfg.seed)
        t_cluster = time.time() - t1
        clusters = []
        for c in range(cfg.k):
            members = np.flatnonzero(labels == c)
            info = {"id": c, **cluster_summary(members, tokens, targets, pred, logp, vocab)}
            sub = members[:cfg.circuit_contexts]
            info["circuit"] = {"n_contexts": int(len(sub)),
                               **cluster_circuit(cfg, model, saes, tokens[sub], targets[sub], c, out)}
            clusters.append(info)
            write_atomic(out / f"cluster_{c}.html", cluster_html(cfg, info, members, tokens, targets, pred, logp, vocab))
            print(f"cluster {c}: {info['size']} contexts, {info['description']}; acc {info['accuracy']:.0%}; "
                  f"circuit {info['circuit']['n_nodes']} nodes ({info['circuit']['seconds']:.0f} s)")
        write_atomic(out / "index.html", index_html(cfg, clusters))
    return {"model": cfg.model, "saes": cfg.saes, "n_contexts": cfg.n_contexts, "labels": labels.tolist(),
            "cluster_seconds": t_cluster, "seconds": time.time() - t0, "clusters": clusters}


main = experiment_main("behaviours", PRESETS, run, doc=__doc__)

if __name__ == "__main__":
    sys.exit(main())
