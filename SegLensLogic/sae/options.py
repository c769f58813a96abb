"""The hyperparameters of SAE training (:class:`SAETrainingOptions`), apart from :mod:`.training` so that the
command line shows their defaults without importing torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SAETrainingOptions:
    """Hyperparameters of SAE training.

    Attributes:
        k: mean active latents per vector.
        expansion: dictionary size over ``d_in``.
        batch_size: vectors per step (BatchTopK keeps ``batch_size * k`` activations).
        epochs: passes over the training vectors (fractions allowed): the step budget; ``max_steps`` caps it.
        max_steps: stop after this many steps, if set.
        learning_rate: Adam learning rate; None: ``2e-4 / sqrt(d_sae / 16384)``.
        warmup_steps: linear warm-up; None: 5 % of the step budget, at most 1000.
        decay_fraction: the final linear decay lasts this share of the steps run before it.
        patience, eval_every, min_delta: the stopping rule (module docstring); ``patience=None`` disables it.
        grad_clip: gradient norm clip (None: off).
        init: ``"data"`` (decoder rows from training vectors) or ``"random"``.
        aux_coefficient: weight of the auxiliary dead-latent loss (1/32).
        k_aux: latents per vector in the auxiliary loss (default ``d_in // 2``).
        dead_after: vectors without firing after which a latent counts as dead (default 10 batches).
        resample_every: every this many steps, while the learning rate has not begun to decay and in the first half
            of the budget, dead latents (``dead_after``) are re-initialised at poorly reconstructed vectors (Bricken
            et al. 2023); None: never (the aux loss alone).
        holdout_fraction: vectors kept out of training to estimate the threshold and evaluate.
        log_every: steps between progress lines.
        seed: initialisation, order and split.
    """

    k: int = 32
    expansion: int = 16
    batch_size: int = 1024
    epochs: float = 100.0
    max_steps: int | None = 20000
    learning_rate: float | None = None
    warmup_steps: int | None = None
    decay_fraction: float = 0.2
    patience: int | None = 4
    eval_every: int = 250
    min_delta: float = 0.005
    grad_clip: float | None = 1.0
    init: str = "data"
    aux_coefficient: float = 1 / 32
    k_aux: int | None = None
    dead_after: int | None = None
    resample_every: int | None = None
    holdout_fraction: float = 0.05
    log_every: int = 50
    seed: int = 0
