"""Unsupervised behaviours: contexts clustered by loss gradients, a feature circuit per cluster, an HTML index."""
