"""ProjectOut on full-rank, rank-deficient, zero and degenerate bases, against a direct projection
(numpy's SVD-based pseudo-inverse in float64), under jit, vmap and grad."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxinterp as ji
from tests.faults.harness import Case, Raises, Returns, expect
from tests.faults.models import D_MODEL, tiny, warm

D = D_MODEL
RNG = np.random.default_rng(3)
X = RNG.normal(size=(2, 5, D)).astype(np.float32)  # [B, T, D]


def projector(basis, rtol: float = 1e-5) -> np.ndarray:
    """Orthogonal projector onto the row space of ``basis`` ([D, D], float64) by numpy's pinv."""
    b = np.atleast_2d(np.asarray(basis, np.float64))
    return np.linalg.pinv(b, rcond=rtol) @ b


def reference(x, basis, mask=None) -> np.ndarray:
    x = np.asarray(x, np.float64)
    out = x - x @ projector(basis)
    if mask is not None:
        out = np.where(np.asarray(mask).reshape(mask.shape + (1,) * (x.ndim - mask.ndim)), out, x)
    return out


def _rows(*vectors) -> np.ndarray:
    return np.stack(vectors).astype(np.float32)


r1, r2, r3 = (RNG.normal(size=D).astype(np.float32) for _ in range(3))
BASES = {
    "full-rank-3": _rows(r1, r2, r3),
    "single-vector": r1,
    "orthonormal": np.eye(D, dtype=np.float32)[:4],
    "rank-deficient": _rows(r1, r2, r1 + r2),
    "duplicate-rows": _rows(r1, r1, r1),
    "zero-basis": np.zeros((2, D), np.float32),
    "zero-vector": np.zeros(D, np.float32),
    "zero-and-nonzero-row": _rows(np.zeros(D), r2),
    "more-rows-than-dim": RNG.normal(size=(D + 3, D)).astype(np.float32),
    "more-rows-rank-deficient": np.repeat(_rows(r1, r2), 10, axis=0),
    "tiny-scale": _rows(r1, r2) * np.float32(1e-20),
    "huge-scale": _rows(r1, r2) * np.float32(1e20),
    "nearly-dependent": _rows(r1, r2, r1 + r2 + 1e-2 * r3),
    "integer-basis": np.array([[1, 2] + [0] * (D - 2), [0, 0, 3] + [0] * (D - 3)], np.int32),
}


def _close(want, atol=2e-5):
    def check(result, tmp):
        got = np.asarray(result, np.float64)
        np.testing.assert_allclose(got, want, atol=atol * max(1.0, float(np.abs(want).max())), rtol=0)
    return check


def apply_case(name: str, basis) -> Case:
    want = reference(X, basis)
    return Case(f"po-{name}", lambda t: ji.ProjectOut(jnp.asarray(basis)).apply(jnp.asarray(X)), Returns(_close(want)))


def _idempotent(tmp):
    po = ji.ProjectOut(jnp.asarray(BASES["rank-deficient"]))
    once = po.apply(jnp.asarray(X))
    return once, po.apply(once)


def _vmap_stack(tmp):
    names = ["full-rank-3", "rank-deficient", "zero-basis"]
    stack = jnp.stack([jnp.atleast_2d(jnp.asarray(BASES[n]))[:2] for n in names] +
                      [jnp.asarray(_rows(r1, r2 * 0))])  # [4, 2, D]
    f = jax.jit(jax.vmap(lambda b: ji.ProjectOut(b).apply(jnp.asarray(X))))
    return stack, f(stack)


def _check_vmap(result, tmp):
    stack, got = result
    for b, g in zip(np.asarray(stack), np.asarray(got)):
        np.testing.assert_allclose(g, reference(X, b), atol=2e-5)


def _grad_x(name):
    def run(tmp):
        w = jnp.asarray(RNG.normal(size=X.shape).astype(np.float32))
        po = ji.ProjectOut(jnp.asarray(BASES[name]))
        return w, jax.grad(lambda x: jnp.sum(po.apply(x) * w))(jnp.asarray(X))

    def check(result, tmp):  # d/dx sum(w * (x - x P)) = w (I - P), P symmetric
        w, g = result
        want = np.asarray(w, np.float64) @ (np.eye(D) - projector(BASES[name]))
        np.testing.assert_allclose(np.asarray(g), want, atol=2e-5)
    return Case(f"po-grad-x-{name}", run, Returns(check))


