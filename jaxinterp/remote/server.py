"""``jaxinterp serve``: one loaded model behind HTTP; requests and results travel in the wire format.

Endpoints (every one but ``/health`` needs ``Authorization: Bearer <key>``; ``keys.json`` maps user
names to keys):

* ``GET /health``: ``{"ok": true}``.
* ``GET /info``: the model's family, config, sites and whether it has a tokenizer (JSON).
* ``GET /status``: whether a run is in progress and the requests served per user (JSON).
* ``POST /run``: body a wire blob of ``{"tokens": int array [B, T] | text | [texts], "capture": ...,
  "interventions": ..., "attention_mask", "positions", "logits_at"}`` (``model.run``'s arguments);
  answer a wire blob ``{"logits": array, "cache": {site: array}}``.

Bad input is a 4xx naming the problem: 400 for a blob the wire format refuses, 401 for a missing or
wrong key, 413 for a request or response over the limits, 422 for a request the model refuses
(unknown site, wrong shape). The model runs one compiled program per request structure, requests
one at a time. Keys are never logged.
"""

import argparse
import dataclasses
import functools
import hmac
import json
import sys
import threading
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np

from jaxinterp.model import Model, run
from jaxinterp.remote.wire import FORMAT, VERSION, Limits, WireError, decode, encode

__all__ = ["ServeConfig", "create_app", "load_keys", "main"]

RUN_FIELDS = ("tokens", "capture", "interventions", "attention_mask", "positions", "logits_at")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """Server limits."""

    max_request_bytes: int = 256 << 20
    max_response_bytes: int = 1 << 30
    limits: Limits = Limits()

    def __post_init__(self):
        if self.max_request_bytes <= 0 or self.max_response_bytes <= 0:
            raise ValueError("max_request_bytes and max_response_bytes must be positive")


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


@functools.partial(jax.jit, static_argnames=("capture",))
def _run(model, tokens, interventions, attention_mask, positions, logits_at, capture):
    out = run(model, tokens, capture=capture, interventions=interventions, attention_mask=attention_mask,
              positions=positions, logits_at=logits_at)
    return out.logits, dict(out.cache)


