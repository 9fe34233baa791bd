"""A sweep's grid: the base experiment spec, the values given for some of its fields
(``--grid model.k=16,32,64``), and one experiment spec per combination.

Each variant is an ordinary experiment spec, written beside the base as
``specs/<base>-<name><value>[-...].yaml`` (``sae_L2-k16-lr0p003``) with a header saying how it
was made, so DVC caches, reruns and diffs it like any other, and the subject and dataset are
shared. A variant file is rewritten only while it still carries that header: a spec someone
wrote by hand under the same name is refused, never overwritten.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import SpecError
from ..io import atomic_write_text
from ..spec.models import SPEC_ID_MAX_LENGTH, ExperimentSpec, describe_error, load_spec, quote, read_yaml

HEADER = "# Written by `saeclt sweep`"  # first line of every variant file (only such files are rewritten)
MAX_VARIANTS = 256  # a grid larger than this is a typo more often than a plan
FIXED_KEYS = ("id",)  # a variant's id is its file name


@dataclass(frozen=True)
class Variant:
    id: str
    path: Path
    values: dict[str, Any]  # grid key -> this variant's value
    data: dict  # the variant's spec as written (the base's fields, the grid's values set)


def _scalar(text: str) -> Any:
    """A grid value as YAML 1.2 reads a plain scalar: an integer, a float (``1e-3`` too), true /
    false, null, else the text."""
    text = text.strip()
    if re.fullmatch(r"[-+]?\d+", text):
        return int(text)
    if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text):
        return float(text)
    return {"true": True, "false": False, "null": None, "~": None}.get(text, text)


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``["model.k=16,32", "train.lr=1e-3,3e-3"]`` -> {"model.k": [16, 32], "train.lr": [0.001, 0.003]}.
    Errors name the item and say what is expected (SpecError, exit code 2)."""
    grid: dict[str, list[Any]] = {}
    problems = []
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        parsed = [_scalar(v) for v in values.split(",")] if sep else []
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
            problems.append(f"--grid {quote(item)}: expected FIELD=V1,V2,... with FIELD a spec field's dotted path, "
                            "e.g. model.k=16,32,64")
        elif key in FIXED_KEYS:
            problems.append(f"--grid {key}: the id is not swept (each variant's id is made from its values)")
        elif key in grid:
            problems.append(f"--grid {key}: given twice; list every value in one --grid {key}=V1,V2")
        elif any(v == "" for v in parsed):
            problems.append(f"--grid {key}: an empty value in {quote(values)}")
        elif len(set(map(repr, parsed))) != len(parsed):
            problems.append(f"--grid {key}: a value is repeated in {quote(values)}")
        else:
            grid[key] = parsed
    if not items:
        problems.append("--grid: give at least one, e.g. --grid model.k=16,32,64")
    if problems:
        raise SpecError("--grid", problems)
    size = 1
    for values in grid.values():
        size *= len(values)
    if size > MAX_VARIANTS:
        raise SpecError("--grid", [f"--grid: {size} combinations; at most {MAX_VARIANTS} in one sweep"])
    return grid


def _short_names(keys: list[str]) -> dict[str, str]:
    """Each key's name in variant ids: its last part (``model.k`` -> ``k``), the whole path with
    ``_`` where two keys share a last part."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (name if last.count(name) == 1 else k.replace(".", "_")) for k, name in zip(keys, last)}


def _token(value: Any) -> str:
    """A value as it appears in an id: ``0.003`` -> ``0p003``, ``1e-05`` -> ``1e-05``, ``True`` -> ``true``."""
    text = "true" if value is True else "false" if value is False else "null" if value is None else (
        f"{value:g}" if isinstance(value, float) else str(value))
    return re.sub(r"[^A-Za-z0-9_-]", "_", text.replace(".", "p"))


def _set(data: dict, key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SpecError("--grid", [f"--grid {key}: {part} is {quote(child)} in the base spec, not a section"])
        node = child
    node[parts[-1]] = value


def variants(base_path: Path, grid: dict[str, list[Any]]) -> list[Variant]:
    """One validated variant per combination of the grid's values, in the grid's order. The base
    spec is checked first; a value the spec does not accept is an error naming the --grid key."""
    base_path = Path(base_path)
    base = load_spec(base_path, "experiments")
    data, _ = read_yaml(base_path)
    names = _short_names(list(grid))
    out, problems = [], []
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        vid = "-".join([base.id, *(f"{names[k]}{_token(v)}" for k, v in values.items())])
        variant = {"id": vid, **copy.deepcopy({k: v for k, v in data.items() if k != "id"})}  # the base's key order
        for key, value in values.items():
            _set(variant, key, value)
        if len(vid) > SPEC_ID_MAX_LENGTH:
            problems.append(f"--grid: the variant id {quote(vid)} is longer than {SPEC_ID_MAX_LENGTH} characters")
            continue
        try:
            ExperimentSpec.model_validate(variant)
        except ValidationError as exc:
            for err in exc.errors():
                field = ".".join(str(p) for p in err["loc"])
                key = next((k for k in grid if field == k or field.startswith(k + ".")), None)
                where = f"--grid {key}={quote(values[key])}" if key else f"{base_path}: {field}"
                problems.append(f"{where}: {field}: {describe_error(err, ExperimentSpec)}")
            continue
        out.append(Variant(vid, base_path.parent / f"{vid}.yaml", values, variant))
    if problems:
        raise SpecError("--grid", list(dict.fromkeys(problems)))
    return out


def variant_text(variant: Variant, base_path: Path, command: str) -> str:
    grid = ", ".join(f"{k}={v!r}" for k, v in variant.values.items())
    return (f"{HEADER} from {base_path.name} ({grid}).\n# The sweep: {command}\n"
            f"# Edit the base spec and sweep again rather than this file.\n"
            + yaml.safe_dump(variant.data, sort_keys=False))


def write_variants(found: list[Variant], base_path: Path, command: str) -> list[Path]:
    """Write each variant's spec (unchanged files are left alone); refuse to replace a file that
    was not written by a sweep. Returns the paths written or already up to date."""
    clashes = [v.path for v in found if v.path.exists() and not v.path.read_text(errors="replace").startswith(HEADER)]
    if clashes:
        raise SpecError(str(clashes[0]), [f"{p}: exists and was not written by `saeclt sweep`; it is left as it is. "
                                          "Rename it, or sweep from another base spec" for p in clashes])
    for v in found:
        text = variant_text(v, base_path, command)
        if not v.path.exists() or v.path.read_text() != text:
            atomic_write_text(v.path, text)
    return [v.path for v in found]
