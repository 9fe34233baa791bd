"""Hook-point names and patterns, without torch (so `saeclt validate` starts fast).

A hook point is a module path as ``named_modules()`` spells it, meaning that module's output,
or ``<path>:input`` for its (first positional) input; ``*`` in a pattern stands for one path
component.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class HookPoint:
    module: str
    io: str  # "output" | "input"

    @classmethod
    def parse(cls, text: str) -> "HookPoint":
        module, _, io = text.partition(":")
        io = io or "output"
        if io not in ("output", "input"):
            raise ValueError(f"hook point '{text}': suffix must be ':input' or ':output'")
        return cls(module, io)

    def __str__(self) -> str:
        return self.module if self.io == "output" else f"{self.module}:input"


def pattern_regex(pattern: str) -> re.Pattern:
    """A hook-point pattern: `*` stands for one path component (`encoder.layer.*` matches
    `encoder.layer.3`, not `encoder.layer.3.attention`)."""
    return re.compile("^" + re.escape(pattern).replace(r"\*", "[^.:]+") + "$")


def is_pattern(text: str) -> bool:
    return "*" in text


def matches(point: str, pattern: str) -> bool:
    return bool(pattern_regex(pattern).match(point)) if is_pattern(pattern) else point == pattern


def expand_hook_points(patterns: list[str], available: list[str]) -> list[str]:
    """Concrete hook points for a list of names and patterns, in the subject's module order."""
    out: list[str] = []
    for pattern in patterns:
        found = [a for a in available if matches(a, pattern)] if is_pattern(pattern) else [pattern]
        out += [f for f in found if f not in out]
    return out
