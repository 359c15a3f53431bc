"""Causal mediators: interchange interventions on subspaces of a site (full patching, neurons, random
and learned subspaces: distributed alignment search) and on SAE latents, with interchange-intervention
accuracy. See ``subspace`` (the interventions) and ``das`` (pairs, training, IIA)."""

from jaxinterp.mediators.das import (
    DASConfig,
    InterchangeData,
    capture,
    check_site,
    das_subspace,
    iia,
    interchange_data,
    layer_site,
    predict,
    train_das,
)
from jaxinterp.mediators.subspace import FeatureInterchange, Interchange, SAEFeature, Subspace, orthonormal_rows

__all__ = [
    "Interchange", "FeatureInterchange", "Subspace", "SAEFeature", "orthonormal_rows", "InterchangeData",
    "DASConfig", "interchange_data", "capture", "check_site", "layer_site", "predict", "iia", "train_das", "das_subspace",
]
