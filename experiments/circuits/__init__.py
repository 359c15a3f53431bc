"""Sparse feature circuits vs neuron circuits on facts-world behaviours (README.md has the command)."""
