"""docs/specs.md, generated from the spec models in ``sae_clt/spec/models.py``.

Every field's type, default, allowed values or bounds and description come from its Pydantic
definition, so the reference cannot drift from what ``saeclt validate`` accepts. Regenerate
after changing a spec model::

    python -m sae_clt.spec.docs > docs/specs.md

``tests/test_docs.py`` fails while the committed file differs from ``render_spec_docs()``.
The output is deterministic: fields in declaration order, no dates, no machine paths.
"""

from __future__ import annotations

import inspect
import json
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from . import models as spec_module

COMMAND = "python -m sae_clt.spec.docs > docs/specs.md"

# Where each kind of spec lives and what it declares (the kinds are spec.SPEC_KINDS' keys).
KIND_FILES = {
    "subjects": ("specs/subjects/<id>.yaml", "a subject: the model whose activations are recorded"),
    "datasets": ("specs/datasets/<id>.yaml", "an activation store: which subject, which hook points, how many rows, how to normalise and split them"),
    "experiments": ("specs/<id>.yaml", "an experiment: a dictionary trained on one dataset from a source to a target hook point, then evaluated, reported and exported"),
}


# --------------------------------------------------------------------------- values


def _number(value: Any) -> str:
    """An int or float as a reader writes it: large powers of two or ten as 2^n / 10^n."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        magnitude = abs(value)
        sign = "-" if value < 0 else ""
        if magnitude >= 1024 and magnitude & (magnitude - 1) == 0:
            return f"{sign}2^{magnitude.bit_length() - 1}"
        if magnitude >= 10**6 and str(magnitude).rstrip("0") == "1":
            return f"{sign}10^{len(str(magnitude)) - 1}"
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _value(value: Any) -> str:
    """A default as it would be written in YAML (JSON spelling: null, true, [..], {..})."""
    if isinstance(value, BaseModel):
        return "(section defaults)"
    if isinstance(value, (bool, int, float)) and value is not None:
        return f"`{_number(value) if isinstance(value, bool) else json.dumps(value)}`"
    return f"`{json.dumps(value, sort_keys=True, ensure_ascii=False)}`"


# --------------------------------------------------------------------------- types


def _strip_annotated(annotation: Any) -> tuple[Any, list]:
    """(the type, the constraints attached to it by Annotated[..., Field(...)])."""
    metadata: list = []
    while get_origin(annotation) is Annotated:
        base, *extra = get_args(annotation)
        for item in extra:
            metadata.extend(item.metadata if isinstance(item, FieldInfo) else [item])
        annotation = base
    return annotation, metadata


def _options(annotation: Any) -> list:
    """The members of a Union / X | None, else [annotation]."""
    if get_origin(annotation) in (Union, types.UnionType):
        return list(get_args(annotation))
    return [annotation]


def _section_model(annotation: Any) -> type[BaseModel] | None:
    for option in _options(_strip_annotated(annotation)[0]):
        if inspect.isclass(option) and issubclass(option, BaseModel):
            return option
    return None


def _type_name(annotation: Any) -> str:
    annotation, _ = _strip_annotated(annotation)
    options = _options(annotation)
    if len(options) > 1:
        names = [_type_name(o) for o in options if o is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in options else "")
    origin = get_origin(annotation)
    if origin is Literal:
        kinds = sorted({type(v).__name__ for v in get_args(annotation)})
        return " or ".join(kinds)
    if origin in (list, tuple, set):
        args = get_args(annotation)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return "section"
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


_BOUNDS = (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"))


def _bounds(metadata: list) -> list[str]:
    found = {type(item).__name__.lower(): getattr(item, type(item).__name__.lower()) for item in metadata
             if type(item).__name__.lower() in dict(_BOUNDS)}
    if "ge" in found and "le" in found:
        out = [f"{_number(found.pop('ge'))} to {_number(found.pop('le'))}"]
    else:
        out = []
    out += [f"{sign} {_number(found[attr])}" for attr, sign in _BOUNDS if attr in found]
    for item in metadata:
        min_length = getattr(item, "min_length", None)
        max_length = getattr(item, "max_length", None)
        if min_length is not None:
            out.append(f"at least {min_length} item{'s' if min_length != 1 else ''}")
        if max_length is not None:
            out.append(f"at most {max_length} items")
        pattern = getattr(item, "pattern", None)
        if pattern is not None:
            out.append(f"matches `{pattern}`")
    return out


def _allowed(annotation: Any, metadata: list) -> str:
    """Choices of a Literal, bounds of a number, pattern of a string, item bounds of a list."""
    parts: list[str] = []
    annotation, extra = _strip_annotated(annotation)
    for option in _options(annotation):
        if get_origin(option) is Literal:
            parts.append(", ".join(f"`{v}`" for v in get_args(option)))
        elif get_origin(option) in (list, tuple, set) and get_args(option):
            item_bounds = _bounds(_strip_annotated(get_args(option)[0])[1])
            if item_bounds:
                parts.append("each item " + ", ".join(item_bounds))
    parts.extend(_bounds(metadata + extra))
    return "; ".join(parts)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


# --------------------------------------------------------------------------- tables


def _field_row(name: str, field: FieldInfo) -> str:
    section = _section_model(field.annotation)
    if field.is_required():
        default = "required"
    elif field.default_factory is not None:
        default = _value(field.default_factory())
    else:
        default = _value(field.default)
    kind = _type_name(field.annotation)
    if section is not None:
        kind = kind.replace("section", f"section ([`{name}`](#{_anchor_of(section)}))")
    description = field.description or ""
    return (f"| `{name}` | {_cell(kind)} | {_cell(default)} | {_cell(_allowed(field.annotation, list(field.metadata)))} "
            f"| {_cell(description)} |")


_anchors: dict[type[BaseModel], str] = {}


def _anchor_of(model: type[BaseModel]) -> str:
    return _anchors.get(model, model.__name__.lower())


def _table(model: type[BaseModel]) -> list[str]:
    lines = ["| field | type | default | allowed | description |", "|---|---|---|---|---|"]
    lines += [_field_row(name, field) for name, field in model.model_fields.items()]
    return lines


def _sections(model: type[BaseModel], prefix: str) -> list[tuple[str, type[BaseModel]]]:
    """(dotted path, model) of every nested section, depth first, in declaration order."""
    found = []
    for name, field in model.model_fields.items():
        section = _section_model(field.annotation)
        if section is not None:
            path = f"{prefix}{name}"
            found.append((path, section))
            found.extend(_sections(section, f"{path}."))
    return found


def _doc(model: type[BaseModel]) -> str:
    """The model's own docstring (not one inherited from BaseModel or StrictModel)."""
    text = model.__dict__.get("__doc__")
    return " ".join(inspect.cleandoc(text).split()) if text else ""


