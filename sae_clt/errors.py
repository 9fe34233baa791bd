"""Typed errors. The CLI maps each to an exit code and a one-paragraph message (no traceback
unless --debug); library code raises these and never calls sys.exit."""

from __future__ import annotations


class SaecltError(Exception):
    """Base class: a problem the user can fix, with a message that says how."""

    exit_code = 1


class SpecError(SaecltError):
    """A spec file is invalid. ``problems`` holds one line per problem, each naming
    file:line, the field path, what was given and what is allowed."""

    exit_code = 2

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        super().__init__("\n".join(problems))


class DataError(SaecltError):
    """An activation store or artefact on disk is missing, corrupt or disagrees with the spec."""

    exit_code = 3


class PipelineError(SaecltError):
    """A stage or the DVC pipeline around it failed."""

    exit_code = 4
