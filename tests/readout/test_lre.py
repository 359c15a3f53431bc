"""Linear relational embeddings (jaxinterp.readout.lre) against direct computations: the Jacobians
against central finite differences of plain runs (float64), faithfulness and causality against a
per-prompt loop of unpadded runs, and the one-line refusals."""

import jax
import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp.readout import lre

V = 40
LENGTHS = (6, 4, 6, 6)  # row 1 is left-padded to 6
SUBJECT = (2, 3, 2, 4)  # the subject's last token in each padded row


def _model(kind: str, dtype="float32"):
    fam = ji.get_family(kind)
    small = dict(vocab_size=V, d_model=32, n_layers=2)
    cfg = fam.config_cls.tiny(**small, **({"n_heads": 4, "d_mlp": 64} if kind == "gpt2" else {"d_state": 4}))
    return ji.init(cfg, key=1, dtype=dtype)


def _batch():
    rng = np.random.default_rng(0)
    tokens = np.zeros((len(LENGTHS), max(LENGTHS)), np.int32)
    mask = np.zeros(tokens.shape, bool)
    for row, n in enumerate(LENGTHS):
        tokens[row, -n:], mask[row, -n:] = rng.integers(1, V, n), True
    return tokens, mask, np.array(SUBJECT)


def _unpadded(tokens, mask, row):
    """Row ``row`` alone, without padding, and its subject position there."""
    pad = int((~mask[row]).sum())
    return tokens[row:row + 1, pad:], SUBJECT[row] - pad


def _final_state_fn(model, toks, pos, layer):
    """F as a plain (jitted) run: a callable sets the subject state, the last position's final state is read."""
    site, out = f"blocks.{layer}.resid_pre", f"blocks.{model.config.n_layers - 1}.resid_post"
    return jax.jit(lambda s: model.run(toks, capture=out, interventions={site: lambda x: x.at[0, pos].set(s)}
                                       ).cache[out][0, -1])


@pytest.mark.parametrize("kind", ["gpt2", "mamba"])
def test_jacobians_match_finite_differences(kind):
    """Each row's Jacobian of the padded batch equals central differences of that row run alone.

    float32 (Mamba keeps its residual stream in float32, attention softmaxes in float32, whatever the
    parameters' dtype): differences at eps=1e-2 carry ~1e-5 of rounding (1e-7 x |o| / 2 eps) and
    ~1e-5 of truncation (eps^2 x the third derivative); the check allows 2% of the column's largest
    entry (1e-3..5e-2 here) + 1e-6. A wrong row, position or layer errs by the entries' own size."""
    tokens, mask, pos = _batch()
    model = _model(kind)
    jac, st = lre.jacobians(model, tokens, pos, layer=1, attention_mask=mask)
    assert jac.shape == (4, 32, 32)
    eps = 1e-2
    for row in (1,):  # a padded row
        toks, p = _unpadded(tokens, mask, row)
        final, s = _final_state_fn(model, toks, p, 1), np.asarray(st.s[row])
        np.testing.assert_allclose(final(s), st.o[row], atol=1e-5)
        for k in (0, 19):
            e = np.zeros_like(s)
            e[k] = eps
            fd = (np.asarray(final(s + e)) - np.asarray(final(s - e))) / (2 * eps)
            np.testing.assert_allclose(np.asarray(jac[row, :, k]), fd, atol=0.02 * np.abs(fd).max() + 1e-6)
            assert np.abs(fd).max() > 1e-3  # the map is not trivially constant
    op = lre.estimate(model, tokens, pos, layer=1, n=4, beta=2.5, attention_mask=mask)
    j = np.asarray(jac, np.float64)
    np.testing.assert_allclose(op.weight, j.mean(0), atol=1e-6)
    np.testing.assert_allclose(op.bias, (np.asarray(st.o) - np.einsum("nij,nj->ni", j, st.s)).mean(0), atol=1e-5)


@pytest.fixture(scope="module")
def gpt():
    return _model("gpt2")


def _gpt2_head(model, o: np.ndarray) -> np.ndarray:
    """GPT-2's final LayerNorm and tied unembedding, written out in numpy (float64)."""
    p = model.params
    h = (o - o.mean()) / np.sqrt(o.var() + model.config.arch.norm_eps)
    h = h * np.asarray(p["final_norm"]["scale"], np.float64) + np.asarray(p["final_norm"]["bias"], np.float64)
    return np.asarray(p["embed"], np.float64) @ h  # [V]


