"""Sparse feature circuits (Marks et al. 2024): nodes are SAE features and SAE error terms (or neurons)
at spliced sites; node effects by attribution patching or integrated gradients of a user metric;
edges between consecutive sites by the same linearisation; faithfulness and completeness under mean
ablation; clustering contexts by their loss gradients to find behaviours without labels.

    saes = {f"blocks.{l}.{s}": ji.sae.load(...) for l in range(L) for s in ("attn_out", "mlp_out", "resid_post")}
    circuit, effects = ji.circuits.discover(model, saes, clean, logit_diff, patch=corrupt, metric_args=(a, b))
    circuit.save_json("circuit.json"); circuit.render("circuit.svg")
    means = ji.circuits.mean_nodes(model, saes, clean)
    curve = ji.circuits.faithfulness_curve(model, saes, clean, logit_diff, effects, (1, 10, 100), means=means,
                                           metric_args=(a, b))
"""

from .ablation import ablated_metrics, ablation_interventions, faithfulness_curve, keep_masks, mean_nodes
from .clusters import gradient_sketches, spectral_clusters
from .edges import Y, edge_effects
from .effects import ERROR, METHODS, Effects, Node, exact_effects, node_effects
from .graph import Circuit, discover, select_nodes
from .nodes import NodeAblate, NodeProbe, NodeValues, Neurons, Sites

__all__ = ["Neurons", "Sites", "NodeValues", "NodeProbe", "NodeAblate", "Node", "ERROR", "METHODS", "Effects",
           "node_effects", "exact_effects", "edge_effects", "Y", "Circuit", "discover", "select_nodes", "mean_nodes",
           "ablation_interventions", "keep_masks", "ablated_metrics", "faithfulness_curve", "gradient_sketches",
           "spectral_clusters"]
