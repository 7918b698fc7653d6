"""Nested settings as dotted keys: {"optimizer": {"lr": 3e-4}} -> {"optimizer.lr": 3e-4}.

The spelling of a config override (`optimizer.lr=1e-4`), used wherever configs are compared key by key:
`megamath report` (runs side by side) and the ranks' start-up agreement (megamath.parallel.agreement).
"""
from __future__ import annotations

from typing import Mapping


def flatten(settings: Mapping, prefix: str = "") -> dict:
    """Every leaf of `settings` under its dotted key (lists are leaves)."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
