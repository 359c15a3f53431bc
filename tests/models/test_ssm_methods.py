"""The methods on the state-space families added for issue 18 (Falcon-Mamba, Mamba-2), on random
configs: causal tracing (incremental engine vs the full engine), an activation-patching sweep vs a
plain loop of patched runs (per position, and per head on Mamba-2's ``mixer.heads``), ROME edits
of every target and a LoRA fine-tuning step (plus PEFT export for Mamba-2)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp import lora
from jaxinterp.editing.rome import EditRequest, RomeConfig, edit, edit_target, key_covariances
from jaxinterp.models.mamba import MambaConfig
from jaxinterp.models.mamba2 import Mamba2Config
from jaxinterp.patching import TraceConfig, embedding_sigma, trace
from jaxinterp.patching.activation import activation_patching

V, SEQ, SUBJECT = 97, 6, (1, 3)
CONFIGS = {
    "falcon_mamba": lambda: MambaConfig.falcon_tiny(vocab_size=V, d_model=32, n_layers=3),
    "mamba2": lambda: Mamba2Config.tiny(vocab_size=V, n_layers=3, chunk_size=4),
}


def amplified(name, factor=5.0):
    """Larger-than-default weights so that restorations and edits move the outputs visibly."""
    config = CONFIGS[name]()
    m = jax.jit(lambda key: ji.init(config, key))(jax.random.PRNGKey(0))
    big = lambda path, p: p * factor if getattr(path[-1], "key", None) in ("kernel", "embed") else p  # noqa: E731
    return m.replace(params=jax.tree_util.tree_map_with_path(big, m.params))


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request):
    return amplified(request.param)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(1).integers(0, V, SEQ)


def logit_diff(logits):
    return (logits[:, 3] - logits[:, 7]).mean()


# ----------------------------------------------------------------------------- causal tracing


@pytest.mark.parametrize("kind", ["mixer.ssm_in"])
def test_trace_incremental_engine_equals_full_engine(model, tokens, kind):
    """The incremental engine (Mamba's stepper running this family's mixer on suffixes, continuing
    from the corrupted run's conv window and SSM state) equals the full engine cell by cell."""
    sigma = embedding_sigma(model, [tokens[SUBJECT[0]:SUBJECT[1]]])
    res = {engine: trace(model, tokens, SUBJECT, kind=kind, sigma=sigma,
                         config=TraceConfig(n_samples=2, window=2, position_buckets=2, engine=engine))
           for engine in ("full", "incremental")}
    np.testing.assert_allclose(res["incremental"].probs, res["full"].probs, atol=1e-5, rtol=0)
    assert np.ptp(res["full"].probs) > 1e-3, "restorations must matter, else the test cannot fail"


def test_trace_per_head_site_on_mamba2(tokens):
    """mixer.heads is per position (the stepper's shortcut for it runs one token only): same table."""
    model = amplified("mamba2")
    sigma = embedding_sigma(model, [tokens[SUBJECT[0]:SUBJECT[1]]])
    res = {engine: trace(model, tokens, SUBJECT, kind="mixer.heads", sigma=sigma,
                         config=TraceConfig(n_samples=2, window=2, position_buckets=2, engine=engine))
           for engine in ("full", "incremental")}
    np.testing.assert_allclose(res["incremental"].probs, res["full"].probs, atol=1e-5, rtol=0)
    assert np.ptp(res["full"].probs) > 1e-3


# ----------------------------------------------------------------------------- activation patching


@functools.partial(jax.jit, static_argnames="site")
def _patched_jit(model, tokens, value, mask, *, site):
    return logit_diff(ji.run(model, tokens, interventions={site: ji.Patch(value, mask=mask)}, logits_at=-1).logits)


def _patched(model, tokens, site, value, mask):
    """One patched run (the loop reference: one compiled program per site, one call per cell)."""
    return float(_patched_jit(model, jnp.asarray(tokens), value, jnp.asarray(mask), site=site))


def test_activation_patching_sweep_matches_loop(model):
    rng = np.random.default_rng(0)
    clean = rng.integers(0, V, (2, SEQ))
    corrupt = clean.copy()
    corrupt[:, 1:3] = rng.integers(0, V, (2, 2))
    sites = ["blocks.*.resid_pre", "blocks.1.mixer.ssm_in"]
    res = activation_patching(model, clean, corrupt, sites, logit_diff)
    cache = ji.run(model, clean, capture=sites).cache
    for site in ("blocks.0.resid_pre", "blocks.2.resid_pre", "blocks.1.mixer.ssm_in"):
        ref = [_patched(model, corrupt, site, cache[site], ji.positions_mask(SEQ, t)) for t in range(SEQ)]
        np.testing.assert_allclose(res.effects[site], ref, atol=1e-5, err_msg=site)
    assert abs(res.clean - res.corrupt) > 1e-3 and np.ptp(res.effects["blocks.1.mixer.ssm_in"]) > 1e-4


def test_activation_patching_per_head_on_mamba2():
    model = amplified("mamba2")
    rng = np.random.default_rng(3)
    clean = rng.integers(0, V, (2, SEQ))
    corrupt = clean.copy()
    corrupt[:, 2] = rng.integers(0, V, 2)
    site, h = "blocks.1.mixer.heads", model.config.n_heads
    res = activation_patching(model, clean, corrupt, site, logit_diff, per="head")
    assert res.effects[site].shape == (SEQ, h)
    value = ji.run(model, clean, capture=site).cache[site]
    for t in (2, SEQ - 1):
        ref = [_patched(model, corrupt, site, value, ji.heads_mask(SEQ, h, head, positions=t)) for head in range(h)]
        np.testing.assert_allclose(res.effects[site][t], ref, atol=1e-5)
    assert np.ptp(res.effects[site][2]) > 1e-4
    with pytest.raises(ValueError, match="mixer.heads"):
        activation_patching(model, clean, corrupt, "blocks.1.mixer.ssm_out", logit_diff, per="head")


# ----------------------------------------------------------------------------- ROME


@pytest.mark.parametrize("target", ["out_proj"])
def test_rome_edit_reaches_v_star(model, target):
    """The edited projection maps the subject's key to v*, so the edited model computes v* at the
    subject's last token; only that layer's kernel changes."""
    corpus = [np.random.default_rng(9).integers(0, V, (4, 12))]
    prompt, layer = [4, 8, 15, 16, 23], 1
    t = edit_target(model, layer, target)
    cov = key_covariances(model, [layer], corpus, target=target)[layer]
    request = EditRequest(prompts=(tuple(prompt),), subject_last=(2,), target_new=(11,))
    res = edit(model, request, layer, cov, config=RomeConfig(steps=5, target=target))
    out = ji.run(res.model, np.asarray(prompt)[None], capture=t.value_site).cache[t.value_site]
    np.testing.assert_allclose(out[0, 2], res.v_star, atol=1e-4)
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), model.params, res.model.params)
    assert sum(jax.tree_util.tree_leaves(changed)) == 1
    assert res.losses[-1] < res.losses[0]


