"""What an intervention does in the subject's own task.

Each subject kind offers ``task_reference()`` (the clean run's outputs: greedy tours, next-token
distributions, pooled outputs) and ``task_effects(reference)`` (the task run again under whatever
patch is active, compared with the reference). The clean run is made once per call here and
shared by every intervention measured against it.

EFFECTS, a flat dict per subject kind (metrics/<id>/analysis.json, docs/interventions.md):
  tsp:       mean_tour_length, mean_tour_length_clean, mean_tour_length_change_pct, decisions_changed
  causal LM: cross_entropy, cross_entropy_clean, cross_entropy_change, kl_clean_edited, top1_agreement,
             top_tokens_moved [[token, change in mean probability], ...]
  encoder:   pooled_cosine
  torch:     output_cosine, output_cosine_clean, output_cosine_change
"""

from __future__ import annotations

from pathlib import Path

from ..dictionaries.dictionary import Dictionary
from ..errors import DataError, SpecError
from ..spec.models import Intervention, LatentEdit
from .edits import check_edits, parse_edits
from .splice import intervene, normalize_mode


def _dictionary(dictionary):
    """A ``Dictionary``, loaded first when given as its folder."""
    if isinstance(dictionary, (str, Path)):
        return Dictionary.load(Path(dictionary))
    return dictionary


def task_reference(subject):
    """The subject's clean task outputs (run with nothing patched)."""
    if not hasattr(subject, "task_reference") or getattr(subject, "model", None) is None:
        raise DataError(f"subject kind '{getattr(subject, 'kind', type(subject).__name__)}' has no model whose task "
                        "an intervention could change (imported activations)")
    return subject.task_reference()


def _as_intervention(intervention) -> Intervention:
    if isinstance(intervention, Intervention):
        return intervention
    try:
        return Intervention.model_validate(intervention)
    except Exception as exc:  # noqa: BLE001 - pydantic's ValidationError, reworded
        raise SpecError("interventions", [f"interventions: {intervention!r} is not an intervention ({exc})"]) from None


def measure(subject, dictionary, norm, exp, intervention, reference=None) -> dict:
    """EFFECTS of one intervention (an ``Intervention`` or its dict form: name, mode, keep_error,
    edits). ``reference``: a clean run from ``task_reference`` to reuse; made here when None."""
    inter = _as_intervention(intervention)
    dictionary = _dictionary(dictionary)
    check_edits(inter.edits, dictionary.cfg.d_sae, f"interventions.{inter.name}.edits")
    reference = task_reference(subject) if reference is None else reference
    with intervene(subject, dictionary, norm, exp, normalize_mode(inter.mode), inter.edits, inter.keep_error):
        return subject.task_effects(reference)


def ablate_features(subject, dictionary, norm, exp, features: list[int], scores: list[float]) -> list[dict]:
    """Each feature set to 0 on every row (error term kept), one at a time, against one clean run:
    ``[{"feature": f, "score": s, "effects": EFFECTS}, ...]`` in the order given."""
    if len(features) != len(scores):
        raise SpecError("features", [f"ablate_features: {len(features)} features but {len(scores)} scores"])
    dictionary = _dictionary(dictionary)
    edits = [LatentEdit(feature=int(f), op="set", value=0.0) for f in features]
    check_edits(edits, dictionary.cfg.d_sae, "features")
    if not edits:
        return []
    reference = task_reference(subject)
    out = []
    for edit, score in zip(edits, scores):
        with intervene(subject, dictionary, norm, exp, "edit", [edit], keep_error=True):
            out.append({"feature": edit.feature, "score": float(score), "effects": subject.task_effects(reference)})
    return out


def run_interventions(subject, dictionary, norm, exp) -> list[dict]:
    """The spec's ``interventions:``, each measured against one shared clean run:
    ``[{"name", "mode", "keep_error", "edits", "effects"}, ...]``."""
    if not exp.interventions:
        return []
    dictionary = _dictionary(dictionary)
    for inter in exp.interventions:  # every range checked before anything runs
        check_edits(parse_edits(inter.edits), dictionary.cfg.d_sae, f"interventions.{inter.name}.edits")
    reference = task_reference(subject)
    return [{"name": inter.name, "mode": inter.mode, "keep_error": inter.keep_error,
             "edits": [e.model_dump(exclude_none=True) for e in inter.edits],
             "effects": measure(subject, dictionary, norm, exp, inter, reference)} for inter in exp.interventions]
