"""The requests of ``test_distributed.py``, and (run as a script) their results from ONE process whose
model is sharded the same way over 4 simulated CPU devices: the reference the 2-process server must
equal to 1e-6 (an unsharded run differs by float summation order, a few 1e-6).

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/remote/dist_cases.py OUT.npz MESH
"""

import sys

import jax.numpy as jnp
import numpy as np

import jaxinterp as ji

GEN_PROMPT = ["alice works at"]
SWEEP_SITE = "blocks.1.resid_pre"


def cases(model):
    """``(tokens, {name: run kwargs}, generate kwargs, (corrupt, metric, sweep kwargs))``."""
    d, vocab = model.config.d_model, model.config.vocab_size
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (2, 6)).astype(np.int32)
    v = jnp.asarray(rng.normal(size=d), jnp.float32)
    patch = jnp.asarray(rng.normal(size=(2, 6, d)), jnp.float32)
    mask = jnp.asarray(np.arange(6) == 2)[None, :, None]
    capture = ["blocks.1.resid_post", "blocks.2.attn.pattern"]
    # alice and bob: same shapes and intervention structure (batchable together); alice2: another structure
    runs = {"alice": dict(capture=capture, interventions={"blocks.0.resid_post": ji.Add(v),
                                                          "blocks.1.mlp_out": ji.ZeroAblate()}),
            "bob": dict(capture=capture, interventions={"blocks.0.resid_post": ji.Add(-v),
                                                        "blocks.1.mlp_out": ji.ZeroAblate()}),
            "alice2": dict(capture="blocks.3.mlp_out", logits_at=-1,
                           interventions={"blocks.2.resid_pre": ji.Patch(patch, mask),
                                          "blocks.1.resid_post": ji.Scale(jnp.float32(0.5))})}
    gen = dict(max_new_tokens=4, temperature=0.8, top_k=20, seed=3, capture="blocks.1.resid_post",
               interventions={"blocks.1.resid_post": ji.Steer(v, jnp.float32(2.0), where="generated")})
    corrupt = tokens.copy()
    corrupt[:, 1] = (corrupt[:, 1] + 5) % vocab
    answers, wrong = jnp.asarray([5, 9], jnp.int32), jnp.asarray([11, 3], jnp.int32)
    sweep = dict(per="position", metric_args=(answers, wrong), chunk=3)
    return tokens, runs, gen, (corrupt, logit_diff, sweep)


def logit_diff(logits, answers, wrong):
    rows = jnp.arange(logits.shape[0])
    return jnp.mean(logits[rows, answers] - logits[rows, wrong])


def results(model) -> dict:
    """Every case's arrays, flat: ``run/<name>/logits``, ``run/<name>/<site>``, ``gen/...``, ``sweep``."""
    from jaxinterp.patching import activation_patching
    from jaxinterp.remote.cluster import to_host

    tokens, runs, gen, (corrupt, metric, sweep) = cases(model)
    out = {}
    for name, kwargs in runs.items():
        r = model.run(tokens, **kwargs)
        out[f"run/{name}/logits"] = r.logits
        out.update({f"run/{name}/{site}": r.cache[site] for site in r.cache})
    g = ji.generate(model, GEN_PROMPT, **gen)
    out["gen/tokens"], out["gen/cache"] = g.tokens, g.cache["blocks.1.resid_post"]
    out["sweep"] = activation_patching(model, tokens, corrupt, [SWEEP_SITE], metric, **sweep).effects[SWEEP_SITE]
    return to_host(out)


if __name__ == "__main__":
    from jaxinterp.remote.server import _mesh

    path, mesh = sys.argv[1:3]
    np.savez(path, **results(ji.load("facts-gpt", mesh=_mesh(mesh))))
