"""Where loaded parameters live while a checkpoint is read: host numpy arrays (``HostPlacer``) or the
device, filled as tensors are read (``DevicePlacer``), and ``release`` of a memory-mapped tensor's
pages once read. With both, loading a bfloat16 checkpoint holds little more than the model itself."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["HostPlacer", "DevicePlacer", "release"]


class HostPlacer:
    """Parameters as host numpy arrays (the default of ``params_from_hf``)."""

    def single(self, path, host: np.ndarray):
        return host

    def stacked(self, path, shape, dtype):
        return np.empty(shape, dtype)

    def set_layer(self, buf, i: int, part: np.ndarray):
        buf[i] = part
        return buf


class DevicePlacer(HostPlacer):
    """Parameters placed on the default device as they are read: a stacked parameter is allocated once
    on the device and filled layer by layer in place (donated update), so the host never holds more than
    one tensor of one layer beyond what is already placed."""

    def __init__(self):
        self._set = jax.jit(lambda buf, x, i: jax.lax.dynamic_update_index_in_dim(buf, x, i, 0), donate_argnums=0)

    # Each transfer is waited for: with asynchronous dispatch the host tensors of many layers would
    # otherwise be alive at once, waiting for their copies.
    def single(self, path, host):
        return jax.block_until_ready(jax.device_put(host))

    def stacked(self, path, shape, dtype):
        return jnp.zeros(shape, dtype)

    def set_layer(self, buf, i, part):
        return jax.block_until_ready(self._set(buf, part, i))


def release(array) -> None:
    """Drop the resident pages of a memory-mapped checkpoint tensor once it has been read (its pages
    would otherwise stay in the process's resident set until the whole file is closed)."""
    import mmap

    base = array  # walk the views down to the np.memmap that owns the mapping (its base is the mmap)
    while base is not None and not isinstance(getattr(base, "base", None), mmap.mmap):
        base = getattr(base, "base", None)
    if base is None or array.nbytes == 0 or not isinstance(getattr(base, "offset", None), int):
        return
    mm = base.base
    start_of_map = base.__array_interface__["data"][0] - (base.offset % mmap.ALLOCATIONGRANULARITY)
    lo = array.__array_interface__["data"][0] - start_of_map
    page = mmap.PAGESIZE
    lo_page = lo - lo % page
    length = min(len(mm), lo + array.nbytes) - lo_page
    if length > 0 and hasattr(mm, "madvise"):
        try:
            mm.madvise(mmap.MADV_DONTNEED, lo_page, length)
        except (OSError, ValueError):  # not all platforms / mappings allow it: keeping the pages is harmless
            pass
