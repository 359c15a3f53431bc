"""Mamba-2 port vs Hugging Face transformers' Mamba2ForCausalLM (pure-torch path), site by site,
float32, random-initialised models of several shapes; the SSD scans vs a plain numpy recurrence;
interventions on ssm_state / heads vs direct computation; the recurrent cache vs HF's and vs the
uncached run; gradients vs torch; config / checkpoint round trips and refusals."""

import dataclasses
import importlib.util
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.hf_utils import assert_param_grads_match_hf, max_err, save_random_hf, torch, transformers, visited_sites

import jaxinterp as ji
from jaxinterp.hf import ConversionError, read_hf_dir, write_hf_dir
from jaxinterp.model import forward
from jaxinterp.models.common import expected_hf_shapes
from jaxinterp.models.mamba2 import FAMILY, Mamba2Config, site_names, ssd_outputs, ssd_states
from jaxinterp.models.mamba2 import convert
from jaxinterp.models.mamba2.family import param_shapes
from jaxinterp.models.mamba2.model import MIXER_SITES
from jaxinterp.sites import SiteContext

TOL = 1e-4
SHAPES = {
    # 8 heads of 8 in 2 groups, chunks of 4 (several chunks per sequence), untied
    "h8g2c4": dict(hidden_size=32, num_hidden_layers=2, state_size=8, vocab_size=61, num_heads=8, head_dim=8,
                   n_groups=2, chunk_size=4),
    # one group, 4 heads of 12, biases in in/out_proj, conv 3, tied, residual in the activation dtype
    "h4g1bias": dict(hidden_size=24, num_hidden_layers=3, state_size=16, vocab_size=40, num_heads=4, head_dim=12,
                     n_groups=1, use_bias=True, conv_kernel=3, tie_word_embeddings=True, residual_in_fp32=False),
    # expand 3, 3 groups, no conv bias, a time-step limit that clips
    "h6g3clip": dict(hidden_size=16, num_hidden_layers=2, state_size=4, vocab_size=50, expand=3, num_heads=6,
                     head_dim=8, n_groups=3, use_conv_bias=False, time_step_limit=(0.01, 0.03), chunk_size=5),
}


@pytest.fixture(scope="module", autouse=True)
def torch_reference_path():
    """HF must run its pure-torch scan and conv: the CUDA kernels would change the reference."""
    present = [m for m in ("mamba_ssm", "causal_conv1d") if importlib.util.find_spec(m) is not None]
    assert not present, f"uninstall {present}: the parity tests compare against HF's pure-torch Mamba-2 path"


def make(tmp_path, seed=0, **kw):
    hf = save_random_hf(transformers.Mamba2ForCausalLM, transformers.Mamba2Config(**kw), tmp_path, seed=seed)
    return hf, ji.load(tmp_path)


def tokens_for(vocab, batch, seq, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq))


def run(model, tokens, capture=None, interventions=None):
    fn = jax.jit(lambda m, t, iv: m.run(t, capture=capture, interventions=iv))
    return fn(model, jnp.asarray(tokens), interventions)


def with_scan(model, scan, **kw):
    return model.replace(config=dataclasses.replace(model.config, scan=scan, **kw))


def hf_run(hf, tokens, **kw):
    """HF forward with hooks on every module whose inputs/outputs are named sites."""
    got = {}

    def out_hook(name):
        return lambda module, args, out: got.__setitem__(name, out.detach().numpy())

    def in_hook(*names):
        return lambda module, args: got.update({n: a.detach().numpy() for n, a in zip(names, args)})

    handles = []
    for i, layer in enumerate(hf.backbone.layers):
        m = layer.mixer
        handles += [layer.norm.register_forward_hook(out_hook(f"blocks.{i}.norm")),
                    m.in_proj.register_forward_hook(out_hook(f"{i}.in_proj")),
                    m.norm.register_forward_pre_hook(in_hook(f"blocks.{i}.mixer.ssm_out", f"blocks.{i}.mixer.in_z")),
                    m.norm.register_forward_hook(out_hook(f"blocks.{i}.mixer.gated")),
                    m.register_forward_hook(out_hook(f"blocks.{i}.mixer_out"))]
    try:
        with torch.no_grad():
            out = hf(torch.as_tensor(np.array(tokens), dtype=torch.long), output_hidden_states=True, use_cache=True,
                     **kw)
    finally:
        for h in handles:
            h.remove()
    return out, got


