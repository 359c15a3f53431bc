"""Token erasure (Feucht et al., 2024): the erasure score and Algorithm 1's segmentation on hand-built
documents whose answers are worked out by hand below; the vectorised score against a plain loop; the
probes against a direct softmax, trained by ``fit`` and resumed bit-identically; bad input in one line;
the experiment's ground truth against the facts world and its run end to end."""

import json

import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp.readout import erasure as er

NAN = np.nan


def _unit_doc():
    """Six tokens; token 4 forgets itself (0.6) and token 3 (0.9) between the two layers; nothing else
    changes. Columns: delta(t, 0), delta(t, -1), delta(t, -2); NaN where t - i < 0."""
    delta = np.zeros((6, 3))
    delta[0, 1:] = NAN
    delta[1, 2] = NAN
    delta[4, 0], delta[4, 1] = 0.6, 0.9
    return delta


# psi by hand (terms: delta(q, 0), then +-delta(t, -1), +-delta(t, -2) for t = p..q; "-" when t - i < p):
HAND = {
    (3, 5): (0.6 + (-0 - 0) + (0.9 - 0)) / 5,            # tokens 3-4: 0.3, the unit
    (4, 5): (0.6 + (-0.9 - 0)) / 3,                       # token 4 alone: it erased a token before it
    (2, 5): (0.6 + (-0 - 0) + (0 - 0) + (0.9 + 0)) / 7,   # 1.5 / 7
    (4, 6): (0.0 + (-0.9 - 0) + (0 - 0)) / 5,             # 4-5: token 4 still erased token 3, outside
    (3, 6): (0.0 + (-0 - 0) + (0.9 - 0) + (0 + 0)) / 7,   # 0.9 / 7
    (0, 5): (0.6 + 0 + (0 + 0) + (0 + 0) + (0.9 + 0)) / 8,  # delta(0, -1/-2), delta(1, -2) do not exist
    (0, 1): 0.0 / 1,                                      # BOS alone: only delta(0, 0)
    (1, 2): (0.0 - 0) / 2,
}


@pytest.mark.parametrize("span", list(HAND))
def test_span_score_by_hand(span):
    assert er.span_score(_unit_doc(), *span) == pytest.approx(HAND[span], abs=1e-12)


def test_segmentation_by_hand():
    # best span: [3, 5) (0.3 beats 1.5/7 and 1.5/8); every other span left scores 0, so ties go to the
    # earlier start, then the shorter span: the rest become single tokens
    assert [(a, b) for a, b, _ in er.segment(_unit_doc(), max_len=4)] == [(0, 1), (1, 2), (2, 3), (3, 5), (5, 6)]
    assert er.segment(_unit_doc(), max_len=4)[3][2] == pytest.approx(0.3)
    assert [(a, b) for a, b, _ in er.segment(_unit_doc(), max_len=1)] == [(t, t + 1) for t in range(6)]
    # a 3-token unit 1..3: token 3 forgets itself (0.5) and tokens 2 (0.8) and 1 (0.7); token 1 keeps token 0
    # better at the later layer (delta(1, -1) = -0.2), so a span holding tokens 0 and 1 is penalised
    delta = np.zeros((5, 3))
    delta[0, 1:] = NAN
    delta[1, 2] = NAN
    delta[1, 1] = -0.2
    delta[3] = [0.5, 0.8, 0.7]
    # [1, 4): (0.5 + (+0.2 + nan) + (0 - 0) + (0.8 + 0.7)) / (1 + 1 + 2 + 2) = 2.2 / 6
    assert er.span_score(delta, 1, 4) == pytest.approx(2.2 / 6)
    # [0, 4): (0.5 + (nan) + (-0.2) + (0 + 0) + (0.8 + 0.7)) / 6 = 0.3; [2, 4): (0.5 - 0 - 0 + 0.8 - 0.7) / 5
    assert er.span_score(delta, 0, 4) == pytest.approx(0.3)
    assert er.span_score(delta, 2, 4) == pytest.approx(0.12)
    # [1, 5): (0 + 0.2 + 0 + 1.5 + 0) / 8 = 0.275 < 2.2 / 6: the unit is kept whole, the rest single tokens
    for max_len in (3, 4):
        assert [(a, b) for a, b, _ in er.segment(delta, max_len=max_len)] == [(0, 1), (1, 4), (4, 5)]


def test_span_scores_match_a_plain_loop():
    rng = np.random.default_rng(0)
    delta = rng.normal(size=(9, 3))
    delta[0, 1:], delta[1, 2] = NAN, NAN
    table = er.span_scores(delta, 5)
    for p in range(9):
        for n in range(1, 6):
            want = er.span_score(delta, p, p + n) if p + n <= 9 else NAN
            np.testing.assert_allclose(table[p, n - 1], want, atol=1e-12)


