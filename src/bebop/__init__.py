"""Bebop: exact MTP speculative decoding for fast RL rollouts (see DESIGN.md)."""

__version__ = "0.1.0"