def hf_conv_path(mixer, in_proj_out):
    """From HF's in_proj output and its own weights (torch): z, xBC, dt, the conv output and its activation."""
    di, cc = mixer.intermediate_size, mixer.conv_dim
    proj = torch.as_tensor(in_proj_out)
    z, xbc, dt = proj[..., :di], proj[..., di:di + cc], proj[..., di + cc:]
    k = mixer.conv_kernel_size
    with torch.no_grad():
        conv = torch.nn.functional.conv1d(xbc.transpose(1, 2), mixer.conv1d.weight, mixer.conv1d.bias,
                                          padding=k - 1, groups=cc)[..., :proj.shape[1]].transpose(1, 2)
        delta = torch.clamp(torch.nn.functional.softplus(dt + mixer.dt_bias), *mixer.time_step_limit)
    return z.numpy(), xbc.numpy(), conv.numpy(), torch.nn.functional.silu(conv).numpy(), delta.numpy()


# ----------------------------------------------------------------------------- HF parity


@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
@pytest.mark.parametrize("scan", ["sequential", "chunked"])
def test_mamba2_matches_hf(tmp_path, shape, scan):
    kw = SHAPES[shape]
    hf, model = make(tmp_path, **kw)
    model = with_scan(model, scan)
    cfg = model.config
    tokens = tokens_for(kw["vocab_size"], 2, 13, seed=5)
    ref, hooked = hf_run(hf, tokens)
    c = run(model, tokens, capture="all").cache
    n, di, gn = cfg.n_layers, cfg.d_inner, cfg.n_groups * cfg.d_state
    assert max_err(run(model, tokens).logits, ref.logits) < TOL  # the state-free path
    # Mamba2Model: hidden_states[0] = embeddings, [i + 1] = block i's output, the last one replaced by norm_f's.
    assert len(ref.hidden_states) == n + 1
    assert max_err(c["embed"], ref.hidden_states[0]) < TOL
    for i in range(n - 1):
        assert max_err(c[f"blocks.{i}.resid_post"], ref.hidden_states[i + 1]) < TOL, i
    assert max_err(c["final_norm"], ref.hidden_states[n]) < TOL
    for i in range(n):
        m, mixer = f"blocks.{i}.mixer", hf.backbone.layers[i].mixer
        for site in (f"blocks.{i}.norm", f"{m}.ssm_out", f"{m}.in_z", f"{m}.gated", f"blocks.{i}.mixer_out"):
            assert max_err(c[site], hooked[site]) < TOL, site
        z, xbc, conv, act, delta = hf_conv_path(mixer, hooked[f"{i}.in_proj"])
        expect = {"in_z": z, "in_x": xbc, "conv_out": conv, "ssm_in": act[..., :di], "B": act[..., di:di + gn],
                  "C": act[..., di + gn:], "delta": delta, "heads": hooked[f"{m}.ssm_out"].reshape(c[f"{m}.heads"].shape)}
        for name, value in expect.items():
            assert max_err(c[f"{m}.{name}"], value) < TOL, (i, name)
        last = ref.cache.get_recurrent_state(i, state_idx=0).numpy()  # [B, H, P, N]
        assert max_err(c[f"{m}.ssm_state"][:, -1], last.reshape(2, di, -1)) < TOL, i
    if "time_step_limit" in kw:  # the clip is live: some steps sit at each bound
        d = np.stack([np.asarray(c[f"blocks.{i}.mixer.delta"]) for i in range(n)])
        assert all((d == np.float32(bound)).any() for bound in kw["time_step_limit"])


