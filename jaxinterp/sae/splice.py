"""``Splice``: run a model with an SAE's reconstruction in place of a site's activation."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

from jaxinterp.interventions import Intervention
from .families import SAE

__all__ = ["Splice"]


@struct.dataclass
class Splice(Intervention):
    """Replace ``x`` by ``decode(encode(x) * latent_scale)``.

    ``latent_scale [F]`` (optional) multiplies the latents (0 ablates a latent, 2 doubles
    it). With ``add_error`` the SAE's error term ``x - decode(encode(x))`` is added back,
    so only the latent edits change the model (the usual setting for feature circuits).
    Array leaves (the SAE's parameters, ``latent_scale``) are ordinary inputs: vmap and
    grad apply.
    """

    sae: SAE
    latent_scale: Optional[jax.Array] = None
    add_error: bool = struct.field(pytree_node=False, default=False)

    def validate(self, x, site):
        if x.shape[-1] != self.sae.d_in:
            raise ValueError(
                f"Splice at {site!r}: the SAE reads d_in={self.sae.d_in} features but the site has shape "
                f"{tuple(x.shape)} (last axis {x.shape[-1]}); train the SAE on this site or pick a site of width "
                f"{self.sae.d_in}"
            )
        if self.latent_scale is not None and jnp.shape(self.latent_scale)[-1:] != (self.sae.d_sae,):
            raise ValueError(f"Splice at {site!r}: latent_scale must end in [{self.sae.d_sae}], "
                             f"got {tuple(jnp.shape(self.latent_scale))}")

    def apply(self, x):
        xf = x.astype(jnp.float32)
        f = self.sae.encode(xf)
        edited = f if self.latent_scale is None else f * self.latent_scale
        out = self.sae.decode(edited)
        if self.add_error:
            out = out + (xf - self.sae.decode(f))
        return out.astype(x.dtype)
