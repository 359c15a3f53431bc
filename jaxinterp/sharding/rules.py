"""Rules mapping logical axes to mesh axes, shipped as package data (``jaxinterp/sharding/rule_sets/*.yaml``).

A rule file has two sections, as levanter separates parameter and compute mappings:

    params:       {logical axis: mesh axis | [mesh axes] | null}   # where weights live
    activations:  {logical axis: mesh axis | [mesh axes] | null}   # inside the forward

Logical axes not listed are replicated. Resolving a rule against an array's shape and a
mesh drops mesh axes that are already used by an earlier dimension, that have size 1,
or that do not divide the dimension (trailing ones first), so the same rules apply to
tiny test models and to 8B models alike.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml
from jax.sharding import PartitionSpec

from jaxinterp.sharding.axes import AXES

__all__ = ["MESH_AXES", "Rules", "load_rules", "rules_dir", "configs_dir", "resolve_spec", "rule_names"]

MESH_AXES = ("data", "fsdp", "tensor")

Mapping_ = dict[str, tuple[str, ...]]


def configs_dir() -> Path:
    """The repository's ``tpu_configs/`` folder (deployment targets; absent from an installed wheel)."""
    return Path(__file__).resolve().parents[2] / "tpu_configs"


def _rule_sets():
    """The rule sets shipped inside the package (``jaxinterp/sharding/rule_sets/*.yaml``)."""
    return importlib.resources.files("jaxinterp.sharding").joinpath("rule_sets")


def rules_dir() -> Path:
    return Path(str(_rule_sets()))


def rule_names() -> list[str]:
    return sorted(p.name[:-5] for p in _rule_sets().iterdir() if p.name.endswith(".yaml"))


def _normalise(section: str, raw: Optional[Mapping[str, Any]]) -> Mapping_:
    out: Mapping_ = {}
    for logical, mesh in (raw or {}).items():
        if logical not in AXES:
            raise ValueError(f"rules.{section}: unknown logical axis {logical!r}; valid axes: {list(AXES)}")
        if mesh is None:
            mesh = ()
        elif isinstance(mesh, str):
            mesh = (mesh,)
        mesh = tuple(mesh)
        bad = [m for m in mesh if m not in MESH_AXES]
        if bad:
            raise ValueError(f"rules.{section}.{logical}: unknown mesh axes {bad}; valid mesh axes: {list(MESH_AXES)}")
        if len(set(mesh)) != len(mesh):
            raise ValueError(f"rules.{section}.{logical}: mesh axis repeated in {list(mesh)}")
        out[logical] = mesh
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rules:
    """Logical -> mesh axis mappings for parameters and activations."""

    name: str
    params: Mapping_
    activations: Mapping_
    description: str = ""

    def __post_init__(self):
        object.__setattr__(self, "params", _normalise("params", self.params))
        object.__setattr__(self, "activations", _normalise("activations", self.activations))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], name: str = "inline") -> "Rules":
        unknown = sorted(set(d) - {"name", "description", "params", "activations"})
        if unknown:
            raise ValueError(f"rules {name!r}: unknown keys {unknown}; expected name, description, params, activations")
        return cls(name=d.get("name", name), description=d.get("description", ""),
                   params=d.get("params") or {}, activations=d.get("activations") or {})

    def without(self, mesh_axes: Sequence[str]) -> "Rules":
        """The same rules with ``mesh_axes`` removed everywhere (they are used by an outer axis,
        e.g. the sweep axis of a vmapped patching sweep)."""
        drop = set(mesh_axes)
        strip = lambda m: {k: tuple(a for a in v if a not in drop) for k, v in m.items()}
        return Rules(name=f"{self.name}-minus-{'-'.join(mesh_axes)}", description=self.description,
                     params=strip(self.params), activations=strip(self.activations))

    def mesh_axes_for(self, logical: str, kind: str = "activations") -> tuple[str, ...]:
        return getattr(self, kind).get(logical, ())


def load_rules(name_or_path: str | Path | Rules) -> Rules:
    """Rules by name (``"fsdp_tp"`` -> the shipped ``rule_sets/fsdp_tp.yaml``) or path."""
    if isinstance(name_or_path, Rules):
        return name_or_path
    path = Path(name_or_path)
    if not path.suffix:
        shipped = _rule_sets().joinpath(f"{name_or_path}.yaml")
        if not shipped.is_file():
            raise FileNotFoundError(f"no rules {str(name_or_path)!r}; available: {rule_names()} (or a .yaml path)")
        return Rules.from_dict(yaml.safe_load(shipped.read_text()) or {}, name=str(name_or_path))
    if not path.exists():
        raise FileNotFoundError(f"no rules file {str(name_or_path)!r}; shipped rule sets: {rule_names()}")
    return Rules.from_dict(yaml.safe_load(path.read_text()) or {}, name=path.stem)


def resolve_spec(axes: Sequence[Optional[str]], mapping: Mapping_, shape: Optional[Sequence[int]] = None,
                 mesh_shape: Optional[Mapping[str, int]] = None) -> PartitionSpec:
    """PartitionSpec for an array with logical ``axes`` under a logical -> mesh ``mapping``.

    Without ``shape``/``mesh_shape`` this is the pure rule (golden specs); with them, mesh
    axes of size 1 and mesh axes that do not divide the dimension are dropped.
    """
    used: set[str] = set()
    entries = []
    for dim, logical in enumerate(axes):
        mesh = [m for m in mapping.get(logical, ()) if m not in used] if logical is not None else []
        if mesh_shape is not None:
            mesh = [m for m in mesh if mesh_shape.get(m, 1) > 1]
        if shape is not None and mesh_shape is not None:
            while mesh and shape[dim] % _prod(mesh_shape[m] for m in mesh):
                mesh.pop()
        used.update(mesh)
        entries.append(None if not mesh else mesh[0] if len(mesh) == 1 else tuple(mesh))
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out
