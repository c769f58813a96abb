"""Figures of interpreted latents: a gallery per latent (paper figure 2) and latents per category (figure 3).

Gallery: one column per top example (most active first). Top row: the MRI slice (FLAIR when the model has it)
with the ground-truth mask overlaid; bottom row: the latent's heatmap at image resolution over the same slice,
with the mask's outline. Slices are shown in neurological convention (patient's right on the right, anterior up),
cropped to the brain, and marked L / R so that a description such as "left hemisphere" can be checked by eye.

Figures use matplotlib's Agg backend and are written atomically; existing files are kept unless ``overwrite``.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..data.cases import read_case
from ..storage import atomic_write_bytes
from ..data.labels import TUMOUR_COLOURS
from ..data.preprocessing import prepare_case
from ..errors import refuse_existing
from .top_slices import upsample
from .labeller import GENERIC_CATEGORIES

DISPLAY_PREFERENCE = ("t2f", "t1c", "t2w", "t1n")
_OTHER_COLOURS = {
    "tumour boundary": "#b15928", "healthy tissue": "#1f78b4", "brain edge": "#6a3d9a", "background": "#999999",
    "diffuse": "#a6cee3", "dead": "#333333",
}  # fmt: skip


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, overwrite: bool) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    _pyplot().close(fig)
    return atomic_write_bytes(path, buffer.getvalue(), overwrite=overwrite)


def class_colours(class_names: Sequence[str]) -> list[tuple[float, float, float]]:
    """RGB in [0, 1] per class (index 0 unused): BraTS colours for tumour classes, a qualitative map otherwise."""
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    out = [(0.0, 0.0, 0.0)]
    for index, name in enumerate(class_names[1:], start=1):
        if tuple(class_names[:4]) == ("background", "necrotic core", "edema", "enhancing tumour") and index in TUMOUR_COLOURS:
            out.append(tuple(v / 255 for v in TUMOUR_COLOURS[index]))
        else:
            out.append(tuple(cmap((index - 1) % 10)[:3]))
    return out


def category_colour(category: str, class_names: Sequence[str]) -> tuple[float, float, float] | str:
    if category in class_names[1:]:
        return class_colours(class_names)[list(class_names).index(category)]
    return _OTHER_COLOURS.get(category, "#999999")


def display_modality(modalities: Sequence[str]) -> str:
    return next((m for m in DISPLAY_PREFERENCE if m in modalities), modalities[0])


def load_display_slices(case_folder: str, modalities: Sequence[str], size: int, slices: Sequence[int]) -> dict:
    """Read one modality and the labels of a case; return ``{z: (image, label, brain)}`` RAS slices and the
    case's slice geometry under key ``"geometry"``."""
    from ..data.cases import find_case

    modality = display_modality(modalities)
    prepared = prepare_case(read_case(find_case(case_folder), modalities=[modality]), [modality], size)
    out: dict = {"geometry": prepared.geometry, "modality": modality}
    for z in set(int(s) for s in slices):
        label = prepared.label[:, :, z] if prepared.label is not None else np.zeros(prepared.brain_mask.shape[:2], np.uint8)
        out[z] = (prepared.images[0, :, :, z].copy(), label.copy(), prepared.brain_mask[:, :, z].copy())
    return out


def _crop(brain: np.ndarray, margin: int = 4) -> tuple[slice, slice]:
    if not brain.any():
        return slice(None), slice(None)
    xs, ys = np.nonzero(brain)
    return (
        slice(max(xs.min() - margin, 0), xs.max() + margin + 1),
        slice(max(ys.min() - margin, 0), ys.max() + margin + 1),
    )


def _overlay(label: np.ndarray, colours, alpha: float = 0.45) -> np.ndarray:
    rgba = np.zeros((*label.shape, 4), dtype=np.float32)
    for index in range(1, len(colours)):
        hit = label == index
        rgba[hit, :3] = colours[index]
        rgba[hit, 3] = alpha
    return rgba


def render_gallery(
    latent: int,
    entry: dict,
    examples: list[dict],
    class_names: Sequence[str],
    path: str | Path,
    overwrite: bool = False,
) -> Path:
    """Write one latent's gallery.

    Args:
        entry: the latent's record in the labels document (category, description, confidence, ...).
        examples: per column ``{"case_id", "slice", "activation", "image", "label", "brain", "heatmap"}`` with RAS
            ``(X, Y)`` arrays of that slice.
    """
    plt = _pyplot()
    path = refuse_existing(path, overwrite)
    colours = class_colours(class_names)
    n = max(len(examples), 1)
    fig, axes = plt.subplots(2, n, figsize=(2.0 * n + 0.8, 5.0), squeeze=False)
    vmax = max((float(e["heatmap"].max()) for e in examples), default=1.0) or 1.0
    image_handle = None
    for column, example in enumerate(examples):
        cx, cy = _crop(example["brain"])
        brain = example["brain"][cx, cy].T
        label = example["label"][cx, cy].T
        heat = example["heatmap"][cx, cy].T
        values = example["image"][cx, cy].T
        low, high = np.percentile(values[brain], [1, 99]) if brain.any() else (0.0, 1.0)
        image = np.where(brain, values, low)  # black outside the brain (z-scored images are 0 there: mid-grey)
        for row in range(2):
            ax = axes[row, column]
            ax.imshow(image, cmap="gray", vmin=low, vmax=high, origin="lower", interpolation="nearest")
            if row == 0:
                ax.imshow(_overlay(label, colours), origin="lower", interpolation="nearest")
                ax.set_title(f"{example['case_id']}\nz={example['slice']}  act {example['activation']:.1f}", fontsize=7)
            else:
                masked = np.ma.masked_less_equal(heat, 0.02 * vmax)
                image_handle = ax.imshow(masked, cmap="inferno", alpha=0.75, vmin=0, vmax=vmax, origin="lower", interpolation="bilinear")
                if (label > 0).any():
                    ax.contour(label > 0, levels=[0.5], colors="cyan", linewidths=0.6, origin="lower")
            ax.text(0.02, 0.02, "L", color="white", fontsize=7, transform=ax.transAxes)
            ax.text(0.93, 0.02, "R", color="white", fontsize=7, transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
    for column in range(len(examples), n):
        for row in range(2):
            axes[row, column].axis("off")
    stable = {True: "stable", False: "UNSTABLE", None: "stability n/a"}[entry.get("stable")]
    fig.suptitle(
        f"latent {latent}: {entry['category']} (confidence {entry['confidence']:.2f}, {stable})\n{entry['description']}",
        fontsize=9,
    )
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[i]) for i in range(1, len(class_names))]
    fig.legend(handles, class_names[1:], loc="lower center", ncol=min(len(class_names) - 1, 5), fontsize=7, frameon=False)
    fig.subplots_adjust(left=0.01, right=0.92, bottom=0.07, top=0.84, wspace=0.04, hspace=0.16)
    if image_handle is not None:
        fig.colorbar(image_handle, cax=fig.add_axes((0.935, 0.1, 0.012, 0.33)), label="activation")
    return _save(fig, path, overwrite)


