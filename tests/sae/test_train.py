"""Trainer: vmapped grid == separate runs, p-annealing schedule and continuity, constrained decoder,
bit-identical resume after SIGKILL."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp.sae import Hparams, SAETrainConfig, SAETrainer, init_sae, unstack
from jaxinterp.sae.families import lp_penalty
from jaxinterp.sae.train import anneal_update

D, F = 8, 24


def batch_fn(t, n=64):
    r = np.random.default_rng(1000 + t)
    dirs = np.random.default_rng(0).normal(size=(F, D))
    f = (r.random((n, F)) < 0.1) * r.random((n, F))
    return (f @ dirs + 0.05 * r.normal(size=(n, D)) + 0.3).astype(np.float32)


SAMPLE = np.concatenate([batch_fn(-i) for i in range(1, 5)])


@pytest.mark.parametrize("family,grid", [
    ("relu", [{"sparsity_coeff": 0.01, "seed": 0}, {"sparsity_coeff": 0.1, "seed": 1}, {"lr": 3e-3, "seed": 2}]),
    ("topk", [{"k": 2, "seed": 0}, {"k": 5, "seed": 3}]),
    ("panneal", [{"sparsity_coeff": 0.05, "p_end": 0.5}, {"sparsity_coeff": 0.02, "p_end": 0.2, "seed": 4}]),
])
def test_vmapped_grid_equals_separate_runs(family, grid):
    cfg = SAETrainConfig(family=family, d_in=D, d_sae=F, steps=12, lr=1e-3, lr_warmup_steps=3, anneal_start=4,
                         n_anneal_points=3, sparsity_warmup_steps=5, dead_tokens=128, aux_k=4, k=4)
    trainer = SAETrainer({"g": (cfg, grid)})
    states, _ = trainer.fit(trainer.init(SAMPLE), batch_fn, progress=False)
    for i, override in enumerate(grid):
        alone = SAETrainer({"g": (cfg, [override])})
        single, _ = alone.fit(alone.init(SAMPLE), batch_fn, progress=False)
        a, b = unstack(states["g"], i), unstack(single["g"], 0)
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
            np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6, err_msg=f"{family}[{i}] {path}")


def test_a_family_trains_the_same_whichever_families_run_beside_it():
    """Families share only the batches: relu trained alone equals relu trained with topk and gated."""
    base = dict(d_in=D, d_sae=F, steps=12, lr=1e-3, lr_warmup_steps=3, dead_tokens=128, aux_k=4)
    relu = (SAETrainConfig(family="relu", **base), [{"sparsity_coeff": 0.05}, {"sparsity_coeff": 0.2, "seed": 1}])
    others = {"t": (SAETrainConfig(family="topk", k=3, **base), [{"seed": 5}]),
              "g": (SAETrainConfig(family="gated", sparsity_coeff=0.1, **base), [{"seed": 6}])}
    alone, together = SAETrainer({"r": relu}), SAETrainer({"r": relu, **others})
    a, _ = alone.fit(alone.init(SAMPLE), batch_fn, progress=False)
    b, _ = together.fit(together.init(SAMPLE), batch_fn, progress=False)
    assert set(b) == {"r", "t", "g"}
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a["r"]), jax.tree_util.tree_leaves(b["r"]),
                            strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7, err_msg=str(path))


def test_decoder_rows_stay_unit_norm_and_training_reduces_mse():
    cfg = SAETrainConfig(family="relu", d_in=D, d_sae=F, steps=60, lr=3e-3, sparsity_coeff=0.01, lr_warmup_steps=1)
    trainer = SAETrainer({"r": (cfg, [{}])})
    states, hist = trainer.fit(trainer.init(SAMPLE), batch_fn, progress=False, log_every=10)
    norms = jnp.linalg.norm(states["r"].sae.params["W_dec"], axis=-1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    assert hist[-1]["r"]["mse"][0] < 0.5 * hist[0]["r"]["mse"][0]


def test_panneal_schedule_steps_p_at_the_points():
    cfg = SAETrainConfig(family="panneal", d_in=D, d_sae=F, steps=40, anneal_start=8, n_anneal_points=5, p_end=0.2,
                         sparsity_coeff=0.05, lr=1e-3)
    trainer = SAETrainer({"p": (cfg, [{}])})
    _, hist = trainer.fit(trainer.init(SAMPLE), batch_fn, progress=False, log_every=1)
    p_seen = np.array([h["p"]["p"][0] for h in hist])  # p used at step t
    points = np.linspace(8, 40, 5).astype(int)  # 8, 16, 24, 32, 40
    values = np.linspace(1, 0.2, 5)
    want = np.array([values[np.searchsorted(points[:-1], t, side="right")] for t in range(40)])
    want[: points[0]] = 1.0
    np.testing.assert_allclose(p_seen, want, rtol=1e-6)
    coeffs = np.array([h["p"]["sparsity_coeff"][0] for h in hist])
    assert len(np.unique(np.round(coeffs, 7))) == 5  # lambda rescaled at each of the 4 changes


def test_panneal_rescale_keeps_loss_continuous():
    sae = init_sae("panneal", jax.random.PRNGKey(0), D, F)
    x = jnp.asarray(batch_fn(3))
    hp = Hparams.make(sparsity_coeff=0.05, p=1.0)
    anneal = {"p_values": jnp.linspace(1.0, 0.2, 5), "points": jnp.array([8, 16, 24, 32, 40]), "idx": jnp.int32(0),
              "ema_cur": jnp.float32(0), "ema_next": jnp.float32(0)}
    f = sae.train_acts(sae.normalize(x), hp)[0]
    # ema = 0: the "recent batches" are this batch, so the loss on it must not move across the step.
    new_anneal, new_hp = anneal_update(anneal, hp, f, jnp.int32(7), ema=0.0)
    assert float(new_hp.p) == pytest.approx(0.8) and int(new_anneal["idx"]) == 1
    before, after = sae.loss(x, hp)[0], sae.loss(x, new_hp)[0]
    np.testing.assert_allclose(after, before, rtol=1e-6)
    assert float(lp_penalty(f, 0.8).mean()) != pytest.approx(float(lp_penalty(f, 1.0).mean()))  # p did matter
    # not at a point: nothing changes
    same_anneal, same_hp = anneal_update(anneal, hp, f, jnp.int32(3), ema=0.0)
    assert float(same_hp.p) == 1.0 and float(same_hp.sparsity_coeff) == pytest.approx(0.05)


def test_bad_grid_key_and_config():
    cfg = SAETrainConfig(family="relu", d_in=D, d_sae=F)
    with pytest.raises(ValueError, match="not tunable per SAE"):
        SAETrainer({"r": (cfg, [{"d_sae": 3}])}).init(SAMPLE)
    with pytest.raises(ValueError, match="unknown SAE family"):
        SAETrainConfig(family="nope", d_in=D, d_sae=F)
    with pytest.raises(ValueError, match="sample must be"):
        SAETrainer({"r": (cfg, [{}])}).init(SAMPLE[:, :3])


SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    sys.path.insert(0, {test_dir!r})
    from test_train import batch_fn, SAMPLE, D, F
    from jaxinterp.sae import SAETrainConfig, SAETrainer
    ckpt, out, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    runs = {{"relu": (SAETrainConfig(family="relu", d_in=D, d_sae=F, steps=30, sparsity_coeff=0.02, lr=1e-3), [{{}}, {{"seed": 1}}]),
            "topk": (SAETrainConfig(family="topk", d_in=D, d_sae=F, steps=30, k=3, dead_tokens=64, aux_k=4), [{{}}])}}
    def data(t):
        if t == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return batch_fn(t)
    tr = SAETrainer(runs)
    states, _ = tr.fit(tr.init(SAMPLE), data, ckpt_dir=ckpt if ckpt != "-" else None, save_every=10, progress=False)
    import jax
    np.savez(out, *[np.asarray(a) for a in jax.tree_util.tree_leaves(states)])
""")


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(test_dir=os.path.dirname(__file__)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = lambda *a: subprocess.run([sys.executable, str(script), *map(str, a)], env=env, capture_output=True, text=True)
    ref = run("-", tmp_path / "ref.npz", -1)
    assert ref.returncode == 0, ref.stderr
    killed = run(tmp_path / "ckpt", tmp_path / "x.npz", 23)
    assert killed.returncode == -9, killed.stderr  # died by SIGKILL after the step-20 checkpoint
    assert not (tmp_path / "x.npz").exists() and (tmp_path / "ckpt" / "20").exists()
    resumed = run(tmp_path / "ckpt", tmp_path / "resumed.npz", -1)
    assert resumed.returncode == 0, resumed.stderr
    a, b = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "resumed.npz")
    assert len(a.files) == len(b.files) > 10
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
