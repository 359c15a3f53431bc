"""The library's methods on a random config of every zoo family (short smoke tests, each checked
against an independent computation): causal tracing (incremental engine vs the full engine), an
activation-patching sweep (vs a plain loop of patched runs), ROME (the edited map sends the key
to v*, and the model then computes v*), and a LoRA fine-tune step (identity at init, only the
adapters move, the loss falls)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxinterp as ji
from jaxinterp import lora
from jaxinterp.editing.rome import EditRequest, RomeConfig, edit, key_covariances, rome_targets
from jaxinterp.interventions import Patch
from jaxinterp.models.gemma import GemmaConfig
from jaxinterp.models.gptj import GPTJConfig
from jaxinterp.models.llama import LlamaConfig
from jaxinterp.models.mixtral import MixtralConfig
from jaxinterp.models.olmo2 import Olmo2Config
from jaxinterp.models.phi3 import Phi3Config
from jaxinterp.models.rope import RopeScaling
from jaxinterp.patching import TraceConfig, activation_patching, embedding_sigma, trace

V, SEQ, SUBJECT = 97, 6, (1, 3)
_S = dict(vocab_size=V, n_layers=3, d_model=32, n_heads=4)
# One random config per zoo family, each exercising the block's new paths: Gemma-3 (sandwich norms,
# per-head q/k norm, sliding windows, local / global rope, soft-capped logits), Llama 3 (llama3 rope),
# OLMo-2 (post-norms, full q/k norm), Phi-3 (LongRoPE past its original context, partial rotary,
# fused checkpoint tensors), GPT-J (shared-norm parallel block, interleaved rotary, head bias),
# Mixtral (experts). The other variants share these paths and are covered by the parity tests.
ZOO = {
    "gemma3": lambda: GemmaConfig.gemma3_tiny(**_S, n_kv_heads=2, head_dim=8, d_mlp=48, sliding_window=3,
                                              sliding_layers=(0, 1), final_softcap=5.0),
    "llama3": lambda: LlamaConfig.llama3_tiny(**_S, n_kv_heads=2, d_mlp=48, max_seq_len=64),
    "olmo2": lambda: Olmo2Config.tiny(**_S, n_kv_heads=2, d_mlp=48),
    "phi3-longrope": lambda: Phi3Config.tiny(**_S, d_mlp=48, partial_rotary=0.5, rope_scaling=RopeScaling.of(
        "longrope", original_max_position_embeddings=4, short_factor=[1.0, 1.2], long_factor=[3.0, 7.0])),
    "gptj": lambda: GPTJConfig.tiny(**_S, rotary_dim=4),
    "mixtral": lambda: MixtralConfig.mixtral_tiny(**_S, n_kv_heads=2, d_mlp=24, n_experts=4, top_k=2),
}


def _amplified(name, factor=3.0):
    """Larger-than-default weights, so that restorations and patches move the output visibly."""
    m = ji.init(ZOO[name](), 0)
    big = lambda path, p: p * factor if getattr(path[-1], "key", None) in ("kernel", "embed", "gate", "up", "down") \
        else p  # noqa: E731
    return m.replace(params=jax.tree_util.tree_map_with_path(big, m.params))


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(1).integers(0, V, SEQ)


@pytest.mark.parametrize("name", list(ZOO))
def test_trace_incremental_engine_equals_full_engine(tokens, name):
    model = _amplified(name)
    sigma = embedding_sigma(model, [tokens[SUBJECT[0]:SUBJECT[1]]])
    probs = {}
    for engine in ("full", "incremental"):
        cfg = TraceConfig(n_samples=2, window=1, position_buckets=2, engine=engine)
        probs[engine] = trace(model, tokens, SUBJECT, kind="mlp_out", sigma=sigma, config=cfg).probs
    np.testing.assert_allclose(probs["incremental"], probs["full"], atol=1e-5, rtol=0)
    assert np.ptp(probs["full"]) > 1e-4, "restorations must matter, else the comparison cannot fail"


def _logit_diff(logits):
    return (logits[:, 3] - logits[:, 5]).mean()


@pytest.mark.parametrize("name", list(ZOO))
def test_activation_patching_sweep_equals_a_loop(tokens, name):
    model = _amplified(name)
    clean = jnp.asarray(tokens[None], jnp.int32)
    corrupt = clean.at[0, 1].set((tokens[1] + 7) % V)
    site = "blocks.1.attn_out"
    res = activation_patching(model, clean, corrupt, [site], _logit_diff)
    value = ji.run(model, clean, capture=site).cache[site]
    one = jax.jit(lambda mask: _logit_diff(ji.run(model, corrupt, interventions={site: Patch(value, mask=mask)},
                                                  logits_at=-1).logits))
    loop = [float(one(jnp.arange(SEQ)[None] == t)) for t in range(SEQ)]
    np.testing.assert_allclose(res.effects[site], loop, atol=1e-5, rtol=1e-5)
    assert res.effects[site][0] == pytest.approx(res.corrupt, abs=1e-5)  # before the change nothing differs
    assert abs(res.clean - res.corrupt) > 1e-4


@pytest.mark.parametrize("name", list(ZOO))
def test_rome_edit(name):
    model = ji.init(ZOO[name](), 0)
    if model.config.arch.n_experts:  # experts are not one [in, out] map: no ROME target, said clearly
        assert rome_targets(model) == ()
        with pytest.raises(ValueError, match="ROME has no edit targets"):
            edit(model, _request(), 1, None)
        return
    layer = 1
    corpus = [np.random.default_rng(9).integers(0, V, (4, 12))]
    cov = key_covariances(model, [layer], corpus)[layer]
    res = edit(model, _request(), layer, cov, config=RomeConfig(steps=5))
    t = res.target
    assert t.name == "mlp.down"
    assert t.value_site == f"blocks.{layer}." + ("mlp.out" if model.config.arch.post_norms else "mlp_out")
    w = jax.tree_util.tree_map(lambda a: np.asarray(a[layer], np.float64), res.model.params["layers"]["mlp"]["down"])
    np.testing.assert_allclose(res.k_insert @ w["kernel"] + w.get("bias", 0.0), res.v_star, atol=1e-4)
    out = ji.run(res.model, np.asarray(PROMPT)[None], capture=t.value_site).cache[t.value_site]
    np.testing.assert_allclose(out[0, 2], res.v_star, atol=1e-4)


PROMPT = [4, 8, 15, 16, 23]


def _request():
    return EditRequest(prompts=(tuple(PROMPT),), subject_last=(2,), target_new=(11,))


def _next_token_loss(lm, batch):
    logits = lm.run(batch[:, :-1]).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


@pytest.mark.parametrize("name", list(ZOO))
def test_lora_finetune_step(name):
    base = ji.init(ZOO[name](), 0)
    batch = jnp.asarray(np.random.default_rng(2).integers(0, V, (2, 9)))
    lm = lora.init(base, lora.LoraConfig(rank=2))
    np.testing.assert_allclose(lm.run(batch).logits, base.run(batch).logits, atol=1e-5, rtol=0)
    trainable, frozen = lora.split(lm)
    loss = lambda tr: _next_token_loss(lora.combine(tr, frozen), batch)  # noqa: E731
    opt = optax.sgd(0.05)
    before, grads = jax.value_and_grad(loss)(trainable)
    updates, _ = opt.update(grads, opt.init(trainable), trainable)
    after = loss(optax.apply_updates(trainable, updates))
    assert float(after) < float(before)
    assert all(float(jnp.abs(g["B"]).max()) > 0 for g in grads.weights.values())
    kinds = {p.unit for p in lm.lora.projections}
    assert kinds >= {"attn.q", "attn.o"} or kinds >= {"attn.qkv", "attn.o"}
