"""Calibration probes: per-module sensitivity statistics from a short forward/backward pass.

This package knows modules by name only and never imports ``allocator``.
"""