def _grouped_runs(tokens, run_rows):
    """Plain runs without padding, rows of one length together: ``{row: (output of its run, index in it)}``.
    ``run_rows(tokens [k, n], rows, subject positions)`` runs one group."""
    out = {}
    for n in sorted(set(LENGTHS)):
        rows = [r for r, m in enumerate(LENGTHS) if m == n]
        pad = max(LENGTHS) - n
        res = run_rows(tokens[rows, pad:], rows, np.array([SUBJECT[r] - pad for r in rows]))
        out.update({r: (res, i) for i, r in enumerate(rows)})
    return out


def test_faithfulness_and_causality_match_a_direct_loop(gpt):
    tokens, mask, pos = _batch()
    layer, n_last = 0, gpt.config.n_layers - 1
    op = lre.estimate(gpt, tokens, pos, layer=layer, n=4, attention_mask=mask)
    w, b = np.asarray(op.weight, np.float64), np.asarray(op.bias, np.float64)
    u, sv, vt = np.linalg.svd(w)
    rank, targets = 8, np.array([1, 2, 3, 0])
    pinv = vt[:rank].T @ np.diag(1 / sv[:rank]) @ u[:, :rank].T
    site, out = f"blocks.{layer}.resid_pre", f"blocks.{n_last}.resid_post"
    runs = _grouped_runs(tokens, lambda t, rows, p: (gpt.run(t, capture=[site, out]), p))
    s, o, pred = [], [], []
    for r in range(4):
        (res, p), i = runs[r]
        s.append(np.asarray(res.cache[site][i, p[i]], np.float64))
        o.append(np.asarray(res.cache[out][i, -1], np.float64))
        pred.append(int(np.argmax(res.logits[i, -1])))
    np.testing.assert_allclose(_gpt2_head(gpt, o[0]), runs[0][0][0].logits[runs[0][1], -1], atol=1e-4)  # the head
    st = lre.states(gpt, tokens, pos, layer=layer, attention_mask=mask)
    hits = []
    for beta in (1.0, 3.0):
        logits = np.asarray(lre.predict(gpt, op.with_beta(beta), st.s))
        want = []
        for r in range(4):
            ref = _gpt2_head(gpt, beta * w @ s[r] + b)
            np.testing.assert_allclose(logits[r], ref, atol=1e-3)
            want.append(int(np.argmax(ref)) == pred[r])
        got = np.asarray(lre.faithfulness(gpt, op.with_beta(beta), tokens, pos, attention_mask=mask))
        assert got.tolist() == want, beta
        hits += want
    assert 0 < sum(hits) < len(hits)  # both outcomes occur, so the comparison can fail

    def edited(t, rows, p):  # each row's subject state moved by its own delta
        delta = np.stack([pinv @ (o[targets[r]] - o[r]) for r in rows]).astype(np.float32)  # [rows, D]
        return gpt.run(t, interventions={site: lambda x: x.at[np.arange(len(rows)), p].add(delta)}).logits

    runs = _grouped_runs(tokens, edited)
    want = [int(np.argmax(runs[r][0][runs[r][1], -1])) == pred[targets[r]] for r in range(4)]
    got = lre.causality(gpt, op, tokens, pos, targets, rank=rank, attention_mask=mask)
    assert np.asarray(got).tolist() == want


def test_bad_input_one_line_errors(gpt):
    tokens, mask, pos = _batch()
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 2\) for this 2-layer model.*got 2$"):
        lre.estimate(gpt, tokens, pos, layer=2, n=2, attention_mask=mask)
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 2\).*got -1$"):
        lre.states(gpt, tokens, pos, layer=-1, attention_mask=mask)
    with pytest.raises(ValueError, match=r"^the relation has 4 example prompts, fewer than n=5 needed"):
        lre.estimate(gpt, tokens, pos, layer=0, n=5, attention_mask=mask)
    with pytest.raises(ValueError, match="prompts must be left-padded"):
        lre.states(gpt, tokens, pos, layer=0, attention_mask=mask[:, ::-1])
    with pytest.raises(ValueError, match="subject_pos points at padding"):
        lre.states(gpt, tokens, np.array([2, 0, 2, 4]), layer=0, attention_mask=mask)
    op = lre.LRE(weight=np.eye(32, dtype=np.float32), bias=np.zeros(32, np.float32))
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, 32\], got 33"):
        op.inverse(33)
    np.testing.assert_allclose(op.inverse(32), np.eye(32), atol=1e-6)


def test_lre_command_refuses_bad_settings(tmp_path, capsys):
    from jaxinterp.experiments.lre.main import main

    assert main(["--set", "models=facts-mamba", "n=16", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "n=16 leaves no held-out subjects" in err, err
    assert main(["--set", "relations=lives_in,nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown relations ['nope']" in err, err
