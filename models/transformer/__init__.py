"""The shared decoder block every transformer family runs on (see ``arch.Arch``)."""

from .arch import Arch
from .model import Block, Transformer

__all__ = ["Arch", "Block", "Transformer"]
