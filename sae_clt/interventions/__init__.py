"""Interventions: the subject run with a trained dictionary spliced in at its target hook point(s).

Three modes (after splatnlp's steering hook):

- ``bypass``: the subject untouched (the clean run);
- ``no_change``: the hook point replaced by the dictionary's reconstruction; with the error term
  kept (the default) that is the original activation again, without it the plain reconstruction;
- ``edit``: chosen latents changed (set, scale, clamp, add) before decoding; with the error term
  kept only the edit changes the activation.

``splice.intervene`` is the context manager, ``edits.apply_edits`` the change to a code tensor,
``effects`` measures what an intervention does in the subject's own task.
"""

from __future__ import annotations

from .edits import apply_edits, check_edits, parse_edits
from .effects import ablate_features, measure, run_interventions
from .splice import MODES, intervene

__all__ = ["MODES", "ablate_features", "apply_edits", "check_edits", "intervene", "measure", "parse_edits", "run_interventions"]
