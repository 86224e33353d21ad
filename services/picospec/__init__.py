"""PicoSpec: edge-cloud collaborative speculative decoding."""

__version__ = "0.1.0"
