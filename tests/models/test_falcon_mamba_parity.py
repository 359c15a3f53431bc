"""Falcon-Mamba (the mamba family with ``mixer_norm_eps``) vs Hugging Face transformers'
FalconMambaForCausalLM (pure-torch path), site by site, float32, random-initialised models; export,
bf16 load and config refusals."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from tests.hf_utils import max_err, save_random_hf, torch, transformers
from tests.models.test_mamba_parity import numpy_recurrence, run, tokens_for, torch_reference_path  # noqa: F401

import jaxinterp as ji
from jaxinterp.hf import ConversionError, read_hf_dir, write_hf_dir
from jaxinterp.models.mamba import MambaConfig

TOL = 1e-4
SHAPES = {
    # tied embeddings, dt rank auto, HF's default mixer epsilon
    "d32s4": dict(hidden_size=32, num_hidden_layers=2, state_size=4, vocab_size=61),
    # a large mixer epsilon (it changes the result: checked below), biases, untied, conv 3, explicit dt rank
    "d48s16eps": dict(hidden_size=48, num_hidden_layers=3, state_size=16, vocab_size=77, time_step_rank=5,
                      use_bias=True, tie_word_embeddings=False, conv_kernel=3, mixer_rms_eps=0.05),
}


def make(tmp_path, **kw):
    hf = save_random_hf(transformers.FalconMambaForCausalLM, transformers.FalconMambaConfig(**kw), tmp_path)
    return hf, ji.load(tmp_path)


def hf_run(hf, tokens):
    """HF forward with hooks on the modules whose inputs/outputs are named sites (the mixer norms included)."""
    got = {}

    def keep(name, use_input=False):
        def hook(module, args, out):
            got[name] = (args[0] if use_input else out).detach().numpy()
        return hook

    handles = []
    for i, layer in enumerate(hf.backbone.layers):
        m = layer.mixer
        handles += [layer.norm.register_forward_hook(keep(f"blocks.{i}.norm")),
                    m.in_proj.register_forward_hook(keep(f"{i}.in_proj")),
                    m.dt_layernorm.register_forward_hook(keep(f"{i}.dt_low")),
                    m.b_layernorm.register_forward_hook(keep(f"blocks.{i}.mixer.B")),
                    m.c_layernorm.register_forward_hook(keep(f"blocks.{i}.mixer.C")),
                    m.out_proj.register_forward_hook(keep(f"blocks.{i}.mixer.gated", use_input=True)),
                    m.register_forward_hook(keep(f"blocks.{i}.mixer_out"))]
    try:
        with torch.no_grad():
            out = hf(torch.as_tensor(tokens, dtype=torch.long), output_hidden_states=True, use_cache=True)
    finally:
        for h in handles:
            h.remove()
    return out, got


@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
def test_falcon_mamba_matches_hf(tmp_path, shape):
    kw = SHAPES[shape]
    hf, model = make(tmp_path, **kw)
    assert model.family == "mamba" and model.config.mixer_norm_eps == kw.get("mixer_rms_eps", 1e-6)
    tokens = tokens_for(kw["vocab_size"], 2, 11, seed=4)
    ref, hooked = hf_run(hf, tokens)
    c = run(model, tokens, capture="all").cache
    n, di = model.config.n_layers, model.config.d_inner
    assert max_err(run(model, tokens).logits, ref.logits) < TOL
    for i in range(n):  # HF's FalconMambaModel: hidden_states[i] after block i, [n] after norm_f
        assert max_err(c[f"blocks.{i}.resid_post"], ref.hidden_states[i]) < TOL, i
    assert max_err(c["final_norm"], ref.hidden_states[n]) < TOL
    for i in range(n):
        m, mixer = f"blocks.{i}.mixer", hf.backbone.layers[i].mixer
        for site in (f"blocks.{i}.norm", f"{m}.B", f"{m}.C", f"{m}.gated", f"blocks.{i}.mixer_out"):
            assert max_err(c[site], hooked[site]) < TOL, site
        assert max_err(c[f"{m}.in_x"], hooked[f"{i}.in_proj"][..., :di]) < TOL
        assert max_err(c[f"{m}.in_z"], hooked[f"{i}.in_proj"][..., di:]) < TOL
        with torch.no_grad():  # delta from HF's normalised dt input and its dt_proj weights
            delta = torch.nn.functional.softplus(torch.as_tensor(hooked[f"{i}.dt_low"]) @ mixer.dt_proj.weight.T
                                                 + mixer.dt_proj.bias).numpy()
        assert max_err(c[f"{m}.delta"], delta) < TOL
        # The scan runs on the normalised B / C: states equal a plain recurrence on HF's values.
        a = -np.exp(mixer.A_log.detach().numpy().astype(np.float64))
        states, _ = numpy_recurrence(c[f"{m}.ssm_in"], delta, a, hooked[f"{m}.B"], hooked[f"{m}.C"])
        assert max_err(c[f"{m}.ssm_state"], states) < TOL
        assert max_err(c[f"{m}.ssm_state"][:, -1], ref.cache_params.get_recurrent_state(i, state_idx=0).numpy()) < TOL
    # The norms matter: the same weights without them (Mamba-1) or with another epsilon differ.
    plain = model.replace(config=dataclasses.replace(model.config, mixer_norm_eps=None))
    assert max_err(run(plain, tokens).logits, ref.logits) > 1e-2
    if shape == "d48s16eps":
        other = model.replace(config=dataclasses.replace(model.config, mixer_norm_eps=1e-6))
        assert max_err(run(other, tokens).logits, ref.logits) > 1e-3


def test_falcon_mamba_export_round_trip(tmp_path):
    kw = SHAPES["d48s16eps"]
    _, model = make(tmp_path / "a", **kw)
    ji.save_pretrained(model, tmp_path / "b")
    written, _ = read_hf_dir(tmp_path / "b")
    assert written["model_type"] == "falcon_mamba" and written["mixer_rms_eps"] == 0.05
    hf_b = transformers.FalconMambaForCausalLM.from_pretrained(tmp_path / "b").eval()
    tokens = tokens_for(kw["vocab_size"], 2, 9)
    ref, _ = hf_run(hf_b, tokens)
    assert max_err(run(model, tokens).logits, ref.logits) < TOL
    assert ji.load(tmp_path / "b").config == model.config
    # A model built here (ji.init) exports as Falcon-Mamba too.
    fresh = ji.init(MambaConfig.falcon_tiny(vocab_size=50, d_model=32), 1)
    ji.save_pretrained(fresh, tmp_path / "c")
    ref, _ = hf_run(transformers.FalconMambaForCausalLM.from_pretrained(tmp_path / "c").eval(), tokens % 50)
    assert max_err(run(fresh, tokens % 50).logits, ref.logits) < TOL


def test_falcon_mamba_bfloat16_load(tmp_path):
    kw = SHAPES["d32s4"]
    _, model = make(tmp_path, **kw)
    bf = ji.load(tmp_path, dtype="bfloat16")
    tokens = tokens_for(kw["vocab_size"], 1, 8)
    out = run(bf, tokens, capture=["blocks.0.mixer.B", "blocks.1.resid_post"])
    assert out.cache["blocks.0.mixer.B"].dtype == jnp.bfloat16
    assert out.cache["blocks.1.resid_post"].dtype == jnp.float32  # residual_in_fp32
    ref = np.asarray(run(model, tokens).logits)
    assert max_err(np.asarray(out.logits, np.float32), ref) < 0.05 * np.abs(ref).max()


def test_falcon_mamba_config_fields(tmp_path):
    hf_cfg = transformers.FalconMambaConfig(**SHAPES["d48s16eps"]).to_dict()
    cfg = MambaConfig.from_hf(hf_cfg)
    assert cfg.model_type == "falcon_mamba" and cfg.to_hf()["architectures"] == ["FalconMambaForCausalLM"]
    assert MambaConfig.from_hf(transformers.FalconMambaConfig(**cfg.to_hf()).to_dict()) == cfg
    save_random_hf(transformers.FalconMambaForCausalLM, transformers.FalconMambaConfig(**SHAPES["d32s4"]), tmp_path)
    config, tensors = read_hf_dir(tmp_path)
    write_hf_dir(tmp_path / "x", {**config, "mixer_norm_type": "layernorm"}, tensors)
    with pytest.raises(ConversionError, match="falcon_mamba config has fields .*'mixer_norm_type'"):
        ji.load(tmp_path / "x")
    # Mamba-1 configs do not know the mixer epsilon: a mamba config.json carrying it is refused.
    with pytest.raises(ConversionError, match="mamba config has fields .*'mixer_rms_eps'"):
        MambaConfig.from_hf({**config, "model_type": "mamba"})
    with pytest.raises(ValueError, match="mixer_norm_eps"):
        MambaConfig.tiny(mixer_norm_eps=0.0)
