"""Mamba-1 port vs Hugging Face transformers (pure-torch path), site by site, float32,
random-initialised models; the selective scan vs a plain numpy recurrence; interventions on
``ssm_state`` vs direct computation; config/checkpoint round trips and refusals."""

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.hf_utils import assert_param_grads_match_hf, max_err, save_random_hf, torch, transformers, visited_sites

import jaxinterp as ji
from jaxinterp.hf import ConversionError, read_hf_dir, write_hf_dir
from jaxinterp.models.common import expected_hf_shapes
from jaxinterp.models.mamba import FAMILY, MambaConfig, site_names, ssm_outputs, ssm_states
from jaxinterp.models.mamba import convert
from jaxinterp.models.mamba.family import param_shapes
from jaxinterp.models.mamba.model import MIXER_SITES, Mamba

TOL = 1e-4
SHAPES = {
    # expand 2, state 4, conv 4, dt rank auto (ceil(32/16) = 2), tied embeddings
    "d32s4auto": dict(hidden_size=32, num_hidden_layers=2, state_size=4, vocab_size=61),
    # state 16, explicit dt rank, biases in in/out_proj, untied lm_head
    "d48s16r5": dict(hidden_size=48, num_hidden_layers=3, state_size=16, vocab_size=77, time_step_rank=5,
                     use_bias=True, tie_word_embeddings=False),
    # expand 3, conv 3, no conv bias, residual in the activation dtype
    "d24e3k3": dict(hidden_size=24, num_hidden_layers=2, state_size=8, vocab_size=40, expand=3, conv_kernel=3,
                    use_conv_bias=False, residual_in_fp32=False),
}


@pytest.fixture(scope="module", autouse=True)
def torch_reference_path():
    """HF must run its pure-torch scan and conv: the CUDA kernels and mambapy would change the reference."""
    present = [m for m in ("mamba_ssm", "causal_conv1d", "mambapy") if importlib.util.find_spec(m) is not None]
    assert not present, f"uninstall {present}: the parity tests compare against HF's pure-torch Mamba path"


def hf_config(**kw):
    return transformers.MambaConfig(**{"use_mambapy": False, **kw})


def make(tmp_path, seed=0, **kw):
    hf = save_random_hf(transformers.MambaForCausalLM, hf_config(**kw), tmp_path, seed=seed)
    return hf, ji.load(tmp_path)


def tokens_for(vocab, batch, seq, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq))


def run(model, tokens, capture=None, interventions=None):
    """``model.run`` as one compiled program (much cheaper than op-by-op dispatch on a busy CPU)."""
    fn = jax.jit(lambda m, t, iv: m.run(t, capture=capture, interventions=iv))
    return fn(model, jnp.asarray(tokens), interventions)


def hf_run(hf, tokens):
    """HF forward with hooks on every module whose inputs/outputs are named sites."""
    got = {}

    def keep(name, use_input=False):
        def hook(module, args, out):
            got[name] = (args[0] if use_input else out).detach().numpy()
        return hook

    handles = []
    for i, layer in enumerate(hf.backbone.layers):
        handles += [
            layer.norm.register_forward_hook(keep(f"blocks.{i}.norm")),
            layer.mixer.in_proj.register_forward_hook(keep(f"{i}.in_proj")),
            layer.mixer.x_proj.register_forward_hook(keep(f"{i}.x_proj")),
            layer.mixer.out_proj.register_forward_hook(keep(f"blocks.{i}.mixer.gated", use_input=True)),
            layer.mixer.register_forward_hook(keep(f"blocks.{i}.mixer_out")),
        ]
    try:
        with torch.no_grad():
            out = hf(torch.as_tensor(tokens, dtype=torch.long), output_hidden_states=True, use_cache=True)
    finally:
        for h in handles:
            h.remove()
    return out, got


def hf_delta(hf, layer, x_proj_out):
    """softplus(dt_proj(dt_low)) from HF's own weights and x_proj output (torch)."""
    mixer = hf.backbone.layers[layer].mixer
    dt_low = torch.as_tensor(x_proj_out[..., : mixer.time_step_rank])
    with torch.no_grad():
        return torch.nn.functional.softplus(dt_low @ mixer.dt_proj.weight.T + mixer.dt_proj.bias).numpy()


# ----------------------------------------------------------------------------- HF parity