# ----------------------------------------------------------------------------- LoRA


def test_lora_step_trains_only_the_adapters(model):
    """Adapters on in_proj and out_proj: zero-init B changes nothing, one SGD step on a next-token
    loss lowers it with gradients reaching the adapters only, and merged then equals unmerged."""
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, V, (2, 8)))
    lm = lora.init(model, lora.LoraConfig(rank=2))
    assert sorted({p.unit for p in lm.lora.projections}) == ["mixer.in_proj", "mixer.out_proj"]
    np.testing.assert_allclose(np.asarray(lm.run(tokens).logits), np.asarray(model.run(tokens).logits), atol=1e-6)

    def loss(full):
        logits = full.run(tokens[:, :-1], mode="unmerged").logits
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1).mean()

    value, grads = jax.jit(jax.value_and_grad(loss))(lm)
    assert all(not np.any(np.asarray(g)) for g in jax.tree_util.tree_leaves(grads.base))
    # With B = 0 only B has a gradient (dL/dA = x^T dL/dy B^T = 0): every B gets one.
    assert all(float(jnp.abs(w["B"]).sum()) > 0 and not np.any(np.asarray(w["A"])) for w in grads.lora.weights.values())
    trainable, frozen = lora.split(lm)
    stepped = jax.tree_util.tree_map(lambda w, g: w - 0.05 * g, trainable, lora.split(grads)[0])
    new = lora.combine(stepped, frozen)
    assert float(jax.jit(loss)(new)) < float(value)
    np.testing.assert_allclose(np.asarray(lora.merge(new).run(tokens).logits),
                               np.asarray(new.run(tokens, mode="unmerged").logits), atol=2e-5)


@pytest.mark.hf
def test_mamba2_lora_exports_to_peft(tmp_path):
    """A Mamba-2 LoRA saved as a PEFT adapter: PEFT on transformers' Mamba2 computes our logits."""
    peft = pytest.importorskip("peft")
    from tests.hf_utils import hf_forward, max_err, transformers

    base = ji.init(Mamba2Config.tiny(vocab_size=V), 0)
    ji.save_pretrained(base, tmp_path / "base")
    # PEFT refuses out_proj (and conv1d) adapters on Mamba-based models: adapt in_proj only.
    lm = lora.init(base, lora.LoraConfig(rank=2, alpha=4.0, targets=("blocks.*.mixer.in_proj",)))
    weights = {k: {**w, "B": 0.2 * jax.random.normal(jax.random.PRNGKey(i), w["B"].shape)}
               for i, (k, w) in enumerate(sorted(lm.lora.weights.items()))}
    lm = lora.combine(lm.lora.replace(weights), lm.base)
    lora.save_peft(lm, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    hf = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path / "base").eval()
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    tokens = np.arange(10)[None] % V
    ours = np.asarray(lm.run(tokens).logits)
    assert max_err(ours, hf_forward(peft_model, tokens).logits) < 1e-4
    assert max_err(ours, np.asarray(base.run(tokens).logits)) > 1e-3
