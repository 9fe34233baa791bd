"""``saeclt steer``: one intervention on an experiment's trained dictionary, from the command
line's options to a printed table (the CLI only parses; the work is here)."""

from __future__ import annotations

import math
from pathlib import Path

from ..devices import experiment_device
from ..dictionaries.dictionary import CONFIG, WEIGHTS, Dictionary
from ..errors import DataError, SpecError
from ..spec.project import resolve_experiment
from ..spec.validation import check_devices
from ..stages.inputs import experiment_inputs
from ..subjects import load_subject
from .edits import parse_edits
from .effects import measure
from .splice import normalize_mode

OPS = ("scale", "set", "clamp", "add")


def edits_from_options(features: list[int], ops: dict, low: float | None, mode: str | None,
                       no_error: bool) -> tuple[str, list[dict], bool]:
    """(mode, edits, keep_error) from ``saeclt steer``'s options; ``ops`` maps scale / set /
    clamp / add to the value given (None when not given). Conflicts are refused, naming the options."""

    given = {op: v for op, v in ops.items() if v is not None}
    problems = [f"--feature {f}: a latent's index is 0 or more" for f in features if f < 0]
    problems += [f"--{op} {v}: not a finite number" for op, v in {**given, "low": low}.items() if v is not None and not math.isfinite(v)]
    if len(given) > 1:
        problems.append(f"--{' / --'.join(given)}: give one operation (each applies to every --feature)")
    if low is not None and "clamp" not in given:
        problems.append("--low: applies to --clamp only (the lower bound of the clamp)")
    if low is not None and "clamp" in given and low > given["clamp"]:
        problems.append(f"--low {low}: above --clamp {given['clamp']}")
    name = normalize_mode(mode) if mode is not None else ("edit" if features or given else "no_change")
    if name == "edit":
        if not features:
            problems.append("--mode edit: name the latents to change with --feature N (repeatable)")
        if features and not given:
            problems.append("--feature: say what to do with it: --scale V, --set V, --clamp V (with --low L) or --add V")
    elif features or given:
        problems.append(f"--mode {mode}: takes no --feature or operation (those edit latents: --mode edit)")
    if no_error and name == "bypass":
        problems.append("--no-error: bypass patches nothing, so there is no error term to drop")
    if problems:
        raise SpecError("saeclt steer", problems)
    op, value = next(iter(given.items()), (None, None))
    edits = [{"feature": f, "op": op, "value": value, **({"low": low} if low is not None else {})} for f in features]
    return name, edits, not no_error


def named_intervention(spec_path: Path, name: str, other_options: list[str]) -> tuple[str, list[dict], bool]:
    """(mode, edits, keep_error) of the experiment's own intervention ``name`` (its
    ``interventions:`` list), for ``saeclt steer --intervention NAME``; refused beside options
    that would change it (``other_options``, as the command line spells them)."""
    if other_options:
        raise SpecError("saeclt steer", [f"--intervention {name}: runs the spec's intervention as it is written; "
                                         f"drop {' / '.join(other_options)} (or give the edits without --intervention)"])
    exp = resolve_experiment(spec_path).experiment
    for inter in exp.interventions:
        if inter.name == name:
            return inter.mode, [e.model_dump(exclude_none=True) for e in inter.edits], inter.keep_error
    names = [inter.name for inter in exp.interventions]
    raise SpecError("--intervention", [f"--intervention {name!r}: {spec_path} has no intervention of that name; "
                                       + (f"its interventions: {', '.join(names)}" if names else "its interventions: list is empty")])


def load_for_intervention(spec_path: Path):
    """(experiment spec, subject ready for its task, trained dictionary, normalisation) of an
    experiment spec file; a clear error, naming the command that trains it, when the dictionary is missing."""

    resolved = resolve_experiment(spec_path)
    check_devices(resolved)
    p, exp = resolved.paths, resolved.experiment
    folder = p.dictionary_dir(exp.id)
    if not (folder / CONFIG).exists() or not (folder / WEIGHTS).exists():
        raise DataError(f"experiment '{exp.id}' has no trained dictionary yet ({folder} holds no {CONFIG} and {WEIGHTS}); "
                        f"train it with `saeclt run {spec_path}` (or `saeclt stage train {spec_path}` once its "
                        "dataset is collected and normalized)")
    resolved, _, norm = experiment_inputs(spec_path)
    device = experiment_device(exp)  # train.device: where the experiment's stages run
    dictionary = Dictionary.load(folder).to(device)
    subject = load_subject(resolved.subject, p.subject_dir(resolved.subject.id), p.root).to(device)
    subject.prepare_task(resolved.dataset)
    return exp, subject, dictionary, norm


def steer(spec_path: Path, mode: str, edits: list[dict], keep_error: bool, name: str = "steer") -> dict:
    """Run one intervention on the experiment of ``spec_path``: {experiment, mode, keep_error, edits, effects}
    (and its ``name`` when it is one of the spec's)."""

    exp, subject, dictionary, norm = load_for_intervention(Path(spec_path))
    parsed = parse_edits(edits, "--feature")
    width = dictionary.cfg.d_sae
    outside = sorted({e.feature for e in parsed if e.feature >= width})
    if outside:
        raise SpecError("--feature", [f"--feature {f}: out of range: the dictionary of '{exp.id}' has {width} latents "
                                      f"(0 to {width - 1})" for f in outside])
    intervention = {"name": name, "mode": mode, "keep_error": keep_error, "edits": edits}
    effects = measure(subject, dictionary, norm, exp, intervention)
    return {"experiment": exp.id, **({"intervention": name} if name != "steer" else {}), "mode": mode, "keep_error": keep_error,
            "edits": [e.model_dump(exclude_none=True) for e in parsed], "effects": effects}


def _number(value: float) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def effects_table(result: dict) -> str:
    """The effects of a ``steer`` result as a small text table (lists, such as the tokens that
    moved, on their own lines below it)."""
    what = ", ".join(f"feature {e['feature']} {e['op']} {_number(e['value'])}" + (f" (low {_number(e['low'])})" if "low" in e else "")
                     for e in result["edits"])
    error = "" if result["mode"] == "bypass" else (", error term kept" if result["keep_error"] else ", error term dropped")
    named = f" (the spec's intervention {result['intervention']!r})" if "intervention" in result else ""
    lines = [f"{result['experiment']}{named}: {result['mode']}{error}" + (f"; {what}" if what else "")]
    scalars = {k: v for k, v in result["effects"].items() if not isinstance(v, list)}
    width = max([len("metric"), *map(len, scalars)])
    lines.append(f"{'metric':<{width}}  value")
    lines += [f"{name:<{width}}  {_number(value)}" for name, value in scalars.items()]
    for name, value in result["effects"].items():
        if isinstance(value, list):
            lines.append(f"{name}: " + ", ".join(f"{token!r} {delta:+.4g}" for token, delta in value))
    return "\n".join(lines)