def test_generation_cache_matches_hf_and_the_uncached_run(tmp_path):
    """A prefix run with a cache, then the rest from that cache: the cache equals HF's after the prefix,
    and the continued logits equal the whole sequence run at once (also one token at a time)."""
    kw = SHAPES["h8g2c4"]
    hf, model = make(tmp_path, **kw)
    cfg = model.config
    tokens = jnp.asarray(tokens_for(kw["vocab_size"], 2, 11, seed=2))
    full = run(model, tokens).logits
    ref_prefix, _ = hf_run(hf, np.asarray(tokens[:, :6]))

    @jax.jit
    def step(m, cache, toks):
        shape = toks.shape
        return forward(m, toks, SiteContext(m.sites), positions=jnp.broadcast_to(jnp.arange(shape[1]), shape),
                       k_valid=jnp.ones(shape, bool), cache=cache)

    zeros = {"conv": jnp.zeros((cfg.n_layers, 2, cfg.d_conv - 1, cfg.conv_dim)),
             "ssm": jnp.zeros((cfg.n_layers, 2, cfg.d_inner, cfg.d_state))}
    for method in ("sequential", "chunked"):
        m = with_scan(model, method)
        logits, cache = step(m, zeros, tokens[:, :6])
        assert max_err(logits, full[:, :6]) < 1e-5
        for i in range(cfg.n_layers):
            hf_conv = ref_prefix.cache.get_conv_state(i).numpy()  # [B, Cc, K]: the last K inputs
            assert max_err(cache["conv"][i], np.swapaxes(hf_conv[..., 1:], 1, 2)) < TOL, i
            hf_ssm = ref_prefix.cache.get_recurrent_state(i, state_idx=0).numpy()
            assert max_err(cache["ssm"][i], hf_ssm.reshape(2, cfg.d_inner, -1)) < TOL, i
        rest, _ = step(m, cache, tokens[:, 6:])
        assert max_err(rest, full[:, 6:]) < 1e-5, method
        for t in range(6, 11):  # token by token, as generation runs
            one, cache = step(m, cache, tokens[:, t:t + 1])
            assert max_err(one[:, 0], full[:, t]) < 1e-5, (method, t)


# ----------------------------------------------------------------------------- the scan


