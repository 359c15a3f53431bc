"""The training loop (jaxinterp.train): output lock, run-config guard, metrics.jsonl after a resume,
kill -9 then resume bit-identical, checkpoint corruption fallback, hooks, and the step builder
against a plain optax loop."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxinterp.checkpoint import OutputLock, OutputLocked
from jaxinterp.train import Hook, LoopConfig, fit, init_state, loss_step, make_train_step, read_metrics

D = 6


def batches(step: int) -> dict:
    """A regression batch that depends only on the step."""
    r = np.random.default_rng(100 + step)
    x = r.normal(size=(16, D)).astype(np.float32)
    return {"x": x, "y": (x @ np.linspace(-1, 1, D) + 0.1 * r.normal(size=16)).astype(np.float32)}


def loss_fn(params, frozen, batch, key):
    noise = 0.01 * jax.random.normal(key, batch["y"].shape)  # the key matters: a wrong RNG state shows
    pred = batch["x"] @ params["w"] + params["b"] + noise
    return jnp.mean((pred - batch["y"]) ** 2), {"mean_pred": pred.mean()}


def fresh(lr=0.05):
    opt = optax.adam(lr)
    params = {"w": jnp.zeros(D), "b": jnp.zeros(())}
    return make_train_step(loss_step(loss_fn, opt)), init_state(params, opt, jax.random.key(0))


def run(directory, steps, *, lr=0.05, save_every=4, **kw):
    step, state = fresh(lr)
    loop = LoopConfig(steps=steps, save_every=save_every, keep=3, quiet=True)
    return fit(step, state, batches, loop, directory=directory, run_config={"optim": {"lr": lr}, "steps": steps},
               may_change=("steps",), log=kw.pop("log", lambda m: None), **kw)


def _notes(logs):
    return [line for line in logs if not line.startswith("saved checkpoint step")]


def _equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_loss_step_equals_a_plain_optax_loop():
    opt = optax.adam(0.05)
    params = {"w": jnp.zeros(D), "b": jnp.zeros(())}
    key = jax.random.key(0)
    grad = jax.jit(jax.grad(lambda p, batch, k: loss_fn(p, None, batch, k)[0]))
    for s in range(5):
        key, sub = jax.random.split(key)
        grads = grad(params, batches(s), sub)
        updates, opt_state = opt.update(grads, opt_state if s else opt.init(params), params)
        params = optax.apply_updates(params, updates)
    state, history = run(None, 5)
    for name in ("w", "b"):
        np.testing.assert_allclose(np.asarray(state["params"][name]), np.asarray(params[name]), rtol=1e-6, atol=1e-7)
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5] and history[-1]["loss"] < history[0]["loss"]
    assert set(history[0]) == {"step", "loss", "mean_pred", "grad_norm"}


def test_resume_extends_to_the_same_result_and_metrics_have_no_duplicates(tmp_path):
    straight, straight_rows = run(tmp_path / "a", 10)
    run(tmp_path / "b", 6)
    logs = []
    resumed, rows = run(tmp_path / "b", 10, log=logs.append)
    assert _notes(logs) == [f"resumed from step 6 ({tmp_path / 'b'})"]
    assert logs[1:] == ["saved checkpoint step 8", "saved checkpoint step 10"]
    _equal(resumed, straight)
    assert rows == straight_rows == read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 11))
    _, again = run(tmp_path / "b", 10)  # finished: nothing runs, nothing is appended
    assert again == straight_rows == read_metrics(tmp_path / "b" / "metrics.jsonl")


def test_config_guard_names_the_field_and_refuses_fewer_steps(tmp_path):
    run(tmp_path, 6)
    with pytest.raises(ValueError, match=r"different config \(optim\.lr: 0\.05 -> 0\.01\)"):
        run(tmp_path, 6, lr=0.01)
    with pytest.raises(ValueError, match="checkpoint at step 6, past the 4 steps asked for"):
        run(tmp_path, 4)
    assert max(r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")) == 6  # nothing was cut


def test_hooks_add_fields_to_their_rows():
    seen = []

    def hook(step, state, metrics):
        seen.append(step)
        return {"eval": float(state["params"]["b"])}

    step, state = fresh()
    _, rows = fit(step, state, batches, LoopConfig(steps=7, log_every=3, quiet=True), hooks=[Hook(2, hook)])
    assert seen == [2, 4, 6]
    assert [(r["step"], "eval" in r) for r in rows] == [(2, True), (3, False), (4, True), (6, True), (7, False)]


def test_corrupt_newest_checkpoint_falls_back_and_is_rewritten(tmp_path):
    straight, _ = run(tmp_path / "ref", 8)
    run(tmp_path / "x", 8)  # steps 4 and 8 on disk
    data = max((p for p in (tmp_path / "x" / "8").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    data.write_bytes(bytes(raw))
    logs = []
    resumed, rows = run(tmp_path / "x", 8, log=logs.append)
    notes = _notes(logs)
    assert len(notes) == 2 and "checkpoint step 8" in notes[0] and "skipped" in notes[0], logs
    assert notes[1].startswith("resumed from step 4")
    _equal(resumed, straight)
    assert [r["step"] for r in rows] == list(range(1, 9))
    logs.clear()
    run(tmp_path / "x", 8, log=logs.append)  # step 8 was written again, intact
    assert _notes(logs) == [f"resumed from step 8 ({tmp_path / 'x'})"]


# ----------------------------------------------------------------------------- processes

_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    import numpy as np
    sys.path.insert(0, {test_dir!r})
    import test_train as t
    from jaxinterp.checkpoint import OutputLock
    mode, directory = sys.argv[1], sys.argv[2]
    if mode == "hold":
        OutputLock(directory).acquire()
        print("locked", flush=True)
        time.sleep(120)
    kill_at = int(sys.argv[3])
    def data(step):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return t.batches(step)
    step, state = t.fresh()
    loop = t.LoopConfig(steps=30, save_every=5, quiet=True)
    state, _ = t.fit(step, state, data, loop, directory=directory, run_config={{"lr": 0.05}})
    np.savez(os.path.join(directory, "final.npz"), *[np.asarray(a) for a in (state["params"]["w"], state["params"]["b"])])
""")


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "loop.py"
    path.write_text(_SCRIPT.format(test_dir=os.path.dirname(__file__)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return lambda *args, **kw: subprocess.Popen([sys.executable, str(path), *map(str, args)], env=env,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_second_process_is_refused_and_a_killed_holder_is_taken_over(tmp_path, script):
    holder = script("hold", tmp_path / "out")
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        with pytest.raises(OutputLocked, match=f"in use by process {holder.pid} "):
            OutputLock(tmp_path / "out").acquire()
        with pytest.raises(ValueError, match=f"process {holder.pid} "):  # a user error, like a bad argument
            run(tmp_path / "out", 3)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / "out" / ".lock").read_text().strip() == str(holder.pid)  # left behind by the kill
    with OutputLock(tmp_path / "out") as lock:  # the OS released the flock: taken over
        assert lock.path.read_text().strip() == str(os.getpid())
        with OutputLock(tmp_path / "out"):  # re-entrant in one process
            pass
        assert lock.path.exists()
    assert not (tmp_path / "out" / ".lock").exists()


@pytest.mark.slow
def test_kill_9_then_resume_is_bit_identical(tmp_path, script):
    ref = script("train", tmp_path / "ref", -1)
    killed = script("train", tmp_path / "run", 23)  # dies fetching step 24: checkpoint 20, rows up to 23
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    assert killed.wait(timeout=300) == -signal.SIGKILL, killed.stderr.read()
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")][-1] == 23
    assert not (tmp_path / "run" / "final.npz").exists()
    resumed = script("train", tmp_path / "run", -1)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resumed from step 20" in out
    a, b = np.load(tmp_path / "ref" / "final.npz"), np.load(tmp_path / "run" / "final.npz")
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])
    rows, ref_rows = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("run", "ref"))
    assert [r["step"] for r in rows] == list(range(1, 31))  # 21..23 once each
    assert rows == ref_rows
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == {"lr": 0.05}
