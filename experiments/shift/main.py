"""SHIFT (Marks et al. 2024): remove a classifier's reliance on a spurious attribute by ablating the SAE
features an automatic judge calls spurious, on facts-gpt.

    jaxinterp shift                                       # results/shift/default/
    jaxinterp shift --set saes=/work/saes/facts-gpt layer=1

Task (``data.py``): the entity's domain (intended) from ``"<lead-in> <entity> lives in"``-style texts whose
lead-in phrase (spurious) always matches the domain in training and is independent of it in the balanced
test set. A logistic-regression head reads the mean over positions of ``blocks.<layer>.resid_post`` of the
frozen model. Node effects (integrated gradients, zero patch) of the SAE features at every site up to that
layer on the head's signed logit (mean of ``(2y - 1) * logit`` on the training set) rank features; the
judge (on held-out *judge* entities, both leads, never the test set) calls a top feature spurious when its
standardised mean difference between the lead groups exceeds that between the domain groups. Six rows on
the balanced test set: original head, SHIFT (the spurious features ablated through the SAE splice: set
to their training-set means, or zero), SHIFT + retraining the head (correlated training set, features
ablated), as many random features ablated, the spurious mean-difference direction projected out (concept erasure, head retrained), and the oracle
head trained on balanced data.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.checkpoint import OutputLock as locked  # re-entrant: the harness holds it too
from jaxinterp.circuits import NodeAblate, node_effects
from jaxinterp.circuits.nodes import encode_nodes
from jaxinterp.experiments.common import UsageError, experiment_main
from jaxinterp.experiments.data.facts_world import load_world_model
from jaxinterp.experiments.train_saes.main import ensure_saes
from jaxinterp.model import run as run_model
from jaxinterp.sites import split_layer_site

from .config import ShiftConfig
from .data import SPLITS, Split, group_counts, make_splits

PRESETS = {"default": ShiftConfig.default, "smoke": ShiftConfig.smoke}
ROWS = ("original", "shift", "shift_retrain", "random", "concept_erasure", "oracle")


# ---- the linear head ------------------------------------------------------------------------------------

def pool(value, weights):
    """``[B, D]``: the weighted sum over positions of ``value [B, T, D]`` (weights: 1/length on real tokens)."""
    return jnp.einsum("btd,bt->bd", value.astype(jnp.float32), weights)


def head_logit(head: dict, x):
    """``[B]``: the head's logit of ``x [B, D]`` (standardised with the training mean / std)."""
    return ((x - head["mu"]) / head["sd"]) @ head["w"] + head["b"]


@jax.jit
def _fit(x, y, steps_arr, l2):
    def step(_, wb):
        w, b = wb
        g = jax.nn.sigmoid(x @ w + b) - y  # [N]
        return w - 1.0 * (x.T @ g / len(y) + l2 * w), b - 1.0 * g.mean()

    return jax.lax.fori_loop(0, steps_arr.shape[0], step, (jnp.zeros(x.shape[1]), jnp.zeros(())))


def fit_head(x: np.ndarray, y: np.ndarray, *, steps: int, l2: float) -> dict:
    """L2-regularised logistic regression by ``steps`` full-batch gradient steps on standardised ``x``."""
    x = jnp.asarray(x, jnp.float32)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    w, b = _fit((x - mu) / sd, jnp.asarray(y, jnp.float32), jnp.zeros(steps), jnp.float32(l2))
    return {"w": w, "b": b, "mu": mu, "sd": sd}


def accuracy(head: dict, x, split: Split) -> dict:
    """Accuracy and worst-group accuracy (over the four domain x lead cells present)."""
    pred = np.asarray(head_logit(head, jnp.asarray(x)) > 0)
    right = pred == split.y.astype(bool)
    groups = [right[(split.y == i) & (split.s == j)].mean() for i in (0, 1) for j in (0, 1)
              if np.any((split.y == i) & (split.s == j))]
    return {"accuracy": float(right.mean()), "worst_group": float(min(groups))}


def head_metric(value, weights, sign, w, b, mu, sd):
    """The circuit metric: mean of ``sign * logit`` (how strongly the head backs the training label)."""
    return jnp.mean(sign * head_logit({"w": w, "b": b, "mu": mu, "sd": sd}, pool(value, weights)))


# ---- representations, with or without ablation ----------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("sites", "stop"))
def _pooled(model, tokens, weights, interventions, *, sites: tuple, stop: int):
    out = run_model(model, tokens, capture=list(sites), interventions=interventions, stop_at=stop)
    return {s: pool(out.cache[s], weights) for s in sites}


