"""Steering facts-gpt toward an attribute with a mean-difference vector (README.md has the command)."""
