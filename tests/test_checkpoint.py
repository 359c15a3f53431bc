"""Checkpointer: round trips of mixed pytrees, PRNG keys, retention, atomicity, sharded arrays."""

import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxinterp.checkpoint import Checkpointer


def _state(seed=0):
    k = jax.random.PRNGKey(seed)
    params = {"w": jax.random.normal(k, (4, 3)), "b": jnp.arange(3.0)}
    opt = optax.adamw(1e-3).init(params)
    return {"params": params, "opt": opt, "step": 7, "pos": np.int64(123), "lr": 0.5,
            "typed_key": jax.random.key(seed), "raw_key": jax.random.PRNGKey(seed + 1)}


def _assert_same(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert type(x) is type(y) or (isinstance(x, jax.Array) and isinstance(y, jax.Array)), (type(x), type(y))
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_mixed_state(tmp_path):
    state = _state(0)
    with Checkpointer(tmp_path, keep=2) as ck:
        assert ck.latest_step() is None
        assert ck.save(5, state)
        template = _state(1)  # different values, same structure
        restored = ck.restore(template=template)
    _assert_same(restored, state)
    assert jnp.issubdtype(restored["typed_key"].dtype, jax.dtypes.prng_key)
    assert jax.random.key_impl(restored["typed_key"]) == jax.random.key_impl(state["typed_key"])
    # the restored keys draw the same numbers
    np.testing.assert_array_equal(jax.random.normal(restored["typed_key"], (3,)),
                                  jax.random.normal(state["typed_key"], (3,)))


def test_keep_and_save_every(tmp_path):
    state = _state(0)
    ck = Checkpointer(tmp_path, keep=2, save_every=10)
    saved = [s for s in range(0, 41, 5) if ck.save(s, {**state, "step": s})]
    assert saved == [0, 10, 20, 30, 40]
    assert ck.all_steps() == [30, 40] and ck.latest_step() == 40
    assert ck.restore(30, template=state)["step"] == 30
    assert ck.save(41, state, force=True)
    ck.close()
    with pytest.raises(FileNotFoundError, match="steps"):
        Checkpointer(tmp_path, keep=2).restore(3, template=state)


def test_missing_checkpoint_and_bad_args(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Checkpointer(tmp_path).restore(template=_state())
    with pytest.raises(ValueError, match="keep"):
        Checkpointer(tmp_path, keep=0)
    with pytest.raises(ValueError, match="save_every"):
        Checkpointer(tmp_path, save_every=0)


def test_sharded_arrays_restore_with_template_sharding(tmp_path):
    devices = np.array(jax.devices())
    mesh = Mesh(devices, ("data",))
    sharding = NamedSharding(mesh, P("data"))
    x = jax.device_put(jnp.arange(8.0 * len(devices)).reshape(-1, 2), sharding)
    with Checkpointer(tmp_path) as ck:
        ck.save(1, {"x": x})
        out = ck.restore(template={"x": jax.device_put(jnp.zeros_like(x), sharding)})
    assert out["x"].sharding == sharding
    np.testing.assert_array_equal(out["x"], x)


_KILL_SCRIPT = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp
    from jaxinterp.checkpoint import Checkpointer
    ck = Checkpointer(sys.argv[1], keep=5)
    ck.save(1, {"x": jnp.ones((256, 256))})
    print("saved", flush=True)
    # a large second save; the parent kills us while it is being written
    ck.save(2, {"x": jnp.full((256, 256), 2.0), "big": jnp.zeros((4000, 4000))})
    print("done", flush=True)
""")


def test_kill_mid_save_keeps_previous_checkpoint(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(_KILL_SCRIPT)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "ck")], stdout=subprocess.PIPE, env=env,
                            text=True)
    assert proc.stdout.readline().strip() == "saved"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ck = Checkpointer(tmp_path / "ck")
    step = ck.latest_step()
    template = {"x": jnp.zeros((256, 256))}
    if step == 2:  # the save happened to finish before the kill: it must then be complete
        template["big"] = jnp.ones((4000, 4000))
    restored = ck.restore(template=template)
    np.testing.assert_array_equal(restored["x"], np.full((256, 256), float(step)))


# ----------------------------------------------------------------------------- integrity (issue 24 item 6)


def _two_steps(directory):
    """Steps 1 and 2 of incompressible arrays; returns their values."""
    rng = np.random.default_rng(0)
    values = {s: {"x": rng.normal(size=(64, 64)).astype(np.float32), "n": s} for s in (1, 2)}
    with Checkpointer(directory, keep=3) as ck:
        for s, v in values.items():
            ck.save(s, {"x": jnp.asarray(v["x"]), "n": v["n"]})
    return values


def _largest_file(step_dir):
    return max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_flipped_byte_falls_back_to_the_previous_step(tmp_path):
    """A flipped byte in the newest step's array data used to restore silently (wrong values)."""
    values = _two_steps(tmp_path)
    data = _largest_file(tmp_path / "2")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    lines = []
    restored = Checkpointer(tmp_path, log=lines.append).restore(template={"x": jnp.zeros((64, 64)), "n": 0})
    assert restored["n"] == 1
    np.testing.assert_array_equal(np.asarray(restored["x"]), values[1]["x"])
    assert len(lines) == 1 and "step 2" in lines[0] and "skipped" in lines[0] and "checksum" in lines[0], lines
    with pytest.raises(ValueError, match="step 2 .* is damaged"):  # asking for that step by number: an error
        Checkpointer(tmp_path, log=lines.append).restore(2, template={"x": jnp.zeros((64, 64)), "n": 0})


_RESTORE_SCRIPT = textwrap.dedent("""
    import sys, jax.numpy as jnp
    from jaxinterp.checkpoint import Checkpointer
    r = Checkpointer(sys.argv[1]).restore(template={"x": jnp.zeros((64, 64)), "n": 0})
    print("restored", r["n"], float(r["x"].sum()))
""")


def test_truncated_step_is_one_line_and_no_traceback(tmp_path):
    """Truncating the newest step's data used to print ~70 frames of tracebacks and fail."""
    values = _two_steps(tmp_path / "ck")
    data = _largest_file(tmp_path / "ck" / "2")
    size = data.stat().st_size
    data.write_bytes(data.read_bytes()[: size // 2])
    script = tmp_path / "restore.py"
    script.write_text(_RESTORE_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ck")], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    notes = [l for l in proc.stderr.splitlines() if "skipped" in l]
    assert len(notes) == 1 and "step 2" in notes[0] and f"{size // 2} bytes, {size} were written" in notes[0], \
        proc.stderr
    assert proc.stdout.split()[:2] == ["restored", "1"]
    np.testing.assert_allclose(float(proc.stdout.split()[2]), values[1]["x"].sum(), rtol=1e-5)


def test_missing_checksum_or_file_is_not_intact(tmp_path):
    """A step whose writer died before its checksum, or with a file removed, is skipped; a damaged
    step is replaced when saved again."""
    _two_steps(tmp_path)
    (tmp_path / "2" / "sha256.json").unlink()
    lines = []
    ck = Checkpointer(tmp_path, log=lines.append)
    assert ck.latest_step() == 1 and ck.all_steps() == [1, 2]
    assert ck.restore(template={"x": jnp.zeros((64, 64)), "n": 0})["n"] == 1
    assert "no sha256.json" in lines[0]
    assert ck.save(2, {"x": jnp.ones((64, 64)), "n": 2})  # replaced, now intact
    assert ck.restore(template={"x": jnp.zeros((64, 64)), "n": 0})["n"] == 2
    _largest_file(tmp_path / "1").unlink()
    with pytest.raises(ValueError, match="is missing"):
        ck.restore(1, template={"x": jnp.zeros((64, 64)), "n": 0})
