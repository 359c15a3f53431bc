"""Model editing: ROME (rank-one model editing) on any family with an MLP or mixer projection."""

from jaxinterp.editing import rome

__all__ = ["rome"]
