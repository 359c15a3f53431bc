"""Views: attention heatmaps (PNG), an interactive page of patterns and logit-lens predictions (HTML),
and treescope renderings of caches and interventions for notebooks.

    ji.viz.attention_heatmaps(model, "Bren qua wyn prefers the color", "out/")   # out/layer{i}.png
    ji.viz.attention_page(model, "Bren qua wyn prefers the color", "out/view.html")
    ji.viz.show(model.run(tokens, capture="blocks.0.*").cache)                   # in a notebook
"""

from jaxinterp.viz.data import ViewData, view_data
from jaxinterp.viz.heatmaps import attention_heatmaps, plot_heads
from jaxinterp.viz.page import attention_page, page_html
from jaxinterp.viz.trees import render_html, show

__all__ = ["attention_heatmaps", "plot_heads", "attention_page", "page_html", "view_data", "ViewData",
           "render_html", "show"]
