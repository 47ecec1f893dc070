"""llamaswap: a model-swapping reverse proxy for local AI inference, on Twisted."""

__version__ = "0.1.0"
