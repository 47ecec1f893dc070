"""The HTTP API (Klein)."""

from .app import LlamaSwapApp

__all__ = ["LlamaSwapApp"]
