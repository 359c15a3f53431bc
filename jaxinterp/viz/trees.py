"""treescope renderings for notebooks: a run's captured activations and a set of interventions.

    ji.viz.show(out.cache)                      # in a notebook: foldable tree, arrays drawn as heatmaps
    html = ji.viz.render_html(interventions)    # the same as a standalone HTML fragment
"""

from __future__ import annotations

from typing import Any, Mapping

import treescope

from jaxinterp.model import RunOutput

__all__ = ["render_html", "show", "as_tree"]


def as_tree(value: Any) -> Any:
    """What to render: a ``RunOutput``'s cache (sites in forward order), a cache mapping sorted by
    layer, or ``value`` itself (interventions, params, anything treescope renders)."""
    if isinstance(value, RunOutput):
        value = value.cache
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return dict(sorted(value.items(), key=lambda kv: _site_key(kv[0])))
    return value


def _site_key(name: str):
    parts = name.split(".")
    if parts[0] == "blocks" and len(parts) > 2 and parts[1].isdigit():
        return (1, int(parts[1]), ".".join(parts[2:]))
    return (0 if name == "embed" else 2, 0, name)


def render_html(value: Any, *, arrays: bool = True, compressed: bool = True) -> str:
    """A self-contained HTML rendering (treescope) of a cache / ``RunOutput`` / interventions;
    ``arrays`` draws array leaves as heatmaps (else summaries only); ``compressed`` as treescope's
    (False: plain, searchable HTML)."""
    tree = as_tree(value)
    if not arrays:
        return treescope.render_to_html(tree, compressed=compressed)
    with treescope.active_autovisualizer.set_scoped(treescope.ArrayAutovisualizer()):
        return treescope.render_to_html(tree, compressed=compressed)


def show(value: Any, *, arrays: bool = True) -> None:
    """Display in a notebook (IPython) with array leaves drawn as heatmaps."""
    treescope.display(as_tree(value), autovisualize=arrays)