@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
@pytest.mark.parametrize("batch,seq", [(1, 7), (3, 13)])
def test_mamba_matches_hf(tmp_path, shape, batch, seq):
    kw = SHAPES[shape]
    hf, model = make(tmp_path, **kw)
    tokens = tokens_for(kw["vocab_size"], batch, seq, seed=seq)
    ref, hooked = hf_run(hf, tokens)
    out = run(model, tokens, capture="all")
    c = out.cache
    n, di, r, ns = model.config.n_layers, model.config.d_inner, model.config.dt_rank, model.config.d_state
    assert max_err(out.logits, ref.logits) < TOL
    # HF's MambaModel records hidden_states after every block (no embedding entry), then norm_f.
    assert len(ref.hidden_states) == n + 1
    for i in range(n):
        assert max_err(c[f"blocks.{i}.resid_post"], ref.hidden_states[i]) < TOL, i
    assert max_err(c["final_norm"], ref.hidden_states[n]) < TOL
    assert max_err(c["embed"], hf.backbone.embeddings.weight.detach().numpy()[tokens]) < TOL
    for i in range(n):
        m = f"blocks.{i}.mixer"
        for site in (f"blocks.{i}.norm", f"{m}.gated", f"blocks.{i}.mixer_out"):
            assert max_err(c[site], hooked[site]) < TOL, site
        assert max_err(c[f"{m}.in_x"], hooked[f"{i}.in_proj"][..., :di]) < TOL
        assert max_err(c[f"{m}.in_z"], hooked[f"{i}.in_proj"][..., di:]) < TOL
        assert max_err(c[f"{m}.B"], hooked[f"{i}.x_proj"][..., r:r + ns]) < TOL
        assert max_err(c[f"{m}.C"], hooked[f"{i}.x_proj"][..., r + ns:]) < TOL
        assert max_err(c[f"{m}.delta"], hf_delta(hf, i, hooked[f"{i}.x_proj"])) < TOL
        # HF keeps the state after the last step in its cache.
        last = ref.cache_params.get_recurrent_state(i, state_idx=0).numpy()  # [B, Di, N]
        assert max_err(c[f"{m}.ssm_state"][:, -1], last) < TOL, i


def test_logits_without_capture_match_hf(tmp_path):
    """The state-free output path (no ssm_state asked for) agrees with HF too, eager and jitted."""
    kw = SHAPES["d48s16r5"]
    hf, model = make(tmp_path, **kw)
    tokens = tokens_for(kw["vocab_size"], 2, 11)
    ref, _ = hf_run(hf, tokens)
    assert max_err(run(model, tokens).logits, ref.logits) < TOL
    jitted = jax.jit(lambda m, t: m.run(t, capture="blocks.*.resid_post"))(model, jnp.asarray(tokens))
    assert max_err(jitted.logits, ref.logits) < TOL
    assert max_err(jitted.cache["blocks.1.resid_post"], ref.hidden_states[1]) < TOL


# ----------------------------------------------------------------------------- the scan


def numpy_recurrence(u, delta, A, B, C):
    """The Mamba-1 recurrence written as a plain float64 loop: states [B,T,Di,N], outputs [B,T,Di]."""
    u, delta, A, B, C = (np.asarray(a, np.float64) for a in (u, delta, A, B, C))
    b, t, d = u.shape
    h = np.zeros((b, d, A.shape[-1]))
    states, ys = [], []
    for step in range(t):
        h = np.exp(delta[:, step, :, None] * A) * h + (delta[:, step] * u[:, step])[..., None] * B[:, step, None, :]
        states.append(h)
        ys.append((h * C[:, step, None, :]).sum(-1))
    return np.stack(states, 1), np.stack(ys, 1)


@pytest.mark.parametrize("method,chunk", [("associative", None), ("associative", 4), ("associative", 32),
                                          ("sequential", None)])
def test_scan_functions_match_numpy(method, chunk):
    rng = np.random.default_rng(1)
    b, t, d, n = 2, 13, 6, 5
    u = rng.normal(size=(b, t, d)).astype(np.float32)
    delta = np.log1p(np.exp(rng.normal(size=(b, t, d)))).astype(np.float32)
    A = -np.exp(rng.normal(size=(d, n))).astype(np.float32)
    B, C = (rng.normal(size=(b, t, n)).astype(np.float32) for _ in range(2))
    want_states, want_y = numpy_recurrence(u, delta, A, B, C)
    states = ssm_states(u, delta, A, B, method=method, chunk=chunk)
    assert states.shape == (b, t, d, n)
    assert max_err(states, want_states) < 1e-5
    y, h_last = ssm_outputs(u, delta, A, B, C, method=method, chunk=chunk)
    assert max_err(y, want_y) < 1e-5
    assert max_err(h_last, want_states[:, -1]) < 1e-5
    # Continuing from a state: the second half scanned from h0 = state after the first half.
    s = 6
    y2, h2 = ssm_outputs(u[:, s:], delta[:, s:], A, B[:, s:], C[:, s:], method=method, chunk=chunk,
                         h0=want_states[:, s - 1])
    assert max_err(y2, want_y[:, s:]) < 1e-5 and max_err(h2, want_states[:, -1]) < 1e-5
    assert max_err(ssm_states(u[:, s:], delta[:, s:], A, B[:, s:], method=method, chunk=chunk,
                              h0=want_states[:, s - 1]), want_states[:, s:]) < 1e-5