def write_galleries(
    interpretation,
    document: dict,
    folder: str | Path,
    modalities: Sequence[str],
    image_size: int,
    latents: Sequence[int] | None = None,
    examples: int = 6,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """A gallery PNG (``latent_00012.png``) for each latent (default: every latent that is not dead).

    Each case that the galleries show is read once (one modality and its labels), then released.
    """
    log = log or (lambda message: None)
    folder = Path(folder)
    full = interpretation.full
    entries = {e["id"]: e for e in document["latents"]}
    if latents is None:
        latents = [j for j, e in entries.items() if e["category"] != "dead"]
    latents = [int(j) for j in latents]
    for j in latents:
        if j not in entries:
            raise ValueError(f"latent {j} is out of range for an SAE with {len(entries)} latents")
        refuse_existing(folder / f"latent_{j:05d}.png", overwrite)
    written = []
    chunk_size = 128  # latents whose example slices are held at once (bounded memory on large SAEs)
    for start in range(0, len(latents), chunk_size):
        chunk = latents[start : start + chunk_size]
        wanted: dict[int, set[int]] = {}
        for j in chunk:
            for i in range(min(full.count(j), examples)):
                wanted.setdefault(int(full.case[j, i]), set()).add(int(full.slice[j, i]))
        slices = {c: load_display_slices(interpretation.case_folders[c], modalities, image_size, zs) for c, zs in sorted(wanted.items())}
        for j in chunk:
            columns = []
            for i in range(min(full.count(j), examples)):
                c, z = int(full.case[j, i]), int(full.slice[j, i])
                image, label, brain = slices[c][z]
                heatmap = upsample(full.maps[j, i][None].astype(np.float32), slices[c]["geometry"])[0]
                columns.append({"case_id": interpretation.case_ids[c], "slice": z, "activation": float(full.scores[j, i]),
                                "image": image, "label": label, "brain": brain, "heatmap": heatmap})  # fmt: skip
            written.append(render_gallery(j, entries[j], columns, interpretation.class_names, folder / f"latent_{j:05d}.png", overwrite))
        log(f"  galleries {min(start + chunk_size, len(latents))}/{len(latents)}")
    return written


def render_category_chart(document: dict, path: str | Path, overwrite: bool = False) -> Path:
    """Bar chart of the number of latents per category, split into stable / unstable / not compared."""
    plt = _pyplot()
    path = refuse_existing(path, overwrite)
    class_names = document["class_names"]
    order = list(class_names[1:]) + list(GENERIC_CATEGORIES)
    seen = [e["category"] for e in document["latents"]]
    order += sorted(set(seen) - set(order))
    counts = {name: {True: 0, False: 0, None: 0} for name in order}
    for entry in document["latents"]:
        counts[entry["category"]][entry.get("stable")] += 1
    names = [name for name in order if sum(counts[name].values()) > 0]
    fig, ax = plt.subplots(figsize=(8.0, 0.45 * len(names) + 1.6))
    y = np.arange(len(names))[::-1]
    left = np.zeros(len(names))
    styles = ((True, 1.0, "stable"), (None, 0.55, "not compared"), (False, 0.25, "unstable"))
    for key, alpha, legend in styles:
        widths = np.array([counts[name][key] for name in names], dtype=float)
        if widths.sum() == 0:
            continue
        ax.barh(y, widths, left=left, color=[category_colour(name, class_names) for name in names], alpha=alpha,
                edgecolor="black", linewidth=0.5, label=legend)  # fmt: skip
        left += widths
    for yi, total in zip(y, left):
        ax.text(total + 0.3, yi, str(int(total)), va="center", fontsize=8)
    from matplotlib.patches import Patch

    ax.set_yticks(y, names)
    handles = [Patch(facecolor="#777777", alpha=alpha, edgecolor="black", label=legend) for _, alpha, legend in styles]
    ax.set_xlabel("latents")
    stability = document.get("stability") or {}
    agreement = stability.get("agreement")
    subtitle = f"split-half agreement {agreement:.2f} over {stability.get('n_compared')} latents" if agreement is not None else "no split-half stability"
    ax.set_title(f"Latents per category: {document.get('cohort')} cohort, {len(document['latents'])} latents\n{subtitle}", fontsize=10)
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_xlim(0, max(left.max(initial=1) * 1.15, 1))
    fig.tight_layout()
    return _save(fig, path, overwrite)
