"""penzai interop: the shared machinery; each family's layout lives in its own folder.

A family that penzai also models provides ``jaxinterp.models.<family>.penzai_interop`` with

* ``to_penzai(model, *, layer_stack) -> penzai TransformerLM`` (refusing configs penzai's layer
  cannot express, in one line), and
* ``from_penzai(pz_model, params, *, max_seq_len) -> Model or None`` (None: not this family's layout),

built from the helpers here: parameters addressed by their penzai labels, ``check_same_layout``
(the converted model's penzai twin must have exactly the input's structure and constants, so a
layer jaxinterp does not map — a soft-cap, an extra norm, a different RoPE — is refused, never
dropped), and ``penzai_logits`` to run a penzai model on token ids.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.families import families, family_for_config
from jaxinterp.model import Model, abstract_params

try:
    from penzai import pz
except ImportError:  # pragma: no cover - exercised where penzai is missing
    pz = None

__all__ = ["to_penzai", "from_penzai", "penzai_logits", "available", "named", "array", "bind", "labelled_params",
           "layer_value", "stack_layers", "check_same_layout", "activation_name", "single", "checked_model",
           "LayoutError", "ACTIVATIONS", "PREFIX"]

PREFIX = "transformer"  # the label prefix penzai's builders give every parameter
INSTALL = "penzai is not installed: pip install 'jaxinterp[penzai]' (or pip install penzai)"


def available() -> bool:
    return pz is not None


def _require() -> None:
    if pz is None:
        raise ImportError(INSTALL)


# ----------------------------------------------------------------------------- family dispatch


def _converter(family: str):
    """The family's ``penzai_interop`` module, or None where it has none."""
    module = f"{_family_package(family)}.penzai_interop"
    return importlib.import_module(module) if importlib.util.find_spec(module) else None


def _family_package(family: str) -> str:
    """``jaxinterp.models.<folder>``: the package that declared ``family``'s config class."""
    return families()[family].config_cls.__module__.rsplit(".", 1)[0]


def _converters() -> dict[str, Any]:
    return {name: mod for name in families() if (mod := _converter(name)) is not None}


def to_penzai(model: Model, *, layer_stack: bool = False):
    """A penzai ``TransformerLM`` computing the same logits as ``model`` (float32: <= 1e-5).

    ``layer_stack``: stack the blocks in a penzai ``LayerStack`` (one block definition, params with
    a ``blocks`` axis) instead of a list of blocks. Refused (one line, naming why) for families
    penzai does not model and configs its layers cannot express.
    """
    _require()
    converter = _converter(model.family)
    if converter is None:
        raise ValueError(f"penzai has no counterpart of model family {model.family!r}; families with one: "
                         f"{sorted(_converters())}")
    return converter.to_penzai(model, layer_stack=layer_stack)


def from_penzai(pz_model, *, max_seq_len: int = 2048) -> Model:
    """A jaxinterp ``Model`` computing the same logits as a penzai ``TransformerLM``.

    ``max_seq_len``: the context the model is allowed (penzai models do not record one). The
    model's layout must be one a family maps exactly; anything else is refused in one line.
    """
    _require()
    unbound, params = labelled_params(pz_model)
    refusals = []
    for name, converter in _converters().items():
        try:
            model = converter.from_penzai(pz_model, params, max_seq_len=max_seq_len)
        except LayoutError as err:
            refusals.append(f"{name}: {err}")
            continue
        if model is not None:
            return model
    why = "; ".join(refusals) if refusals else "no family recognises its parameter labels"
    raise ValueError(f"from_penzai: cannot map this penzai model ({why})")


# ----------------------------------------------------------------------------- parameters


class LayoutError(ValueError):
    """A penzai model of a family's kind that uses something the family does not map."""


def named(x, *axes: str):
    """``x`` as a penzai ``NamedArray`` with ``axes``."""
    return pz.nx.wrap(jnp.asarray(x)).tag(*axes)


def array(value, *axes: str) -> jax.Array:
    """A ``NamedArray``'s data with its axes in the order ``axes`` (every axis must be named)."""
    if set(value.named_shape) != set(axes) or value.positional_shape:
        raise LayoutError(f"expected a parameter with axes {sorted(axes)}, got {dict(value.named_shape)}")
    return value.unwrap(*axes)


def labelled_params(pz_model) -> tuple[Any, dict[str, Any]]:
    """``(model with parameter slots, {label: NamedArray})``."""
    unbound, params = pz.unbind_params(pz_model)
    return unbound, {p.label: p.value for p in params}


def layer_value(params: Mapping[str, Any], key: str, layer: int, n_layers: int):
    """The ``layer``-th block's parameter ``key`` (``block_{i}/key`` or a ``blocks/key`` layer stack)."""
    stacked = params.get(f"{PREFIX}/blocks/{key}")
    if stacked is not None:
        if stacked.named_shape.get("blocks") != n_layers:
            raise LayoutError(f"layer stack {key} has {stacked.named_shape.get('blocks')} blocks, expected {n_layers}")
        return stacked[{"blocks": layer}]
    value = params.get(f"{PREFIX}/block_{layer}/{key}")
    if value is None:
        raise LayoutError(f"no parameter {key!r} for block {layer}")
    return value


