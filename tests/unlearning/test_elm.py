"""ELM objective: target distribution vs a direct numpy computation, batch alignment, gradients
only into LoRA parameters, guided sampling vs a plain loop, training + checkpoint resume."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxinterp as ji
from jaxinterp import lora, train
from jaxinterp.unlearning import elm
from jaxinterp.models.gpt2 import GPT2Config

CFG = GPT2Config.tiny(vocab_size=61, max_seq_len=64, n_layers=2)
ECFG = elm.ElmConfig.tiny(eta=3.0, top_k=10, lr=1e-2, template_weight=1.0)
OBJECTS = (7, 11, 13, 17, 19, 23, 29, 31, 37, 41)   # token ids playing fact objects in the toy batches


@pytest.fixture(scope="module")
def base():
    return ji.init(CFG, 0)


def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_target_matches_numpy():
    rng = np.random.default_rng(0)
    b, t, v = 2, 6, 30
    base_l, exp_l, nov_l = (rng.normal(size=(b, t, v)) * 3 for _ in range(3))
    valid = np.ones((b, t), bool)
    valid[1, 4:] = False
    eta, temp, k = 5.0, 1.2, 7
    got = np.asarray(elm.elm_target_logprobs(base_l, exp_l, nov_l, valid, eta=eta, temperature=temp, top_k=k))
    for i in range(b):
        n = int(valid[i].sum())
        etas = np.linspace(1.0, eta, n)   # the reference's torch.linspace(start, end, n_tokens)
        for j in range(n):
            edit = (_np_log_softmax(base_l[i, j] / temp)
                    - etas[j] * (_np_log_softmax(exp_l[i, j] / temp) - _np_log_softmax(nov_l[i, j] / temp)))
            keep = np.argsort(edit)[-k:]
            ref = np.full(v, -np.inf)
            ref[keep] = _np_log_softmax(edit[keep])
            np.testing.assert_allclose(np.exp(got[i, j]), np.exp(ref), atol=1e-6)
            assert np.isneginf(got[i, j][np.isneginf(ref)]).all()


def _batch(seed=0, b=2):
    rng = np.random.default_rng(seed)
    erase = [[0] + list(rng.integers(3, 61, int(n))) for n in rng.integers(5, 9, b)]
    retain = [[0] + list(rng.integers(3, 61, int(n))) for n in rng.integers(5, 9, b)]
    fluency = [e + list(rng.integers(3, 61, 4)) for e in erase]
    return elm.make_elm_batch(erase, [0, 5, 6, 7], [0, 8, 9], retain, fluency, [len(e) for e in erase],
                              erase_len=10, retain_len=10, fluency_len=14, pad_id=1, object_ids=OBJECTS)


def test_batch_alignment(base):
    batch = _batch()
    got = np.asarray(elm.aligned_logits(base, batch["expert"], batch["expert_index"]))
    for i in range(2):
        n = int(batch["erase_valid"][i].sum())
        x = batch["erase"][i, :n]
        direct = np.asarray(base.run(np.concatenate([[0, 5, 6, 7], x[1:]])[None]).logits[0])  # c+ then x
        np.testing.assert_allclose(got[i, :n], direct[3:3 + n], atol=1e-5)
    m = batch["fluency_mask"]
    for i in range(2):  # positions whose next token is one of the 4 appended tokens
        start = int(batch["erase_valid"][i].sum())
        assert list(np.nonzero(m[i])[0]) == list(range(start - 1, start + 3))
    # template mask: position t predicts erase[t + 1], which exists and is not an object
    for i in range(2):
        x = list(batch["erase"][i, : int(batch["erase_valid"][i].sum())])
        want = [t for t in range(len(x) - 1) if x[t + 1] not in OBJECTS]
        assert list(np.nonzero(batch["erase_template_mask"][i])[0]) == want


def test_template_term_equals_direct_computation(base):
    """The template term is the argmax cross-entropy to the frozen model on erase text, averaged
    over the positions that predict a non-object token."""
    lm = lora.init(base, lora.LoraConfig(rank=2, dropout=0.0), key=1)
    adapters = lm.lora.replace({k: {"A": v["A"], "B": v["B"] + 0.05} for k, v in lm.lora.weights.items()})
    data = _batch(seed=3)
    batch = {k: jnp.asarray(v) for k, v in data.items()}
    got = float(jax.jit(lambda a: elm.elm_losses(a, base, batch, jax.random.PRNGKey(0), ECFG)["template"])(adapters))
    student = lora.merge(lora.combine(adapters, base))
    nll = []
    for i in range(2):
        x = data["erase"][i, : int(data["erase_valid"][i].sum())]
        t_lp = _np_log_softmax(np.asarray(base.run(x[None]).logits[0], np.float64))
        s_lp = _np_log_softmax(np.asarray(student.run(x[None]).logits[0], np.float64))
        nll += [-s_lp[t, t_lp[t].argmax()] for t in range(len(x) - 1) if x[t + 1] not in OBJECTS]
    np.testing.assert_allclose(got, np.mean(nll), rtol=1e-4)
    assert "template" not in jax.eval_shape(lambda a: elm.elm_losses(a, base, batch, jax.random.PRNGKey(0),
                                                                    elm.ElmConfig.tiny()), adapters)


@pytest.mark.parametrize("term", ["erase", "retain", "fluency", "template"])
def test_gradients_only_into_lora(base, term):
    lm = lora.init(base, lora.LoraConfig(rank=2, dropout=0.0), key=1)
    w = {k: {"A": v["A"], "B": v["B"] + 0.05} for k, v in lm.lora.weights.items()}
    adapters = lm.lora.replace(w)
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    key = jax.random.PRNGKey(0)

    def f(adapters, student_base, teacher):
        return elm.elm_losses(adapters, student_base, batch, key, ECFG, teacher=teacher)[term]

    g_ad, g_base, g_teacher = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(adapters, base, base)
    for leaf in jax.tree_util.tree_leaves((g_base, g_teacher)):
        assert not np.any(np.asarray(leaf))
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree_util.tree_leaves(g_ad))
    if term == "erase":  # the training step differentiates the adapters only: its gradient tree is the adapter tree
        grads = jax.eval_shape(jax.grad(lambda a: elm.elm_loss(a, base, batch, key, ECFG)[0]), adapters)
        assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(adapters)


def test_guided_generate_matches_loop(base):
    rng = np.random.default_rng(1)
    prompts = [[0] + list(rng.integers(3, 61, n)) for n in (4, 6)]
    cplus, cminus = [0, 5, 6], [0, 8]
    n_new, g = 5, 2.0
    buf, _ = elm.pad_batch(prompts, 12, pad_id=1)
    ebuf, _ = elm.pad_batch([cplus + p[1:] for p in prompts], 14, pad_id=1)
    nbuf, _ = elm.pad_batch([cminus + p[1:] for p in prompts], 14, pad_id=1)
    lens = np.array([len(p) for p in prompts])
    key = jax.random.PRNGKey(3)
    fn = lambda t: base.run(t).logits
    got = np.asarray(elm.guided_generate(fn, jnp.asarray(buf), jnp.asarray(lens), n_new, key, guidance=g,
                                         expert=jnp.asarray(ebuf), expert_lens=jnp.asarray(lens + 2),
                                         novice=jnp.asarray(nbuf), novice_lens=jnp.asarray(lens + 1)))
    # plain loop: unpadded sequences, one row at a time, the same per-step keys
    lp = lambda seq: _np_log_softmax(np.asarray(base.run(np.asarray(seq)[None]).logits[0, -1], np.float64))
    for i, p in enumerate(prompts):
        seq = list(p)
        for s in range(n_new):
            guided = lp(seq) - g * (lp(cplus + seq[1:]) - lp(cminus + seq[1:]))
            logits_all = np.stack([guided if r == i else np.zeros_like(guided) for r in range(2)])
            tok = int(jax.random.categorical(jax.random.fold_in(key, s), jnp.asarray(logits_all, jnp.float32))[i])
            seq.append(tok)
        assert seq[len(p):] == list(got[i])


def _train(lm, loss_fn, data, steps, opt, key, directory=None, step=None, **kw):
    """ELM's training path: the adapters through jaxinterp.train, the frozen base as ``frozen``."""
    step = step or train.make_train_step(train.loss_step(loss_fn, opt))
    state, hist = train.fit(step, train.init_state(lm.lora, opt, key), lambda s: data,
                            train.LoopConfig(steps=steps, save_every=3, quiet=True), directory=directory,
                            frozen=lm.base, log=lambda m: None, **kw)
    return lora.combine(state["params"], lm.base), hist