def test_read_out_and_frequency_baseline():
    unit = _unit_doc()
    docs = [([7, 1, 2, 5, 6, 3], unit), ([7, 4, 4, 5, 6, 3], unit), ([7, 1, 2, 3, 4, 5], np.zeros((6, 3)))]
    vocab = er.read_out(docs, max_len=4)
    assert vocab == [er.VocabEntry((5, 6), 2, pytest.approx(0.3))]  # the third document has no erasure
    grams = er.frequent_ngrams([d for d, _ in docs], lengths=(2, 3), k=3, exclude=(7,))
    # bigrams seen twice: (1, 2), (4, 5), (5, 6), (6, 3); the trigram (5, 6, 3) twice too, but longer ranks later
    assert grams == [((1, 2), 2), ((4, 5), 2), ((5, 6), 2)]


@pytest.fixture(scope="module")
def tiny():
    model = ji.load("facts-gpt")  # 4 layers: loading is cheaper than initialising a random one
    tokens = np.random.default_rng(1).integers(0, 23, (4, 7)).astype(np.int32)
    return model, tokens, np.array([7, 5, 6, 2])


def test_bad_input_is_one_line(tiny):
    delta = _unit_doc()
    with pytest.raises(ValueError, match=r"span \[2, 9\) \(7 tokens\) does not fit the document of 6 tokens: "
                                         r"valid spans are 0 <= start < end <= 6"):
        er.span_score(delta, 2, 9)
    with pytest.raises(ValueError, match=r"max_len 7 does not fit the document of 6 tokens: valid 1..6"):
        er.span_scores(delta, 7)
    model = tiny[0]
    with pytest.raises(ValueError, match=r"layer 5 is outside the model: hidden layers are 0..4"):
        er.hidden_sites(model, [0, 5])
    cfg = er.ProbeConfig(layers=(0, 2))
    with pytest.raises(ValueError, match=r"layer 1 was not probed; probed layers: \[0, 2\]"):
        er.erasure_deltas(np.zeros((4, 2, 5)), cfg, early=1, late=2)
    with pytest.raises(ValueError, match="late layer"):
        er.erasure_deltas(np.zeros((4, 2, 5)), cfg, early=2, late=0)
    with pytest.raises(ValueError, match="distinct"):
        er.ProbeConfig(layers=(1, 1))


def test_hidden_states_and_labels_against_direct_reads(tiny):
    model, tokens, lengths = tiny
    acts = er.hidden_states(model, tokens, [0, 2], batch=2)  # [N, T, 2, D], two chunks of one shape
    cache = model.run(tokens, capture=["blocks.0.resid_pre", "blocks.1.resid_post"]).cache  # all 4 layers run
    np.testing.assert_allclose(acts[:, :, 0], cache["blocks.0.resid_pre"], atol=1e-6)
    np.testing.assert_allclose(acts[:, :, 1], cache["blocks.1.resid_post"], atol=1e-6)
    labels = er.offset_labels(tokens, lengths, er.OFFSETS)
    for n in range(4):
        for t in range(7):
            for j, i in enumerate(er.OFFSETS):
                inside = t < lengths[n] and 0 <= t + i < lengths[n]
                assert labels[n, t, j] == (tokens[n, t + i] if inside else -1)


def _probe_data(m=96, layers=2, d=8, vocab=11, offsets=3):
    rng = np.random.default_rng(2)
    labels = rng.integers(0, vocab, (m, offsets)).astype(np.int32)
    labels[:5, 0] = -1
    acts = rng.normal(size=(m, layers, d)).astype(np.float32)
    acts[:, :, 0] += labels[:, :1]  # something to learn
    return acts, labels


def test_probe_probabilities_and_loss_against_a_direct_softmax():
    acts, labels = _probe_data()
    cfg = er.ProbeConfig(layers=(0, 3), offsets=(-1, 0, 1))
    w = np.random.default_rng(3).normal(size=(2, 3, 8, 11)).astype(np.float32)
    prob, correct = er.probe_targets({"w": w}, acts, labels, chunk=40)
    losses = np.zeros((2, 3))
    for l in range(2):
        for o in range(3):
            logits = acts[:, l].astype(np.float64) @ w[l, o]  # [M, V]
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            ok = labels[:, o] >= 0
            np.testing.assert_allclose(prob[ok, l, o], p[ok, labels[ok, o]], rtol=1e-4, atol=1e-7)
            assert np.isnan(prob[~ok, l, o]).all() and not correct[~ok, l, o].any()
            np.testing.assert_array_equal(correct[ok, l, o], p[ok].argmax(1) == labels[ok, o])
            losses[l, o] = -np.log(p[ok, labels[ok, o]]).mean()
    assert float(er.probe_loss({"w": w}, acts, labels)) == pytest.approx(losses.mean(), rel=1e-5)
    assert cfg.layer_index(3) == 1


