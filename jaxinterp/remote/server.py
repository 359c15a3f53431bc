"""``jaxinterp serve``: one loaded model behind HTTP; requests and results travel in the wire format.

Endpoints (every one but ``/health`` needs a key: ``Authorization: Bearer <key>``, or HTTP Basic
``user:key`` so a browser can open the status page; ``keys.json`` maps user names to keys):

* ``GET /health``: ``{"ok": true}``.
* ``GET /info``: the model's family, config, sites, logits dtype, whether it has a tokenizer (JSON).
* ``GET /status``: models, queue length, per-user usage (JSON); an HTML page when the client accepts
  ``text/html`` (also ``GET /``).
* ``POST /run``: a wire blob of ``model.run``'s arguments ``{"tokens": int array [B, T] | text |
  [texts], "capture", "interventions", "attention_mask", "positions", "logits_at"}``; answer a wire
  blob ``{"logits": array, "cache": {site: array}}``.
* ``POST /generate``: ``ji.generate``'s arguments ``{"prompts", "max_new_tokens", ...}``; answer the
  ``Generation``'s fields.
* ``POST /sweep``: ``activation_patching``'s arguments ``{"clean_tokens", "corrupt_tokens", "sites",
  "metric", "per", ...}``, the metric a ``jax.export`` module (``wire.export_metric``); answer
  ``{"effects", "clean", "corrupt", "per"}``.

Bad input is a 4xx naming the problem: 400 for a blob the wire format refuses, 401 for a missing or
wrong key, 413 for a request, capture or response over the limits, 422 for a request the model
refuses (unknown site, wrong shape), 429 (with ``Retry-After``) past a user's rate or with a full
queue, 503 (with ``Retry-After``) for requests still queued when the server stops, 504 past the time
limit. Requests run on one worker thread, users' queues served round robin;
``run`` requests of different users with the same shapes and intervention structure run as one
batched program (``engine``). Keys are never logged.
"""

import argparse
import asyncio
import base64
import collections
import dataclasses
import hmac
import html
import importlib
import json
import math
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.interventions import Fn
from jaxinterp.model import Model, prepare_inputs, run
from jaxinterp.remote import engine
from jaxinterp.remote.cluster import Cluster, follow, to_host
from jaxinterp.sharding.distributed import add_flags, config_from, initialize
from jaxinterp.remote.wire import FORMAT, VERSION, ExportedFn, ExportedMetric, Limits, WireError, decode, encode

__all__ = ["ServeConfig", "create_app", "load_keys", "main", "RUN_FIELDS", "GENERATE_FIELDS", "SWEEP_FIELDS"]

RUN_FIELDS = ("tokens", "capture", "interventions", "attention_mask", "positions", "logits_at")
GENERATE_FIELDS = ("prompts", "max_new_tokens", "temperature", "top_k", "top_p", "stop", "seed", "interventions",
                   "capture", "attention_mask", "stop_at_eos")