def test_train_step_learns_and_resumes(base, tmp_path):
    lm = lora.init(base, lora.LoraConfig(rank=2), key=0)
    data = {k: np.asarray(v) for k, v in _batch().items()}
    erase_only = elm.ElmConfig.tiny(eta=3.0, top_k=10, retain_weight=0.0, fluency_weight=0.0)
    _, hist = _train(lm, lambda a, b, batch, k: elm.elm_loss(a, b, batch, k, erase_only), data, 5,
                     optax.adam(5e-3), jax.random.PRNGKey(0))
    assert hist[-1]["erase"] < hist[0]["erase"] - 0.05
    loss_fn = lambda a, b, batch, k: elm.elm_loss(a, b, batch, k, ECFG)
    opt = optax.adamw(ECFG.lr)
    key = jax.random.PRNGKey(0)
    trained, hist = _train(lm, loss_fn, data, 6, opt, key)
    # 3 steps, stop, resume to 6 from the checkpoint == 6 straight steps (bit for bit), same metrics rows
    _train(lm, loss_fn, data, 3, opt, key, tmp_path / "ckpt")
    resumed, hist2 = _train(lm, loss_fn, data, 6, opt, key, tmp_path / "ckpt")
    assert hist2 == hist and [r["step"] for r in hist2] == list(range(1, 7))
    for a, b in zip(jax.tree_util.tree_leaves(trained.lora), jax.tree_util.tree_leaves(resumed.lora)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_data_parallel_mesh_matches_single_device(base):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    lm = lora.init(base, lora.LoraConfig(rank=2), key=0)
    data = {k: np.asarray(v) for k, v in _batch().items()}
    loss_fn = lambda a, b, batch, k: elm.elm_loss(a, b, batch, k, ECFG)
    opt = optax.adamw(ECFG.lr)
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    sharded = train.make_train_step(train.loss_step(loss_fn, opt), NamedSharding(mesh, P()),
                                    NamedSharding(mesh, P("data")))
    a, _ = _train(lm, loss_fn, data, 2, opt, jax.random.PRNGKey(0))
    b, _ = _train(lm, loss_fn, data, 2, opt, jax.random.PRNGKey(0), step=sharded)
    for x, y in zip(jax.tree_util.tree_leaves(a.lora), jax.tree_util.tree_leaves(b.lora)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


def test_config_validation():
    with pytest.raises(ValueError, match="temperature"):
        elm.ElmConfig(temperature=0)
    with pytest.raises(ValueError, match="lora_mode"):
        elm.ElmConfig(lora_mode="fast")


def test_elm_on_facts_gpt_erases_pathogens_keeps_other_domains(tmp_path):
    """On the shipped facts-gpt, a short ELM run through the experiment's own pipeline (corpus,
    guided fluency data, batches, LoRA training) drops the erased domain's 4-choice accuracy
    well below the original's while the kept domains stay close to theirs."""
    if "facts-gpt" not in ji.embedded_models():
        pytest.skip("facts-gpt is not shipped yet")
    from jaxinterp.unlearning import metrics as um
    from jaxinterp.experiments.elm_erase import main as exp
    from jaxinterp.experiments.data.facts_world import load_world_model
    from jaxinterp.experiments.elm_erase.config import ExperimentConfig

    cfg = ExperimentConfig(methods=("elm",), steps=25, batch_size=8, erase_len=32, retain_len=32, n_erase_docs=32,
                           n_retain_docs=48, fluency_new=4,
                           lora=lora.LoraConfig(rank=4, alpha=16.0, dropout=0.0),
                           elm=elm.ElmConfig.tiny(eta=4.0, lr=4e-3))
    base, world = load_world_model("facts-gpt")
    key = jax.random.PRNGKey(0)
    corpus = exp.build_corpus(world, cfg)
    fluency, starts = exp.fluency_data(base, world, corpus, cfg, jax.random.fold_in(key, 5))
    trained, hist, _ = exp.run_method("elm", base, exp.batch_fn(corpus, fluency, starts, world, cfg), cfg,
                                      tmp_path, key)
    assert np.isfinite(hist[-1]["loss"]) and hist[-1]["erase"] < hist[0]["erase"]
    # the run's step count is the experiment's (ElmConfig has none to disagree with it: issue 25 item 5)
    assert [r["step"] for r in hist] == list(range(1, cfg.steps + 1))
    assert not {"steps", "batch_size"} & {f.name for f in dataclasses.fields(elm.ElmConfig)}
    merged = lora.merge(trained)

    def acc(model, domain):
        items = world.multiple_choice(domain)
        return um.mc_accuracy(jax.jit(lambda t: model.run(t).logits), [list(q.prompt.ids) for q in items],
                              [q.choice_ids for q in items], [q.correct for q in items], pad_id=world.pad_id)

    before = {d: acc(base, d) for d in ("pathogens", *corpus["kept"])}
    after = {d: acc(merged, d) for d in before}
    assert before["pathogens"] > 0.8, "facts-gpt should know its pathogen facts before erasure"
    assert after["pathogens"] < 0.5 * before["pathogens"], (before, after)
    for d in corpus["kept"]:
        assert after[d] >= before[d] - 0.1, (d, before, after)


def test_seamlessness_split_matches_direct_computation(base):
    """Continuation NLLs under the scorer, their object / other split and the ratios equal a
    per-sequence numpy computation on the same sampled continuations."""
    from jaxinterp.unlearning import metrics as um

    rng = np.random.default_rng(5)
    prompts = [[0] + list(rng.integers(3, 61, n)) for n in (3, 5, 4)]
    lm = lora.init(base, lora.LoraConfig(rank=2), key=2)
    other = lora.merge(lora.combine(lm.lora.replace({k: {"A": v["A"], "B": v["B"] + 0.2}
                                                     for k, v in lm.lora.weights.items()}), base))
    orig_fn = jax.jit(lambda t: base.run(t).logits)
    erased_fn = jax.jit(lambda t: other.run(t).logits)
    key = jax.random.PRNGKey(4)
    objects = list(range(3, 30))          # about half the vocabulary plays objects
    prefix = [0, 40, 41]                  # scored again after this context (replacing bos)
    got = um.seamlessness(erased_fn, orig_fn, prompts, 6, key, pad_id=1, object_ids=objects, score_prefix=prefix)
    k1, k2 = jax.random.split(key)
    stats, prefixed = {}, {}
    for name, fn, k in (("erased", erased_fn, k1), ("original", orig_fn, k2)):
        gens = um.generate(fn, prompts, 6, k, pad_id=1)
        obj, rest, pre_all, pre_rest = [], [], [], []
        for p, g in zip(prompts, gens):
            seq = np.asarray(p + g)
            lp = _np_log_softmax(np.asarray(base.run(seq[None]).logits[0], np.float64))
            for j in range(len(p), len(seq)):
                (obj if seq[j] in objects else rest).append(-lp[j - 1, seq[j]])
            pseq = np.asarray(prefix + p[1:] + g)
            plp = _np_log_softmax(np.asarray(base.run(pseq[None]).logits[0], np.float64))
            off = len(prefix) - 1
            for j in range(len(p), len(seq)):
                pre_all.append(-plp[j + off - 1, seq[j]])
                if seq[j] not in objects:
                    pre_rest.append(pre_all[-1])
        stats[name] = (np.mean(obj), np.mean(rest), len(obj) / (len(obj) + len(rest)), np.mean(obj + rest))
        prefixed[name] = (np.mean(pre_all), np.mean(pre_rest))
    for name, (o, r, share, allm) in stats.items():
        np.testing.assert_allclose(got[f"nll_obj_{name}"], o, rtol=1e-4)
        np.testing.assert_allclose(got[f"nll_other_{name}"], r, rtol=1e-4)
        np.testing.assert_allclose(got[f"obj_share_{name}"], share)
    np.testing.assert_allclose(got["ppl_erased_gen"], np.exp(stats["erased"][3]), rtol=1e-4)
    np.testing.assert_allclose(got["ppl_ratio"], np.exp(stats["erased"][3] - stats["original"][3]), rtol=1e-4)
    np.testing.assert_allclose(got["ppl_ratio_other"], np.exp(stats["erased"][1] - stats["original"][1]), rtol=1e-4)
    np.testing.assert_allclose(got["prefixed_ppl_ratio"], np.exp(prefixed["erased"][0] - prefixed["original"][0]),
                               rtol=1e-4)
    np.testing.assert_allclose(got["prefixed_ppl_ratio_other"],
                               np.exp(prefixed["erased"][1] - prefixed["original"][1]), rtol=1e-4)
    assert 0 < got["obj_share_erased"] < 1 and got["nll_obj_erased"] != got["nll_other_erased"]


def test_innocent_floor_matches_direct_computation(base):
    """Best-wrong slot NLL and the rescored same-relation swap equal a per-token numpy
    computation; pairs as groups make the swap deterministic (the other member)."""
    from jaxinterp.unlearning import metrics as um

    rng = np.random.default_rng(6)
    prompts = [[0] + list(rng.integers(3, 61, n)) for n in (3, 5, 4, 2)]
    orig_fn = jax.jit(lambda t: base.run(t).logits)
    gens = um.generate(orig_fn, prompts, 8, jax.random.PRNGKey(2), pad_id=1)
    groups = [[i, i + 1] for i in range(3, 43, 2)]            # 20 relations of two objects each
    partner = {a: b for a, b in groups} | {b: a for a, b in groups}
    got = um.innocent_floor(orig_fn, prompts, gens, groups, pad_id=1)

    def token_nll(seq, start):
        lp = _np_log_softmax(np.asarray(base.run(np.asarray(seq)[None]).logits[0], np.float64))
        return lp, [-lp[j - 1, seq[j]] for j in range(start, len(seq))]

    own, best, rand, n_obj = [], [], [], 0
    for p, g in zip(prompts, gens):
        lp, nll = token_nll(p + g, len(p))
        slot = []
        for j, t in enumerate(g):
            if t in partner:
                n_obj += 1
                slot.append(-max(lp[len(p) + j - 1, v] for v in range(lp.shape[1]) if v != t))
            else:
                slot.append(nll[j])
        own.append(np.mean(nll))
        best.append(np.mean(slot))
        rand.append(np.mean(token_nll(p + [partner.get(t, t) for t in g], len(p))[1]))
    assert n_obj > 0
    np.testing.assert_allclose(got["floor_obj_share"], n_obj / sum(len(g) for g in gens))
    np.testing.assert_allclose(got["floor_ratio_best_wrong"], np.exp(np.mean(best) - np.mean(own)), rtol=1e-4)
    np.testing.assert_allclose(got["floor_ratio_random_wrong"], np.exp(np.mean(rand) - np.mean(own)), rtol=1e-4)
    with pytest.raises(ValueError, match="object groups"):
        um.innocent_floor(orig_fn, prompts, gens, [[3, 4], [4, 5]])
    with pytest.raises(ValueError, match="at least two"):
        um.innocent_floor(orig_fn, prompts, gens, [[3]])