def test_probes_train_with_fit_and_resume_bit_identically(tmp_path):
    acts, labels = _probe_data()
    cfg = er.ProbeConfig(layers=(0, 3), offsets=(-1, 0, 1), steps=8, batch_size=32, lr=0.05)
    whole, rows = er.train_probes(acts, labels, 11, cfg, directory=tmp_path / "a")
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["step"] == 8
    er.train_probes(acts, labels, 11, er.ProbeConfig(**{**cfg.__dict__, "steps": 4}), directory=tmp_path / "b")
    resumed, rows_b = er.train_probes(acts, labels, 11, cfg, directory=tmp_path / "b")
    np.testing.assert_array_equal(np.asarray(whole["w"]), np.asarray(resumed["w"]))
    assert [r["step"] for r in rows_b] == [r["step"] for r in rows]
    with pytest.raises(ValueError, match="expected acts"):
        er.train_probes(acts[:, :1], labels, 11, cfg)


# ----------------------------------------------------------------------------- the experiment


def test_ground_truth_units_are_the_world_entity_names(tiny):
    from jaxinterp.experiments.data.facts_world import FactsWorld
    from jaxinterp.experiments.token_erasure.main import tokenize
    from jaxinterp.loading import embedded_dir

    model = tiny[0]
    world = FactsWorld.from_dir(embedded_dir("facts-gpt"))
    texts = world.documents(6, seed=3)
    names = [e.name for e in world.entities]
    docs = tokenize(model.tokenizer, texts, names, 40)
    for d, text in enumerate(texts):
        ids = [world.bos_id] + world.encode(text)
        n = int(docs.lengths[d])
        assert list(docs.tokens[d, :n]) == ids[:n] and n <= 40
        # reference: every occurrence of a name's words, found in the word list directly
        words = text.split()
        want = sorted((i + 1, i + 1 + len(nm.split())) for nm in names for i in range(len(words))
                      if words[i:i + len(nm.split())] == nm.split() and i + 1 + len(nm.split()) <= n)
        got = sorted((a, b) for dd, a, b, is_name in docs.units() if dd == d and is_name)
        assert got == want and len(want) > 0
        assert all(is_name for dd, *_, is_name in docs.units() if dd == d)  # word-level: only names split
        # a cut never splits a name
        assert n == len(ids) or docs.last[d, n - 1]


def test_token_erasure_run_end_to_end(tmp_path):
    from jaxinterp.experiments.token_erasure.main import main

    out = tmp_path / "run"
    assert main(["--preset", "smoke", "--set", "train_docs=8", "eval_docs=6", "seq_len=24", "steps=10",
                 "layers=0,1,4", "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["layers"] == [0, 1, 4] and r["early"] == 1 and r["late"] == 4
    assert len(r["accuracy"]["last"]) == 3 and len(r["accuracy"]["last"][0]) == 5
    for key in ("readout", "frequency_baseline"):
        assert 0 <= r[key]["precision"] <= 1 and r[key]["entries"] == r["readout"]["entries"]
    assert r["probe_loss_last"] < r["probe_loss_first"]
    assert (out / "erasure.png").stat().st_size > 0 and (out / "readout.png").stat().st_size > 0
    assert main(["--set", "layers=0,7", "--out", str(tmp_path / "bad")]) == 2


def test_ground_truth_units_with_a_subword_tokenizer():
    """With a tokenizer that splits words (a small BPE trained here), every multi-token unit decodes to one
    word of the document or one entity name, and names are found whole."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

    from jaxinterp.experiments.data.facts_world import FactsWorld
    from jaxinterp.experiments.token_erasure.main import tokenize
    from jaxinterp.loading import embedded_dir
    from jaxinterp.tokenizer import Tokenizer

    world = FactsWorld.from_dir(embedded_dir("facts-gpt"))
    texts = world.documents(20, seed=3)
    backend = Backend(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=120, special_tokens=["<s>", "<unk>"]))
    tok = Tokenizer(backend, bos="<s>", add_bos=True)
    names = {e.name for e in world.entities}
    docs = tokenize(tok, texts[:4], sorted(names), 400)
    units = docs.units()
    assert any(not is_name for *_, is_name in units)  # words split into several tokens
    for d, a, b, is_name in units:
        text = tok.decode(docs.tokens[d, a:b]).strip()
        assert (text in names) if is_name else (text in texts[d].split() and text not in names)
    n_names = sum(is_name for *_, is_name in units)
    assert n_names == sum(texts[d].count(nm) for d in range(4) for nm in names)