def test_scan_rejects_unknown_method():
    x = np.zeros((1, 2, 3), np.float32)
    with pytest.raises(ValueError, match="associative"):
        ssm_outputs(x, x, np.zeros((3, 2)), np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), method="parallel")
    with pytest.raises(ValueError, match="sequential"):
        MambaConfig.tiny(scan="fast")


def test_associative_and_sequential_models_agree(tmp_path):
    kw = SHAPES["d32s4auto"]
    _, model = make(tmp_path, **kw)
    tokens = tokens_for(kw["vocab_size"], 2, 13)
    runs = {}
    for scan, chunk in [("associative", None), ("associative", 4), ("sequential", None)]:
        m = model.replace(config=dataclasses.replace(model.config, scan=scan, scan_chunk=chunk))
        runs[scan, chunk] = run(m, tokens, capture="all")
    ref = runs["associative", None]
    for key, out in runs.items():
        assert max_err(out.logits, ref.logits) < 1e-5, key
        for site in ref.cache:
            assert max_err(out.cache[site], ref.cache[site]) < 1e-5, (key, site)
    # The state-free sequential path (one [B, Di, N] carry, no per-step states) agrees as well.
    seq = model.replace(config=dataclasses.replace(model.config, scan="sequential"))
    light = run(seq, tokens, capture="blocks.*.mixer_out")
    assert max_err(light.logits, ref.logits) < 1e-5
    assert max_err(light.cache["blocks.1.mixer_out"], ref.cache["blocks.1.mixer_out"]) < 1e-5


def test_ssm_state_equals_numpy_recurrence(tmp_path):
    kw = SHAPES["d48s16r5"]
    hf, model = make(tmp_path, **kw)
    tokens = tokens_for(kw["vocab_size"], 2, 9)
    layer = 1
    m = f"blocks.{layer}.mixer"
    out = run(model, tokens, capture=f"{m}.*")
    c = {k.rsplit(".", 1)[1]: np.asarray(v) for k, v in out.cache.items()}
    mixer = hf.backbone.layers[layer].mixer
    A = -np.exp(mixer.A_log.detach().numpy().astype(np.float64))  # from HF's tensors, not ours
    D = mixer.D.detach().numpy()
    states, y = numpy_recurrence(c["ssm_in"], c["delta"], A, c["B"], c["C"])
    assert max_err(c["ssm_state"], states) < 1e-5
    assert max_err(c["ssm_out"], y + c["ssm_in"] * D) < 1e-5
    assert max_err(c["gate"], c["in_z"] / (1 + np.exp(-c["in_z"]))) < 1e-6
    assert max_err(c["gated"], c["ssm_out"] * c["gate"]) < 1e-6


# ----------------------------------------------------------------------------- interventions


