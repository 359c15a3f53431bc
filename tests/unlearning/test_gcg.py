"""GCG-style suffix search: exact candidate scoring against a per-candidate loop, monotone best-so-far."""

import jax
import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp.models.gpt2 import GPT2Config
from jaxinterp.unlearning import attacks as ua

CFG = GPT2Config.tiny(vocab_size=37, max_seq_len=32, n_layers=2)
BOS, PAD = 1, 0
FORWARD = jax.jit(lambda model, tokens: model.run(tokens).logits)   # one compile per prompt length


@pytest.fixture(scope="module")
def setup():
    model = ji.init(CFG, 0)
    # planted target: token 7's embedding (tied to its unembedding) scaled up, so a suffix ending in 7
    # makes 7 the likely next token (the residual at the last position carries its own token's embedding)
    params = dict(model.params)
    params["embed"] = params["embed"].at[7].multiply(4.0)
    model = model.replace(params=params)
    rng = np.random.default_rng(4)
    prompts = [[BOS] + rng.integers(3, 37, n).tolist() for n in (3, 5, 4, 6)]   # different lengths: padding
    answers = [7, 7, 7, 7]                                                      # the planted target
    return model, prompts, answers


def _direct(model, prompts, answers, suffix, placement):
    """Mean log p(answer) of each unpadded prompt with the suffix placed, one forward per prompt."""
    out = []
    for p, a in zip(prompts, answers):
        seq = np.asarray([ua.with_suffix(p, suffix, placement)], np.int32)
        logits = FORWARD(model, seq)[0, -1]
        out.append(float(jax.nn.log_softmax(logits)[a]))
    return float(np.mean(out))


@pytest.mark.parametrize("placement", ua.PLACEMENTS)
def test_candidate_scores_match_plain_loop(setup, placement):
    model, prompts, answers = setup
    cands = np.random.default_rng(1).integers(2, 37, (3, 3)).astype(np.int32)
    parts = ua._parts(prompts, placement, PAD)
    batched = np.asarray(ua._score_candidates(model, parts, cands, np.asarray(answers, np.int32)))
    loop = [_direct(model, prompts, answers, c.tolist(), placement) for c in cands]
    np.testing.assert_allclose(batched, loop, rtol=1e-4, atol=1e-5)


def test_search_improves_monotonically(setup):
    model, prompts, answers = setup
    cfg = ua.GCGConfig(suffix_len=3, iterations=6, candidates=16, top_k=8)
    res = ua.gcg_suffix(model, prompts, answers, cfg, allowed=range(2, 37), placement="suffix", pad_id=PAD)
    hist = np.asarray(res.history)
    assert len(hist) == cfg.iterations + 1
    assert np.all(np.diff(hist) >= 0)                                   # best-so-far never worse
    assert hist[-1] > hist[0] + 1.0 and res.suffix[-1] == 7             # the planted target is found
    assert min(res.suffix) >= 2                                         # only allowed tokens
    assert res.objective == pytest.approx(_direct(model, prompts, answers, res.suffix, "suffix"), abs=1e-4)


def test_bad_input_is_refused(setup):
    model, prompts, answers = setup
    with pytest.raises(ValueError, match="placement"):
        ua.gcg_suffix(model, prompts, answers, placement="middle")
    with pytest.raises(ValueError, match="one answer per prompt"):
        ua.gcg_suffix(model, prompts, answers[:2])
    with pytest.raises(ValueError, match="suffix_len"):
        ua.GCGConfig(suffix_len=0)
