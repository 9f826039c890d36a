"""Baselines the paper compares dense communication with (C2C-style cache fusion)."""
