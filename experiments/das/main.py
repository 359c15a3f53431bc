"""Locating a causal variable of facts-gpt with interchange interventions: distributed alignment search
(DAS, a learned k-dim subspace) against full-vector patching, the best single neuron, the best k neurons,
the best SAE latent and a random k-dim subspace, per layer and position, scored by IIA on held-out pairs.

    jaxinterp das                                   # facts-gpt, lives_in, 4 layers x 3 positions
    jaxinterp das --set relation=color k=4
    jaxinterp das --preset smoke --out /tmp/das     # seconds

(``jaxinterp das`` = ``python -m jaxinterp.experiments.das.main``.) Writes ``results.json``, ``config.json``
and ``iia.png`` (test IIA vs layer, one panel per position) to the output directory; DAS and SAE
checkpoints go to ``ckpt/`` there, so a killed run resumes.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxinterp as ji
from jaxinterp import mediators as M
from jaxinterp.experiments.common import UsageError, experiment_main, pyplot, save_figure
from jaxinterp.experiments.das.config import MEDIATORS, DASExperimentConfig
from jaxinterp.experiments.data.facts_world import load_world_model
from jaxinterp.sae import Reads, SAETrainConfig, SAETrainer, unstack

MAX_SUBJECT = 4  # facts-world names have 2-4 tokens

# ----------------------------------------------------------------------------- prompts and pairs


def pad_left(prompts, width: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p.ids):] = p.ids
        mask[i, width - len(p.ids):] = True
    return tokens, mask


def positions(prompts, width: int, mode: str) -> np.ndarray:
    """``[n, P]`` positions of each (left-padded) prompt for ``mode``; -1 = unused."""
    out = np.full((len(prompts), MAX_SUBJECT if mode == "subject" else 1), -1, np.int64)
    for i, p in enumerate(prompts):
        off = width - len(p.ids)
        lo, hi = p.subject_span
        if mode == "subject_last":
            out[i, 0] = off + hi - 1
        elif mode == "final":
            out[i, 0] = width - 1
        else:
            out[i, : hi - lo] = off + np.arange(lo, hi)
    return out


def sample_pairs(prompts, usable: np.ndarray, n: int, rng) -> np.ndarray:
    """``[n, 2]`` (base, source) prompt indices among ``usable``: different subjects with different values
    of the variable and names of the same token length (so subject spans pair token by token)."""
    usable = np.asarray(usable)
    if len(usable) < 2:
        raise UsageError("fewer than 2 usable prompts in a split; change seed or train_share")
    length = np.array([len(p.subject.split()) for p in prompts])
    answer = np.array([p.answer_id for p in prompts])
    pairs = []
    for _ in range(200 * n):
        if len(pairs) == n:
            break
        b, s = rng.choice(usable, 2)
        if length[b] == length[s] and answer[b] != answer[s]:
            pairs.append((b, s))
    if len(pairs) < n:
        raise UsageError(f"could not draw {n} pairs with different values and equal name lengths")
    return np.asarray(pairs)


def pair_data(acts, tokens, mask, pos, labels, pairs) -> M.InterchangeData:
    b, s = pairs[:, 0], pairs[:, 1]
    return M.InterchangeData.from_acts(acts[s], (tokens[b], mask[b], pos[b]), pos[s], labels[s])


# ----------------------------------------------------------------------------- baselines


def separation(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per column of ``x`` ``[n, C]``: between-value variance / total variance of ``y``'s groups."""
    total = x.var(0)
    means = np.stack([x[y == v].mean(0) for v in np.unique(y)])  # [values, C]
    weights = np.array([(y == v).mean() for v in np.unique(y)])
    between = (weights[:, None] * (means - x.mean(0)) ** 2).sum(0)
    return np.where(total > 1e-12, between / np.maximum(total, 1e-12), 0.0)


def ranked(model, site, stack, data, many_n: int) -> np.ndarray:
    """Candidate order (best first) by training IIA, ties broken by mean log p(label)."""
    pred, logp = M.predict(model, site, stack, data, many=True)
    iia = (pred == np.asarray(data.label)).mean(-1)
    return np.lexsort((-logp.mean(-1), -iia))[:many_n]


def source_rows(acts, pos, pairs, labels) -> tuple[np.ndarray, np.ndarray]:
    """Training sources' vectors at their positions ``[m, D]`` and the variable's value of each."""
    s = np.unique(pairs[:, 1])
    rows, cols = np.nonzero(pos[s] >= 0)
    return acts[s[rows], pos[s][rows, cols]], labels[s[rows]]


