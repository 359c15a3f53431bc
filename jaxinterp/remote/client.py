"""``ji.remote.Client``: a served model used like a local one (``run``, ``generate`` and ``sweep`` take the
arguments of ``model.run``, ``ji.generate`` and ``activation_patching`` and return the same types).

    model = ji.remote.connect("http://127.0.0.1:8000", key=os.environ["JI_KEY"])
    out = model.run("The capital of France is", capture="blocks.*.resid_post",
                    interventions={"blocks.1.resid_post": ji.Add(v)})
    out.logits, out.cache["blocks.2.resid_post"]           # jax arrays, as from a local run
"""

from __future__ import annotations

import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.model import RunOutput
from jaxinterp.remote.wire import ExportedFn, Limits, decode, encode, export_metric

__all__ = ["Client", "RemoteError", "connect"]


class RemoteError(RuntimeError):
    """The server refused a request (``status``: its HTTP status; the message: its reason)."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"server answered {status}: {detail}")
        self.status = status


class Client:
    """A model served by ``jaxinterp serve``. ``http``: an ``httpx.Client``-like object (tests pass
    FastAPI's ``TestClient``); by default one is made for ``url``."""

    RETRY_STATUS = (429, 503)  # over the rate limit / queue full, shutting down: retried after Retry-After

    def __init__(self, url: str, key: Optional[str] = None, *, http: Any = None, timeout: float = 300.0,
                 limits: Limits = Limits(), retries: int = 3, max_wait_s: float = 30.0):
        if http is None:
            import httpx

            http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout)
        self._http, self._limits, self._info = http, limits, None
        self._retries, self._max_wait_s = retries, max_wait_s
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}

    def _check(self, response):
        if response.status_code != 200:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise RemoteError(response.status_code, str(detail))
        return response

    def info(self) -> dict:
        """The server's model: ``family``, ``config`` (a dict), ``sites``, ``tokenizer`` (bool)."""
        if self._info is None:
            self._info = self._check(self._http.get("/info", headers=self._headers)).json()
        return self._info

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self.info()["sites"])

    @property
    def config(self) -> dict:
        return self.info()["config"]

    def run(self, tokens, capture=None, interventions=None, *, attention_mask=None, positions=None,
            logits_at=None) -> RunOutput:
        """``model.run`` on the server; same arguments, same ``RunOutput`` (arrays on this host's device)."""
        request = {"tokens": tokens, "capture": capture, "interventions": interventions,
                   "attention_mask": attention_mask, "positions": positions, "logits_at": logits_at}
        result = self._post("/run", {k: v for k, v in request.items() if v is not None or k == "tokens"})
        return RunOutput(logits=result["logits"], cache=result["cache"])

    def _post(self, path: str, request: dict):
        """POST a request; every endpoint is free of side effects, so a 429 / 503 answer or a lost
        connection (a server restarting) is retried ``retries`` times, waiting as ``Retry-After`` says."""
        import httpx

        body = encode(request)
        headers = {**self._headers, "Content-Type": "application/octet-stream"}
        for attempt in range(self._retries + 1):
            try:
                response = self._http.post(path, content=body, headers=headers)
            except httpx.TransportError:
                if attempt == self._retries:
                    raise
                time.sleep(min(2.0 ** attempt, self._max_wait_s))
                continue
            if response.status_code not in self.RETRY_STATUS or attempt == self._retries:
                break
            try:
                wait = float(response.headers.get("retry-after", "1"))
            except ValueError:
                wait = 1.0
            time.sleep(min(max(wait, 0.0), self._max_wait_s))
        return decode(self._check(response).content, self._limits)

    def generate(self, prompts, *, max_new_tokens: int, temperature: float = 0.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, stop=None, seed=0, interventions=None, capture=None,
                 attention_mask=None, stop_at_eos: bool = True):
        """``ji.generate`` on the server; same arguments, same ``Generation``."""
        from jaxinterp.generate import Generation
        from jaxinterp.sites import Cache

        request = {"prompts": prompts, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k,
                   "top_p": top_p, "stop": stop, "seed": seed, "interventions": interventions, "capture": capture,
                   "attention_mask": attention_mask, "stop_at_eos": stop_at_eos}
        out = self._post("/generate", {k: v for k, v in request.items() if v is not None})
        cache = None if out["cache"] is None else Cache(out["cache"], {}, list(out["cache"]))
        return Generation(tokens=np.asarray(out["tokens"]), lengths=np.asarray(out["lengths"]),
                          sequences=np.asarray(out["sequences"]), attention_mask=np.asarray(out["attention_mask"]),
                          text=out["text"], cache=cache, steps=int(out["steps"]))

    def sweep(self, clean_tokens, corrupt_tokens, sites, metric, *, per: str = "position",
              corrupt_interventions=None, metric_args: tuple = (), chunk: int = 16, attention_mask=None):
        """``jaxinterp.patching.activation_patching`` on the server; same arguments, same ``PatchingResult``.

        ``metric`` (``logits [B, V] at the last position, *metric_args -> scalar``) is exported with
        ``jax.export`` for these shapes before it travels (or pass an ``ExportedFn`` from ``export_metric``).
        """
        from jaxinterp.patching import PatchingResult

        if not isinstance(metric, ExportedFn):
            logits = jax.ShapeDtypeStruct((np.shape(clean_tokens)[0], int(self.config["vocab_size"])),
                                          jnp.dtype(self.info()["logits_dtype"]))
            metric = export_metric(metric, logits, *metric_args)
        request = {"clean_tokens": clean_tokens, "corrupt_tokens": corrupt_tokens, "sites": sites, "metric": metric,
                   "per": per, "corrupt_interventions": corrupt_interventions, "metric_args": tuple(metric_args),
                   "chunk": chunk, "attention_mask": attention_mask}
        out = self._post("/sweep", {k: v for k, v in request.items() if v is not None})
        return PatchingResult({k: np.asarray(v) for k, v in out["effects"].items()}, float(out["clean"]),
                              float(out["corrupt"]), out["per"])

    def status(self) -> dict:
        """The server's queue length, models and per-user usage."""
        return self._check(self._http.get("/status", headers=self._headers)).json()

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def connect(url: str, key: Optional[str] = None, **kwargs) -> Client:
    """``Client(url, key)``: a served model with ``run``, ``generate``, ``sweep``, ``sites`` and ``config``."""
    return Client(url, key, **kwargs)
