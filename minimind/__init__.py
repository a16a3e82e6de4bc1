"""MiniMind: train small language models from nothing, and see every line of it."""

__version__ = "0.1.0"