class BadRequest(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def _as_capture(capture) -> Optional[tuple[str, ...]]:
    if capture is None or isinstance(capture, str):
        return (capture,) if capture else None
    if isinstance(capture, (list, tuple)) and all(isinstance(c, str) for c in capture):
        return tuple(capture)
    raise BadRequest(422, "capture must be a site name, a glob, a list of them, 'all' or null")


def _is_texts(tokens) -> bool:
    return isinstance(tokens, str) or (isinstance(tokens, (list, tuple)) and bool(tokens)
                                       and all(isinstance(t, str) for t in tokens))


def execute(model: Model, request: Any) -> dict:
    """Run one decoded ``/run`` request: ``{"logits": np array, "cache": {site: np array}}``."""
    if not isinstance(request, dict) or "tokens" not in request or set(request) - set(RUN_FIELDS):
        raise BadRequest(422, f"a run request is a dict with 'tokens' and optionally {list(RUN_FIELDS[1:])}; got "
                              f"{sorted(request)[:10] if isinstance(request, dict) else type(request).__name__}")
    tokens, mask = request["tokens"], request.get("attention_mask")
    if _is_texts(tokens):
        if model.tokenizer is None:
            raise BadRequest(422, "this model has no tokenizer; send token ids")
        tokens, text_mask = model.to_tokens(tokens)
        mask = text_mask if mask is None else mask
    elif not isinstance(tokens, jax.Array):
        raise BadRequest(422, "tokens must be an int array [batch, seq], a text or a list of texts")
    interventions = request.get("interventions")
    if interventions is not None and not isinstance(interventions, (dict, list, tuple)):
        raise BadRequest(422, "interventions must be a mapping {site: intervention} or a list of them")
    logits, cache = _run(model, tokens, interventions or None, mask, request.get("positions"),
                         request.get("logits_at"), capture=_as_capture(request.get("capture")))
    return {"logits": np.asarray(logits), "cache": {k: np.asarray(v) for k, v in cache.items()}}


_MODEL_ERRORS = (ValueError, TypeError, IndexError, KeyError, jax.errors.JaxRuntimeError)


def create_app(model: Model, keys: Mapping[str, str], config: ServeConfig = ServeConfig()):
    """The FastAPI application serving ``model`` to the users of ``keys`` ({user: key})."""
    from fastapi import Depends, FastAPI, HTTPException, Request, Response
    from fastapi.concurrency import run_in_threadpool

    app = FastAPI(title="jaxinterp", docs_url=None, redoc_url=None, openapi_url=None)
    lock = threading.Lock()
    usage: dict[str, int] = {user: 0 for user in keys}
    app.state.usage = usage

    def user_of(request: Request) -> str:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        found = None
        for user, key in keys.items():  # compare against every key: timing does not reveal which matched
            if hmac.compare_digest(token.encode(), key.encode()) and scheme.lower() == "bearer":
                found = user
        if found is None:
            raise HTTPException(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                                headers={"WWW-Authenticate": "Bearer"})
        return found

    @app.get("/health")
    def health():
        return {"ok": True}

    @app.get("/info")
    def info(user: str = Depends(user_of)):
        return {"family": model.family, "config": json.loads(json.dumps(dataclasses.asdict(model.config), default=str)),
                "sites": list(model.sites), "tokenizer": model.tokenizer is not None,
                "wire": {"format": FORMAT, "version": VERSION}, "user": user}

    @app.get("/status")
    def status(user: str = Depends(user_of)):
        return {"family": model.family, "busy": lock.locked(), "requests": dict(usage)}

    @app.post("/run")
    async def run_endpoint(request: Request, user: str = Depends(user_of)):
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > config.max_request_bytes:
            raise HTTPException(413, f"request of {declared} bytes exceeds the limit of {config.max_request_bytes}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > config.max_request_bytes:
                raise HTTPException(413, f"request exceeds the limit of {config.max_request_bytes} bytes")

        def work() -> bytes:
            payload = decode(bytes(body), config.limits)
            with lock:
                result = execute(model, payload)
            usage[user] += 1
            return encode(result)

        try:
            blob = await run_in_threadpool(work)
        except WireError as e:
            raise HTTPException(400, f"malformed request: {e}") from None
        except BadRequest as e:
            raise HTTPException(e.status, e.detail) from None
        except _MODEL_ERRORS as e:
            raise HTTPException(422, f"the model refused the request: {type(e).__name__}: {str(e)[:2000]}") from None
        if len(blob) > config.max_response_bytes:
            raise HTTPException(413, f"the result has {len(blob)} bytes, more than the limit of "
                                     f"{config.max_response_bytes}; capture fewer sites or use logits_at")
        return Response(blob, media_type="application/octet-stream")

    return app


def main(argv: Sequence[str] | None = None, prog: str = "jaxinterp serve") -> int:
    p = argparse.ArgumentParser(prog=prog, description="Serve a model: run with captures and interventions sent as "
                                                       "data (the jaxinterp wire format).")
    p.add_argument("--model", required=True, help="any ji.load source: an embedded name or a Hugging Face directory")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--keys", required=True, help="JSON file {user: API key}")
    p.add_argument("--max-request-mb", type=float, default=256.0)
    p.add_argument("--max-response-mb", type=float, default=1024.0)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    try:
        from jaxinterp.loading import load

        keys = load_keys(args.keys)
        if not 0 < args.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {args.port}")
        cfg = ServeConfig(max_request_bytes=int(args.max_request_mb * 2**20),
                          max_response_bytes=int(args.max_response_mb * 2**20))
        app = create_app(load(args.model, dtype=args.dtype), keys, cfg)
        import uvicorn
    except (ValueError, OSError, ImportError) as e:
        if args.debug:
            raise
        hint = " (install the [serve] extra)" if isinstance(e, ImportError) else ""
        print(f"{prog}: error: {' '.join(str(e).split())}{hint}", file=sys.stderr)  # one line
        return 2
    print(f"serving {args.model} for {len(keys)} users on http://{args.host}:{args.port}", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
