"""The tuned lens: identity start equals the logit lens, translators applied as defined, training
lowers held-out KL-to-final below the logit lens's, safetensors round trip."""

import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp.train import Hook, read_metrics


@pytest.fixture(scope="module")
def model():
    return ji.init(ji.get_family("gpt2").config_cls.tiny(n_layers=3, d_model=32, d_mlp=64, vocab_size=50,
                                                          max_seq_len=16), key=5)


def _tokens(seed, batch=8, seq=12):
    return np.random.default_rng(seed).integers(0, 50, size=(batch, seq))


def test_identity_is_logit_lens_and_translators_apply_as_defined(model):
    tokens = _tokens(0, batch=2)
    lens = ji.lens.TunedLens.identity(model, layers=[0, -2])
    assert lens.layers == (0, 1)
    np.testing.assert_allclose(np.asarray(lens(model, tokens)),
                               np.asarray(ji.lens.logit_lens(model, tokens, layers=[0, 1])), atol=1e-6)
    rng = np.random.default_rng(1)
    w = rng.normal(scale=0.1, size=(2, 32, 32)).astype(np.float32)
    b = rng.normal(scale=0.1, size=(2, 32)).astype(np.float32)
    tuned = ji.lens.TunedLens(family="gpt2", layers=(0, 1), weight=w, bias=b)
    cache = model.run(tokens, capture=["blocks.0.resid_post", "blocks.1.resid_post"]).cache
    for j in range(2):
        h = np.asarray(cache[f"blocks.{j}.resid_post"], np.float64)  # [B, T, D]
        ref = ji.lens.apply_head(model, (h + h @ w[j] + b[j]).astype(np.float32))
        np.testing.assert_allclose(np.asarray(tuned(model, tokens)[j]), np.asarray(ref), atol=1e-5)


def test_training_beats_logit_lens_on_held_out_tokens_and_saves(model, tmp_path):
    train = [_tokens(s) for s in range(4)]
    lens, history = ji.lens.train_tuned_lens(model, train, ji.lens.TunedLensConfig(steps=60, lr=1e-2), layers=[0, 1])
    assert [r["step"] for r in history] == list(range(1, 61))
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    held = _tokens(99)
    final = model.run(held).logits
    kl_logit = np.asarray(ji.lens.kl_to_final(ji.lens.logit_lens(model, held, layers=[0, 1]), final)).mean(axis=(1, 2))
    kl_tuned = np.asarray(ji.lens.kl_to_final(lens(model, held), final)).mean(axis=(1, 2))
    assert np.all(kl_tuned < 0.7 * kl_logit), (kl_tuned, kl_logit)
    path = tmp_path / "lens.safetensors"
    lens.save(path)
    back = ji.lens.TunedLens.load(path)
    assert back.layers == (0, 1) and back.family == "gpt2"
    np.testing.assert_array_equal(np.asarray(back.weight), np.asarray(lens.weight))
    np.testing.assert_array_equal(np.asarray(back(model, held)), np.asarray(lens(model, held)))
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_bad_input(model, tmp_path):
    other = ji.init(ji.get_family("gpt2").config_cls.tiny(n_layers=1, d_model=16, vocab_size=50), key=0)
    lens = ji.lens.TunedLens.identity(model, layers=[2])
    with pytest.raises(ValueError, match="trained for a gpt2 model with d_model 32"):
        lens(other, _tokens(0))
    with pytest.raises(ValueError, match=r"layers must be ints in \[-3, 3\)"):
        ji.lens.TunedLens.identity(model, layers=[3])
    with pytest.raises(ValueError, match="steps must be a positive int"):
        ji.lens.TunedLensConfig(steps=0)
    ji.hf.write_safetensors(tmp_path / "x.safetensors", {"w": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="not a tuned lens"):
        ji.lens.TunedLens.load(tmp_path / "x.safetensors")


class Killed(Exception):
    pass


def test_killed_training_resumes_from_its_checkpoint_bit_identical(model, tmp_path):
    train = [_tokens(s) for s in range(2)]
    cfg = ji.lens.TunedLensConfig(steps=8, lr=1e-2, save_every=3)
    quiet = dict(layers=[0, 1], log=lambda m: None)
    straight, rows = ji.lens.train_tuned_lens(model, train, cfg, directory=tmp_path / "a", **quiet)

    def die(step, state, metrics):
        if step == 7:
            raise Killed  # after checkpoint 6, with row 6 logged and row 7 not
    with pytest.raises(Killed):
        ji.lens.train_tuned_lens(model, train, cfg, directory=tmp_path / "b", hooks=[Hook(1, die)], **quiet)
    assert [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    logs = []
    resumed, again = ji.lens.train_tuned_lens(model, train, cfg, directory=tmp_path / "b", layers=[0, 1],
                                              log=logs.append)
    assert f"resumed from step 6 ({tmp_path / 'b'})" in logs
    np.testing.assert_array_equal(np.asarray(resumed.weight), np.asarray(straight.weight))
    np.testing.assert_array_equal(np.asarray(resumed.bias), np.asarray(straight.bias))
    assert again == rows and [r["step"] for r in rows] == list(range(1, 9))
    with pytest.raises(ValueError, match=r"lens\.lr: 0\.01 -> 0\.02"):
        ji.lens.train_tuned_lens(model, train, ji.lens.TunedLensConfig(steps=8, lr=2e-2), directory=tmp_path / "b",
                                 **quiet)
    _, longer = ji.lens.train_tuned_lens(model, train, ji.lens.TunedLensConfig(steps=9, lr=1e-2, save_every=3),
                                         directory=tmp_path / "b", **quiet)  # a resume may train longer
    assert [r["step"] for r in longer] == list(range(1, 10)) and longer[:8] == rows
