"""Steering: interventions on SAE latents at the hook point, fast re-segmentation, recipes and the interactive
session (paper sections 5.3, 6 and 7).

- :mod:`~SegLensLogic.steering.interventions` -- :class:`LatentEdit` (scale, add, zero, clamp, swap) inside a
  :class:`Region`, applied as ``h' = h + W_dec^T (z' - z)`` so the SAE's reconstruction error is kept;
- :mod:`~SegLensLogic.steering.resegment` -- :class:`CachedForward`: the layers before the hook run once per case,
  an edit re-runs only the rest of the network on the slices it changes;
- :mod:`~SegLensLogic.steering.selection` -- choosing latents by id, activity in a region, category, population;
- :mod:`~SegLensLogic.steering.hints` -- :class:`Hint`: a point and what the user says of it (``+``/``-``, a class);
- :mod:`~SegLensLogic.steering.guided` -- the latent edit that agrees with hints (:func:`guided_edits`);
- :mod:`~SegLensLogic.steering.recipe` -- JSON recipes that reproduce a corrected mask bit for bit;
- :mod:`~SegLensLogic.steering.session` -- :class:`SteeringSession`, what the Slicer module drives.
"""

# Names are imported on first use (PEP 562): `seglens steer --help` and the recipe format read no torch. The
# function resegment is imported from its module (steering.resegment), whose name it shares.
from ..lazy import lazy_exports

_EXPORTS = {
    "GuidedFix": "guided",
    "GuidedOptions": "guided",
    "guided_edits": "guided",
    "Hint": "hints",
    "parse_hint": "hints",
    "LABEL_RULES": "interventions",
    "MODES": "interventions",
    "LatentEdit": "interventions",
    "Region": "interventions",
    "apply_label_rule": "interventions",
    "check_latent_ids": "interventions",
    "steer_activations": "interventions",
    "steering_delta": "interventions",
    "Recipe": "recipe",
    "load_recipe": "recipe",
    "recipe_path_for": "recipe",
    "CachedForward": "resegment",
    "SteeringSession": "session",
}


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
__all__ = list(_EXPORTS)