def test_patching_ssm_state_changes_downstream_as_computed(tmp_path):
    kw = SHAPES["d32s4auto"]
    hf, model = make(tmp_path, **kw)
    tokens = tokens_for(kw["vocab_size"], 2, 10)
    site, pos = "blocks.0.mixer.ssm_state", 6
    clean = run(model, tokens, capture=["blocks.0.*", "blocks.0.mixer.*"])
    c = {k: np.asarray(v, np.float64) for k, v in clean.cache.items()}
    new_states = c[site].copy()
    new_states[:, pos] = np.random.default_rng(3).normal(size=new_states[:, pos].shape)
    mask = ji.positions_mask(tokens.shape[1], [pos], batch=2)
    patched = run(model, tokens, capture=["blocks.0.resid_post", "blocks.0.mixer.gated", site],
                        interventions={site: ji.Patch(jnp.asarray(new_states, jnp.float32), mask)})
    assert max_err(patched.cache[site], new_states) < 1e-6
    # Direct computation from HF's weights: y = C.h + D u, gated = y * SiLU(z), resid += out_proj(gated).
    mixer = hf.backbone.layers[0].mixer
    D = mixer.D.detach().numpy()
    w_out = mixer.out_proj.weight.detach().numpy().astype(np.float64)  # [D, Di]
    y = np.einsum("btdn,btn->btd", new_states, c["blocks.0.mixer.C"]) + c["blocks.0.mixer.ssm_in"] * D
    gated = y * c["blocks.0.mixer.gate"]
    resid = c["blocks.0.resid_pre"] + gated @ w_out.T
    assert max_err(patched.cache["blocks.0.mixer.gated"], gated) < 1e-5
    assert max_err(patched.cache["blocks.0.resid_post"], resid) < 1e-5
    # The state is read out at its own step only; everything before `pos` is untouched.
    np.testing.assert_array_equal(np.asarray(patched.logits)[:, :pos], np.asarray(clean.logits)[:, :pos])
    assert max_err(patched.logits[:, pos], clean.logits[:, pos]) > 1e-3
    # Downstream of block 0 the model sees exactly the directly computed residual stream.
    via_resid = run(model, tokens, interventions={"blocks.0.resid_post": ji.Patch(jnp.asarray(resid, jnp.float32))})
    assert max_err(patched.logits, via_resid.logits) < 1e-5


def test_zero_state_ablation_leaves_only_skip(tmp_path):
    _, model = make(tmp_path, **SHAPES["d32s4auto"])
    tokens = tokens_for(61, 1, 8)
    out = run(model, tokens, capture="blocks.1.mixer.*", interventions={"blocks.1.mixer.ssm_state": ji.ZeroAblate()})
    D = np.asarray(model.params["layers"]["mixer"]["D"][1])
    c = out.cache
    assert np.all(np.asarray(c["blocks.1.mixer.ssm_state"]) == 0)
    assert max_err(c["blocks.1.mixer.ssm_out"], np.asarray(c["blocks.1.mixer.ssm_in"]) * D) < 1e-6


def test_grad_through_both_scans_agrees_with_finite_difference(tmp_path):
    _, model = make(tmp_path, **SHAPES["d32s4auto"])
    tokens = jnp.asarray(tokens_for(61, 1, 9))
    site = "blocks.0.mixer.delta"

    def loss(m, vec):
        logits = m.run(tokens, interventions={site: ji.Add(vec)}).logits
        return jax.nn.logsumexp(logits[0, -1]) - logits[0, -1, 3]

    vec = jnp.asarray(np.random.default_rng(0).normal(size=model.config.d_inner) * 0.1, jnp.float32)
    grads = {}
    for scan in ("associative", "sequential"):
        m = model.replace(config=dataclasses.replace(model.config, scan=scan))
        grads[scan] = np.asarray(jax.jit(jax.grad(loss, argnums=1))(m, vec))
    assert max_err(grads["associative"], grads["sequential"]) < 1e-6
    direction = np.random.default_rng(1).normal(size=vec.shape).astype(np.float32)
    direction /= np.linalg.norm(direction)
    eps = 1e-2
    loss_j = jax.jit(loss)
    fd = (loss_j(model, vec + eps * direction) - loss_j(model, vec - eps * direction)) / (2 * eps)
    assert abs(float(fd) - float(grads["associative"] @ direction)) < 1e-3 * max(1.0, abs(float(fd)))


# ----------------------------------------------------------------------------- sites


def test_sites_visited_equal_model_sites(tmp_path):
    _, model = make(tmp_path, **SHAPES["d48s16r5"])
    cfg = model.config
    tokens = jnp.asarray(tokens_for(cfg.vocab_size, 2, 5))
    assert tuple(visited_sites(model, capture="all")) == model.sites == site_names(cfg)
    assert len(set(model.sites)) == len(model.sites) == 1 + cfg.n_layers * (4 + len(MIXER_SITES)) + 1
    # Without asking for it, the per-step state is neither emitted nor kept.
    assert tuple(visited_sites(model)) == tuple(s for s in model.sites if not s.endswith(".ssm_state"))
    # Layouts as documented.
    out = run(model, tokens, capture="all")
    b, t, d, di, n = 2, 5, cfg.d_model, cfg.d_inner, cfg.d_state
    expect = {"embed": (b, t, d), "final_norm": (b, t, d), "resid_pre": (b, t, d), "norm": (b, t, d),
              "mixer_out": (b, t, d), "resid_post": (b, t, d), "B": (b, t, n), "C": (b, t, n),
              "ssm_state": (b, t, di, n)}
    for name, value in out.cache.items():
        assert value.shape == expect.get(name.rsplit(".", 1)[-1], (b, t, di)), name
    assert set(out.cache) == set(model.sites)


