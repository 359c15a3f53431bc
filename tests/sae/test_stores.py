"""Activation stores: resumable chunked zarr writes, shuffled epochs, the fused on-device step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp.models.gpt2 import GPT2Config
from jaxinterp.sae import SAETrainConfig, SAETrainer
from jaxinterp.sae.stores import DiskStore, OnlineStore, fused_step


def chunk(i, rows=32, d=5):
    return np.random.default_rng(i).normal(size=(rows, d)).astype(np.float32) + i


def test_disk_store_resumes_interrupted_write_and_reads_shuffled_epochs(tmp_path):
    store = DiskStore(tmp_path / "s", n_rows=8 * 32, d=5, chunk_rows=32, chunks_per_shard=4)

    def flaky(i):
        if i == 5:
            raise KeyboardInterrupt  # the writer dies mid-way
        return chunk(i)

    with pytest.raises(KeyboardInterrupt):
        store.write(flaky, progress=False)
    assert store.rows_written() == 5 * 32 and not store.complete()
    with pytest.raises(RuntimeError, match="only 160 of 256 rows"):
        store.batch(0, 16)
    reopened = DiskStore(tmp_path / "s", n_rows=8 * 32, d=5, chunk_rows=32, chunks_per_shard=4)
    reopened.write(chunk, progress=False)  # resumes at chunk 5
    want = np.concatenate([chunk(i) for i in range(8)])
    np.testing.assert_array_equal(reopened.read(), want)
    # one epoch of batches is a permutation of all rows, and not storage order
    epoch = np.concatenate([reopened.batch(t, 16, seed=3, window_chunks=4) for t in range(16)])
    assert not np.array_equal(epoch, want)
    np.testing.assert_array_equal(np.sort(epoch, 0), np.sort(want, 0))
    # deterministic: a fresh reader gives the same batch for the same step
    again = DiskStore(tmp_path / "s", n_rows=8 * 32, d=5, chunk_rows=32)
    np.testing.assert_array_equal(again.batch(11, 16, seed=3, window_chunks=4), epoch[11 * 16:12 * 16])
    assert not np.array_equal(again.batch(16, 16, seed=3, window_chunks=4), epoch[:16])  # next epoch reshuffles


def test_online_buffer_exchange_and_fused_step_match_unfused():
    model = ji.init(GPT2Config.tiny(vocab_size=17, d_model=16, n_layers=2, n_heads=2, d_mlp=32, max_seq_len=8), 0)
    sites = ["blocks.0.resid_post", "blocks.1.resid_post"]
    store = OnlineStore(sites, buffer_factor=3)
    toks = lambda t: jax.random.randint(jax.random.PRNGKey(100 + t), (4, 8), 0, 17)
    buffer = store.fill(model, [toks(-i - 1) for i in range(3)])
    assert buffer[sites[0]].shape == (96, 16)
    cfg = SAETrainConfig(family="relu", d_in=16, d_sae=32, steps=5, sparsity_coeff=0.01, lr=1e-3)
    trainers = {s: SAETrainer({"relu": (cfg, [{}, {"seed": 1}])}) for s in sites}
    sample = np.asarray(buffer[sites[0]])
    states = {s: trainers[s].init(sample) for s in sites}
    ref_states = jax.tree_util.tree_map(jnp.copy, states)
    ref_buffer = jax.tree_util.tree_map(jnp.copy, buffer)
    step = fused_step(trainers, store)
    for t in range(3):
        key = jax.random.PRNGKey(t)
        states, buffer, _ = step(states, buffer, model, toks(t), key)
        # unfused reference: explicit forward, explicit exchange, each trainer's own step
        fresh = {s: model.run(toks(t), capture=s).cache[s].reshape(-1, 16) for s in sites}
        idx = jax.random.permutation(key, 96)[:32]
        batch = {s: ref_buffer[s][idx] for s in sites}
        ref_buffer = {s: ref_buffer[s].at[idx].set(fresh[s]) for s in sites}
        ref_states = {s: trainers[s].step(ref_states[s], batch[s])[0] for s in sites}
    for s in sites:
        np.testing.assert_allclose(buffer[s], ref_buffer[s], rtol=1e-5, atol=1e-7)
        a = ref_states[s]["relu"].sae.params["W_dec"]
        np.testing.assert_allclose(states[s]["relu"].sae.params["W_dec"], a, rtol=1e-5, atol=1e-6)


def test_online_store_skips_padding_and_stops_early():
    """Harvesting a padded batch: padding rows never enter the buffer, real rows equal each prompt run alone,
    and only the layers up to the harvested site run."""
    model = ji.init(GPT2Config.tiny(vocab_size=17, d_model=16, n_layers=3, n_heads=2, d_mlp=32, max_seq_len=8), 0)
    site = "blocks.0.resid_post"
    store = OnlineStore(site, buffer_factor=2)
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(3), (2, 6), 1, 17))
    mask = np.ones((2, 6), bool)
    mask[0, :4] = False  # row 0: two real tokens, left-padded
    buffer = store.fill(model, [tokens, tokens], masks=[mask, mask])
    assert buffer[site].shape == (2 * int(mask.sum()), 16)
    alone = [model.run(tokens[i:i + 1, mask[i]], capture=site).cache[site][0] for i in range(2)]
    want = np.concatenate([np.asarray(a) for a in alone])
    np.testing.assert_allclose(buffer[site][: len(want)], want, atol=1e-5)
    fresh, keep = store.acts(model, jnp.asarray(tokens), jnp.asarray(mask))
    assert np.asarray(keep).tolist() == mask.reshape(-1).tolist()
    # exchange never writes a padding row: the buffer keeps only rows of real tokens
    poisoned = {site: jnp.where(jnp.asarray(mask.reshape(-1, 1)), fresh[site], 1e6)}
    new, _ = store.exchange(buffer, poisoned, jax.random.PRNGKey(0), keep)
    assert float(jnp.abs(new[site]).max()) < 1e5
    jaxpr = jax.make_jaxpr(lambda t, m: store.acts(model, t, m))(jnp.asarray(tokens), jnp.asarray(mask))
    assert [e.params["length"] for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"] == [1]


def _family_presets():
    out = []
    for name, fam in sorted(ji.families().items()):
        preset = next(p for p in vars(fam.config_cls) if p == "tiny" or p.endswith("_tiny"))
        out.append((name, preset))
    return out


@pytest.mark.parametrize("family,preset", _family_presets(), ids=[f for f, _ in _family_presets()])
def test_harvest_on_every_family_equals_a_full_capture(family, preset):
    """SAE harvesting (stop_at the deepest site, padding rows dropped) on one tiny model per family
    equals the real rows of an ordinary full-depth run's capture."""
    config = getattr(ji.get_family(family).config_cls, preset)()
    model = ji.init(config, 0)
    site = "blocks.0.resid_post"
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (2, 6), 1, config.vocab_size))
    mask = np.ones((2, 6), bool)
    mask[0, :2] = False
    store = OnlineStore(site, buffer_factor=1)
    both = jax.jit(lambda m, t, k: (store.acts(m, t, k), m.run(t, capture=site, attention_mask=k).cache[site]))
    (acts, keep), full = both(model, jnp.asarray(tokens), jnp.asarray(mask))
    full = full.reshape(-1, acts[site].shape[-1])
    keep = np.asarray(keep)
    assert keep.tolist() == mask.reshape(-1).tolist()
    np.testing.assert_allclose(np.asarray(acts[site])[keep], np.asarray(full)[keep], atol=1e-5)


