"""Device meshes from configs, and target configs (``tpu_configs/<target>.yaml``).

A mesh always has the three axes ``("data", "fsdp", "tensor")``; any of them may be 1,
and one may be -1 ("all remaining devices").
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
import yaml
from jax.sharding import Mesh

from jaxinterp.sharding.rules import MESH_AXES, Rules, configs_dir, load_rules

__all__ = ["MeshConfig", "TargetConfig", "make_mesh", "load_target", "target_names"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Mesh shape over ``(data, fsdp, tensor)``; one entry may be -1 (fill with the rest)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = self.as_tuple()
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh axis sizes must be positive or -1, got data={self.data}, fsdp={self.fsdp}, "
                             f"tensor={self.tensor}")
        if sizes.count(-1) > 1:
            raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    def resolve(self, num_devices: int) -> dict[str, int]:
        """Concrete ``{axis: size}`` for ``num_devices``; raises if they do not fit."""
        sizes = list(self.as_tuple())
        if -1 in sizes:
            known = int(np.prod([s for s in sizes if s != -1]))
            if num_devices % known:
                raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not divisible by "
                                 f"the fixed axes' product {known}")
            sizes[sizes.index(-1)] = num_devices // known
        if int(np.prod(sizes)) != num_devices:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                             f"but {num_devices} are available")
        return dict(zip(MESH_AXES, sizes))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MeshConfig":
        unknown = sorted(set(d) - set(MESH_AXES))
        if unknown:
            raise ValueError(f"mesh: unknown axes {unknown}; valid axes: {list(MESH_AXES)}")
        return cls(**{k: int(v) for k, v in d.items()})


def make_mesh(config: MeshConfig | Mapping[str, int] | Sequence[int] | None = None,
              devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A ``Mesh`` with axes ``(data, fsdp, tensor)`` over ``devices`` (default: all).

    ``config`` may be a ``MeshConfig``, a dict, or a ``(data, fsdp, tensor)`` tuple.
    On TPU/GPU the device order follows the physical topology (``mesh_utils``).
    """
    if config is None:
        config = MeshConfig()
    elif isinstance(config, Mapping):
        config = MeshConfig.from_dict(config)
    elif not isinstance(config, MeshConfig):
        config = MeshConfig(**dict(zip(MESH_AXES, config)))
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(config.resolve(len(devices)).values())
    if devices[0].platform in ("tpu", "gpu") and len(devices) == jax.device_count():
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    else:
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


def mesh_shape(mesh: Mesh) -> dict[str, int]:
    return dict(mesh.shape)


# ----------------------------------------------------------------------------- targets


@dataclasses.dataclass(frozen=True, kw_only=True)
class TargetConfig:
    """One deployment target: device count, hosts, mesh and rules (``tpu_configs/*.yaml``)."""

    name: str
    platform: str
    num_devices: int
    num_processes: int
    mesh: MeshConfig
    rules: str
    memory_per_device_gib: float
    launcher: str = ""
    description: str = ""

    def __post_init__(self):
        if self.platform not in ("tpu", "gpu", "cpu"):
            raise ValueError(f"target {self.name!r}: platform must be tpu, gpu or cpu, got {self.platform!r}")
        if self.num_devices <= 0 or self.num_processes <= 0 or self.num_devices % self.num_processes:
            raise ValueError(f"target {self.name!r}: num_devices ({self.num_devices}) must be a positive multiple "
                             f"of num_processes ({self.num_processes})")
        self.mesh.resolve(self.num_devices)  # raises if the mesh does not fit

    @property
    def devices_per_process(self) -> int:
        return self.num_devices // self.num_processes

    def load_rules(self) -> Rules:
        return load_rules(self.rules)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TargetConfig":
        path = Path(path)
        if not path.suffix:
            path = configs_dir() / f"{path}.yaml"
        if not path.exists():
            raise FileNotFoundError(f"no target config {str(path)!r}; targets: {target_names()}")
        d = dict(yaml.safe_load(path.read_text()))
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"{path.name}: unknown keys {unknown}; expected {sorted(fields)}")
        d["mesh"] = MeshConfig.from_dict(d.get("mesh", {}))
        d.setdefault("name", path.stem)
        return cls(**d)


def load_target(name_or_path: str | Path) -> TargetConfig:
    return TargetConfig.from_yaml(name_or_path)


def target_names() -> list[str]:
    return sorted(p.stem for p in configs_dir().glob("*.yaml"))