def _grad_basis_finite(name):
    def run(tmp):
        return jax.jit(jax.grad(lambda b: jnp.sum(ji.ProjectOut(b).apply(jnp.asarray(X)) ** 2)))(
            jnp.asarray(BASES[name], jnp.float32))
    return Case(f"po-grad-basis-finite-{name}", run,
                Returns(lambda g, t: expect(bool(np.all(np.isfinite(np.asarray(g)))), np.asarray(g))))


def _grad_basis_matches_finite_differences(tmp):
    basis = BASES["full-rank-3"].astype(np.float64)
    f = lambda b: jnp.sum(jnp.sin(ji.ProjectOut(b).apply(jnp.asarray(X))))
    g = np.asarray(jax.grad(f)(jnp.asarray(basis, jnp.float32)), np.float64)
    fd = np.zeros_like(basis)
    eps = 1e-2
    for idx in [(0, 0), (1, 3), (2, 7), (0, 15)]:
        e = np.zeros_like(basis)
        e[idx] = eps
        lo = np.sin(reference(X, basis - e)).sum()
        hi = np.sin(reference(X, basis + e)).sum()
        fd[idx] = (hi - lo) / (2 * eps)
        expect(abs(fd[idx] - g[idx]) < 2e-2 * max(1.0, abs(fd[idx])), (idx, fd[idx], g[idx]))


def _through_model(tmp):
    model = tiny(1)
    tokens = np.array([[1, 5, 9, 2]])
    site = "blocks.0.resid_mid"
    x = np.asarray(model.run(tokens, capture=site).cache[site])
    basis = BASES["rank-deficient"]
    f = jax.jit(lambda m, b: m.run(tokens, capture=site, interventions={site: ji.ProjectOut(b)}).cache[site])
    return x, f(model, jnp.asarray(basis))


MASK = np.array([[True, False, True, False, False], [False, False, False, False, True]])

CASES = [apply_case(name, basis) for name, basis in BASES.items()] + [
    Case("po-masked-positions", lambda t: ji.ProjectOut(jnp.asarray(BASES["rank-deficient"]), jnp.asarray(MASK)).apply(
        jnp.asarray(X)), Returns(_close(reference(X, BASES["rank-deficient"], MASK)))),
    Case("po-jit-rank-deficient", lambda t: jax.jit(lambda b, x: ji.ProjectOut(b).apply(x))(
        jnp.asarray(BASES["rank-deficient"]), jnp.asarray(X)), Returns(_close(reference(X, BASES["rank-deficient"])))),
    Case("po-idempotent", _idempotent, Returns(lambda r, t: np.testing.assert_allclose(r[0], r[1], atol=2e-5))),
    Case("po-vmap-mixed-ranks", _vmap_stack, Returns(_check_vmap)),
    _grad_x("rank-deficient"),
    _grad_x("zero-basis"),
    _grad_basis_finite("rank-deficient"),
    _grad_basis_finite("zero-basis"),
    _grad_basis_finite("orthonormal"),
    _grad_basis_finite("duplicate-rows"),
    Case("po-grad-basis-vs-finite-differences", _grad_basis_matches_finite_differences, Returns(lambda r, t: None)),
    Case("po-bfloat16-site", lambda t: ji.ProjectOut(jnp.asarray(BASES["rank-deficient"])).apply(
        jnp.asarray(X, jnp.bfloat16)), Returns(lambda r, t: (expect(r.dtype == jnp.bfloat16, r.dtype), _close(
            reference(X, BASES["rank-deficient"]), atol=2e-2)(r.astype(jnp.float32), t)))),
    Case("po-through-model-jit", _through_model,
         Returns(lambda r, t: np.testing.assert_allclose(np.asarray(r[1]), reference(r[0], BASES["rank-deficient"]),
                                                         atol=1e-4)), setup=warm),
    Case("po-nan-basis", lambda t: ji.ProjectOut(jnp.asarray(_rows(r1, np.full(D, np.nan)))).validate(
        jnp.asarray(X), "blocks.0.resid_mid"), Raises(ValueError, r"ProjectOut.*blocks\.0\.resid_mid.*(NaN|finite)")),
    Case("po-wrong-width", lambda t: ji.ProjectOut(jnp.ones((2, D + 1))).validate(jnp.asarray(X), "s"),
         Raises(ValueError, r"ProjectOut.*basis")),
    Case("po-rank-3-basis", lambda t: ji.ProjectOut(jnp.ones((2, 2, D))).validate(jnp.asarray(X), "s"),
         Raises(ValueError, r"ProjectOut.*basis")),
]
