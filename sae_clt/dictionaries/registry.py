"""Lookup in a registry of named kinds (activations, architectures), with a clear error."""

from __future__ import annotations

import difflib


def lookup(registry: dict, name: str, what: str):
    """``registry[name]``, or a ValueError naming the allowed keys (and the closest, for short names)."""
    if name not in registry:
        short = len(str(name)) <= 80
        hint = difflib.get_close_matches(str(name), list(registry), n=1) if short else []
        raise ValueError(f"unknown {what}" + (f" {name!r}" if short else "") + (f" (did you mean '{hint[0]}'?)" if hint else "")
                         + f"; allowed: {', '.join(registry)}")
    return registry[name]
