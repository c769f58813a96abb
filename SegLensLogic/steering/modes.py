"""The vocabulary of latent edits, torch-free so that the command line's help can name it.

- ``MODES``: what an edit does to its latents (:class:`~SegLensLogic.steering.interventions.LatentEdit`);
- ``LABEL_RULES``: what the edited model's labels become (:func:`~SegLensLogic.steering.interventions.apply_label_rule`):
  extent and composition apart;
- ``WHERE``: which positions an edit touches; ``REGION_KINDS``: the kinds of :class:`~SegLensLogic.steering.interventions.Region`.
"""

MODES = ("scale", "add", "zero", "clamp", "swap")
LABEL_RULES = ("model", "grow", "shrink", "extent", "composition")
WHERE = ("active", "everywhere")
REGION_KINDS = ("volume", "slice", "slices", "mask")
