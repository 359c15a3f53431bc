"""``ji.remote.Client``: a served model used like a local one (``run`` takes ``model.run``'s arguments).

    model = ji.remote.connect("http://127.0.0.1:8000", key=os.environ["JI_KEY"])
    out = model.run("The capital of France is", capture="blocks.*.resid_post",
                    interventions={"blocks.1.resid_post": ji.Add(v)})
    out.logits, out.cache["blocks.2.resid_post"]           # jax arrays, as from a local run
"""

from __future__ import annotations

from typing import Any, Optional

from jaxinterp.model import RunOutput
from jaxinterp.remote.wire import Limits, decode, encode

__all__ = ["Client", "RemoteError", "connect"]


class RemoteError(RuntimeError):
    """The server refused a request (``status``: its HTTP status; the message: its reason)."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"server answered {status}: {detail}")
        self.status = status


class Client:
    """A model served by ``jaxinterp serve``. ``http``: an ``httpx.Client``-like object (tests pass
    FastAPI's ``TestClient``); by default one is made for ``url``."""

    def __init__(self, url: str, key: Optional[str] = None, *, http: Any = None, timeout: float = 300.0,
                 limits: Limits = Limits()):
        if http is None:
            import httpx

            http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout)
        self._http, self._limits, self._info = http, limits, None
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
        body = encode({k: v for k, v in request.items() if v is not None or k == "tokens"})
        response = self._check(self._http.post("/run", content=body, headers={
            **self._headers, "Content-Type": "application/octet-stream"}))
        result = decode(response.content, self._limits)
        return RunOutput(logits=result["logits"], cache=result["cache"])

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def connect(url: str, key: Optional[str] = None, **kwargs) -> Client:
    """``Client(url, key)``: a served model with ``run``, ``sites`` and ``config``."""
    return Client(url, key, **kwargs)
