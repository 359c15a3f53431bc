"""The wire format: every built-in intervention survives encode/decode and save/load with identical run
output; an exported Fn runs as the function; hostile blobs and modules are refused with a WireError."""

import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp.models.gpt2 import GPT2Config
from jaxinterp.remote import WireError, decode, encode, export_fn
from jaxinterp.sae import init_sae
from jaxinterp.sae.splice import Splice
from tests.remote.tiny import rewrite_header

CFG = GPT2Config.tiny(vocab_size=31, d_model=16, n_layers=2, n_heads=2, d_mlp=32, max_seq_len=8)
B, T, D = 2, 6, 16
SITE = "blocks.0.resid_post"


@pytest.fixture(scope="module")
def model():
    return ji.init(CFG, 0)


@jax.jit
def _logits(model, tokens, ivs):
    return ji.run(model, tokens, interventions=ivs).logits


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, size=(B, T)))


def _f32(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _cases():
    pos = ji.positions_mask(T, [1, 3], batch=B)
    sae = init_sae("topk", jax.random.PRNGKey(0), D, 24, k=4)
    return {
        "patch": {SITE: ji.Patch(_f32(B, T, D), pos)},
        "zero": {"blocks.1.attn.z": ji.ZeroAblate(ji.heads_mask(T, 2, [1], batch=B))},
        "mean": {SITE: ji.MeanAblate(_f32(T, D, seed=1))},
        "add": {"blocks.*.resid_post": ji.Add(_f32(D, seed=2), pos)},
        "scale_number": {SITE: ji.Scale(0.5)},
        "scale_array": {SITE: ji.Scale(_f32(D, seed=3), pos)},
        "project": {SITE: ji.ProjectOut(_f32(2, D, seed=4))},
        "noise": {"embed": ji.Noise(_f32(B, T, D, seed=5), jnp.float32(0.3))},
        "steer": {SITE: ji.Steer(_f32(D, seed=10), jnp.float32(2.0), where="prompt")},
        "compose_and_list": {SITE: ji.Compose((ji.Scale(2.0), ji.Add(_f32(D, seed=6)))),
                             "blocks.1.resid_post": [ji.ZeroAblate(pos), ji.Add(_f32(D, seed=7))]},
        "by_layer": {"blocks.*.resid_post": ji.ByLayer(ji.Add(_f32(CFG.n_layers, D, seed=8)))},
        "splice": {SITE: Splice(sae, latent_scale=_f32(24, seed=9), add_error=True)},
        "fn": {SITE: export_fn(lambda x: jnp.tanh(x) * 2.0, ("b", "t", D))},
        "list_of_mappings_value": [ji.Scale(1.5)],
    }


CASES = _cases()


def _as_mapping(ivs):
    return {"blocks.1.mlp_out": ivs} if isinstance(ivs, list) else ivs


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip_keeps_every_leaf_and_static_field(name, tmp_path):
    """Same tree structure (node types and static fields: Fn's module, Splice's add_error, the SAE's reads)
    and bitwise-equal leaves of the same dtypes, from memory and from disk."""
    ivs = _as_mapping(CASES[name])
    ji.save_intervention(tmp_path / "iv.safetensors", ivs)
    for got in (decode(encode(ivs)), ji.load_intervention(tmp_path / "iv.safetensors")):
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(ivs)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ivs)):
            assert type(a) is type(b) if not isinstance(b, jax.Array) else isinstance(a, jax.Array)
            np.testing.assert_array_equal(a, b)
            assert np.asarray(a).dtype == np.asarray(b).dtype and np.shape(a) == np.shape(b)  # 0-d stays 0-d


def test_round_trip_gives_identical_run(model, tokens, tmp_path):
    """Every kind at once (a list per site, in order): decoded and loaded interventions give the same logits."""
    merged = {}
    for name in sorted(CASES):
        for site, iv in _as_mapping(CASES[name]).items():
            merged.setdefault(site, []).extend(iv if isinstance(iv, list) else [iv])
    want = _logits(model, tokens, merged)
    assert not np.allclose(want, _logits(model, tokens, {}))  # the interventions do something
    ji.save_intervention(tmp_path / "iv.safetensors", merged)
    for got in (decode(encode(merged)), ji.load_intervention(tmp_path / "iv.safetensors")):
        np.testing.assert_array_equal(_logits(model, tokens, got), want)


def test_exported_fn_equals_the_function(model, tokens):
    fn = lambda x: x * jnp.float32(0.25) + jnp.sin(x)  # noqa: E731
    direct = _logits(model, tokens, {SITE: ji.Fn(fn)})
    remote = _logits(model, tokens, decode(encode({SITE: export_fn(fn, ("b", "t", D))})))
    np.testing.assert_allclose(remote, direct, atol=1e-6, rtol=0)


def test_python_callable_fn_is_refused_not_dropped(tmp_path):
    with pytest.raises(WireError, match="export_fn"):
        ji.save_intervention(tmp_path / "x.safetensors", {SITE: ji.Fn(lambda x: x)})
    assert not (tmp_path / "x.safetensors").exists()


def test_plain_values_and_arrays_round_trip():
    obj = {"a": [1, 2.5, None, True, "s"], "b": (np.arange(6, dtype=np.int32).reshape(2, 3),),
           "c": {"m": np.array([True, False]), "h": jnp.ones((2,), jnp.bfloat16)}}
    out = decode(encode(obj))
    assert out["a"] == obj["a"] and isinstance(out["b"], tuple)
    np.testing.assert_array_equal(out["b"][0], obj["b"][0])
    assert out["c"]["h"].dtype == jnp.bfloat16 and out["c"]["m"].dtype == np.bool_


