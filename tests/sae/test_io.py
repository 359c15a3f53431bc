"""SAEs from the public ecosystem: every format built from random arrays (written with numpy /
safetensors / torch.save), read with ``ji.sae.load`` and checked against a direct NumPy
computation of THAT format's definition; SAELens round trips; the TransformerLens hook table;
splicing loaded SAEs into a model; one-line errors."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import jaxinterp as ji
from jaxinterp.models.gpt2 import GPT2Config
from jaxinterp.sae import Reads, Splice, init_sae
from jaxinterp.sae.io import FormatError, TL_HOOKS, UnknownHookError, site_for_hook
from jaxinterp.sae.metrics import reconstruction_metrics

D, F = 8, 24


def _x(n=64, d=D, seed=3, scale=2.0):
    return (np.random.default_rng(seed).normal(size=(n, d)) * scale + 0.5).astype(np.float32)


def _close(a, b, tol=2e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- Gemma Scope


def _gemmascope_arrays(seed=0):
    r = np.random.default_rng(seed)
    return {"W_enc": r.normal(size=(D, F)).astype(np.float32) / 2, "W_dec": r.normal(size=(F, D)).astype(np.float32),
            "b_enc": r.normal(size=F).astype(np.float32) * 0.3, "b_dec": r.normal(size=D).astype(np.float32),
            "threshold": r.uniform(0.2, 1.5, size=F).astype(np.float32)}


def test_gemmascope_matches_its_definition(tmp_path):
    a = _gemmascope_arrays()
    np.savez(tmp_path / "params.npz", **a)
    sae = ji.sae.load(tmp_path, site="blocks.1.hook_resid_post")
    x = _x()
    pre = x.astype(np.float64) @ a["W_enc"] + a["b_enc"]  # no b_dec subtracted
    f = (pre > a["threshold"]) * pre
    assert 0.1 < (f != 0).mean() < 0.9  # the threshold matters on this data
    _close(sae.encode(jnp.asarray(x)), f)
    _close(sae.decode(jnp.asarray(f, jnp.float32)), f @ a["W_dec"] + a["b_dec"])
    assert sae.family == "jumprelu" and sae.site == "blocks.1.resid_post"
    assert ji.sae.load(tmp_path / "params.npz").site is None  # the file names no site


def test_gemmascope_refuses_missing_key_and_negative_threshold(tmp_path):
    a = _gemmascope_arrays()
    np.savez(tmp_path / "params.npz", **{k: v for k, v in a.items() if k != "threshold"})
    with pytest.raises(FormatError, match=r"missing \['threshold'\]; a Gemma Scope params.npz holds"):
        ji.sae.load(tmp_path / "params.npz")
    np.savez(tmp_path / "params.npz", **{**a, "threshold": a["threshold"] - 1.0})
    with pytest.raises(FormatError, match="negative thresholds"):
        ji.sae.load(tmp_path / "params.npz")


# ----------------------------------------------------------------------------- SAELens


def _np_saelens(cfg, w, x, scale=None):
    """SAELens's forward written out from its definition: ``(latents, reconstruction)``."""
    meta = cfg.get("metadata", {})
    x = np.asarray(x, np.float64)
    shape = x.shape
    if cfg.get("reshape_activations") == "hook_z":
        x = x.reshape(*shape[:-2], -1)
    if meta.get("hook_head_index") is not None:
        x = x[..., meta["hook_head_index"], :]
    norm = cfg.get("normalize_activations", "none")
    if norm == "expected_average_only_in":
        x = x * scale
    elif norm == "constant_norm_rescale":
        coeff = np.sqrt(x.shape[-1]) / np.linalg.norm(x, axis=-1, keepdims=True)
        x = x * coeff
    elif norm == "layer_norm":
        mu = x.mean(-1, keepdims=True)
        std = np.std(x - mu, axis=-1, keepdims=True, ddof=1)
        x = (x - mu) / (std + 1e-5)
    sae_in = x - w["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    arch = cfg["architecture"]
    w_dec = w["W_dec"]
    if arch == "gated":
        gate = sae_in @ w["W_enc"] + w["b_gate"] > 0
        f = gate * np.maximum(sae_in @ (w["W_enc"] * np.exp(w["r_mag"])) + w["b_mag"], 0)
    else:
        pre = sae_in @ w["W_enc"] + w["b_enc"]
        if arch == "jumprelu":
            f = np.maximum(pre, 0) * (pre > w["threshold"])
        elif arch == "topk":
            norms = np.linalg.norm(w_dec, axis=-1)
            if cfg.get("rescale_acts_by_decoder_norm"):
                pre = pre * norms
            k = cfg["k"]
            keep = np.argsort(-pre, axis=-1)[..., :k]
            f = np.zeros_like(pre)
            np.put_along_axis(f, keep, np.maximum(np.take_along_axis(pre, keep, -1), 0), -1)
            if cfg.get("rescale_acts_by_decoder_norm"):
                w_dec = w_dec / norms[:, None]  # decode(f) = (f / n) @ W_dec
        else:
            f = np.maximum(pre, 0)
    scaled = f * w["scaling_factor"] if "scaling_factor" in w else f
    out = scaled @ w_dec + w["b_dec"]
    if norm == "expected_average_only_in":
        out = out / scale
    elif norm == "constant_norm_rescale":
        out = out / coeff
    elif norm == "layer_norm":
        out = out * std + mu
    return f, out.reshape(shape) if cfg.get("reshape_activations") == "hook_z" else out


def _saelens_weights(arch, seed=0, d=D):
    r = np.random.default_rng(seed)
    w = {"W_enc": r.normal(size=(d, F)) / np.sqrt(d), "W_dec": r.normal(size=(F, d)) * 0.7, "b_dec": r.normal(size=d)}
    if arch == "gated":
        w.update(b_gate=r.normal(size=F) * 0.3, r_mag=r.normal(size=F) * 0.3, b_mag=r.normal(size=F) * 0.3)
    else:
        w["b_enc"] = r.normal(size=F) * 0.3
    if arch == "jumprelu":
        w["threshold"] = np.concatenate([[-0.2], r.uniform(0.0, 0.6, size=F - 1)])  # one negative: acts as 0
    return {k: v.astype(np.float32) for k, v in w.items()}


def _write_saelens(path, cfg, w):
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: np.ascontiguousarray(v) for k, v in w.items()}, str(path / "sae_weights.safetensors"))
    return path


