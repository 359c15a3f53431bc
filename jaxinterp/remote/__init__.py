"""Remote execution: interventions travel as data (``wire``), a server runs them on a shared model.

    blob = ji.remote.encode({"blocks.1.resid_post": ji.Add(v)})      # JSON structure + safetensors, no pickle
    ji.save_intervention("steer.safetensors", iv); ji.load_intervention("steer.safetensors")
    fn = ji.remote.export_fn(lambda x: x * 2, ("b", "t", 64))         # a ji.Fn that can travel (jax.export)
    model = ji.remote.connect("http://127.0.0.1:8000", key="...")     # model.run / .generate / .sweep as locally

The server (``jaxinterp serve``) and the client need the ``[serve]`` extra (fastapi, uvicorn, httpx).
"""

from jaxinterp.remote.wire import (ExportedFn, Limits, WireError, check_module, check_safe, decode, encode, export_fn,
                                   export_metric, load_intervention, save_intervention)

__all__ = ["encode", "decode", "save_intervention", "load_intervention", "export_fn", "export_metric", "ExportedFn",
           "check_module", "check_safe", "Limits", "WireError", "Client", "connect", "create_app"]


def __getattr__(name):
    if name in ("Client", "connect"):
        from jaxinterp.remote import client

        return getattr(client, name)
    if name == "create_app":
        from jaxinterp.remote.server import create_app

        return create_app
    raise AttributeError(f"module 'jaxinterp.remote' has no attribute {name!r}")
