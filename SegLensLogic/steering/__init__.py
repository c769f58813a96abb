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

from .guided import GuidedFix, GuidedOptions, guided_edits
from .hints import Hint, parse_hint
from .interventions import LABEL_RULES, MODES, LatentEdit, Region, apply_label_rule, check_latent_ids, steer_activations, steering_delta
from .recipe import Recipe, load_recipe, recipe_path_for
from .resegment import CachedForward, resegment
from .session import SteeringSession

__all__ = [
    "MODES", "LABEL_RULES", "LatentEdit", "Region", "apply_label_rule", "check_latent_ids", "steer_activations", "steering_delta",
    "Hint", "parse_hint", "GuidedFix", "GuidedOptions", "guided_edits",
    "Recipe", "load_recipe", "recipe_path_for", "CachedForward", "resegment", "SteeringSession",
]  # fmt: skip