SWEEP_FIELDS = ("clean_tokens", "corrupt_tokens", "sites", "metric", "per", "corrupt_interventions", "metric_args",
                "chunk", "attention_mask")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """Server limits and scheduling.

    ``max_capture_bytes``: captured arrays of one request (checked before it runs);
    ``max_tokens``: batch x sequence of one request; ``max_new_tokens``: of one ``generate``;
    ``timeout_s``: a request's wait plus run (504 after it; a running program is not interrupted, its
    result is dropped); ``rate``/``burst``: each user's requests per second and burst (token bucket);
    ``max_batch``: requests of several users run as one program; ``program_cache``: compiled programs
    kept (LRU); ``max_queue``: queued requests in all; ``compile_in_background``: a group size not
    compiled yet runs in smaller compiled chunks while its program builds on another thread (False:
    build it before running the group).
    """

    max_request_bytes: int = 256 << 20
    max_response_bytes: int = 1 << 30
    max_capture_bytes: int = 512 << 20
    max_tokens: int = 1 << 16
    max_new_tokens: int = 1024
    timeout_s: float = 300.0
    rate: float = 20.0
    burst: int = 40
    max_batch: int = 8
    program_cache: int = 64
    max_queue: int = 256
    compile_in_background: bool = True
    limits: Limits = Limits()

    def __post_init__(self):
        for name in ("max_request_bytes", "max_response_bytes", "max_capture_bytes", "max_tokens", "max_new_tokens",
                     "burst", "max_batch", "program_cache", "max_queue"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("timeout_s", "rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")


def load_keys(path: str | Path) -> dict[str, str]:
    """``keys.json``: a JSON object mapping user name to API key (non-empty, distinct strings)."""
    try:
        keys = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"keys file {str(path)!r} does not exist") from None
    except ValueError:
        raise ValueError(f"keys file {str(path)!r} is not valid JSON") from None
    if not isinstance(keys, dict) or not keys or not all(
            isinstance(u, str) and isinstance(k, str) and u and len(k) >= 8 for u, k in keys.items()):
        raise ValueError(f"keys file {str(path)!r} must be a non-empty JSON object {{user: key}} with keys of at "
                         f"least 8 characters")
    if len(set(keys.values())) != len(keys):
        raise ValueError(f"keys file {str(path)!r} gives two users the same key")
    return dict(keys)