def _stop(site: str) -> int:
    return split_layer_site(site)[0] + 1


def representations(model, site: str, splits: list, interventions=None) -> list:
    """``[[N, D]]``: the pooled ``site`` value of each split (``interventions`` applied), in one run."""
    tokens = jnp.asarray(np.concatenate([s.tokens for s in splits]))
    weights = jnp.asarray(np.concatenate([s.weights for s in splits]))
    x = np.asarray(_pooled(model, tokens, weights, interventions, sites=(site,), stop=_stop(site))[site])
    return np.split(x, np.cumsum([len(s) for s in splits])[:-1])


def feature_ablation(saes: dict, chosen: dict, means: dict | None = None) -> dict:
    """``{site: NodeAblate}`` setting the features ``chosen[site]`` (indices) at every position to zero, or
    to ``means[site]`` ``[F]`` when given; everything else (other features, the SAE error) kept."""
    ivs = {}
    for site, idx in chosen.items():
        if len(idx) == 0:
            continue
        keep = np.ones(saes[site].d_sae, bool)
        keep[np.asarray(idx, int)] = False
        mean = jnp.zeros(()) if means is None else jnp.asarray(means[site], jnp.float32)
        ivs[site] = NodeAblate(saes[site], jnp.asarray(keep), mean, jnp.asarray(True), jnp.zeros(()))
    return ivs


def feature_means(saes: dict, model, split: Split) -> dict:
    """``{site: [N, F]}``: each feature's mean activation over each text's positions."""
    return {s: np.asarray(v) for s, v in _feature_means(model, saes, jnp.asarray(split.tokens),
                                                         jnp.asarray(split.weights)).items()}


@jax.jit
def _feature_means(model, saes: dict, tokens, weights) -> dict:
    out = run_model(model, tokens, capture=list(saes), stop_at=max(_stop(s) for s in saes))
    return {s: pool(encode_nodes(d, out.cache[s])[0], weights) for s, d in saes.items()}


# ---- the judge ------------------------------------------------------------------------------------------