def stack_layers(params: Mapping[str, Any], key: str, n_layers: int, axes: tuple[str, ...],
                 convert: Callable = lambda a: a) -> np.ndarray:
    """``[L, ...]``: every block's ``key`` with ``axes``, each converted by ``convert``."""
    return np.stack([np.asarray(convert(array(layer_value(params, key, i, n_layers), *axes)))
                     for i in range(n_layers)])


def bind(model_def, values: Mapping[str, Any], *, layer_stack: bool, n_layers: int):
    """Bind ``{key: NamedArray}`` to a penzai model definition built with ``init_base_rng=None``.

    Keys are ``global/key`` (embedder, final norm, head) or ``layer/key`` lists of per-block values
    (``block_{i}/key``, or stacked on a ``blocks`` axis with ``layer_stack``).
    """
    bound = []
    for key, value in values.items():
        if key.startswith("layer/"):
            key = key[len("layer/"):]
            if layer_stack:
                bound.append(pz.Parameter(value=pz.nx.stack(value, "blocks"), label=f"{PREFIX}/blocks/{key}"))
            else:
                bound += [pz.Parameter(value=v, label=f"{PREFIX}/block_{i}/{key}") for i, v in enumerate(value)]
        else:
            bound.append(pz.Parameter(value=value, label=f"{PREFIX}/{key[len('global/'):]}"))
    model = pz.bind_variables(model_def, bound)
    pz.nn.assert_no_parameter_slots(model)
    return model


def _as_float(v) -> float:
    """A Python float; float32 constants (penzai stores norm epsilons so) by their shortest decimal, so
    1e-6 reads back as 1e-6, not 9.99999997e-07."""
    a = np.asarray(v)
    return float(str(a.astype(np.float32))) if a.dtype == np.float32 else float(a)


def single(values, what: str):
    """The one value all layers share (a ``LayoutError`` if they differ: the families have one)."""
    values = {v if isinstance(v, str) else _as_float(v) for v in values}
    if len(values) != 1:
        raise LayoutError(f"its layers use {len(values)} different {what} ({sorted(map(str, values))}); "
                          f"the family has one")
    return values.pop()


def checked_model(params: dict, config) -> Model:
    """A ``Model`` of ``config``'s family, after checking every parameter's shape against the config's."""
    want = jax.tree_util.tree_map(lambda a: tuple(a.shape), abstract_params(config))
    got = jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), params)
    if got != want:
        raise LayoutError(f"its parameters do not have the shapes of {config}")
    return Model(jax.tree_util.tree_map(jnp.asarray, params), config, family_for_config(config).name)


# ----------------------------------------------------------------------------- structure


ACTIVATIONS = {  # penzai Elementwise functions jaxinterp maps, by jaxinterp activation name
    "silu": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


def activation_name(fn) -> Optional[str]:
    """The jaxinterp name of a penzai ``Elementwise`` function (None if unknown)."""
    for name, ref in ACTIVATIONS.items():
        if fn is ref:
            return name
        if isinstance(fn, functools.partial) and isinstance(ref, functools.partial) and fn.func is ref.func \
                and fn.args == ref.args and fn.keywords == ref.keywords:
            return name
    return None


def _canonical(unbound):
    """``unbound`` with every ``Elementwise`` function replaced by its canonical object (partials
    compare by identity) and every parameter slot forgotten."""
    def canon(layer):
        name = activation_name(layer.fn)
        if name is None:
            raise LayoutError(f"unsupported activation {layer.fn!r}; supported: {sorted(ACTIVATIONS)}")
        return pz.nn.Elementwise(ACTIVATIONS[name])

    return pz.select(unbound).at_instances_of(pz.nn.Elementwise).apply(canon)


def check_same_layout(pz_model, twin) -> None:
    """Refuse ``pz_model`` unless it has exactly ``twin``'s layers, static settings and constants.

    ``twin`` is the penzai model the converted jaxinterp model maps back to; any difference means
    the input computes something the conversion would silently drop.
    """
    a, b = _canonical(pz.unbind_params(pz_model)[0]), _canonical(pz.unbind_params(twin)[0])
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    same = tree_a == tree_b and all(
        np.shape(x) == np.shape(y) and np.allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=1e-6)
        for x, y in zip(leaves_a, leaves_b))
    if not same:
        raise LayoutError(f"it differs from the layout jaxinterp maps: {_first_difference(a, b)}")


def _first_difference(a, b) -> str:
    import treescope

    text_a = treescope.render_to_text(a).splitlines()
    text_b = treescope.render_to_text(b).splitlines()
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, text_a, text_b, autojunk=False).get_opcodes():
        if tag != "equal":
            got = " ".join(s.strip() for s in text_a[i1:i2][:2]) or "(nothing)"
            want = " ".join(s.strip() for s in text_b[j1:j2][:2]) or "(nothing)"
            return f"has {got[:160]!r} where jaxinterp's layout has {want[:160]!r}"
    return "constants differ"


# ----------------------------------------------------------------------------- running


def penzai_logits(pz_model, tokens) -> jax.Array:
    """Logits ``[B, T, V]`` of a penzai ``TransformerLM`` on token ids ``[B, T]`` (no padding)."""
    _require()
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
    unbound, params = pz.unbind_params(pz_model, freeze=True)  # frozen parameter values are pytrees
    return _forward(unbound, params, tokens)


@jax.jit
def _forward(unbound, params, tokens):  # one compiled program
    out = pz.bind_variables(unbound, params)(named(tokens, "batch", "seq"))
    return out.unwrap("batch", "seq", "vocabulary")