def _host_callback_module():
    from jax._src.export import _export

    check, _export._check_lowering = _export._check_lowering, lambda lowering: None
    try:
        f = lambda x: jax.pure_callback(lambda a: a, jax.ShapeDtypeStruct(x.shape, x.dtype), x)  # noqa: E731
        exp = jax.export.export(jax.jit(f), disabled_checks=[
            jax.export.DisabledSafetyCheck.custom_call("xla_ffi_python_cpu_callback")])(
            jax.ShapeDtypeStruct((B, T, D), jnp.float32))
    finally:
        _export._check_lowering = check
    return exp


def _with_module(exported) -> bytes:
    """A well-formed blob carrying ``exported`` as an Fn (built by hand: encode would refuse nothing here)."""
    fn = ji.Fn(ji.remote.ExportedFn(exported, exported.serialize()))
    return encode({SITE: fn})


def test_host_callback_module_is_refused():
    with pytest.raises(WireError, match="custom calls.*xla_ffi_python_cpu_callback"):
        decode(_with_module(_host_callback_module()))


def test_loop_module_is_refused():
    f = lambda x: jax.lax.fori_loop(0, jnp.int32(x.size), lambda i, y: y + 1.0, x)  # noqa: E731
    exp = jax.export.export(jax.jit(f))(jax.ShapeDtypeStruct((B, T, D), jnp.float32))
    with pytest.raises(WireError, match="loops"):
        decode(_with_module(exp))


def _structure(edit):
    def go(header):
        s = json.loads(header["__metadata__"]["structure"])
        header["__metadata__"]["structure"] = json.dumps(edit(s))
    return go


GOOD = encode({SITE: ji.Patch(np.ones((B, T, D), np.float32), np.ones((B, T), bool))})
HOSTILE = {
    "empty": b"",
    "truncated": GOOD[:-5],
    "trailing": GOOD + b"\0" * 8,
    "huge_header_len": struct.pack("<Q", 1 << 62) + GOOD[8:],
    "not_json": struct.pack("<Q", 4) + b"{{{{",
    "pickle": b"\x80\x04\x95" + b"\0" * 40,
    "bad_dtype": rewrite_header(GOOD, lambda h: h["t0"].update(dtype="C64")),
    "huge_shape": rewrite_header(GOOD, lambda h: h["t0"].update(shape=[1 << 39, 1 << 39])),
    "shape_vs_bytes": rewrite_header(GOOD, lambda h: h["t0"].update(shape=[B, T, D + 1])),
    "offsets_out": rewrite_header(GOOD, lambda h: h["t0"].update(data_offsets=[0, 1 << 40])),
    "no_format": rewrite_header(GOOD, lambda h: h.pop("__metadata__")),
    "unknown_kind": rewrite_header(GOOD, _structure(lambda s: {"iv": "os.system", "fields": {}})),
    "unknown_field": rewrite_header(GOOD, _structure(lambda s: {"iv": "Patch", "fields": {"__class__": 1}})),
    "string_values": rewrite_header(GOOD, _structure(lambda s: {"iv": "Patch", "fields": {"values": "/etc/passwd"}})),
    "missing_tensor": rewrite_header(GOOD, _structure(lambda s: {"array": "nope"})),
    "deep": rewrite_header(GOOD, _structure(lambda s: json.loads('{"list": [' * 200 + "1" + "]}" * 200))),
    "bad_module": rewrite_header(GOOD, _structure(lambda s: {"iv": "Fn", "module": "t0"})),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_blobs_raise_wire_errors(name):
    with pytest.raises(WireError):
        decode(HOSTILE[name])


def test_fuzzed_blobs_decode_or_raise_wire_error_only():
    """300 mutations of a valid request (bytes flipped, inserted, cut; in the header mostly): each one
    decodes or raises WireError, never another exception."""
    base = encode({"tokens": np.arange(6, dtype=np.int32).reshape(1, 6), "capture": ["embed"],
                   "interventions": {SITE: [ji.Patch(np.ones((1, 6, D), np.float32), np.ones((1, 6), bool)),
                                            ji.Scale(2.0), ji.Compose([ji.ZeroAblate()])]}})
    (n,) = struct.unpack("<Q", base[:8])
    rng = np.random.default_rng(0)
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(300):
        blob = bytearray(base)
        for _ in range(rng.integers(1, 4)):
            where = int(rng.integers(0, 8 + n if rng.random() < 0.8 else len(blob)))
            op = rng.integers(0, 3)
            if op == 0:
                blob[where] = int(rng.integers(0, 256))
            elif op == 1:
                blob[where:where] = bytes(rng.integers(0, 256, size=int(rng.integers(1, 9)), dtype=np.uint8))
            else:
                del blob[where:where + int(rng.integers(1, 9))]
        try:
            decode(bytes(blob))
            outcomes["ok"] += 1
        except WireError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 200, outcomes


def test_module_for_another_platform_is_refused():
    exp = jax.export.export(jax.jit(lambda x: x + 1.0), platforms=("tpu",))(jax.ShapeDtypeStruct((B, T, D), jnp.float32))
    with pytest.raises(WireError, match="lowered for \\['tpu'\\]"):
        decode(_with_module(exp))