def numpy_ssd(x, dt, A, B, C, h0=None):
    """The Mamba-2 recurrence as a plain float64 loop: states [B,T,H,P,N], outputs [B,T,H,P]."""
    x, dt, A, B, C = (np.asarray(a, np.float64) for a in (x, dt, A, B, C))
    b, t, h, p = x.shape
    per_group = h // B.shape[2]
    state = np.zeros((b, h, p, B.shape[-1])) if h0 is None else np.array(h0, np.float64)
    states, ys = [], []
    for step in range(t):
        for head in range(h):
            g = head // per_group
            state[:, head] = (np.exp(dt[:, step, head] * A[head])[:, None, None] * state[:, head]
                              + (dt[:, step, head, None] * x[:, step, head])[:, :, None] * B[:, step, g, None, :])
        states.append(state.copy())
        ys.append(np.stack([np.einsum("bpn,bn->bp", state[:, hd], C[:, step, hd // per_group]) for hd in range(h)], 1))
    return np.stack(states, 1), np.stack(ys, 1)


scan_outputs = jax.jit(ssd_outputs, static_argnames=("method", "chunk"))
scan_states = jax.jit(ssd_states, static_argnames=("method", "chunk"))


@pytest.mark.parametrize("method,chunk", [("sequential", 256), ("chunked", 256), ("chunked", 4), ("chunked", 1)])
def test_ssd_scans_match_numpy(method, chunk):
    rng = np.random.default_rng(1)
    b, t, h, p, g, n = 2, 13, 6, 3, 2, 5
    x = rng.normal(size=(b, t, h, p)).astype(np.float32)
    dt = np.log1p(np.exp(rng.normal(size=(b, t, h)))).astype(np.float32)
    dt[0, 4:7] = 0.0  # padded steps: the state must stay as it was
    A = -np.exp(rng.normal(size=h)).astype(np.float32)
    B, C = (rng.normal(size=(b, t, g, n)).astype(np.float32) for _ in range(2))
    want_states, want_y = numpy_ssd(x, dt, A, B, C)
    np.testing.assert_array_equal(want_states[0, 3], want_states[0, 6])
    y, h_last = scan_outputs(x, dt, A, B, C, method=method, chunk=chunk)
    assert max_err(y, want_y) < 1e-5 and max_err(h_last, want_states[:, -1]) < 1e-5
    states = scan_states(x, dt, A, B, method=method, chunk=chunk)
    assert states.shape == (b, t, h, p, n) and max_err(states, want_states) < 1e-5
    # Continuing from a state: the second part scanned from h0 = the state after the first.
    s = 6
    y2, h2 = scan_outputs(x[:, s:], dt[:, s:], A, B[:, s:], C[:, s:], method=method, chunk=chunk,
                         h0=want_states[:, s - 1])
    assert max_err(y2, want_y[:, s:]) < 1e-5 and max_err(h2, want_states[:, -1]) < 1e-5
    states2 = scan_states(x[:, s:], dt[:, s:], A, B[:, s:], method=method, chunk=chunk, h0=want_states[:, s - 1])
    assert max_err(states2, want_states[:, s:]) < 1e-5


def test_ssd_scan_rejects_bad_arguments():
    x, dt, A, B = np.zeros((1, 2, 4, 2)), np.zeros((1, 2, 4)), np.zeros(4), np.zeros((1, 2, 3, 2))
    with pytest.raises(ValueError, match="chunked"):
        ssd_outputs(x, dt, A, B[:, :, :2], B[:, :, :2], method="parallel")
    with pytest.raises(ValueError, match="3 groups do not divide 4 heads"):
        ssd_states(x, dt, A, B)
    with pytest.raises(ValueError, match="sequential"):
        Mamba2Config.tiny(scan="associative")


def test_one_long_chunk_with_mixed_decay_matches_numpy():
    """A 256-step chunk whose first half decays hard and second half barely: the intra-chunk decays
    are sums over up to 255 steps (segment sums, -inf above the diagonal) and stay accurate."""
    rng = np.random.default_rng(2)
    b, t, h, p, n = 1, 256, 2, 2, 3
    x = rng.normal(size=(b, t, h, p)).astype(np.float32)
    dt = np.concatenate([np.full((b, t // 2, h), 2.0), np.full((b, t // 2, h), 0.01)], 1).astype(np.float32)
    A = np.array([-3.0, -0.05], np.float32)
    B, C = (rng.normal(size=(b, t, 1, n)).astype(np.float32) for _ in range(2))
    want_states, want_y = numpy_ssd(x, dt, A, B, C)
    y, h_last = scan_outputs(x, dt, A, B, C, method="chunked", chunk=256)
    assert max_err(y, want_y) < 1e-5 * max(1.0, np.abs(want_y).max())
    assert max_err(h_last, want_states[:, -1]) < 1e-5 * max(1.0, np.abs(want_states).max())


def test_scans_agree_site_by_site(tmp_path):
    _, model = make(tmp_path, **SHAPES["h6g3clip"])
    tokens = tokens_for(50, 2, 12)
    seq = run(with_scan(model, "sequential"), tokens, capture="all")
    for chunk in (3, 12, 256):
        out = run(with_scan(model, "chunked", chunk_size=chunk), tokens, capture="all")
        assert max_err(out.logits, seq.logits) < 1e-5, chunk
        for site, value in seq.cache.items():
            assert max_err(out.cache[site], value) < 1e-5, (chunk, site)


# ----------------------------------------------------------------------------- interventions


def gated_norm(y, gate, weight, groups, eps):
    v = np.asarray(y, np.float64) * np.asarray(gate, np.float64)
    v = v.reshape(*v.shape[:-1], groups, -1)
    v = v / np.sqrt((v ** 2).mean(-1, keepdims=True) + eps)
    return v.reshape(np.shape(y)) * weight


def test_patching_ssm_state_changes_readout_as_computed(tmp_path):
    hf, model = make(tmp_path, **SHAPES["h8g2c4"])
    cfg = model.config
    tokens = tokens_for(61, 2, 10)
    site, pos = "blocks.0.mixer.ssm_state", 6
    clean = run(model, tokens, capture=["blocks.0.*", "blocks.0.mixer.*"])
    c = {k: np.asarray(v, np.float64) for k, v in clean.cache.items()}
    new_states = c[site].copy()
    new_states[:, pos] = np.random.default_rng(3).normal(size=new_states[:, pos].shape)
    mask = ji.positions_mask(tokens.shape[1], [pos], batch=2)
    patched = run(model, tokens, capture=["blocks.0.resid_post", "blocks.0.mixer.gated", site],
                  interventions={site: ji.Patch(jnp.asarray(new_states, jnp.float32), mask)})
    # Direct computation from HF's weights: y_h = h_h C_g + D_h x_h, gated = GroupNorm(y * SiLU(z)) w, out_proj.
    mixer = hf.backbone.layers[0].mixer
    h, p, g, n = cfg.n_heads, cfg.head_dim, cfg.n_groups, cfg.d_state
    states = new_states.reshape(2, -1, g, h // g, p, n)
    C = c["blocks.0.mixer.C"].reshape(2, -1, g, n)
    y = np.einsum("btgrpn,btgn->btgrp", states, C).reshape(2, -1, h, p)
    y = (y + c["blocks.0.mixer.ssm_in"].reshape(2, -1, h, p) * mixer.D.detach().numpy()[:, None]).reshape(2, -1, h * p)
    gated = gated_norm(y, c["blocks.0.mixer.gate"], mixer.norm.weight.detach().numpy(), g, cfg.norm_eps)
    resid = c["blocks.0.resid_pre"] + gated @ mixer.out_proj.weight.detach().numpy().astype(np.float64).T
    assert max_err(patched.cache["blocks.0.mixer.gated"], gated) < 1e-5
    assert max_err(patched.cache["blocks.0.resid_post"], resid) < 1e-5
    np.testing.assert_array_equal(np.asarray(patched.logits)[:, :pos], np.asarray(clean.logits)[:, :pos])
    assert max_err(patched.logits[:, pos], clean.logits[:, pos]) > 1e-3


def test_head_ablation_zeroes_one_head(tmp_path):
    """A [B, T, H] mask on mixer.heads ablates one head: only its channels of ssm_out change, and
    the gated norm is recomputed from them (direct computation)."""
    hf, model = make(tmp_path, **SHAPES["h8g2c4"])
    cfg = model.config
    tokens = tokens_for(61, 2, 9)
    head, p = 5, cfg.head_dim
    mask = np.zeros((2, 9, cfg.n_heads), bool)
    mask[:, 3:, head] = True
    clean = run(model, tokens, capture="blocks.1.mixer.*")
    out = run(model, tokens, capture="blocks.1.mixer.*",
              interventions={"blocks.1.mixer.heads": ji.ZeroAblate(mask=jnp.asarray(mask))})
    before, after = np.asarray(clean.cache["blocks.1.mixer.ssm_out"]), np.asarray(out.cache["blocks.1.mixer.ssm_out"])
    expected = before.copy()
    expected[:, 3:, head * p:(head + 1) * p] = 0
    assert np.all(after[:, 3:, head * p:(head + 1) * p] == 0) and max_err(after, expected) < 1e-6
    gated = gated_norm(expected, clean.cache["blocks.1.mixer.gate"], hf.backbone.layers[1].mixer.norm.weight.detach()
                       .numpy(), cfg.n_groups, cfg.norm_eps)
    assert max_err(out.cache["blocks.1.mixer.gated"], gated) < 1e-5


def test_grad_through_both_scans_agrees_with_finite_difference(tmp_path):
    _, model = make(tmp_path, **SHAPES["h8g2c4"])
    tokens = jnp.asarray(tokens_for(61, 1, 9))
    site = "blocks.0.mixer.delta"

    def loss(m, vec):
        logits = m.run(tokens, interventions={site: ji.Add(vec)}).logits
        return jax.nn.logsumexp(logits[0, -1]) - logits[0, -1, 3]

    vec = jnp.asarray(np.random.default_rng(0).normal(size=model.config.n_heads) * 0.05, jnp.float32)
    grads = {s: np.asarray(jax.jit(jax.grad(loss, argnums=1))(with_scan(model, s), vec))
             for s in ("sequential", "chunked")}
    assert max_err(grads["sequential"], grads["chunked"]) < 1e-5
    direction = np.random.default_rng(1).normal(size=vec.shape).astype(np.float32)
    direction /= np.linalg.norm(direction)
    eps = 1e-2
    loss_j = jax.jit(loss)
    fd = (loss_j(model, vec + eps * direction) - loss_j(model, vec - eps * direction)) / (2 * eps)
    assert abs(float(fd) - float(grads["chunked"] @ direction)) < 1e-3 * max(1.0, abs(float(fd)))


@pytest.mark.parametrize("scan", ["sequential", "chunked"])
def test_parameter_grads_match_hf(tmp_path, scan):
    """d(loss)/d(every parameter) equals HF torch's backward, for a loss read at the last position."""
    hf, model = make(tmp_path, **SHAPES["h8g2c4"])
    model = with_scan(model, scan)
    tokens = tokens_for(61, 2, 15)

    assert_param_grads_match_hf(model, FAMILY, hf, tokens)


# ----------------------------------------------------------------------------- sites


def test_sites_and_layouts(tmp_path):
    _, model = make(tmp_path, **SHAPES["h6g3clip"])
    cfg = model.config
    assert tuple(visited_sites(model, capture="all")) == model.sites == site_names(cfg)
    assert len(set(model.sites)) == len(model.sites) == 1 + cfg.n_layers * (4 + len(MIXER_SITES)) + 1
    assert tuple(visited_sites(model)) == tuple(s for s in model.sites if not s.endswith(".ssm_state"))
    out = run(model, tokens_for(50, 2, 5), capture="all")
    b, t, d, di, n = 2, 5, cfg.d_model, cfg.d_inner, cfg.d_state
    gn, cc, h = cfg.n_groups * n, cfg.conv_dim, cfg.n_heads
    expect = {"embed": (b, t, d), "final_norm": (b, t, d), "resid_pre": (b, t, d), "norm": (b, t, d),
              "mixer_out": (b, t, d), "resid_post": (b, t, d), "in_x": (b, t, cc), "conv_out": (b, t, cc),
              "delta": (b, t, h), "B": (b, t, gn), "C": (b, t, gn), "ssm_state": (b, t, di, n),
              "heads": (b, t, h, cfg.head_dim)}
    for name, value in out.cache.items():
        assert value.shape == expect.get(name.rsplit(".", 1)[-1], (b, t, di)), name
        assert len(ji.sharding.site_axes(name, value.ndim)) == value.ndim
    assert set(out.cache) == set(model.sites)
    with pytest.raises(ji.UnknownSiteError, match="blocks.0.mixer.heads"):
        model.run(np.zeros((1, 3), int), capture="blocks.0.mixer.head")


# ----------------------------------------------------------------------------- config / conversion


@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
def test_config_round_trips_through_transformers(shape):
    cfg = Mamba2Config.from_hf(transformers.Mamba2Config(**SHAPES[shape]).to_dict())
    assert Mamba2Config.from_hf(transformers.Mamba2Config(**cfg.to_hf()).to_dict()) == cfg
    assert cfg.dt_limit == tuple(SHAPES[shape].get("time_step_limit", (0.0, math.inf)))


def test_130m_shapes_match_hf_state_dict():
    """Every tensor of HF's Mamba-2 architecture at mamba2-130m size maps onto a parameter of the same
    size, and every parameter has sharding axes (no allocation)."""
    cfg = Mamba2Config.mamba2_130m()
    with torch.device("meta"):
        hf = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**cfg.to_hf()))
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    shapes = param_shapes(cfg)
    assert expected_hf_shapes(convert.entries(cfg), shapes, cfg.n_layers) == hf_shapes
    axes = ji.sharding.param_axes("mamba2", shapes)
    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731
    assert jax.tree_util.tree_structure(axes, is_leaf=is_axes) == jax.tree_util.tree_structure(shapes)
    for a, s in zip(jax.tree_util.tree_leaves(axes, is_leaf=is_axes), jax.tree_util.tree_leaves(shapes)):
        assert len(a) == len(s.shape)
    assert axes["layers"]["mixer"]["norm"]["scale"] == ("layers", "d_inner")
    assert axes["layers"]["mixer"]["A_log"] == ("layers", "heads")


@pytest.mark.parametrize("shape", ["h8g2c4", "h4g1bias"], ids=str)
def test_roundtrip_export(tmp_path, shape):
    kw = SHAPES[shape]
    save_random_hf(transformers.Mamba2ForCausalLM, transformers.Mamba2Config(**kw), tmp_path / "a")
    model = ji.load(tmp_path / "a")
    ji.save_pretrained(model, tmp_path / "b")
    hf_b = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path / "b").eval()
    tokens = tokens_for(kw["vocab_size"], 2, 9)
    ref, _ = hf_run(hf_b, tokens)
    assert max_err(run(model, tokens).logits, ref.logits) < TOL
    assert ji.load(tmp_path / "b").config == model.config


def test_init_runs_and_exports(tmp_path):
    cfg = Mamba2Config.tiny(vocab_size=50)
    model = jax.jit(lambda key: ji.init(cfg, key))(jax.random.PRNGKey(0))
    assert np.allclose(np.exp(np.asarray(model.params["layers"]["mixer"]["A_log"][0])), np.arange(1, cfg.n_heads + 1))
    ji.save_pretrained(model, tmp_path)
    hf = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path).eval()
    tokens = tokens_for(50, 1, 6)
    ref, _ = hf_run(hf, tokens)
    assert max_err(run(model, tokens).logits, ref.logits) < TOL


def test_bfloat16_load(tmp_path):
    kw = SHAPES["h8g2c4"]
    _, model = make(tmp_path, **kw)
    bf = ji.load(tmp_path, dtype="bfloat16")
    assert bf.params["layers"]["mixer"]["in_proj"]["kernel"].dtype == jnp.bfloat16
    tokens = tokens_for(kw["vocab_size"], 1, 8)
    for scan in ("sequential", "chunked"):
        out = run(with_scan(bf, scan), tokens, capture=["blocks.0.mixer.heads", "blocks.1.resid_post"])
        assert out.cache["blocks.0.mixer.heads"].dtype == jnp.bfloat16
        assert out.cache["blocks.1.resid_post"].dtype == jnp.float32  # residual_in_fp32
        ref = np.asarray(run(model, tokens).logits)
        assert max_err(np.asarray(out.logits, np.float32), ref) < 0.05 * np.abs(ref).max()


@pytest.fixture
def checkpoint(tmp_path):
    save_random_hf(transformers.Mamba2ForCausalLM, transformers.Mamba2Config(**SHAPES["h8g2c4"]), tmp_path)
    return read_hf_dir(tmp_path)


def test_refuses_unknown_and_inconsistent_config_fields(tmp_path, checkpoint):
    config, tensors = checkpoint
    write_hf_dir(tmp_path / "x", {**config, "norm_before_gate": True}, tensors)
    with pytest.raises(ConversionError, match=r"^mamba2 config has fields .*'norm_before_gate'") as err:
        ji.load(tmp_path / "x")
    assert "\n" not in str(err.value)
    bad = {"num_heads": 6, "n_groups": 3, "time_step_limit": [0.0], "hidden_act": "swish2"}
    for field, value in bad.items():
        with pytest.raises(ConversionError, match="mamba2|activation") as err:
            Mamba2Config.from_hf({**config, field: value})
        assert "\n" not in str(err.value), field
    assert Mamba2Config.from_hf({**config, "time_step_limit": [0.0, {"__float__": "Infinity"}]}).dt_limit[1] == math.inf


def test_refuses_bad_checkpoints(checkpoint):
    config, tensors = checkpoint
    cfg = Mamba2Config.from_hf(config)
    name = "backbone.layers.1.mixer.dt_bias"
    with pytest.raises(ConversionError, match=f"missing tensors.*{name}"):
        FAMILY.from_hf(cfg, {k: v for k, v in tensors.items() if k != name})
    with pytest.raises(ConversionError, match="unexpected tensors.*x_proj"):
        FAMILY.from_hf(cfg, {**tensors, "backbone.layers.1.mixer.x_proj.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(ConversionError, match=r"mis-shaped.*A_log: checkpoint \(5,\) vs expected \(8,\)"):
        FAMILY.from_hf(cfg, {**tensors, "backbone.layers.0.mixer.A_log": np.zeros(5, np.float32)})
    tied = dataclasses.replace(cfg, tie_embeddings=True)
    with pytest.raises(ConversionError, match="different 'lm_head.weight'"):
        FAMILY.from_hf(tied, tensors)
