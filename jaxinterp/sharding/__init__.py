"""Sharding by logical axis names: meshes, rules, placement and sharded workloads.

    import jaxinterp as ji
    from jaxinterp import sharding as jsh

    mesh = jsh.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    model = ji.load("facts-gpt", mesh=mesh, rules="fsdp_tp")    # each device reads its slices
    out = jsh.sharded_run(model, tokens, mesh, "fsdp_tp", capture="blocks.*.resid_post")

Parameters get logical axes from their family's table (``Family.param_axes``),
activations from their site names (``axes.SITE_AXES``); rules in
``jaxinterp/sharding/rule_sets/*.yaml`` map logical axes to the mesh axes ``(data, fsdp, tensor)``.
``python -m jaxinterp.sharding dry-run --config tpu_configs/v5e-16.yaml --model gpt2:small``
validates a target and prints the per-device memory estimate.
"""

from jaxinterp.sharding.axes import AXES, LOGITS_AXES, PARAM_AXES, SITE_AXES, TOKENS_AXES, param_axes, site_axes
from jaxinterp.sharding.mesh import MeshConfig, TargetConfig, load_target, make_mesh, target_names
from jaxinterp.sharding.place import (
    activation_constraint,
    activation_spec,
    estimate_per_device_bytes,
    param_shardings,
    param_specs,
    per_device_bytes,
    place_activation,
    place_host_params,
    place_interventions,
    place_tokens,
    shard_model,
    shard_tree,
)
from jaxinterp.sharding.rules import MESH_AXES, Rules, load_rules, resolve_spec, rule_names
from jaxinterp.sharding import runner
from jaxinterp.sharding.workloads import (
    layer_position_masks,
    make_forward,
    patching_sweep,
    sharded_map,
    sharded_run,
)

__all__ = [
    "AXES", "MESH_AXES", "PARAM_AXES", "SITE_AXES", "LOGITS_AXES", "TOKENS_AXES",
    "param_axes", "site_axes", "MeshConfig", "TargetConfig", "make_mesh", "load_target", "target_names",
    "Rules", "load_rules", "resolve_spec", "rule_names",
    "param_specs", "param_shardings", "shard_tree", "shard_model", "place_host_params",
    "activation_spec", "activation_constraint", "place_activation", "place_tokens", "place_interventions",
    "per_device_bytes", "estimate_per_device_bytes",
    "make_forward", "sharded_run", "sharded_map", "patching_sweep", "layer_position_masks",
]
