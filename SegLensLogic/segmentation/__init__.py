"""Segmenting whole volumes with a slice-wise segmenter and scoring the result.

- :mod:`.inference`: whole-volume prediction, slice by slice, back on the input's voxel grid;
- :mod:`.training`: cohort training and fine-tuning from a shared base model (resumable);
- :mod:`.scores`: Dice, BraTS regions, precision and recall from one confusion matrix;
- :mod:`.evaluation`: per-case tables and CSV over a cohort.
"""
