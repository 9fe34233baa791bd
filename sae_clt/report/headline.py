"""Which of an intervention's effects stands for it (the dashboard's effect column, the report's
ranking of ablations), and how large it is.

The effects are the flat dicts of ``interventions.effects`` (one set per subject kind); the
headline is the first of ``HEADLINE_EFFECTS`` present, else the first number reported.
"""

from __future__ import annotations

# per subject kind: TSP policy, causal LM, torch module, encoder
HEADLINE_EFFECTS = ("mean_tour_length_change_pct", "cross_entropy_change", "output_cosine_change", "pooled_cosine")
COSINES = ("pooled_cosine",)  # effects that are a similarity to the clean run (1 = unchanged), not a change


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def headline_effect(effects: dict) -> str | None:
    """The name of the effect that stands for ``effects``; None when it reports no number."""
    for name in HEADLINE_EFFECTS:
        if _number(effects.get(name)):
            return name
    return next((name for name, value in effects.items() if _number(value)), None)


def effect_size(effects: dict) -> float:
    """How much the intervention moved the subject's task: the headline's absolute value, or for a
    cosine with the clean run, 1 − the cosine; 0 when there is no number."""
    name = headline_effect(effects)
    if name is None:
        return 0.0
    value = float(effects[name])
    return 1.0 - value if name in COSINES else abs(value)
