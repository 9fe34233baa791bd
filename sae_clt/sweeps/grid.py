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
import json
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
    false / null in any of their spellings, else the text."""
    text = text.strip()
    if re.fullmatch(r"[-+]?\d+", text):
        return int(text)
    if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text):
        return float(text)
    words = {**dict.fromkeys(("true", "True", "TRUE"), True), **dict.fromkeys(("false", "False", "FALSE"), False),
             **dict.fromkeys(("null", "Null", "NULL", "~"), None)}
    return words.get(text, text)


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


def short_names(keys: list[str]) -> dict[str, str]:
    """Each key's name in variant ids: its last part (``model.k`` -> ``k``), the whole path with
    ``_`` where two keys share a last part."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (name if last.count(name) == 1 else k.replace(".", "_")) for k, name in zip(keys, last)}


def _token(value: Any) -> str:
    """A value as it appears in an id: ``0.003`` -> ``0p003``, ``1e-05`` -> ``1e-05``, ``True`` -> ``true``
    (floats in full: no two values share an id by rounding)."""
    text = "true" if value is True else "false" if value is False else "null" if value is None else (
        repr(value) if isinstance(value, float) else str(value))
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


def _get(data: dict, key: str) -> Any:
    for part in key.split("."):
        data = data[part]
    return data


def variants(base_path: Path, grid: dict[str, list[Any]]) -> list[Variant]:
    """One validated variant per combination of the grid's values, in the grid's order, each value
    written as the spec reads it (``k: 32`` for ``32.0``). The base spec is checked first; a value
    the spec does not accept is an error naming the --grid key, and two combinations that make the
    same spec (or the same id) are refused."""
    base_path = Path(base_path)
    base = load_spec(base_path, "experiments")
    data, _ = read_yaml(base_path)
    names = short_names(list(grid))
    out, problems, seen = [], [], {}
    for combo in itertools.product(*grid.values()):
        given = dict(zip(grid, combo))
        variant = {"id": base.id, **copy.deepcopy({k: v for k, v in data.items() if k != "id"})}  # the base's key order
        for key, value in given.items():
            _set(variant, key, value)
        try:
            resolved = ExperimentSpec.model_validate(variant).model_dump(mode="json")
        except ValidationError as exc:
            for err in exc.errors():
                field = ".".join(str(p) for p in err["loc"])
                keys = [k for k in grid if field and (field == k or field.startswith(k + ".") or k.startswith(field + "."))]
                keys = keys or list(grid)  # a problem of the whole spec: every value of this combination
                where = ", ".join(f"--grid {k}={quote(given[k])}" for k in keys)
                problems.append(f"{where}: {field or '(the spec as a whole)'}: {describe_error(err, ExperimentSpec)}")
            continue
        values = {k: _get(resolved, k) for k in grid}  # as validated: 32.0 -> 32 for an integer field
        for key, value in values.items():
            _set(variant, key, value)
        vid = "-".join([base.id, *(f"{names[k]}{_token(v)}" for k, v in values.items())])
        variant["id"] = vid
        if len(vid) > SPEC_ID_MAX_LENGTH:
            problems.append(f"--grid: the variant id {quote(vid)} is longer than {SPEC_ID_MAX_LENGTH} characters")
            continue
        same = json.dumps({k: v for k, v in resolved.items() if k != "id"}, sort_keys=True)
        twin = seen.get(vid) or seen.get(same)
        if twin is not None:
            problems.append(f"--grid {', '.join(f'{k}={quote(v)}' for k, v in given.items())}: makes the same "
                            f"{'spec' if seen.get(same) else 'variant id'} as {', '.join(f'{k}={quote(v)}' for k, v in twin.items())}; "
                            "give each value once")
            continue
        seen[vid] = seen[same] = given
        out.append(Variant(vid, base_path.parent / f"{vid}.yaml", values, variant))
    if problems:
        raise SpecError("--grid", list(dict.fromkeys(problems)))
    return out


def variant_text(variant: Variant, base_path: Path, command: str) -> str:
    grid = ", ".join(f"{k}={v!r}" for k, v in variant.values.items())
    return (f"{HEADER} from {base_path.name} ({grid}).\n# The sweep: {command}\n"
            f"# Edit the base spec and sweep again rather than this file.\n"
            + yaml.safe_dump(variant.data, sort_keys=False))


def check_clashes(found: list[Variant]) -> None:
    """Refuse variants whose file exists and was not written by a sweep (it is never overwritten)."""
    clashes = [v.path for v in found if v.path.exists() and not v.path.read_text(errors="replace").startswith(HEADER)]
    if clashes:
        raise SpecError(str(clashes[0]), [f"{p}: exists and was not written by `saeclt sweep`; it is left as it is. "
                                          "Rename it, or sweep from another base spec" for p in clashes])


def write_variants(found: list[Variant], base_path: Path, command: str) -> list[Path]:
    """Write each variant's spec (unchanged files are left alone); refuse to replace a file that
    was not written by a sweep. Returns the paths written or already up to date."""
    check_clashes(found)
    for v in found:
        text = variant_text(v, base_path, command)
        if not v.path.exists() or v.path.read_text() != text:
            atomic_write_text(v.path, text)
    return [v.path for v in found]
