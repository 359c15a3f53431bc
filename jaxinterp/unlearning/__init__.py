"""Concept erasure and its evaluation: ELM (``elm``), the baselines it is compared with
(gradient ascent, RMU: ``baselines``) and the metrics (innocence, seamlessness, specificity:
``metrics``)."""
