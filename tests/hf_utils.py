"""Helpers for parity tests: random-initialised HF models saved offline and compared site by site."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def save_random_hf(model_cls, config, path, seed: int = 0):
    """Build a random-initialised HF model from ``config``, save it to ``path``, return it (eval, f32)."""
    torch.manual_seed(seed)
    model = model_cls(config).eval().float()
    # Default inits leave some tensors (biases, norms) at constants; randomise everything so that
    # a mapping mix-up cannot hide behind identical values.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log") or name.endswith(".D"):
                continue
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(path, safe_serialization=True)
    return model


def hf_forward(model, tokens: np.ndarray):
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(tokens), dtype=torch.long), output_hidden_states=True,
                    output_attentions=True)
    return out


def max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def hooked_forward(model, tokens: np.ndarray, outputs=None, inputs=None):
    """``hf_forward`` that also records module outputs and (first positional) inputs.

    ``outputs`` / ``inputs``: {key: torch module}. Returns (HF output, {key: numpy array}); a
    module returning a tuple records its first element.
    """
    recorded = {}

    def keep(key, value):
        recorded[key] = (value[0] if isinstance(value, tuple) else value).detach().numpy()

    handles = [m.register_forward_hook(lambda mod, i, o, k=k: keep(k, o)) for k, m in (outputs or {}).items()]
    handles += [m.register_forward_pre_hook(lambda mod, i, k=k: keep(k, i[0])) for k, m in (inputs or {}).items()]
    try:
        out = hf_forward(model, tokens)
    finally:
        for h in handles:
            h.remove()
    return out, recorded


def visited_sites(model, capture=None, shape=(2, 5)):
    """The sites a forward emits, in order (traced with ``jax.eval_shape``: no compile, no FLOPs)."""
    import jax
    import jax.numpy as jnp

    from jaxinterp.model import forward
    from jaxinterp.sites import SiteContext

    ctx = SiteContext(model.sites, capture=capture)
    tokens = jnp.zeros(shape, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(shape[1]), shape)
    jax.eval_shape(lambda p: forward(model.replace(params=p), tokens, ctx, positions=positions,
                                     k_valid=jnp.ones(shape, bool)), model.params)
    return ctx.visited


def assert_param_grads_match_hf(model, family, hf, tokens: np.ndarray, target: int = 3) -> None:
    """d(-log p(target) at the last position)/d(every parameter): ours (exported to HF names through
    ``family.to_hf``) against torch autograd on the transformers model, each within 1e-4 of its scale."""
    import jax
    import jax.numpy as jnp
    import torch

    def loss(params):
        logits = model.replace(params=params).run(jnp.asarray(tokens)).logits
        return -jax.nn.log_softmax(logits[:, -1])[:, target].sum()

    grads = family.to_hf(model.config, jax.jit(jax.grad(loss))(model.params))
    hf.zero_grad()
    out = hf(torch.as_tensor(tokens)).logits
    (-torch.log_softmax(out[:, -1], -1)[:, target].sum()).backward()
    ref = {name: p.grad.numpy() for name, p in hf.named_parameters() if p.grad is not None}
    assert len(ref) == len(list(hf.parameters())) and set(ref) <= set(grads), sorted(set(ref) - set(grads))
    for name, g in ref.items():
        scale = max(1e-6, float(np.abs(g).max()))
        assert max_err(np.reshape(grads[name], g.shape), g) < 1e-4 * scale + 1e-8, name
