"""SAE, LoRA and ELM train steps on the mesh (``jaxinterp.train.make_train_step``) equal the
single-device steps."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxinterp as ji
from jaxinterp import lora, train
from jaxinterp import sharding as jsh
from jaxinterp.models.gpt2 import GPT2Config

MESHES = [(8, 1), (2, 4)]  # pure fsdp and mixed; (4, 2) below for ELM
IDS = [f"{a}x{b}" for a, b in MESHES]


def _assert_trees_close(a, b, atol=1e-5):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), atol=atol, rtol=0,
                                   err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------- SAE

@pytest.fixture(scope="module")
def sae_setup():
    sae = pytest.importorskip("jaxinterp.sae")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 64, 32)).astype(np.float32)  # 3 batches of [B=64, D=32]
    cfg = sae.SAETrainConfig(family="relu", d_in=32, d_sae=128, steps=3, batch_size=64, lr=1e-3,
                             lr_warmup_steps=0, sparsity_coeff=1e-2)
    state = sae.unstack(sae.init_state(cfg, [{}], x.reshape(-1, 32)), 0)
    step = functools.partial(sae.sae_step, cfg=cfg)
    ref = state
    for i in range(3):
        ref, _ = jax.jit(step)(ref, jnp.asarray(x[i]))
    return cfg, state, x, step, ref


@pytest.mark.parametrize("shape", MESHES, ids=IDS)
def test_sae_steps_match_single_device(sae_setup, shape):
    """Batch over the data axis, latents (encoder columns, decoder rows, Adam moments) over tensor."""
    cfg, state, x, step, ref = sae_setup
    mesh = jsh.make_mesh({"data": shape[0], "fsdp": 1, "tensor": shape[1]})
    shardings = jsh.param_shardings("sae", state, mesh, "tp", strict=False)
    batch = NamedSharding(mesh, jsh.activation_spec(("batch", "embed"), x.shape[1:], mesh, jsh.load_rules("tp")))
    step_fn = train.make_train_step(step, shardings, batch, donate=False)
    st = jax.device_put(state, shardings)
    for i in range(3):
        st, metrics = step_fn(st, x[i])
    w_enc = st.sae.params["W_enc"]
    assert w_enc.sharding.spec == (P(None, "tensor") if shape[1] > 1 else P())
    assert {s.data.shape for s in w_enc.addressable_shards} == {(32, 128 // shape[1])}
    _assert_trees_close(st.sae.params, ref.sae.params)
    _assert_trees_close(st.opt, ref.opt)


def test_sae_step_fsdp_tp(sae_setup):
    cfg, state, x, step, ref = sae_setup
    mesh = jsh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = jsh.param_shardings("sae", state, mesh, "fsdp_tp", strict=False)
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    step_fn = train.make_train_step(step, shardings, batch, donate=False)
    st = jax.device_put(state, shardings)
    for i in range(3):
        st, _ = step_fn(st, x[i])
    assert st.sae.params["W_dec"].sharding.spec == P("tensor", "fsdp")
    _assert_trees_close(st.sae.params, ref.sae.params)


# ----------------------------------------------------------------------------- LoRA


@pytest.fixture(scope="module")
def lora_setup():
    model = ji.init(GPT2Config.tiny(n_layers=2, d_model=64, n_heads=4, d_mlp=128, vocab_size=256), 4)
    lm = lora.init(model, lora.LoraConfig(rank=4, alpha=8.0), key=1)
    tokens = np.random.default_rng(2).integers(0, 256, (8, 12)).astype(np.int32)
    opt = optax.sgd(0.5, momentum=0.9)

    def loss_fn(adapters, base, tokens):
        logits = lora.run(lora.combine(adapters, base), tokens[:, :-1], mode="unmerged").logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    def step(state, tokens):
        adapters, base, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(adapters, base, tokens)
        updates, opt_state = opt.update(grads, opt_state, adapters)
        return (optax.apply_updates(adapters, updates), base, opt_state), loss

    adapters, base = lora.split(lm)
    ref = (adapters, base, opt.init(adapters))
    losses = []
    for _ in range(3):
        ref, loss = jax.jit(step)(ref, tokens)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    return adapters, base, opt, step, tokens, ref, losses


@pytest.mark.parametrize("shape", MESHES, ids=IDS)
def test_lora_steps_match_single_device(lora_setup, shape):
    """FSDP x TP base (frozen) + replicated adapters; batch over fsdp."""
    adapters, base, opt, step, tokens, ref, losses = lora_setup
    mesh = jsh.make_mesh({"data": 1, "fsdp": shape[0], "tensor": shape[1]})
    base_sh = jsh.param_shardings("gpt2", base.params, mesh, "fsdp_tp")
    ad_sh = jsh.param_shardings("lora", adapters, mesh, "fsdp_tp")
    opt_state = opt.init(adapters)
    opt_sh = jsh.param_shardings("lora", opt_state, mesh, "fsdp_tp", strict=False)
    state_sh = (ad_sh, base.replace(params=base_sh), opt_sh)
    batch = NamedSharding(mesh, jsh.activation_spec(("batch", "seq"), tokens.shape, mesh, jsh.load_rules("fsdp_tp")))
    step_fn = train.make_train_step(step, state_sh, batch, donate=False)
    state = jax.device_put((adapters, base, opt_state), state_sh)
    for i in range(3):
        state, loss = step_fn(state, tokens)
        np.testing.assert_allclose(float(loss), losses[i], atol=1e-5)
    for leaf in jax.tree_util.tree_leaves(state[0]):
        assert leaf.sharding.is_fully_replicated
    if shape[0] > 1:
        assert state[1].params["layers"]["mlp"]["up"]["kernel"].sharding.spec[1] == "fsdp"  # [layers, embed, mlp]
    _assert_trees_close(state[0], ref[0])


# ----------------------------------------------------------------------------- ELM (LoRA erasure)


@pytest.fixture(scope="module")
def elm_setup():
    from jaxinterp.unlearning import elm

    model = ji.init(GPT2Config.tiny(n_layers=2, d_model=64, n_heads=4, d_mlp=128, vocab_size=256), 7)
    lm = lora.init(model, lora.LoraConfig(rank=4, alpha=8.0), key=2)
    rng = np.random.default_rng(8)
    rows = lambda n, lo, hi: [[1] + rng.integers(2, 256, rng.integers(lo, hi)).tolist() for _ in range(n)]
    erase, retain = rows(8, 5, 9), rows(8, 5, 9)
    fluency = [e + rng.integers(2, 256, 3).tolist() for e in erase]
    batch = elm.make_elm_batch(erase, [1, 10, 11], [1, 20, 21, 22], retain, fluency, [len(e) for e in erase],
                               erase_len=10, retain_len=10, fluency_len=14)
    cfg = elm.ElmConfig.tiny(lora_mode="unmerged")
    opt = optax.sgd(0.5)
    loss_fn = lambda ad, base, b, key: elm.elm_loss(ad, base, b, key, cfg)
    step = train.make_train_step(train.loss_step(loss_fn, opt))
    state0 = train.init_state(lm.lora, opt, jax.random.PRNGKey(0))
    ref, losses = train.init_state(lm.lora, opt, jax.random.PRNGKey(0)), []
    for _ in range(2):
        ref, metrics = step(ref, batch, lm.base)
        losses.append(float(metrics["loss"]))
    return lm, batch, opt, step, state0, ref, losses


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(4, 2)], ids=["4x2"])
def test_elm_steps_match_single_device(elm_setup, shape):
    """ELM (erase/retain/fluency with LoRA): FSDP x TP frozen base, replicated adapters, batch split."""
    from jaxinterp.unlearning import elm

    lm, batch, opt, step, state0, ref, losses = elm_setup
    mesh = jsh.make_mesh({"data": 1, "fsdp": shape[0], "tensor": shape[1]})
    base = jsh.shard_model(lm.base, mesh, "fsdp_tp")
    replicated = NamedSharding(mesh, P())
    state = jax.device_put(train.init_state(lm.lora, opt, jax.random.PRNGKey(0)), replicated)
    rows = NamedSharding(mesh, jsh.activation_spec(("batch",), (8,), mesh, jsh.load_rules("fsdp_tp")))
    loss_fn = lambda ad, b, bt, key: elm.elm_loss(ad, b, bt, key, elm.ElmConfig.tiny(lora_mode="unmerged"))
    # the loop's step: adapters replicated between steps, host batches split by rows, the base as it lies
    sharded_step = train.make_train_step(train.loss_step(loss_fn, opt), replicated, rows)
    for i in range(2):
        state, metrics = sharded_step(state, batch, base)
        np.testing.assert_allclose(float(metrics["loss"]), losses[i], atol=1e-5)
    assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree_util.tree_leaves(state["params"]))
    _assert_trees_close(state["params"], ref["params"])