def _cfg(arch, **kw):
    cfg = {"architecture": arch, "d_in": D, "d_sae": F, "dtype": "float32", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.5.0", "hook_name": "blocks.1.hook_resid_post"}}
    if arch == "topk":
        cfg["k"] = 5
    return {**cfg, **kw}


@pytest.mark.parametrize("norm", ["none", "expected_average_only_in", "constant_norm_rescale", "layer_norm"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
def test_saelens_matches_its_definition(tmp_path, arch, apply_b_dec, norm):
    cfg, w = _cfg(arch, apply_b_dec_to_input=apply_b_dec, normalize_activations=norm), _saelens_weights(arch)
    path = _write_saelens(tmp_path / "sae", cfg, w)
    if norm == "expected_average_only_in":
        (path / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 0.37}))
    sae = ji.sae.load(path)
    x = _x()
    f, x_hat = _np_saelens(cfg, {k: v.astype(np.float64) for k, v in w.items()}, x, scale=0.37)
    assert 0.05 < (f != 0).mean() < 0.95
    _close(sae.encode(jnp.asarray(x)), f)
    _close(sae(jnp.asarray(x)), x_hat)
    _close(sae.decode(jnp.asarray(f, jnp.float32), jnp.asarray(x)), x_hat)
    assert isinstance(sae, ji.sae.FAMILIES[{"standard": "relu"}.get(arch, arch)]) and sae.site == "blocks.1.resid_post"


def test_saelens_pre6_layout_topk_kwargs_finetuning_and_rescale(tmp_path):
    # SAELens < 6: top-level hook_point, activation_fn_str topk with its k in activation_fn_kwargs
    w = _saelens_weights("standard")
    old = {"d_in": D, "d_sae": F, "hook_point": "blocks.0.hook_mlp_out", "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": 4}, "apply_b_dec_to_input": False, "normalize_activations": False}
    sae = ji.sae.load(_write_saelens(tmp_path / "old", old, w))
    f, x_hat = _np_saelens({**old, "architecture": "topk", "k": 4}, w, _x())
    _close(sae.encode(jnp.asarray(_x())), f)
    _close(sae(jnp.asarray(_x())), x_hat)
    assert sae.family == "topk" and sae.site == "blocks.0.mlp_out"
    # finetuning scaling factor (latents scaled before decoding)
    sf = np.random.default_rng(5).uniform(0.5, 2.0, F).astype(np.float32)
    cfg = _cfg("standard", finetuning_scaling_factor=True)
    sae = ji.sae.load(_write_saelens(tmp_path / "ft", cfg, {**w, "scaling_factor": sf}))
    f, x_hat = _np_saelens(cfg, {**w, "scaling_factor": sf}, _x())
    _close(sae.encode(jnp.asarray(_x())), f)
    _close(sae(jnp.asarray(_x())), x_hat)
    # topk with rescale_acts_by_decoder_norm: latents are pre-activations scaled by the decoder norms
    cfg = _cfg("topk", rescale_acts_by_decoder_norm=True)
    sae = ji.sae.load(_write_saelens(tmp_path / "rs", cfg, w))
    f, x_hat = _np_saelens(cfg, w, _x())
    _close(sae.encode(jnp.asarray(_x())), f)
    _close(sae(jnp.asarray(_x())), x_hat)