def association(acts: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``[F]``: |mean(acts | label 1) - mean(acts | label 0)| / pooled std (0 where a feature is constant)."""
    a, b = acts[labels == 1], acts[labels == 0]
    sd = np.sqrt((a.var(0) + b.var(0)) / 2)
    diff = np.abs(a.mean(0) - b.mean(0))
    return np.where(sd > 0, diff / np.where(sd > 0, sd, 1), np.where(diff > 0, np.inf, 0.0))


def judge(acts: np.ndarray, intended: np.ndarray, spurious: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(is_spurious [F], z_intended [F], z_spurious [F])``: spurious where the spurious association wins."""
    zi, zs = association(acts, intended), association(acts, spurious)
    return zs > zi, zi, zs


# ---- the run --------------------------------------------------------------------------------------------

def top_features(effects, k: int) -> list:
    """The ``k`` SAE features (no error nodes) with the largest |effect|."""
    return [n for n, _ in effects.ranked() if not n.is_error][:k]


def _by_site(nodes) -> dict:
    out: dict = {}
    for n in nodes:
        out.setdefault(n.site, []).append(n.index)
    return out


def check_decodable(xs: dict, splits: dict, cfg: ShiftConfig) -> dict:
    """Linear probes trained on the judge split (balanced), scored on the test split: both attributes."""
    out = {}
    for name, attr in (("intended", "y"), ("spurious", "s")):
        probe = fit_head(xs["judge"], getattr(splits["judge"], attr), steps=cfg.head_steps, l2=cfg.head_l2)
        pred = np.asarray(head_logit(probe, jnp.asarray(xs["test"])) > 0)
        out[name] = float((pred == getattr(splits["test"], attr).astype(bool)).mean())
    return out


def run(cfg: ShiftConfig, out: Path) -> dict:
    t0 = time.time()
    with locked(out):
        model, world = load_world_model(cfg.model)
        if not 0 <= cfg.layer < model.config.n_layers:
            raise UsageError(f"layer must be in [0, {model.config.n_layers - 1}] for {cfg.model}, got {cfg.layer}")
        all_saes = ensure_saes(cfg.saes, cfg.model)
        sites = [f"blocks.{l}.{k}" for l in range(cfg.layer + 1) for k in cfg.site_kinds]
        missing = [s for s in sites if s not in all_saes]
        if missing:
            raise UsageError(f"{cfg.saes} has no SAEs for {missing}")
        saes = {s: all_saes[s] for s in sites}
        head_site = f"blocks.{cfg.layer}.resid_post"
        splits = make_splits(world, cfg.domains, cfg.leads, templates=cfg.templates, n_judge=cfg.n_judge,
                             n_test=cfg.n_test, seed=cfg.seed)
        fit = dict(steps=cfg.head_steps, l2=cfg.head_l2)
        xs = dict(zip(SPLITS, representations(model, head_site, [splits[k] for k in SPLITS])))
        train, test = splits["train"], splits["test"]
        head = fit_head(xs["train"], train.y, **fit)
        rows = {"original": accuracy(head, xs["test"], test)}

        t1 = time.time()
        sign = jnp.asarray(2.0 * train.y - 1.0)
        effects = node_effects(model, saes, train.tokens, head_metric, method=cfg.method, steps=cfg.steps,
                               readout=head_site, metric_args=(jnp.asarray(train.weights), sign, head["w"],
                                                               head["b"], head["mu"], head["sd"]))
        t_effects = time.time() - t1
        top = top_features(effects, cfg.top)
        acts = feature_means(saes, model, splits["judge"])
        top_acts = np.stack([acts[n.site][:, n.index] for n in top], 1)  # [N, K]
        is_spur, zi, zs = judge(top_acts, splits["judge"].y, splits["judge"].s)
        spurious = [n for n, bad in zip(top, is_spur) if bad]
        means = None
        if cfg.ablation == "mean":
            means = {k: v.mean(0) for k, v in feature_means(saes, model, train).items()}
        ivs = feature_ablation(saes, _by_site(spurious), means)
        x_abl = dict(zip(("train", "test"), representations(model, head_site, [train, test], ivs)))
        rows["shift"] = accuracy(head, x_abl["test"], test)
        rows["shift_retrain"] = accuracy(fit_head(x_abl["train"], train.y, **fit), x_abl["test"], test)

        rng = np.random.default_rng([cfg.seed, 3])
        draws = []
        for _ in range(cfg.random_seeds):
            pool_ = [(s, i) for s in sites for i in range(saes[s].d_sae)]
            pick = rng.choice(len(pool_), size=len(spurious), replace=False)
            chosen: dict = {}
            for j in pick:
                chosen.setdefault(pool_[j][0], []).append(pool_[j][1])
            x_rand, = representations(model, head_site, [test], feature_ablation(saes, chosen, means))
            draws.append(accuracy(head, x_rand, test))
        rows["random"] = {k: float(np.mean([d[k] for d in draws])) for k in ("accuracy", "worst_group")}

        proj = erasure_projection(xs["train"], train.s)
        rows["concept_erasure"] = accuracy(fit_head(xs["train"] @ proj, train.y, **fit), xs["test"] @ proj, test)
        rows["oracle"] = accuracy(fit_head(xs["oracle"], splits["oracle"].y, **fit), xs["test"], test)

    features = [{"node": str(n), "effect": float(effects.nodes()[n]), "z_intended": float(a), "z_spurious": float(b),
                 "spurious": bool(c)} for n, a, b, c in zip(top, zi, zs, is_spur)]
    results = {"model": cfg.model, "saes": cfg.saes, "head_site": head_site, "sites": sites,
               "rows": rows, "n_spurious": len(spurious), "n_top": len(top),
               "decodable": check_decodable(xs, splits, cfg), "group_counts": {k: group_counts(v).tolist()
                                                                       for k, v in splits.items()},
               "sizes": {k: len(v) for k, v in splits.items()}, "features": features,
               "random_draws": draws, "effects_seconds": t_effects, "seconds": time.time() - t0}
    print_table(results)
    return results


def erasure_projection(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``[D, D]``: I - u u^T with u the unit mean difference of ``x`` between the ``s`` groups."""
    d = x[s == 1].mean(0) - x[s == 0].mean(0)
    u = d / np.linalg.norm(d)
    return np.eye(len(u), dtype=np.float32) - np.outer(u, u).astype(np.float32)


def print_table(res: dict) -> None:
    print("balanced test accuracy (domain from the representation; test entities unseen, lead-in independent "
          "of domain) and worst-group accuracy over the 4 domain x lead cells")
    print(f"{'row':<17} {'accuracy':>9} {'worst group':>12}")
    for name in ROWS:
        r = res["rows"][name]
        print(f"{name:<17} {r['accuracy']:>9.3f} {r['worst_group']:>12.3f}")
    print(f"{res['n_spurious']} of the top {res['n_top']} features judged spurious; linear probes on the test "
          f"set: intended {res['decodable']['intended']:.2f}, spurious {res['decodable']['spurious']:.2f}")


main = experiment_main("shift", PRESETS, run, doc=__doc__)

if __name__ == "__main__":
    sys.exit(main())