def test_unknown_site_suggests_mamba_sites(tmp_path):
    _, model = make(tmp_path, **SHAPES["d32s4auto"])
    with pytest.raises(ji.UnknownSiteError, match="blocks.0.mixer.ssm_state"):
        model.run(np.zeros((1, 3), int), capture="blocks.0.mixer.ssm_stat")


# ----------------------------------------------------------------------------- config / conversion


@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
def test_config_round_trips_through_transformers(shape):
    cfg = MambaConfig.from_hf(hf_config(**SHAPES[shape]).to_dict())
    assert MambaConfig.from_hf(transformers.MambaConfig(**cfg.to_hf()).to_dict()) == cfg
    assert cfg.dt_rank == SHAPES[shape].get("time_step_rank", -(-SHAPES[shape]["hidden_size"] // 16))


def test_presets():
    cfg = MambaConfig.mamba_130m()
    assert (cfg.d_inner, cfg.dt_rank, cfg.d_state) == (1536, 48, 16)
    assert not hasattr(cfg, "max_seq_len")
    assert MambaConfig.tiny(d_model=80).dt_rank == 5
    with pytest.raises(ValueError, match="dt_rank"):
        MambaConfig.tiny(dt_rank=0)


def test_130m_shapes_match_hf_state_dict():
    """Every tensor of HF's mamba-130m architecture maps onto a parameter of the same size (no allocation)."""
    cfg = MambaConfig.mamba_130m()
    with torch.device("meta"):
        hf = transformers.MambaForCausalLM(transformers.MambaConfig(**cfg.to_hf()))
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    shapes = param_shapes(cfg)
    ours = expected_hf_shapes(convert.entries(cfg), shapes, cfg.n_layers)
    assert ours == hf_shapes
    assert sum(int(np.prod(s)) for s in ours.values()) == 129_135_360
    axes = ji.sharding.param_axes("mamba", shapes)
    is_axes = lambda x: isinstance(x, tuple)
    assert jax.tree_util.tree_structure(axes, is_leaf=is_axes) == jax.tree_util.tree_structure(shapes)
    for a, s in zip(jax.tree_util.tree_leaves(axes, is_leaf=is_axes), jax.tree_util.tree_leaves(shapes)):
        assert len(a) == len(s.shape)


@pytest.mark.parametrize("shape", ["d32s4auto", "d48s16r5"], ids=str)
def test_roundtrip_export(tmp_path, shape):
    kw = SHAPES[shape]
    save_random_hf(transformers.MambaForCausalLM, hf_config(**kw), tmp_path / "a")
    model = ji.load(tmp_path / "a")
    ji.save_pretrained(model, tmp_path / "b")
    hf_b = transformers.MambaForCausalLM.from_pretrained(tmp_path / "b").eval()
    tokens = tokens_for(kw["vocab_size"], 2, 9)
    ref, _ = hf_run(hf_b, tokens)
    assert max_err(run(model, tokens).logits, ref.logits) < TOL
    assert ji.load(tmp_path / "b").config == model.config


def test_init_runs_and_exports(tmp_path):
    cfg = MambaConfig.tiny(vocab_size=50, d_model=32)
    model = jax.jit(lambda key: ji.init(cfg, key))(jax.random.PRNGKey(0))
    a_log = np.asarray(model.params["layers"]["mixer"]["A_log"][0])
    assert np.allclose(np.exp(a_log), np.arange(1, cfg.d_state + 1))  # S4D-real init, A = -[1..N]
    ji.save_pretrained(model, tmp_path)
    hf = transformers.MambaForCausalLM.from_pretrained(tmp_path).eval()
    tokens = tokens_for(50, 1, 6)
    ref, _ = hf_run(hf, tokens)
    assert max_err(run(model, tokens).logits, ref.logits) < TOL


def test_bfloat16_load(tmp_path):
    kw = SHAPES["d32s4auto"]
    _, model = make(tmp_path, **kw)
    bf = ji.load(tmp_path, dtype="bfloat16")
    tokens = tokens_for(kw["vocab_size"], 1, 8)
    out = run(bf, tokens, capture=["blocks.0.mixer.ssm_out", "blocks.1.resid_post"])
    assert out.cache["blocks.0.mixer.ssm_out"].dtype == jnp.bfloat16
    assert out.cache["blocks.1.resid_post"].dtype == jnp.float32  # residual_in_fp32
    ref = np.asarray(run(model, tokens).logits)
    assert max_err(np.asarray(out.logits, np.float32), ref) < 0.05 * np.abs(ref).max()


@pytest.fixture
def checkpoint(tmp_path):
    save_random_hf(transformers.MambaForCausalLM, hf_config(**SHAPES["d32s4auto"]), tmp_path)
    return read_hf_dir(tmp_path)


def test_refuses_unknown_config_field(tmp_path, checkpoint):
    config, tensors = checkpoint
    write_hf_dir(tmp_path / "x", {**config, "use_fancy_gate": True}, tensors)
    with pytest.raises(ConversionError, match="use_fancy_gate"):
        ji.load(tmp_path / "x")
    with pytest.raises(ConversionError, match="intermediate_size"):
        MambaConfig.from_hf({**config, "intermediate_size": 65})


def test_refuses_bad_checkpoints(checkpoint):
    config, tensors = checkpoint
    cfg = MambaConfig.from_hf(config)
    name = "backbone.layers.1.mixer.conv1d.weight"
    missing = {k: v for k, v in tensors.items() if k != name}
    with pytest.raises(ConversionError, match=f"missing tensors.*{name}"):
        FAMILY.from_hf(cfg, missing)
    extra = {**tensors, "backbone.layers.1.mixer.dt_norm.weight": np.zeros(3, np.float32)}
    with pytest.raises(ConversionError, match="unexpected tensors.*dt_norm"):
        FAMILY.from_hf(cfg, extra)
    bad = {**tensors, "backbone.layers.0.mixer.A_log": np.zeros((64, 5), np.float32)}
    with pytest.raises(ConversionError, match=r"mis-shaped.*A_log: checkpoint \(64, 5\) vs expected \(64, 4\)"):
        FAMILY.from_hf(cfg, bad)
    # A checkpoint with conv biases for a config without them is refused too.
    with pytest.raises(ConversionError, match="unexpected tensors.*conv1d.bias"):
        FAMILY.from_hf(dataclasses.replace(cfg, use_conv_bias=False), tensors)


def test_loads_backbone_only_checkpoint(checkpoint):
    """MambaModel checkpoints (no ``backbone.`` prefix, old ``embedding.`` name) load too."""
    config, tensors = checkpoint
    cfg = MambaConfig.from_hf(config)
    stripped = {k.removeprefix("backbone.").replace("embeddings.", "embedding."): v for k, v in tensors.items()}
    a, b = FAMILY.from_hf(cfg, tensors), FAMILY.from_hf(cfg, stripped)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x, y: np.array_equal(x, y), a, b))