def test_saelens_refuses_bad_configs_in_one_line(tmp_path):
    w = _saelens_weights("standard")
    cases = [
        (_cfg("standard", activation_fn="tanh-relu"), "activation_fn 'tanh-relu' is not supported with architecture "
                                                       r"'standard'; valid: \['relu', 'topk'\]"),
        (_cfg("standard", normalize_activations="rms"), "normalize_activations='rms' is unknown; valid: "
                                                         r"\['none', 'expected_average_only_in'"),
        (_cfg("matryoshka"), "unsupported SAELens architecture 'matryoshka'; supported"),
        (_cfg("transcoder"), "is a transcoder"),
        (_cfg("standard", metadata={"hook_name": "hook_pos_embed"}), "hook .hook_pos_embed. has no jaxinterp site: our embed"),
        (_cfg("standard", metadata={"hook_name": "blocks.1.hook_resid_psot"}),
         "unknown hook name 'blocks.1.hook_resid_psot'; closest: blocks.1.hook_resid_post"),
        (_cfg("standard", normalize_activations="expected_average_only_in"), "needs the norm scaling factor"),
        (_cfg("standard", d_sae=F + 1), r"mis-shaped W_enc \(8, 24\) \(want \(8, 25\)\)"),
    ]
    for i, (cfg, message) in enumerate(cases):
        with pytest.raises(ValueError, match=message) as err:
            ji.sae.load(_write_saelens(tmp_path / str(i), cfg, w))
        assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- dictionary_learning


