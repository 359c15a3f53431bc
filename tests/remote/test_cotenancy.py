"""Co-tenancy: run requests of different users with the same shapes and intervention structure run as one
vmapped program whose results equal each request run alone; other requests queue round robin per user."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp.remote.server import ServeConfig, Service
from tests.remote.tiny import CFG, tiny_model

USERS = ["ann", "ben", "cat", "dan", "eva"]
B, T, D = 2, 6, 16


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def service(model):
    s = Service(model, {u: f"{u}-key-000000" for u in USERS}, ServeConfig(max_batch=4, compile_in_background=False),
                "tiny")
    yield s
    s.close()


def _request(seed: int) -> dict:
    """One structure (Add + Patch with a position mask + a per-feature Scale), different values per seed."""
    rng = np.random.default_rng(seed)
    f32 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    return {"tokens": jnp.asarray(rng.integers(0, CFG.vocab_size, size=(B, T)), jnp.int32),
            "capture": ["blocks.0.resid_post", "blocks.1.attn.pattern"], "logits_at": -1,
            "interventions": {"blocks.0.resid_post": [ji.Add(f32(D)), ji.Scale(f32(D))],
                              "blocks.1.resid_pre": ji.Patch(f32(B, T, D), jnp.asarray(rng.random((B, T)) < 0.5))}}


@jax.jit
def _alone(model, tokens, interventions):
    out = model.run(tokens, capture=["blocks.0.resid_post", "blocks.1.attn.pattern"], interventions=interventions,
                    logits_at=-1)
    return out.logits, dict(out.cache)


def test_batched_requests_equal_each_alone_and_queue_round_robin(model, service):
    requests = [_request(i) for i in range(5)]
    done = []
    service.scheduler.on_done, on_done = (lambda job: done.append(job.user)), service.scheduler.on_done
    try:
        with service.scheduler.hold():  # five users' requests queue up, then run
            futures = [service.scheduler.submit(service.run_job(u, r)) for u, r in zip(USERS, requests)]
            odd = {"tokens": requests[0]["tokens"][:, :5]}  # another structure: not batched with them
            ann_second = service.scheduler.submit(service.run_job("ann", odd))
            assert service.scheduler.queued() == 6 and service.scheduler.queued("ann") == 2
        results = [f.result(timeout=300) for f in futures]
        ann_second.result(timeout=300)
    finally:
        service.scheduler.on_done = on_done
    # ann's first request took the next three users' with it (max_batch 4); then eva, then ann's other shape
    assert done == ["ann", "ben", "cat", "dan", "eva", "ann"]
    assert service.scheduler.batches[4] == 1
    for request, got in zip(requests, results):
        logits, cache = _alone(model, request["tokens"], request["interventions"])
        np.testing.assert_allclose(got["logits"], logits, atol=1e-6, rtol=0)
        assert set(got["cache"]) == set(cache)
        for site in cache:
            np.testing.assert_allclose(got["cache"][site], cache[site], atol=1e-6, rtol=0)
    assert not np.allclose(results[0]["logits"], results[1]["logits"])


def test_a_group_whose_program_fails_is_rerun_request_by_request(model, service):
    """One user's request must not fail another's: when the batched program raises, each runs alone."""
    requests = [_request(10), _request(11)]

    def broken(jobs):
        raise RuntimeError("the batched program failed")

    with service.scheduler.hold():
        futures = [service.scheduler.submit(service.run_job(u, r)) for u, r in zip(USERS, requests)]
        service.scheduler._queues[USERS[0]][0].batch_work = broken  # noqa: SLF001 - the group's first job
    for request, future in zip(requests, futures):
        np.testing.assert_allclose(future.result(timeout=300)["logits"],
                                   _alone(model, request["tokens"], request["interventions"])[0], atol=1e-6, rtol=0)


def test_a_new_group_size_compiles_in_the_background(model):
    """The first group of a size not compiled yet runs request by request (right results) while its
    program builds on the compiler thread; the next such group runs as one program."""
    import time

    service = Service(model, {u: f"{u}-key-000000" for u in USERS[:2]}, ServeConfig(max_batch=2), "tiny")
    try:
        for round_ in range(2):
            requests = [_request(20 + 2 * round_), _request(21 + 2 * round_)]
            with service.scheduler.hold():
                futures = [service.scheduler.submit(service.run_job(u, r)) for u, r in zip(USERS, requests)]
            for request, future in zip(requests, futures):
                np.testing.assert_allclose(future.result(timeout=300)["logits"],
                                           _alone(model, request["tokens"], request["interventions"])[0],
                                           atol=1e-6, rtol=0)
            if round_ == 0:
                assert service.runs == {1: 2}
                deadline = time.monotonic() + 120
                while service.compiler.pending():
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
        assert service.runs == {1: 2, 2: 1}
    finally:
        service.close()


def test_program_cache_is_a_bounded_lru(model):
    from jaxinterp.remote.engine import Programs

    cleared = []
    programs = Programs(2)
    programs.get("a", lambda: (1, None))
    programs.get("b", lambda: (2, None), on_evict=lambda: cleared.append("b"))
    assert programs.get("a", lambda: (0, None))[0] == 1  # a hit: "a" is now the most recent
    programs.get("c", lambda: (3, None))  # evicts "b", the least recently used
    assert len(programs) == 2 and cleared == ["b"] and programs.get("a", lambda: (9, None))[0] == 1
    assert programs.stats() == {"size": 2, "capacity": 2, "hits": 2, "misses": 3, "evictions": 1}
    service = Service(model, {"ann": "ann-key-000000"}, ServeConfig(program_cache=1, compile_in_background=False),
                      "tiny")
    try:
        for t in (3, 4):  # two shapes, two programs: the cache keeps one
            out = service.scheduler.submit(service.run_job("ann", {"tokens": jnp.ones((1, t), jnp.int32)})).result(300)
            assert out["logits"].shape == (1, t, CFG.vocab_size)
        assert len(service.programs) == 1 and service.programs.evictions == 1
    finally:
        service.close()


def test_stopping_the_server_fails_queued_requests_with_retry_not_silence(model):
    """A server stopped (to restart) with requests still queued answers each of them (503, retry), none stuck."""
    from jaxinterp.remote.engine import ShuttingDown

    service = Service(model, {u: f"{u}-key-000000" for u in USERS[:2]}, ServeConfig(), "tiny")
    with service.scheduler.hold():
        futures = [service.scheduler.submit(service.run_job(u, _request(30 + i))) for i, u in enumerate(USERS[:2])]
        service.close()
    for future in futures:
        with pytest.raises(ShuttingDown, match="retry"):
            future.result(timeout=60)
    with pytest.raises(ShuttingDown):
        service.scheduler.submit(service.run_job(USERS[0], _request(32)))