def test_sequential_scan_does_not_materialise_states_unless_asked(tmp_path):
    """With scan="sequential" the compiled program holds no [B, T, Di, N] array unless ssm_state is asked for."""
    _, model = make(tmp_path, **SHAPES["d32s4auto"])
    model = model.replace(config=dataclasses.replace(model.config, scan="sequential"))
    tokens = jnp.asarray(tokens_for(61, 2, 11))
    states_shape = f"f32[2,11,{model.config.d_inner},{model.config.d_state}]"

    def hlo(capture):
        fn = jax.jit(lambda m, t: m.run(t, capture=capture).logits)
        return fn.lower(model, tokens).compile().as_text()

    assert states_shape not in hlo("blocks.*.resid_post")
    assert states_shape in hlo("blocks.0.mixer.ssm_state")


def test_logits_at_selects_positions(tmp_path):
    _, model = make(tmp_path, **SHAPES["d48s16r5"])
    tokens = jnp.asarray(tokens_for(77, 2, 9))
    full = run(model, tokens).logits
    some = jax.jit(lambda m, t: m.run(t, logits_at=jnp.array([[2, 8], [2, 8]])).logits)(model, tokens)
    assert some.shape == (2, 2, 77)
    assert max_err(some, full[:, [2, 8]]) < 1e-6


@pytest.mark.parametrize("shape", ["d32s4auto", "d48s16r5"])
def test_parameter_grads_match_hf(tmp_path, shape):
    """Training relies on these: d(loss)/d(every parameter) equals HF torch's backward, for a loss
    read at the last position only (so the gradient has to flow back through the whole scan)."""
    hf, model = make(tmp_path, **SHAPES[shape])
    tokens = tokens_for(model.config.vocab_size, 2, 23)

    assert_param_grads_match_hf(model, FAMILY, hf, tokens)
