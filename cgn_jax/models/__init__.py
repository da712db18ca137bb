"""Flax Linen modules, one family per file."""
