"""The HTML audit report: self-contained, sections only from their inputs, rendered by a real headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from SegLensLogic.errors import OutputExistsError
from SegLensLogic.app.report import build_report_html, planted_shift_scores, render_report

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
# Appended to a copy of the report: records, after load, whether every image decoded.
IMAGE_CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images', ok + '/' + imgs.length);
});
</script>"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no chromium on PATH (Debian: apt-get install -y chromium; .ci/run installs it)")


def real_slice(brats2018_case: Path):
    """Axial slice through the tumour of a real BraTS 2018 case: FLAIR image and its expert labels (2023 scheme)."""
    from SegLensLogic.data import read_case

    case = read_case(brats2018_case, modalities=["t2f"])
    z = int(np.argmax((case.label > 0).sum(axis=(0, 1))))
    return case.images["t2f"][:, :, z].T[::-1], case.label[:, :, z].T[::-1]


@pytest.fixture(scope="module")
def full_results(brats2018_case):
    image, truth = real_slice(brats2018_case)
    before = np.where(truth == 2, 0, truth)  # a mask that misses the edema, as a failed model's would
    rng = np.random.default_rng(0)
    heat = np.where(truth == 2, rng.uniform(0.5, 1.0, truth.shape), 0.0)
    scores = planted_shift_scores([1, 2, 3, 7], {1: "edema", 2: "edema", 3: "healthy tissue", 4: "edema", 7: "dead"}, ["edema"])
    return {
        "title": "SegLens audit report (test)",
        "cohorts": [{"name": "adult", "population": "adult", "n_cases": 4, "source": "BraTS 2018", "shifted_factors": {}},
                    {"name": "pediatric", "population": "pediatric", "n_cases": 4, "source": "phantoms",
                     "shifted_factors": {"edema_factor": {}, "location": {}}}],
        "models": [{"name": "adult", "cohort": "adult", "arch": "unet", "dice": {"adult": 0.71, "pediatric": 0.42}}],
        "sae_quality": [{"model": "adult", "d_sae": 128, "k": 8, "explained_variance": 0.83, "l0": 8.1, "dead_fraction": 0.02, "dice_recovered": 0.97}],
        "latent_galleries": [{"model": "adult", "categories": {"edema": [{"id": 12, "description": "edema, deep", "image": image, "heatmap": heat, "confidence": 0.8}],
                                                             "healthy tissue": [{"id": 3, "image": image}]}}],
        "shared_matrix": {"names": ["adult", "pediatric", "ssa"], "shared_fraction": [[1, 0.6, 0.8], [0.55, 1, 0.5], [0.8, 0.52, 1]], "seed_noise_floor": 0.75},
        "diffing": [{"reference": "adult", "population": "pediatric", "shifted_factors": ["edema_factor"], "expected_categories": ["edema"], **scores}],
        "failure_recovery": [{"population": "pediatric", "case": "SYN-1", "dice_before": 0.3, "dice_oracle": 0.6, "dice_calibrated": 0.5}],
        "adaptation": [{"population": "ssa", "method": "scale tumour latents", "dice_before": 0.4, "dice_oracle": 0.55, "dice_calibrated": 0.5}],
        "steered_cases": [{"case_id": brats2018_case.name, "image": image, "before": before, "after": truth, "truth": truth,
                           "dice_before": 0.5, "dice_after": 1.0, "recipe": "scale latents 12 by 2"}],
        "reference_case": {"case_id": brats2018_case.name, "shift": "SSA-like degradation x2", "method": "ground-truth-free",
                           "suggestion": "scale latents 4, 9 by 2", "voxels_changed": 812, "dice_before": 0.61, "dice_after": 0.66,
                           "recipe": "steering/recipe.json", "replay_identical": True, "image": image, "before": before,
                           "after": truth, "truth": truth,
                           "top_latents": [{"id": 4, "label": "edema, deep <b>", "category": "edema", "status": "shared",
                                            "shared_with": "ssa", "activation": 1.5}],
                           "repair": {"oracle": {"cases": 6, "recovered": 0.5, "dice_mean": "+0.04 [0.01, 0.08]"}}},
    }  # fmt: skip


def test_planted_shift_scores():
    scores = planted_shift_scores([1, 2, 3, 7], {1: "edema", 2: "edema", 3: "healthy tissue", 4: "edema", 7: "dead"}, ["edema"])
    assert scores == {"n_specific": 3, "n_expected": 3, "n_hits": 2, "precision": 2 / 3, "recall": 2 / 3}
    assert planted_shift_scores([], {1: "edema"}, ["edema"])["precision"] is None


def test_report_is_self_contained_and_omits_absent_sections(full_results, tmp_path):
    page = build_report_html(full_results)
    assert page.count("<img") == 1 + 2 + 4 + 4  # shared matrix, two gallery latents, four steering panels, four reference panels
    assert "edema, deep &lt;b&gt;" in page and "+0.04 [0.01, 0.08]" in page
    # No reference leaves the file: every src is inline data, every href an anchor.
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'src="([^"]*)"', page))
    assert all(href.startswith("#") for href in re.findall(r'href="([^"]*)"', page))
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "Omitted" not in page
    sparse = build_report_html({"title": "t", "models": full_results["models"]})
    assert sparse.count("Omitted:") == 8 and "<img" not in sparse
    assert "no alignments were given" in sparse
    out = render_report(full_results, tmp_path / "report.html")
    with pytest.raises(OutputExistsError):
        render_report(full_results, out)


def test_report_renders_in_headless_chromium(full_results, tmp_path):
    browser = chromium()
    report = render_report(full_results, tmp_path / "report.html")
    page = report.read_text(encoding="utf-8")
    # The checker needs inline script; the report's policy allows none, so the copy under test adds just that.
    checked = page.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';").replace("</body>", IMAGE_CHECK + "</body>")
    probe = tmp_path / "probe.html"
    probe.write_text(checked, encoding="utf-8")
    flags = CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert dom.returncode == 0, dom.stderr[-2000:]
    n_images = page.count("<img")
    assert f'data-images="{n_images}/{n_images}"' in dom.stdout, re.findall(r'data-images="[^"]*"', dom.stdout) or dom.stderr[-2000:]
    assert "Diffing against the planted shift" in dom.stdout
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    run = subprocess.run([browser, *flags, "--hide-scrollbars", "--window-size=1280,3600", f"--screenshot={shot}", report.as_uri()],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0 and shot.is_file() and shot.stat().st_size > 10_000, run.stderr[-2000:]
    print(f"report screenshot: {shot}")


def test_footprint_diffing_rows_and_floors_per_row():
    """Planted-feature rows show precision beside chance and the converse; the matrix takes one floor per row."""
    rows = [{"reference": "adult", "population": "ssa-band", "feature": "band", "method": "activation-correlation", "used": True,
             "n_live": 50, "n_feature": 5, "best_fraction": 0.8, "n_specific": 10, "precision": 0.4, "chance_precision": 0.1,
             "chance_precision_95": 0.3, "recall": 0.8, "n_shared": 40, "shared_on_feature": 1, "reproducible_n_specific": 4,
             "reproducible_precision": 0.75, "reproducible_recall": 0.6, "seed_floor": 0.55}]  # fmt: skip
    results = {"title": "t", "diffing": rows,
               "shared_matrix": {"names": ["adult", "ssa-band"], "shared_fraction": [[1, 0.4], [0.5, 1]], "seed_noise_floor": [0.55, 0.45],
                                 "floors": [{"name": "adult", "method": "cosine", "seed_floor": 0.05, "resampling_floor": 0.02}]}}  # fmt: skip
    page = build_report_html(results)
    for text in ("precision of chance", "0.100 (95th pct 0.300)", "activation-correlation (used)", "1 of 40", "5 of 50",
                 "reproducible precision", "resampling floor", "0.750"):
        assert text in page, text
    assert "Omitted: no diffing" not in page and "Omitted: no alignments" not in page
    with pytest.raises(ValueError, match="floors for a"):
        build_report_html({**results, "shared_matrix": {**results["shared_matrix"], "seed_noise_floor": [0.5]}})


def test_reference_section_shows_the_bundles_hint_measurement():
    """The demo report's reference section carries the bundle's hint benchmark (``figures["hints"]``) as a table."""
    from SegLensLogic.reference.card import hints_figures
    from SegLensLogic.app.report import _hints_table

    def row(arm, mean):
        return {"arm": arm, "dice_mean": mean, "dice_WT": "+0.010 [+0.000, +0.020]", "gaining >= 0.05": 0.25, "far from clicks": 0.7,
                "seconds": 6.0, "vs random latents": "+0.020 [-0.001, +0.040]", "vs logit bias": "+0.030 [+0.010, +0.050]",
                "vs spheres": "-0.004 [-0.020, +0.010]"}  # fmt: skip

    results = {"failures": [{"failure": True}, {"failure": True}, {"failure": False}],
               "summary": {"1": [row("latent fix", "+0.011 [-0.010, +0.030]")], "3": [row("latent fix", "+0.033 [+0.009, +0.056]")]},
               "paper": {"dice_mean": "+0.010 [+0.003, +0.019]", "recovered (>= 0.05)": 0.06}}  # fmt: skip
    html = _hints_table(hints_figures(results))
    assert "2 real failures" in html and html.count("<tr>") == 3
    assert "+0.033 [+0.009, +0.056]" in html and "+0.030 [+0.010, +0.050]" in html and "25%" in html
    assert _hints_table({}) == ""


def test_report_opens_with_what_the_run_shows_and_keeps_the_caveats_last(full_results):
    """The first section after the navigation is what was built and what it shows (from the results); the caveats
    (``notes``) have a section of their own at the end, every one kept."""
    results = {**full_results, "notes": ["Goal A missed by 0.10: too few cases.", "Goal B met."]}
    html = build_report_html(results)
    summary, caveats = html.index("id='summary'"), html.index("id='caveats'")
    assert html.index("</nav>") < summary < html.index('id="cohorts"') < html.index('id="reference"') < caveats
    shown = html[summary:html.index("</section>", summary)]
    assert "mean Dice 0.710 on adult" in shown and "explained variance 0.830 to 0.830" in shown
    assert "2 latents shown" in shown and "Dice 0.500 before steering, 1.000 after" in shown and "0.610 before, 0.660 after" in shown
    assert "Goal A missed by 0.10: too few cases." in html[caveats:] and "Goal B met." in html[caveats:]
    assert "id='caveats'" not in build_report_html(full_results)  # no notes: no empty section