def train_sae(acts: np.ndarray, cfg: DASExperimentConfig, site: str, ckpt: Path):
    d = acts.shape[1]
    run = SAETrainConfig(family="topk", d_in=d, d_sae=cfg.sae_width, k=cfg.sae_k, steps=cfg.sae_steps,
                         batch_size=512, lr=1e-3, lr_warmup_steps=min(50, cfg.sae_steps // 10 + 1),
                         lr_decay_frac=0.2, dead_tokens=20 * 512, aux_k=min(64, cfg.sae_width), seed=cfg.seed)
    trainer = SAETrainer({"topk": (run, [{}])})
    batch_fn = lambda t: acts[np.random.default_rng([cfg.seed, t]).integers(0, len(acts), 512)]
    states, history = trainer.fit(trainer.init(acts[:4096]), batch_fn, ckpt_dir=ckpt, progress=False,
                                  log_every=max(cfg.sae_steps // 5, 1), log=lambda _: None)
    sae = unstack(states["topk"], 0).sae.replace(reads=Reads(site=site))
    recon = np.asarray(sae(jnp.asarray(acts[:4096])))
    fvu = float(((recon - acts[:4096]) ** 2).sum() / ((acts[:4096] - acts[:4096].mean(0)) ** 2).sum())
    return sae, fvu


def mediators_at(model, site, acts, sae, train, pos, pairs, labels, cfg, ckpt: Path) -> tuple[dict, dict]:
    """``({name: mediator}, {name: info})`` at one (site, position), chosen on the training pairs only."""
    d = acts.shape[-1]
    x, y = source_rows(acts, pos, pairs, labels)
    c = min(cfg.n_candidates, d)
    neuron_cands = np.argsort(-separation(x, y))[:c]
    order = ranked(model, site, M.Subspace(jax.nn.one_hot(jnp.asarray(neuron_cands)[:, None], d)), train, c)
    neurons = neuron_cands[order]
    feats = np.asarray(sae.encode(jnp.asarray(x)))
    feat_cands = np.argsort(-separation(feats, y))[: min(cfg.n_candidates, sae.d_sae)]
    stack = M.SAEFeature(jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (len(feat_cands),) + a.shape), sae),
                         jnp.asarray(feat_cands, jnp.int32))
    feature = int(feat_cands[ranked(model, site, stack, train, len(feat_cands))[0]])
    t0 = time.time()
    das, history = M.train_das(model, site, train, M.DASConfig(k=cfg.k, steps=cfg.steps, batch_size=cfg.batch_size,
                                                               lr=cfg.lr, seed=cfg.seed), directory=ckpt)
    basis = np.asarray(das.basis, np.float64)
    meds = {"full": M.Subspace.full(d), "das": das,
            "random": M.Subspace.random(jax.random.key(cfg.seed + 1), d, cfg.k),
            "neuron": M.Subspace.neurons(int(neurons[0]), d),
            "neurons_k": M.Subspace.neurons(neurons[: cfg.k], d),
            "sae_feature": M.SAEFeature(sae, jnp.int32(feature))}
    info = {"das_loss": [history[0]["loss"], history[-1]["loss"]], "das_seconds": round(time.time() - t0, 1),
            "das_orthonormality_error": float(np.abs(basis @ basis.T - np.eye(len(basis))).max()),
            "neuron": int(neurons[0]), "neurons_k": [int(i) for i in neurons[: cfg.k]], "sae_feature": feature}
    return meds, info


# ----------------------------------------------------------------------------- run


def check(cfg: DASExperimentConfig, model, world) -> list[str]:
    names = [r.name for r in world.relations]
    if cfg.relation not in names:
        raise UsageError(f"relation must be one of {names}, got {cfg.relation!r}")
    try:
        return [M.layer_site(model, layer, cfg.site) for layer in cfg.layers]
    except (ValueError, KeyError) as err:
        raise UsageError(str(err)) from err


def split(world, cfg: DASExperimentConfig, prompts) -> tuple[np.ndarray, np.ndarray]:
    """Prompt indices of the training and the test entities (a seeded split of the entities)."""
    names = [e.name for e in world.entities]
    order = np.random.default_rng(cfg.seed).permutation(len(names))
    train = {names[i] for i in order[: int(round(cfg.train_share * len(names)))]}
    is_train = np.array([p.subject in train for p in prompts])
    return np.nonzero(is_train)[0], np.nonzero(~is_train)[0]


def recall(model, tokens, mask, answers) -> np.ndarray:
    logits = jax.jit(lambda t, m: ji.run(model, t, attention_mask=m, logits_at=t.shape[1] - 1).logits)(tokens, mask)
    return np.asarray(logits.argmax(-1)) == answers


def sae_inputs(world, model, sites) -> dict:
    """Each site's activations at every real token of every train-template fact prompt of the world."""
    prompts = world.fact_prompts("train")
    tokens, mask = pad_left(prompts, max(len(p.ids) for p in prompts))
    acts = M.capture(model, sites, tokens, mask)
    return {s: np.asarray(a)[mask] for s, a in acts.items()}


def run(cfg: DASExperimentConfig, out: Path) -> dict:
    t0 = time.time()
    model, world = load_world_model(cfg.model)
    sites = check(cfg, model, world)
    rel = world.relation(cfg.relation)
    prompts = [world.prompt(e.name, cfg.relation, t) for e in world.entities for t in range(len(rel.templates))]
    width = max(len(p.ids) for p in prompts)
    tokens, mask = pad_left(prompts, width)
    labels = np.array([p.answer_id for p in prompts])
    ok = recall(model, tokens, mask, labels)
    train_idx, test_idx = split(world, cfg, prompts)
    rng = np.random.default_rng([cfg.seed, 1])
    pairs = {"train": sample_pairs(prompts, train_idx[ok[train_idx]], cfg.n_train_pairs, rng),
             "test": sample_pairs(prompts, test_idx[ok[test_idx]], cfg.n_test_pairs, rng)}
    acts = {s: np.asarray(a) for s, a in M.capture(model, sites, tokens, mask).items()}
    d_site = acts[sites[0]].shape[-1]
    if cfg.k > d_site:
        raise UsageError(f"k={cfg.k} exceeds the width {d_site} of {cfg.site}; choose 1 <= k <= {d_site}")
    sae_acts = sae_inputs(world, model, sites)
    print(f"{cfg.model}: recall of {cfg.relation} {ok.mean():.3f} ({len(prompts)} prompts); "
          f"{len(pairs['train'])} train / {len(pairs['test'])} test pairs", flush=True)
    table: dict = {p: {} for p in cfg.positions}
    extra: dict = {p: {} for p in cfg.positions}
    saes = {}
    for layer, site in zip(cfg.layers, sites):
        sae, fvu = train_sae(sae_acts[site], cfg, site, out / "ckpt" / f"sae_L{layer}")
        saes[str(layer)] = {"fvu": fvu, "n_acts": int(len(sae_acts[site]))}
        for mode in cfg.positions:
            pos = positions(prompts, width, mode)
            train, test = (pair_data(acts[site], tokens, mask, pos, labels, pairs[k]) for k in ("train", "test"))
            meds, info = mediators_at(model, site, acts[site], sae, train, pos, pairs["train"], labels, cfg,
                                      out / "ckpt" / f"das_{mode}_L{layer}")
            row = {name: {"test_iia": M.iia(model, site, med, test), "train_iia": M.iia(model, site, med, train)}
                   for name, med in meds.items()}
            row["none"] = {"test_iia": M.iia(model, site, None, test), "train_iia": M.iia(model, site, None, train)}
            table[mode][str(layer)], extra[mode][str(layer)] = row, info
            print(f"layer {layer} {mode:12s} test IIA " + " ".join(f"{n} {row[n]['test_iia']:.2f}" for n in MEDIATORS),
                  flush=True)
    plot(table, cfg, out)
    return {
        "model": cfg.model, "relation": cfg.relation, "site": cfg.site, "k": cfg.k,
        "recall": float(ok.mean()), "n_prompts": len(prompts),
        "n_pairs": {k: len(v) for k, v in pairs.items()},
        "mediators": {
            "full": "the whole vector patched (R = I)", "das": f"learned {cfg.k}-dim subspace (DAS)",
            "random": f"random {cfg.k}-dim subspace", "neuron": "best single neuron (training IIA)",
            "neurons_k": f"best {cfg.k} neurons", "sae_feature": "best latent of a TopK SAE at the site",
            "none": "no intervention (rate at which the base already gives the source's value)"},
        "iia": table, "details": extra, "sae": saes,
        "wall_s": round(time.time() - t0, 1),
    }


def plot(table: dict, cfg: DASExperimentConfig, out: Path) -> None:
    plt = pyplot()
    modes = list(table)
    fig, axes = plt.subplots(1, len(modes), figsize=(4.6 * len(modes), 3.8), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        layers = [int(layer) for layer in table[mode]]
        for name in MEDIATORS:
            ax.plot(layers, [table[mode][str(layer)][name]["test_iia"] for layer in layers], "o-", label=name)
        ax.set_title(f"{cfg.relation}: position {mode}", fontsize=10)
        ax.set_xlabel(f"layer ({cfg.site})")
        ax.set_xticks(layers)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("held-out IIA")
    axes[0, -1].legend(fontsize=8)
    save_figure(fig, out / "iia.png")


PRESETS = {"default": DASExperimentConfig.default, "smoke": DASExperimentConfig.smoke}
main = experiment_main("das", PRESETS, run, doc=__doc__)

if __name__ == "__main__":
    raise SystemExit(main())
