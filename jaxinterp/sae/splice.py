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

    On a per-head site ``[..., H, Dh]`` the SAE reads what ``sae.reads`` says: one head
    (``head``: only that head is replaced) or every head flattened (``flatten_heads``:
    ``[..., H * Dh]``).
    """

    sae: SAE
    latent_scale: Optional[jax.Array] = None
    add_error: bool = struct.field(pytree_node=False, default=False)

    def sae_input(self, x: jax.Array) -> jax.Array:
        """The site's value as the SAE's input ``[..., d_in]``."""
        reads = self.sae.reads
        if reads.head is not None:
            return x[..., reads.head, :]
        if reads.flatten_heads:
            return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])
        return x

    def _site_output(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """``y`` (the SAE's output) put back into the site's layout of ``x``."""
        reads = self.sae.reads
        if reads.head is not None:
            return x.at[..., reads.head, :].set(y)
        return y.reshape(x.shape)

    def validate(self, x, site):
        reads = self.sae.reads
        if (reads.head is not None or reads.flatten_heads) and x.ndim < 3:
            what = "flattened heads" if reads.head is None else f"head {reads.head}"
            raise ValueError(f"Splice at {site!r}: the SAE reads {what} of a [..., heads, head_dim] site, but the site "
                             f"has shape {tuple(x.shape)}")
        if reads.head is not None and reads.head >= x.shape[-2]:
            raise ValueError(f"Splice at {site!r}: the SAE reads head {reads.head}, but the site has {x.shape[-2]} heads "
                             f"(shape {tuple(x.shape)})")
        width = self.sae_input(x).shape[-1]
        if width != self.sae.d_in:
            how = "with its heads flattened " if reads.flatten_heads else ""
            trained = f" ({reads.site})" if reads.site else ""
            raise ValueError(
                f"Splice at {site!r}: the SAE reads d_in={self.sae.d_in} features but the site {how}has width {width} "
                f"(shape {tuple(x.shape)}); use the SAE on the site it was trained on{trained} or a site of width "
                f"{self.sae.d_in}"
            )
        if self.latent_scale is not None and jnp.shape(self.latent_scale)[-1:] != (self.sae.d_sae,):
            raise ValueError(f"Splice at {site!r}: latent_scale must end in [{self.sae.d_sae}], "
                             f"got {tuple(jnp.shape(self.latent_scale))}")

    def apply(self, x):
        xf = self.sae_input(x).astype(jnp.float32)
        f = self.sae.encode(xf)
        edited = f if self.latent_scale is None else f * self.latent_scale
        out = self.sae.decode(edited, xf)
        if self.add_error:
            out = out + (xf - self.sae.decode(f, xf))
        return self._site_output(x, out.astype(x.dtype))