def _spec_block(title: str, slug: str, model: type[BaseModel], where: str, tracked: list[str]) -> list[str]:
    sections = _sections(model, "")
    for path, section in sections:
        _anchors[section] = f"{slug}-{path.replace('.', '-')}"
    lines = [f'<a id="{slug}"></a>', "", f"## {title}", "", f"File: `{where}`."]
    if _doc(model):
        lines += ["", _doc(model)]
    if tracked:
        lines += ["", "Write these keys out even when every default suits (DVC tracks them as stage parameters; "
                  "`{}` takes a section's defaults): " + ", ".join(f"`{k}`" for k in tracked) + "."]
    lines += ["", *_table(model)]
    for path, section in sections:
        lines += ["", f'<a id="{_anchors[section]}"></a>', "", f"### `{path}`"]
        if _doc(section):
            lines += ["", _doc(section)]
        lines += ["", *_table(section)]
    return lines


def render_spec_docs() -> str:
    """The whole of docs/specs.md."""
    _anchors.clear()
    kinds = spec_module.SPEC_KINDS
    subjects = {name: kind.spec for name, kind in spec_module.SUBJECT_KINDS.items()}
    tracked = spec_module.TRACKED_SECTIONS
    blocks: list[tuple[str, str, type[BaseModel], str, list[str]]] = []
    configs = [model.model_config for model in [*kinds.values(), *subjects.values()]]
    finite = ", and every number must be finite" if configs and all(c.get("allow_inf_nan") is False for c in configs) else ""
    for kind, model in kinds.items():
        where = KIND_FILES.get(kind, (f"specs/{kind}/<id>.yaml", ""))[0]
        if kind == "subjects" and subjects:
            for subject_kind, subject_model in subjects.items():
                blocks.append((f"Subject spec, `kind: {subject_kind}`", f"subject-{subject_kind}", subject_model, where,
                               list(tracked.get(kind, []))))
        else:
            blocks.append((f"{kind[:-1].capitalize() if kind.endswith('s') else kind} spec", kind, model, where,
                           list(tracked.get(kind, []))))

    lines = [
        f"<!-- Generated by `{COMMAND}` from the field definitions in sae_clt/spec/models.py. Do not edit by hand. -->",
        "",
        "# Spec reference",
        "",
        "Every key a spec file may hold, with its type, default, allowed values and meaning. Three kinds of spec, "
        "so that a subject is trained once and its activations are collected once for every experiment that uses them:",
        "",
    ]
    lines += [f"- `{KIND_FILES[k][0]}`: {KIND_FILES[k][1]}." for k in kinds if k in KIND_FILES]
    lines += [
        "",
        "Unknown keys are errors (with a \"did you mean\")" + finite + ". Some rules tie fields "
        "together (for example `model.k` ≤ `model.d_sae`); `saeclt validate` checks them and names the file, line "
        "and field of each problem. The spec's `id` must equal its file name and may hold letters, digits, `_` and `-`.",
        "",
        "Contents:",
        "",
    ]
    lines += [f"- [{title}](#{slug})" for title, slug, *_ in blocks]
    for block in blocks:
        lines += ["", *_spec_block(*block)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_spec_docs(), end="")
