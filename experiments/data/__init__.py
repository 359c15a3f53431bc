"""Synthetic datasets for the experiments."""
