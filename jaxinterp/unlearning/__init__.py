"""Concept erasure and its evaluation: ELM (``elm``), the baselines it is compared with
(gradient ascent, RMU: ``baselines``), the metrics (innocence, seamlessness, specificity:
``metrics``) and prompt attacks (a GCG-style adversarial token search: ``attacks``)."""