def test_harvest_grid_members_equal_single_runs_on_the_same_stream():
    """A widths x sparsities grid trained from one on-the-fly stream: each member's params after N steps are
    those of a run of that member's config alone, harvesting the same token batches."""
    import dataclasses

    from jaxinterp.sae import grid_runs
    from jaxinterp.sae.stores import harvest_grid
    from jaxinterp.sae.train import unstack

    model = ji.init(GPT2Config.tiny(vocab_size=17, d_model=16, n_layers=2, n_heads=2, d_mlp=32, max_seq_len=8), 0)
    site = "blocks.1.resid_post"
    toks = lambda t: np.asarray(jax.random.randint(jax.random.PRNGKey(200 + t), (4, 8), 0, 17))
    runs = grid_runs("relu", 16, widths=(32, 64), sparsities=(1e-3, 3e-2), steps=3, lr=1e-3)
    grid, _ = harvest_grid(model, {site: runs}, toks, 3, buffer_factor=2, progress=False)
    for name, i in (("relu-64", 1),):  # one of the four members (each check compiles a run)
        cfg, members = runs[name]
        one = {"one": (dataclasses.replace(cfg, **members[i]), [{}])}
        single, _ = harvest_grid(model, {site: one}, toks, 3, buffer_factor=2, progress=False)
        got, want = unstack(grid[site][name], i).sae.params, unstack(single[site]["one"], 0).sae.params
        assert int(unstack(grid[site][name], i).step) == 3 and float(one["one"][0].sparsity_coeff) == [1e-3, 3e-2][i]
        for k in want:
            np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=2e-5, atol=2e-6, err_msg=k)
    # the members differ from each other (the grid is not one SAE copied)
    a, b = (unstack(grid[site]["relu-64"], i).sae.params["W_enc"] for i in (0, 1))
    assert not np.allclose(np.asarray(a), np.asarray(b))