class BadRequest(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class RateLimiter:
    """A token bucket per user: ``rate`` requests per second, bursts of ``burst``."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, user: str) -> float:
        """0 when ``user`` may send a request now (one token taken), else the seconds to wait."""
        with self._lock:
            now = self.clock()
            tokens, last = self._buckets.get(user, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[user] = (tokens - 1.0, now)
                return 0.0
            self._buckets[user] = (tokens, now)
            return (1.0 - tokens) / self.rate


# ----------------------------------------------------------------------------- request checks


def _as_capture(capture) -> Optional[tuple[str, ...]]:
    if capture is None:
        return None
    if isinstance(capture, str) and capture:
        return (capture,)
    if isinstance(capture, (list, tuple)) and all(isinstance(c, str) and c for c in capture):
        return tuple(capture)
    raise BadRequest(422, "capture must be a site name, a glob, a list of them, 'all' or null")


def _is_texts(tokens) -> bool:
    return isinstance(tokens, str) or (isinstance(tokens, (list, tuple)) and bool(tokens)
                                       and all(isinstance(t, str) for t in tokens))


def _fields(request: Any, allowed: Sequence[str], required: Sequence[str], what: str) -> dict:
    if not isinstance(request, dict) or set(required) - set(request) or set(request) - set(allowed):
        got = sorted(request)[:10] if isinstance(request, dict) else type(request).__name__
        raise BadRequest(422, f"a {what} request is a dict with {list(required)} and optionally "
                              f"{[f for f in allowed if f not in required]}; got {got}")
    return request


def _interventions(value, what: str = "interventions"):
    if value is not None and not isinstance(value, (dict, list, tuple)):
        raise BadRequest(422, f"{what} must be a mapping {{site: intervention}} or a list of them")
    return value or None


def _int_array(x, what: str, ndim: int = 2):
    if not isinstance(x, (jax.Array, np.ndarray)) or not jnp.issubdtype(x.dtype, jnp.integer) or x.ndim != ndim \
            or not x.size:
        raise BadRequest(422, f"{what} must be a non-empty int array of {ndim} dimensions, got "
                              f"{getattr(x, 'dtype', type(x).__name__)}{list(getattr(x, 'shape', []))}")
    return x


class Service:
    """The model, its limits and the job queue; turns decoded requests into jobs."""

    def __init__(self, model: Model, keys: Mapping[str, str], config: ServeConfig, name: str,
                 cluster: Optional[Cluster] = None):
        """``cluster``: this is one process of a distributed server (``cluster``); process 0 announces
        every group it runs to the others, which run it too (no background compiling there: every
        process must choose the same programs)."""
        self.model, self.config, self.name, self.cluster = model, config, name, cluster
        self.programs = engine.Programs(config.program_cache)
        self.unbatchable: set = set()  # run keys whose batched program failed to build
        self.compiler = engine.BackgroundCompiler(self.programs) \
            if config.compile_in_background and cluster is None else None
        self.runs = collections.Counter()  # programs run, by group size
        self.usage = {user: collections_counter() for user in keys}
        self.started = time.time()
        announce = cluster.announce if cluster is not None and cluster.leader else None
        self.scheduler = engine.Scheduler(config.max_batch, config.max_queue, on_done=self._done,
                                          before_run=announce)
        self.logits_dtype = str(jax.eval_shape(lambda m, t: run(m, t).logits, model,
                                               jax.ShapeDtypeStruct((1, 1), jnp.int32)).dtype)

    def _unbatchable(self, key) -> None:
        """Do not try to build a batched program for ``key`` again (its build failed)."""
        if len(self.unbatchable) > 4096:  # bounded, like the program cache
            self.unbatchable.clear()
        self.unbatchable.add(key)

    def close(self) -> None:
        self.scheduler.stop()
        if self.compiler is not None:
            self.compiler.stop()
        if self.cluster is not None and self.cluster.leader:
            self.cluster.stop()  # the other processes exit

    def _done(self, job: engine.Job) -> None:
        self.usage[job.user]["compute_s"] += job.compute_s

    def _check_size(self, b: int, t: int) -> None:
        if b * t > self.config.max_tokens:
            raise BadRequest(413, f"{b} x {t} tokens exceed the limit of {self.config.max_tokens} per request")

    def _check_capture(self, nbytes: int) -> None:
        if nbytes > self.config.max_capture_bytes:
            raise BadRequest(413, f"the captured sites take {nbytes} bytes, more than the limit of "
                                  f"{self.config.max_capture_bytes}; capture fewer sites or shorter inputs")

    # --------------------------------------------------------------------------- run

    def run_job(self, user: str, request: Any) -> engine.Job:
        request = dict(_fields(request, RUN_FIELDS, ("tokens",), "run"))
        tokens, mask = request["tokens"], request.get("attention_mask")
        if _is_texts(tokens):
            if self.model.tokenizer is None:
                raise BadRequest(422, "this model has no tokenizer; send token ids")
            tokens, text_mask = self.model.to_tokens(tokens)
            request["tokens"], request["attention_mask"] = jnp.asarray(tokens), text_mask if mask is None else mask
        _int_array(request["tokens"], "tokens")
        self._check_size(*request["tokens"].shape)
        # Host-side checks of tokens, mask, positions and logits_at: a bad value is refused here, never
        # inside a batched program where it would fail other users' requests.
        prepare_inputs(self.model, request["tokens"], request.get("attention_mask"), request.get("positions"),
                       request.get("logits_at"))
        capture = _as_capture(request.pop("capture", None))
        request["interventions"] = _interventions(request.get("interventions"))
        key, arrays, rebuild = engine.run_signature(request)
        key = ("run", capture, key)
        # An exported Fn cannot be vmapped (jax.export has no batching rule): such requests run alone.
        batchable = not any(isinstance(x, Fn) for x in jax.tree_util.tree_leaves(
            request["interventions"], is_leaf=lambda x: isinstance(x, Fn))) and key not in self.unbatchable

        def build(n: int):
            def go():
                lowered, nbytes = engine.compile_run(self.model, arrays, rebuild=rebuild, capture=capture, n=n)
                self._check_capture(nbytes)
                return lowered.compile(), nbytes
            return go

        def work():
            logits, cache = self.programs.get((key, 0), build(0))[0](self.model, arrays)
            self.runs[1] += 1
            return _run_result(logits, cache)

        def run_group(jobs, n: int) -> list:
            rows = [j.arrays for j in jobs] + [jobs[-1].arrays] * (n - len(jobs))
            stacked = [np.stack([np.asarray(a) for a in column]) for column in zip(*rows)]  # on the host: no dispatch
            try:
                compiled = self.programs.get((key, n), build(n))[0]
            except Exception:
                self._unbatchable(key)
                raise
            logits, cache = _run_result(*compiled(self.model, stacked)).values()  # to numpy once, then views
            self.runs[n] += 1
            return [{"logits": logits[i], "cache": {k: v[i] for k, v in cache.items()}} for i in range(len(jobs))]

        def batch_work(jobs) -> list:
            """The group as one program of its (padded) size; with background compiling, while that size is
            not compiled yet, in chunks of the compiled sizes or request by request."""
            out: list = []
            while len(out) < len(jobs):
                rest = jobs[len(out):]
                n = engine.group_size(len(rest), self.config.max_batch)
                if n > 1 and self.compiler is not None and not self.programs.has((key, n)):
                    self.compiler.submit((key, n), build(n), on_error=lambda: self._unbatchable(key))
                    n = max([m for m in range(2, len(rest) + 1) if m & (m - 1) == 0 and self.programs.has((key, m))],
                            default=1)
                if n == 1:
                    out.append(rest[0].work())
                else:
                    out.extend(run_group(rest[:n], n))
            return out

        return engine.Job(user, "run", work, batch_key=key if batchable else None, arrays=arrays,
                          batch_work=batch_work)

    # --------------------------------------------------------------------------- generate

    def generate_job(self, user: str, request: Any) -> engine.Job:
        from jaxinterp.generate import generate, prompt_batch

        request = dict(_fields(request, GENERATE_FIELDS, ("prompts", "max_new_tokens"), "generate"))
        n_new = request["max_new_tokens"]
        if isinstance(n_new, bool) or not isinstance(n_new, int) or not 1 <= n_new <= self.config.max_new_tokens:
            raise BadRequest(422, f"max_new_tokens must be an int in [1, {self.config.max_new_tokens}], got {n_new!r}")
        request["interventions"] = _interventions(request.get("interventions"))
        prompts = request["prompts"]
        if not _is_texts(prompts):
            if isinstance(prompts, jax.Array):
                prompts = request["prompts"] = np.asarray(_int_array(prompts, "prompts"))
            elif not (isinstance(prompts, list) and prompts and all(
                    isinstance(p, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in p)
                    for p in prompts)):
                raise BadRequest(422, "prompts must be a text, a list of texts, a list of token-id lists or an int "
                                      "array [batch, seq]")
        tokens, _ = prompt_batch(self.model, prompts, request.get("attention_mask"))
        b, t = tokens.shape
        self._check_size(b, t + n_new)
        capture = _as_capture(request.get("capture"))
        if capture:  # bounded by a run over the whole sequence (the generation keeps fewer positions)
            shapes = jax.eval_shape(lambda m, x: dict(run(m, x, capture=capture).cache), self.model,
                                    jax.ShapeDtypeStruct((b, t + n_new), jnp.int32))
            self._check_capture(sum(int(np.prod(s.shape)) * jnp.dtype(s.dtype).itemsize for s in shapes.values()))
        gen_module = importlib.import_module("jaxinterp.generate")  # the package's `generate` is the function

        def work():
            key = ("generate", b, t, n_new, capture, jax.tree_util.tree_structure(request.get("interventions")))
            self.programs.get(key, lambda: (None, None), on_evict=gen_module._program.clear_cache)
            out = generate(self.model, **request)
            cache = None if out.cache is None else {k: to_host(out.cache[k]) for k in out.cache}
            return {"tokens": out.tokens, "lengths": out.lengths, "sequences": out.sequences,
                    "attention_mask": out.attention_mask, "text": out.text, "cache": cache, "steps": out.steps}

        return engine.Job(user, "generate", work)

    # --------------------------------------------------------------------------- sweep

    def sweep_job(self, user: str, request: Any) -> engine.Job:
        activation = importlib.import_module("jaxinterp.patching.activation")

        request = dict(_fields(request, SWEEP_FIELDS, ("clean_tokens", "corrupt_tokens", "sites", "metric"), "sweep"))
        clean = _int_array(request["clean_tokens"], "clean_tokens")
        _int_array(request["corrupt_tokens"], "corrupt_tokens")
        self._check_size(*clean.shape)
        if not isinstance(request["metric"], ExportedFn):
            raise BadRequest(422, "metric must be a jax.export module (ji.remote.export_metric(fn, logits, *args))")
        metric = request["metric"] = ExportedMetric(request["metric"])
        args = request.get("metric_args", ())
        if not isinstance(args, (list, tuple)) or not all(isinstance(a, jax.Array) for a in args):
            raise BadRequest(422, "metric_args must be a list of arrays")
        request["metric_args"] = tuple(args)
        request["corrupt_interventions"] = _interventions(request.get("corrupt_interventions"), "corrupt_interventions")
        chunk = request.get("chunk", 16)
        if isinstance(chunk, bool) or not isinstance(chunk, int) or not 1 <= chunk <= 1024:
            raise BadRequest(422, f"chunk must be an int in [1, 1024], got {chunk!r}")
        sites = request["sites"]
        if not (isinstance(sites, str) or isinstance(sites, (list, tuple)) and all(isinstance(s, str) for s in sites)):
            raise BadRequest(422, "sites must be a site name, a glob or a list of them")
        prepare_inputs(self.model, clean, request.get("attention_mask"))
        prepare_inputs(self.model, request["corrupt_tokens"], request.get("attention_mask"))

        def work():
            key = ("sweep", clean.shape, str(sites), request.get("per"), metric, chunk)
            self.programs.get(key, lambda: (None, None), on_evict=activation._activation_jit.clear_cache)
            res = activation.activation_patching(self.model, **request)
            return {"effects": {k: to_host(v) for k, v in res.effects.items()}, "clean": to_host(res.clean),
                    "corrupt": to_host(res.corrupt), "per": res.per}

        return engine.Job(user, "sweep", work)

    def status(self) -> dict:
        cfg = self.model.config
        return {"models": [{"name": self.name, "family": self.model.family, "n_layers": cfg.n_layers,
                            "d_model": getattr(cfg, "d_model", None), "vocab_size": cfg.vocab_size,
                            "sites": len(self.model.sites)}],
                "queue": self.scheduler.queued(), "running": self.scheduler.running,
                "uptime_s": round(time.time() - self.started, 1), "programs": self.programs.stats(),
                "batches": {str(k): v for k, v in sorted(self.runs.items())},
                "compiling": 0 if self.compiler is None else self.compiler.pending(),
                "users": {u: {**{k: round(v, 3) if isinstance(v, float) else v for k, v in c.items()},
                              "queued": self.scheduler.queued(u)} for u, c in self.usage.items()},
                # the JSON /status of before: requests served per user
                "requests": {u: c["requests"] for u, c in self.usage.items()},
                "busy": self.scheduler.running > 0, "family": self.model.family}


def collections_counter() -> dict:
    return {"requests": 0, "refused": 0, "rate_limited": 0, "timeouts": 0, "bytes_in": 0, "bytes_out": 0,
            "compute_s": 0.0}


def _run_result(logits, cache) -> dict:
    return {"logits": to_host(logits), "cache": {k: to_host(v) for k, v in cache.items()}}  # the sites' order kept


_MODEL_ERRORS = (ValueError, TypeError, IndexError, KeyError, jax.errors.JaxRuntimeError)


def _error_status(e: BaseException) -> Optional[tuple[int, str]]:
    if isinstance(e, WireError):
        return 400, f"malformed request: {e}"
    if isinstance(e, BadRequest):
        return e.status, e.detail
    if isinstance(e, engine.QueueFull):
        return 429, str(e)
    if isinstance(e, engine.ShuttingDown):
        return 503, str(e)
    if isinstance(e, _MODEL_ERRORS):
        return 422, f"the model refused the request: {type(e).__name__}: {str(e)[:2000]}"
    return None


# ----------------------------------------------------------------------------- HTML status page


def status_html(status: dict) -> str:
    esc = html.escape
    models = "".join(f"<tr><td class=model>{esc(m['name'])}</td><td>{esc(m['family'])}</td><td>{m['n_layers']}</td>"
                     f"<td>{m['d_model']}</td><td>{m['vocab_size']}</td><td>{m['sites']}</td></tr>"
                     for m in status["models"])
    cols = ("requests", "queued", "refused", "rate_limited", "timeouts", "compute_s", "bytes_in", "bytes_out")
    users = "".join(f"<tr><td>{esc(u)}</td>" + "".join(f"<td>{c[k]}</td>" for k in cols) + "</tr>"
                    for u, c in sorted(status["users"].items()))
    p = status["programs"]
    batches = ", ".join(f"{k}: {v}" for k, v in status["batches"].items()) or "none yet"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="10"><title>jaxinterp serve</title>
<style>body{{font-family:sans-serif;margin:2em;color:#222}} table{{border-collapse:collapse;margin:.5em 0 1.5em}}
td,th{{border:1px solid #bbb;padding:.3em .8em;text-align:right}} td:first-child,th:first-child{{text-align:left}}
th{{background:#eef}} .big{{font-size:1.4em}}</style></head>
<body><h1>jaxinterp serve</h1>
<p class=big>queue: <b id=queue>{status['queue']}</b> waiting, {status['running']} running
&middot; up {status['uptime_s']} s</p>
<h2>Models</h2><table id=models><tr><th>model</th><th>family</th><th>layers</th><th>d_model</th><th>vocab</th>
<th>sites</th></tr>{models}</table>
<h2>Users</h2><table id=users><tr><th>user</th>{''.join(f'<th>{k}</th>' for k in cols)}</tr>{users}</table>
<h2>Programs</h2><p>compiled programs cached: {p['size']} / {p['capacity']} (hits {p['hits']}, misses {p['misses']},
evictions {p['evictions']}); groups run by size: {esc(batches)}</p>
</body></html>"""


# ----------------------------------------------------------------------------- the app


def create_app(model: Model, keys: Mapping[str, str], config: ServeConfig = ServeConfig(), *, name: str = "model",
               clock: Callable[[], float] = time.monotonic, cluster: Optional[Cluster] = None):
    """The FastAPI application serving ``model`` (shown as ``name``) to the users of ``keys`` ({user: key}).
    ``clock``: the rate limiter's clock (tests pass a fake one); ``cluster``: on process 0 of a distributed
    server (``Service``)."""
    from contextlib import asynccontextmanager

    from fastapi import Depends, FastAPI, HTTPException, Request, Response
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse

    service = Service(model, keys, config, name, cluster)
    limiter = RateLimiter(config.rate, config.burst, clock)

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.close()

    app = FastAPI(title="jaxinterp", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.service = service
    app.state.usage = service.usage

    def user_of(request: Request) -> str:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        claimed = None
        if scheme.lower() == "basic":
            try:
                claimed, _, token = base64.b64decode(token, validate=True).decode().partition(":")
            except ValueError:
                token = ""
        elif scheme.lower() != "bearer":
            token = ""
        found = None
        for user, key in keys.items():  # compare against every key: timing does not reveal which matched
            if hmac.compare_digest(token.encode(), key.encode()) and claimed in (None, user):
                found = user
        if found is None:
            raise HTTPException(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                                headers={"WWW-Authenticate": 'Basic realm="jaxinterp"'})
        return found

    def wants_html(request: Request) -> bool:
        return "text/html" in request.headers.get("accept", "")

    @app.get("/health")
    def health():
        return {"ok": True}

    @app.get("/info")
    def info(user: str = Depends(user_of)):
        return {"name": name, "family": model.family,
                "config": json.loads(json.dumps(dataclasses.asdict(model.config), default=str)),
                "sites": list(model.sites), "tokenizer": model.tokenizer is not None,
                "logits_dtype": service.logits_dtype, "wire": {"format": FORMAT, "version": VERSION}, "user": user}

    @app.get("/status")
    def status(request: Request, user: str = Depends(user_of)):
        s = service.status()
        return HTMLResponse(status_html(s)) if wants_html(request) else s

    @app.get("/", response_class=HTMLResponse)
    def index(user: str = Depends(user_of)):
        return status_html(service.status())

    async def serve(request: Request, user: str, make_job: Callable[[str, Any], engine.Job]) -> Response:
        usage = service.usage[user]
        wait = limiter.take(user)
        if wait:
            usage["rate_limited"] += 1
            raise HTTPException(429, f"user {user!r} is over the rate limit of {config.rate:g} requests/s "
                                     f"(burst {config.burst}); retry in {wait:.2f} s",
                                headers={"Retry-After": str(max(1, math.ceil(wait)))})
        try:
            blob = await call(request, user, make_job)
        except HTTPException:
            usage["refused"] += 1
            raise
        usage["requests"] += 1
        usage["bytes_out"] += len(blob)
        return Response(blob, media_type="application/octet-stream")

    async def call(request: Request, user: str, make_job) -> bytes:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > config.max_request_bytes:
            raise HTTPException(413, f"request of {declared} bytes exceeds the limit of {config.max_request_bytes}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > config.max_request_bytes:
                raise HTTPException(413, f"request exceeds the limit of {config.max_request_bytes} bytes")
        service.usage[user]["bytes_in"] += len(body)
        deadline = time.monotonic() + config.timeout_s
        job = None
        try:
            job = await run_in_threadpool(lambda: make_job(user, decode(bytes(body), config.limits)))
            job.payload = bytes(body)
            service.scheduler.submit(job)
            result = await asyncio.wait_for(asyncio.wrap_future(job.future), max(0.0, deadline - time.monotonic()))
            blob = await run_in_threadpool(encode, result)
        except asyncio.TimeoutError:
            if job is not None:
                job.cancelled = True
            service.usage[user]["timeouts"] += 1
            raise HTTPException(504, f"the request did not finish within the time limit of {config.timeout_s:g} s "
                                     f"(queue length {service.scheduler.queued()})") from None
        except Exception as e:  # noqa: BLE001 - every failure of bad input becomes a 4xx naming it
            mapped = _error_status(e)
            if mapped is None:
                raise
            raise HTTPException(*mapped, headers={"Retry-After": "1"} if mapped[0] in (429, 503) else None) from None
        if len(blob) > config.max_response_bytes:
            raise HTTPException(413, f"the result has {len(blob)} bytes, more than the limit of "
                                     f"{config.max_response_bytes}; capture fewer sites or use logits_at")
        return blob

    @app.post("/run")
    async def run_endpoint(request: Request, user: str = Depends(user_of)):
        return await serve(request, user, service.run_job)

    @app.post("/generate")
    async def generate_endpoint(request: Request, user: str = Depends(user_of)):
        return await serve(request, user, service.generate_job)

    @app.post("/sweep")
    async def sweep_endpoint(request: Request, user: str = Depends(user_of)):
        return await serve(request, user, service.sweep_job)

    return app


def _mesh(spec: str):
    """``'data=1,tensor=2'`` -> a ``Mesh`` over this host's devices (the existing sharding rules place the model)."""
    from jaxinterp.sharding.mesh import MeshConfig, make_mesh

    sizes = {}
    for part in spec.split(","):
        axis, _, size = part.partition("=")
        try:
            sizes[axis.strip()] = int(size)
        except ValueError:
            raise ValueError(f"--mesh {spec!r}: expected axis=size pairs such as 'data=1,tensor=2'") from None
    return make_mesh(MeshConfig.from_dict(sizes))


def main(argv: Sequence[str] | None = None, prog: str = "jaxinterp serve") -> int:
    p = argparse.ArgumentParser(prog=prog, description="Serve a model: run, generate and patching sweeps with "
                                                       "captures and interventions sent as data (the jaxinterp wire "
                                                       "format).")
    p.add_argument("--model", required=True, help="any ji.load source: an embedded name or a Hugging Face directory")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--keys", required=True, help="JSON file {user: API key}")
    p.add_argument("--max-request-mb", type=float, default=256.0)
    p.add_argument("--max-response-mb", type=float, default=1024.0)
    p.add_argument("--max-capture-mb", type=float, default=512.0)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a request may wait and run")
    p.add_argument("--rate", type=float, default=20.0, help="requests per second per user")
    p.add_argument("--burst", type=int, default=40, help="requests a user may send at once")
    p.add_argument("--max-batch", type=int, default=8, help="requests of several users run as one program "
                                                            "(1: no co-tenant batching)")
    p.add_argument("--program-cache", type=int, default=64, help="compiled programs kept (LRU)")
    p.add_argument("--mesh", default=None, help="shard the model over this host's devices: axis=size pairs among "
                                                "data, fsdp, tensor (one may be -1), e.g. 'data=1,tensor=2'")
    p.add_argument("--rules", default=None, help="sharding rule set with --mesh (a shipped name or a YAML path; "
                                                 "default fsdp_tp)")
    p.add_argument("--distributed", action="store_true",
                   help="run as a jax.distributed job (settings from the flags below, JAXINTERP_* variables, SLURM "
                        "or TPU metadata): the model is sharded over every process's devices (--mesh, default "
                        "'data=1,tensor=-1'), process 0 answers HTTP and every process runs each request")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    add_flags(p)
    args = p.parse_args(argv)
    try:
        from jaxinterp.loading import load

        keys = load_keys(args.keys)
        dist = config_from(args)
        if (args.distributed or dist.num_processes is not None or dist.coordinator is not None) and \
                initialize(dist, auto=args.distributed):
            cluster = Cluster()
            args.mesh = args.mesh or "data=1,tensor=-1"
        else:
            cluster = None
        if not 0 < args.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {args.port}")
        cfg = ServeConfig(max_request_bytes=int(args.max_request_mb * 2**20),
                          max_response_bytes=int(args.max_response_mb * 2**20),
                          max_capture_bytes=int(args.max_capture_mb * 2**20), timeout_s=args.timeout, rate=args.rate,
                          burst=args.burst, max_batch=args.max_batch, program_cache=args.program_cache)
        mesh = None if args.mesh is None else _mesh(args.mesh)
        if args.rules is not None and mesh is None:
            raise ValueError("--rules needs --mesh")
        model = load(args.model, dtype=args.dtype, mesh=mesh, rules=args.rules)
        if cluster is not None and not cluster.leader:
            service = Service(model, keys, cfg, args.model, cluster)
            groups = follow(service, cluster)  # until process 0 stops
            service.close()
            cluster.leave()
            print(f"process {jax.process_index()}: ran {groups} groups; process 0 stopped", file=sys.stderr)
            return 0
        app = create_app(model, keys, cfg, name=args.model, cluster=cluster)
        import uvicorn
    except (ValueError, OSError, ImportError) as e:
        if args.debug:
            raise
        hint = " (install the [serve] extra)" if isinstance(e, ImportError) else ""
        print(f"{prog}: error: {' '.join(str(e).split())}{hint}", file=sys.stderr)  # one line
        return 2
    where = "" if cluster is None else f" ({jax.process_count()} processes, {jax.device_count()} devices)"
    print(f"serving {args.model} for {len(keys)} users on http://{args.host}:{args.port}{where}", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