def _np_dictlearn(cls, sd, x):
    """dictionary_learning's encode / decode written out per class from its definition."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    x = np.asarray(x, np.float64)
    lin = lambda v, name: v @ sd[f"{name}.weight"].T + (sd[f"{name}.bias"] if f"{name}.bias" in sd else 0)
    relu = lambda v: np.maximum(v, 0)
    if cls == "AutoEncoder":
        f = relu(lin(x - sd["bias"], "encoder"))
        return f, lin(f, "decoder") + sd["bias"]
    if cls == "AutoEncoderNew":
        f = relu(lin(x, "encoder"))
        return f, lin(f, "decoder")
    if cls == "GatedAutoEncoder":
        e = lin(x - sd["decoder_bias"], "encoder")
        f = (e + sd["gate_bias"] > 0) * relu(np.exp(sd["r_mag"]) * e + sd["mag_bias"])
        return f, lin(f, "decoder") + sd["decoder_bias"]
    if cls == "JumpReluAutoEncoder":
        pre = x @ sd["W_enc"] + sd["b_enc"]
        f = relu(pre * (pre > sd["threshold"]))
        return f, f @ sd["W_dec"] + sd["b_dec"]
    if cls == "MatryoshkaBatchTopKSAE":
        a = relu((x - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"])
        f = a * (a > sd["threshold"])
        return f, f @ sd["W_dec"] + sd["b_dec"]
    a = relu(lin(x - sd["b_dec"], "encoder"))
    if cls == "BatchTopKSAE":
        f = a * (a > sd["threshold"])
    else:  # AutoEncoderTopK: top-k of the ReLU'd pre-activations
        keep = np.argsort(-a, axis=-1)[:, :int(sd["k"])]
        f = np.zeros_like(a)
        np.put_along_axis(f, keep, np.take_along_axis(a, keep, -1), -1)
    return f, lin(f, "decoder") + sd["b_dec"]


def _dictlearn_state(cls, seed=0):
    r = np.random.default_rng(seed)
    n = lambda *s: r.normal(size=s).astype(np.float32)
    lin = {"encoder.weight": n(F, D) / np.sqrt(D), "encoder.bias": n(F) * 0.3, "decoder.weight": n(D, F)}
    raw = {"W_enc": n(D, F) / np.sqrt(D), "b_enc": n(F) * 0.3, "W_dec": n(F, D), "b_dec": n(D)}
    topk = {"b_dec": n(D), "k": np.asarray(5, np.int32), "threshold": np.asarray(0.4, np.float32)}
    return {
        "AutoEncoder": {**lin, "bias": n(D)},
        "AutoEncoderNew": {**lin, "decoder.bias": n(D)},
        "GatedAutoEncoder": {"encoder.weight": lin["encoder.weight"], "decoder.weight": lin["decoder.weight"],
                             "decoder_bias": n(D), "r_mag": n(F) * 0.3, "gate_bias": n(F) * 0.3, "mag_bias": n(F) * 0.3},
        "AutoEncoderTopK": {**lin, **topk},
        "BatchTopKSAE": {**lin, **topk},
        "MatryoshkaBatchTopKSAE": {**raw, "k": topk["k"], "threshold": topk["threshold"],
                                   "group_sizes": np.asarray([8, 16], np.int64)},
        "JumpReluAutoEncoder": {**raw, "threshold": np.concatenate([[-0.1], r.uniform(0, 0.6, F - 1)]).astype(np.float32)},
    }[cls]


def _torch_save(path, state):
    torch = pytest.importorskip("torch")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, path)


_FAMILY_OF = {"AutoEncoder": "relu", "AutoEncoderNew": "relu", "GatedAutoEncoder": "gated", "AutoEncoderTopK": "topk",
              "BatchTopKSAE": "batchtopk", "MatryoshkaBatchTopKSAE": "batchtopk", "JumpReluAutoEncoder": "jumprelu"}


@pytest.mark.parametrize("cls", sorted(_FAMILY_OF))
def test_dictlearn_matches_its_definition(tmp_path, cls):
    state = _dictlearn_state(cls)
    _torch_save(tmp_path / "resid_out_layer2" / "ae.pt", state)
    (tmp_path / "resid_out_layer2" / "config.json").write_text(json.dumps(
        {"trainer": {"dict_class": cls, "submodule_name": "resid_out_layer2", "layer": 2}}))
    sae = ji.sae.load(tmp_path / "resid_out_layer2")
    x = _x()
    f, x_hat = _np_dictlearn(cls, state, x)
    assert 0.05 < (f != 0).mean() < 0.95
    _close(sae.encode(jnp.asarray(x)), f)
    _close(sae(jnp.asarray(x)), x_hat)
    assert sae.family == _FAMILY_OF[cls] and sae.site == "blocks.2.resid_post"


def test_dictlearn_safetensors_and_class_from_tensor_names(tmp_path):
    state = _dictlearn_state("AutoEncoder")
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp_path / "ae.safetensors"))
    sae = ji.sae.load(tmp_path / "ae.safetensors", site="blocks.0.hook_attn_out")  # no config.json: names decide
    f, x_hat = _np_dictlearn("AutoEncoder", state, _x())
    _close(sae.encode(jnp.asarray(_x())), f)
    _close(sae(jnp.asarray(_x())), x_hat)
    assert sae.site == "blocks.0.attn_out"
    state = _dictlearn_state("BatchTopKSAE")
    (tmp_path / "b").mkdir()
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp_path / "b" / "ae.safetensors"))
    with pytest.raises(FormatError, match=r"fit \['AutoEncoderTopK', 'BatchTopKSAE'\] alike"):
        ji.sae.load(tmp_path / "b")
    assert ji.sae.load(tmp_path / "b", dict_class="BatchTopKSAE").family == "batchtopk"
    with pytest.raises(FormatError, match="dict_class 'Crosscoder' is not supported"):
        ji.sae.load(tmp_path / "b", dict_class="Crosscoder")


# ----------------------------------------------------------------------------- round trip


def _random_sae(family, **kw):
    sae = init_sae(family, __import__("jax").random.PRNGKey(0), D, F, k=5, input_scale=0.4)
    r = np.random.default_rng(1)
    params = {k: jnp.asarray(v + 0.3 * r.normal(size=v.shape), jnp.float32) for k, v in sae.params.items()}
    buffers = {**sae.buffers, **({"threshold": jnp.float32(0.3)} if family == "batchtopk" else {})}
    return sae.replace(params=params, buffers=buffers, **kw)


@pytest.mark.parametrize("family", ["relu", "panneal", "topk", "batchtopk", "jumprelu", "gated"])
def test_save_saelens_then_load_equals(tmp_path, family):
    sae = _random_sae(family, reads=Reads(site="blocks.1.resid_post"),
                      act_norm="layer_norm" if family == "relu" else "none")
    ji.sae.save(sae, tmp_path / "s", format="saelens", model_name="facts-gpt")
    back = ji.sae.load(tmp_path / "s")
    x = jnp.asarray(_x())
    _close(back.encode(x), sae.encode(x))
    _close(back(x), sae(x))
    assert back.family == sae.family and back.reads == sae.reads and back.act_norm == sae.act_norm
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    # the file computes the same under SAELens's own definition (independent of our reader)
    from safetensors.numpy import load_file
    f, x_hat = _np_saelens(cfg, {k: v.astype(np.float64) for k, v in load_file(str(tmp_path / "s" /
                                                                                   "sae_weights.safetensors")).items()}, x)
    _close(f, sae.encode(x))
    _close(x_hat, sae(x))
    ji.sae.save(_random_sae("relu"), tmp_path / "s")  # replaces the directory
    assert ji.sae.load(tmp_path / "s").family == "relu" and not list(tmp_path.glob(".s*"))


def test_save_refuses_other_formats_and_grids(tmp_path):
    with pytest.raises(ValueError, match=r"cannot save SAEs as 'npz'; choose one of \['saelens'\]"):
        ji.sae.save(_random_sae("relu"), tmp_path / "s", format="npz")
    with pytest.raises(FormatError, match="cannot tell the SAE format"):
        (tmp_path / "empty").mkdir()
        ji.sae.load(tmp_path / "empty")


# ----------------------------------------------------------------------------- hook names


def test_every_tl_hook_maps_to_a_real_site_or_says_why_not():
    sites = set(ji.init(GPT2Config.tiny(n_layers=2, d_model=16, n_heads=2, d_mlp=32, vocab_size=11)).sites)
    for hook, (site, note) in TL_HOOKS.items():
        name = hook.replace("{L}", "1")
        if site is None:
            with pytest.raises(UnknownHookError, match=f"hook '{name}' has no jaxinterp site: "):
                site_for_hook(name)
            continue
        mapped = site_for_hook(name)
        assert mapped == site.replace("{L}", "1")
        assert mapped in sites or note == "gated MLPs only", (hook, mapped)
    assert site_for_hook("blocks.3.resid_post") == "blocks.3.resid_post"  # our own names pass
    with pytest.raises(UnknownHookError, match="unknown hook name 'model.layers.3'"):
        site_for_hook("model.layers.3")


# ----------------------------------------------------------------------------- splicing


def _tiny_model():
    cfg = GPT2Config.tiny(vocab_size=23, d_model=D, n_layers=2, n_heads=2, d_mlp=32, max_seq_len=12)
    return ji.init(cfg, 0), np.asarray(np.random.default_rng(1).integers(0, 23, (3, 12)))


def test_loaded_saes_splice_into_a_model_run(tmp_path):
    model, tokens = _tiny_model()
    clean = model.run(tokens, capture=["blocks.0.resid_post", "blocks.1.attn.z"]).cache
    # a layer-norm SAELens SAE at a residual site: the spliced value is its reconstruction
    cfg = _cfg("jumprelu", normalize_activations="layer_norm", metadata={"hook_name": "blocks.0.hook_resid_post"})
    w = _saelens_weights("jumprelu")
    sae = ji.sae.load(_write_saelens(tmp_path / "r", cfg, w))
    out = model.run(tokens, capture=sae.site, interventions={sae.site: Splice(sae)}).cache[sae.site]
    _close(out, _np_saelens(cfg, w, np.asarray(clean["blocks.0.resid_post"]))[1], 1e-4)
    # an attention SAE reading hook_z with the heads flattened (d_in = H * Dh = 8)
    cfg = _cfg("standard", reshape_activations="hook_z", metadata={"hook_name": "blocks.1.attn.hook_z"})
    sae = ji.sae.load(_write_saelens(tmp_path / "z", cfg, _saelens_weights("standard")))
    assert sae.reads == Reads(site="blocks.1.attn.z", flatten_heads=True)
    out = model.run(tokens, capture=sae.site, interventions={sae.site: Splice(sae)}).cache[sae.site]
    z = np.asarray(clean["blocks.1.attn.z"])  # [B, T, H, Dh]
    _close(out, _np_saelens(cfg, _saelens_weights("standard"), z)[1], 1e-4)
    # one head of hook_z (SAELens < 6 hook_head_index): only that head changes
    cfg = _cfg("standard", d_in=4, metadata={"hook_name": "blocks.1.attn.hook_z", "hook_head_index": 1})
    sae = ji.sae.load(_write_saelens(tmp_path / "h", cfg, _saelens_weights("standard", d=4)))
    out = np.asarray(model.run(tokens, capture=sae.site, interventions={sae.site: Splice(sae)}).cache[sae.site])
    _close(out[:, :, 0], z[:, :, 0])
    _close(out[:, :, 1], _np_saelens(cfg, _saelens_weights("standard", d=4), z)[1], 1e-4)
    # reconstruction metrics work on a per-input-normalised SAE
    assert reconstruction_metrics(ji.sae.load(tmp_path / "r"), np.asarray(clean["blocks.0.resid_post"]).reshape(-1, D))[
        "fve"] < 1


def test_splicing_a_sae_of_the_wrong_width_is_refused(tmp_path):
    model, tokens = _tiny_model()
    np.savez(tmp_path / "params.npz", **_gemmascope_arrays())
    sae = ji.sae.load(tmp_path, site="blocks.0.mlp.post")  # width 32, the SAE reads 8
    with pytest.raises(ValueError, match=r"Splice at 'blocks.0.mlp.post': the SAE reads d_in=8 features but the site "
                                         r"has width 32 .* \(blocks.0.mlp.post\) or a site of width 8"):
        model.run(tokens, interventions={sae.site: Splice(sae)})
    sae = ji.sae.load(tmp_path, site="blocks.0.attn.hook_q")  # heads flattened: 2 x 4 = 8 fits
    assert model.run(tokens, interventions={sae.site: Splice(sae)}).logits.shape == (3, 12, 23)
