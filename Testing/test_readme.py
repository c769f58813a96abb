"""The README and the documents under ``docs/``: the README stays short, every relative link and image resolves
(anchors included), and the figures they quote from the shipped reference bundle are the bundle's own.

- The README is at most :data:`MAX_README_LINES` lines; what does not fit lives under ``docs/`` and is linked.
- Every relative link and image (Markdown inline links, reference definitions, HTML ``href``/``src``) of
  ``README.md`` and ``docs/**/*.md`` names a file or folder of the repository; a ``#anchor`` must be a heading of
  the target (GitHub's slugs). Links in code blocks and code spans are not links; http(s) and mailto are skipped.
- The reference model's figures in ``README.md`` and ``docs/reference-model.md`` (test Dice, SAE quality, sizes,
  goals met or missed, populations, latent labels) are read back from ``Resources/adult-glioma-segformer``
  (``bundle.json``'s ``figures`` and ``sae``, ``latents.json``, ``MODEL_CARD.md``) and compared as rounded.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
BUNDLE = REPO / "Resources" / "adult-glioma-segformer"
REFERENCE_DOC = DOCS / "reference-model.md"
MAX_README_LINES = 250

# Generated pages under docs/measurements/*/ whose links point into result folders that are not kept in the
# repository (paths relative to the repository root). Every page's links resolve today, so none is listed: add a
# page here only when a measurement's generated README links to outputs that cannot be copied beside it.
UNCHECKED_GENERATED: frozenset[str] = frozenset()


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def _name(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


# -- reading Markdown ------------------------------------------------------------------------------------------
FENCE = re.compile(r"^\s{0,3}(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
INLINE_TARGET = re.compile(r"\]\(\s*(<[^>]*>|[^()\s]+(?:\([^()\s]*\)[^()\s]*)*)(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
HTML_TARGET = re.compile(r"""<(?:a|img|source)\b[^>]*?\b(?:href|src)\s*=\s*["']([^"']+)["']""", re.I)
HTML_ANCHOR = re.compile(r"""<[a-z][^>]*?\b(?:id|name)\s*=\s*["']([^"']+)["']""", re.I)
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """``(line number, line)`` outside fenced code blocks, with code spans blanked out."""
    out, fence = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        match = FENCE.match(line)
        if match:
            if fence is None:
                fence = match.group(1)
            elif match.group(1) == fence:
                fence = None
            continue
        if fence is None:
            out.append((number, CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)))
    return out


def links(text: str) -> list[tuple[int, str]]:
    """Every link and image target of a Markdown text: ``(line number, target)``."""
    found = []
    for number, line in prose_lines(text):
        for pattern in (INLINE_TARGET, REFERENCE_DEFINITION, HTML_TARGET):
            for match in pattern.finditer(line):
                found.append((number, match.group(1).strip("<>")))
    return found


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its rendered text, lowercased, punctuation other than hyphens and spaces
    dropped, spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link or image: its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = re.sub(r"(\*\*|__|\*|`)", "", text)
    text = re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors a Markdown file defines: its headings' slugs (repeats get -1, -2, ...) and HTML ids/names."""
    seen: Counter = Counter()
    found = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if match:
            slug = github_slug(match.group(2))
            found.add(slug if seen[slug] == 0 else f"{slug}-{seen[slug]}")
            seen[slug] += 1
        found.update(m.group(1) for m in HTML_ANCHOR.finditer(line))
    return found


def broken_link(source: Path, target: str) -> str | None:
    """Why ``target`` (a link in ``source``) does not resolve, or None when it does (or is not a relative link)."""
    if SCHEME.match(target) or target.startswith("//"):
        return None  # http(s), mailto and other absolute URLs are not checked
    path_part, _, anchor = target.partition("#")
    path_part = unquote(path_part.split("?", 1)[0])
    if not path_part:
        resolved = source
    elif path_part.startswith("/"):
        resolved = REPO / path_part.lstrip("/")
    else:
        resolved = source.parent / path_part
    resolved = resolved.resolve()
    if not resolved.is_relative_to(REPO):
        return f"{target}: leaves the repository"
    if not resolved.exists():
        return f"{target}: {_name(resolved)} does not exist"
    if anchor:
        page = resolved / "README.md" if resolved.is_dir() else resolved
        if page.suffix.lower() != ".md" or not page.is_file():
            return f"{target}: an anchor into {_name(resolved)}, which is not a Markdown page"
        if unquote(anchor).lower() not in {a.lower() for a in anchors(page)}:
            return f"{target}: no heading of {_name(page)} has the anchor #{anchor}"
    return None


# -- the tests -------------------------------------------------------------------------------------------------
def test_readme_is_at_most_250_lines():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines (at most {MAX_README_LINES}): move details to docs/ and link them"
    )


def test_every_document_the_readme_sends_readers_to_exists():
    targets = {t.partition("#")[0] for _, t in links(README.read_text(encoding="utf-8"))}
    for required in ("docs/demo.md", "docs/commands.md", "docs/formats.md", "docs/scale.md", "docs/slicer.md",
                     "docs/development.md", "docs/measurements/README.md", "docs/reference-model.md",
                     "Resources/adult-glioma-segformer/MODEL_CARD.md", "docs/images/slicer-panel.png"):  # fmt: skip
        assert required in targets, f"README.md does not link {required}"


@pytest.mark.parametrize("page", markdown_files(), ids=_name)
def test_every_relative_link_and_image_resolves(page):
    if _name(page) in UNCHECKED_GENERATED:
        pytest.skip(f"{_name(page)} is a generated page listed in UNCHECKED_GENERATED")
    problems = []
    for number, target in links(page.read_text(encoding="utf-8")):
        why = broken_link(page, target)
        if why:
            problems.append(f"{_name(page)}:{number}: {why}")
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_link_checker_finds_what_it_should(tmp_path):
    """The checker itself: links in code are not links, anchors follow GitHub's slugs, a missing image is broken."""
    text = (
        "# Top `code` title: yes, no!\n## Top code title yes no\n"
        "See [a](#top-code-title-yes-no), [b](#top-code-title-yes-no-1) and ![img](missing.png).\n"
        "`[not](a-link.md)`\n```\n[neither](nope.md)\n```\n[ref]: other.md#x\n<img src=\"pic.png\">\n"
    )
    assert [t for _, t in links(text)] == ["#top-code-title-yes-no", "#top-code-title-yes-no-1", "missing.png",
                                           "other.md#x", "pic.png"]  # fmt: skip
    assert github_slug("Model diffing: aligning latents across cohorts") == "model-diffing-aligning-latents-across-cohorts"
    assert github_slug("Experiments: diagnosis, recovery, adaptation") == "experiments-diagnosis-recovery-adaptation"
    assert github_slug("The `seglens` command line") == "the-seglens-command-line"
    assert broken_link(README, "https://example.org/x") is None
    assert broken_link(README, "docs/no-such-page.md") is not None
    assert broken_link(README, "#the-reference-model") is None
    assert broken_link(README, "#no-such-heading") is not None


# -- figures quoted from the shipped bundle --------------------------------------------------------------------
def _bundle() -> dict:
    return json.loads((BUNDLE / "bundle.json").read_text(encoding="utf-8"))


def _flat(path: Path) -> str:
    """A document's text with its line breaks as spaces (a quoted figure may wrap)."""
    return re.sub(r"\s+", " ", path.read_text(encoding="utf-8"))


def _goal_status(value: float, goal: float, said: str) -> bool:
    return (said == "met") == (value >= goal)


def _quoted_figures() -> list[tuple[str, str, tuple[Path, ...], object]]:
    """``(what, pattern, documents that must quote it, expected)``: ``expected`` is a string (each group of the
    pattern, in order, separated by '|') computed from the bundle's files."""
    bundle = _bundle()
    figures = bundle["figures"]
    test, b2013, sae, training = figures["dice_test"], figures["dice_brats2013"], figures["sae"], figures["training"]
    labels = json.loads((BUNDLE / "latents.json").read_text(encoding="utf-8"))
    categories = Counter(latent["category"] for latent in labels["latents"])
    both = (README, REFERENCE_DOC)

    def f3(value):
        return f"{value:.3f}"

    def f2(value):
        return f"{value:.2f}"

    return [
        ("whole tumour test Dice", r"whole tumour \*\*(\d\.\d{3})\*\*", both, f3(test["dice_WT"])),
        ("tumour core test Dice", r"tumour core \*\*(\d\.\d{3})\*\*", both, f3(test["dice_TC"])),
        ("enhancing tumour test Dice", r"enhancing tumour \*\*(\d\.\d{3})\*\*", both, f3(test["dice_ET"])),
        ("edema and necrotic core test Dice", r"edema (\d\.\d{3}), necrotic core (\d\.\d{3})", both,
         f"{f3(test['dice_ED'])}|{f3(test['dice_NC'])}"),
        ("BraTS 2013 whole tumour and tumour core Dice", r"whole tumour (\d\.\d{3}), tumour core (\d\.\d{3})", both,
         f"{f3(b2013['dice_WT'])}|{f3(b2013['dice_TC'])}"),
        ("SAE explained variance", r"explained variance \*\*(\d\.\d{3})\*\*", both, f3(sae["explained_variance"])),
        ("SAE L0", r"L0 (\d+\.\d)\b", both, f"{sae['l0']:.1f}"),
        ("SAE dead latents", r"\*\*dead (\d+) %\*\*", both, f"{100 * sae['dead_fraction']:.0f}"),
        ("SAE Dice recovered", r"Dice recovered \*\*(\d\.\d{3})\*\*", both, f3(sae["dice_recovered"])),
        ("SAE seed agreement", r"share (\d+) % of their live latents", both, f"{100 * sae['seed_shared']:.0f}"),
        ("SAE k and expansion", r"\*\*k (\d+), expansion (\d+)\*\*", both, f"{sae['k']}|{sae['expansion']}"),
        ("SAE latents and channels", r"(\d+) latents over (\d+) channels", both,
         f"{bundle['sae']['d_sae']}|{bundle['sae']['d_in']}"),
        ("training cases", r"\*\*(\d+) real BraTS 2018 cases\*\*", both, str(len(training["cases"]))),
        ("test cases", r"\*\*(\d+) BraTS 2018 test cases\*\*", both, str(len(training["test_cases"]))),
        ("epochs", r"\b(\d+) epochs\b", both, str(training["epochs"])),
        ("image size", r"\b(\d+) px\b", both, str(training["image_size"])),
        ("hook point", r"[Hh]ook point \**`(\w+)`", both, figures["hook_point"]),
        ("test case names", r"\(one per acquisition group: `(\w+)`, `(\w+)`, `(\w+)`\)", (REFERENCE_DOC,),
         "|".join(training["test_cases"])),
        ("alignment floors", r"two seeds (\d\.\d\d), resampled data (\d\.\d\d)", (REFERENCE_DOC,),
         f"{f2(figures['floors']['seed'])}|{f2(figures['floors']['resample'])}"),
        ("populations' shared latents", r"the SSA model shares (\d\.\d\d) of the live latents, the pediatric (\d\.\d\d)",
         (REFERENCE_DOC,), f"{f2(figures['populations']['ssa']['live_shared'])}|{f2(figures['populations']['pediatric']['live_shared'])}"),
        ("latent categories", r"\(enhancing tumour (\d+), edema (\d+), necrotic core (\d+), brain edge (\d+), diffuse (\d+), "
         r"healthy tissue (\d+); split-half stability (\d\.\d\d)\)", (REFERENCE_DOC,),
         "|".join(str(categories[c]) for c in ("enhancing tumour", "edema", "necrotic core", "brain edge", "diffuse", "healthy tissue"))
         + f"|{f2(labels['stability']['agreement'])}"),
    ]  # fmt: skip


@pytest.mark.parametrize("what", [entry[0] for entry in _quoted_figures()])
def test_quoted_figures_are_the_shipped_bundles(what):
    _, pattern, documents, expected = next(entry for entry in _quoted_figures() if entry[0] == what)
    for document in documents:
        match = re.search(pattern, _flat(document))
        assert match, f"{_name(document)} no longer quotes the {what} (pattern {pattern!r}); update this test with it"
        quoted = "|".join(match.groups())
        assert quoted == expected, f"{_name(document)} quotes the {what} as {quoted}; the shipped bundle says {expected}"


@pytest.mark.parametrize("document", [README, REFERENCE_DOC], ids=_name)
def test_quoted_goals_say_met_or_missed_as_the_bundle_does(document):
    figures = _bundle()["figures"]
    text = _flat(document)
    for name, key in (("whole tumour", "dice_WT"), ("tumour core", "dice_TC"), ("enhancing tumour", "dice_ET")):
        match = re.search(name + r" \*\*(\d\.\d{3})\*\* \(goal (\d\.\d+): (met|just missed|missed)\)", text)
        assert match, f"{_name(document)} no longer quotes the {name} goal"
        goal, said = float(match.group(2)), match.group(3)
        assert goal == pytest.approx(figures["goals"][key]), f"{_name(document)}: the {name} goal is {goal}, the bundle's {figures['goals'][key]}"
        assert _goal_status(figures["dice_test"][key], goal, said), f"{_name(document)} says the {name} goal was {said}"


def test_readme_figures_are_the_model_cards():
    """The card's mean row of the held-out test cases and its SAE line agree with what the README quotes."""
    card = (BUNDLE / "MODEL_CARD.md").read_text(encoding="utf-8")
    mean = re.search(r"^\| \*\*mean\*\* \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", card, re.M)
    assert mean, "MODEL_CARD.md has no mean row of per-class Dice"
    nc, ed, et, wt, tc = mean.groups()  # the first mean row: the BraTS 2018 test cases
    readme = _flat(README)
    assert f"whole tumour **{wt}**" in readme and f"tumour core **{tc}**" in readme and f"enhancing tumour **{et}**" in readme
    assert f"edema {ed}, necrotic core {nc}" in readme
    ev = re.search(r"explained variance (\d\.\d{3})", card)
    assert ev and f"explained variance **{ev.group(1)}**" in readme


def test_the_hint_table_is_the_benchmarks_and_the_bundle_carries_it():
    """The README's hint table is :func:`hints_headline` of the committed benchmark (``docs/measurements/hints``),
    and the shipped bundle's ``figures["hints"]`` (what the panel shows beside *Fix*) is that benchmark's."""
    from SegLensLogic.reference.card import hints_figures, hints_headline

    results = json.loads((DOCS / "measurements" / "hints" / "results.json").read_text(encoding="utf-8"))
    readme = README.read_text(encoding="utf-8")
    assert "\n".join(hints_headline(results)) in readme
    assert _bundle()["figures"]["hints"] == json.loads(json.dumps(hints_figures(results)))


def documented_imports(text: str) -> list[tuple[str, str]]:
    """``(module, name)`` of every ``from SegLensLogic... import ...`` line in a document's code."""
    found = []
    for match in re.finditer(r"^\s*from (SegLensLogic[\w.]*) import ([\w, ]+)", text, re.M):
        found += [(match.group(1), name.strip()) for name in match.group(2).split(",") if name.strip()]
    return found


def importable(module: str, name: str) -> bool:
    import importlib

    try:
        return hasattr(importlib.import_module(module), name) or importlib.util.find_spec(f"{module}.{name}") is not None
    except ImportError:
        return False


@pytest.mark.parametrize("page", markdown_files(), ids=_name)
def test_every_documented_import_exists(page):
    """The API examples of the README and docs/ name modules and functions that exist (moving code keeps them true)."""
    missing = [f"from {module} import {name}" for module, name in documented_imports(page.read_text(encoding="utf-8"))
               if not importable(module, name)]  # fmt: skip
    assert missing == [], missing


def test_the_import_checker_sees_a_missing_name():
    assert documented_imports("x\n    from SegLensLogic.bundle import open_session, no_such_thing\n") == [
        ("SegLensLogic.bundle", "open_session"), ("SegLensLogic.bundle", "no_such_thing")]
    assert importable("SegLensLogic.bundle", "open_session") and not importable("SegLensLogic.bundle", "no_such_thing")
    assert not importable("SegLensLogic.no_such_module", "x")


def test_the_unet_reference_figures_are_its_bundles():
    """The README's line on the second shipped reference quotes the U-Net bundle's own figures and files."""
    folder = REPO / "Resources" / "adult-glioma-unet"
    bundle = json.loads((folder / "bundle.json").read_text(encoding="utf-8"))
    figures, labels = bundle["figures"], json.loads((folder / "latents.json").read_text(encoding="utf-8"))
    categories = Counter(latent["category"] for latent in labels["latents"])
    text = _flat(README)
    match = re.search(r"On its (\d+) test cases the U-Net reference segments whole tumour (\d\.\d{3}), tumour core (\d\.\d{3}), "
                      r"enhancing tumour (\d\.\d{3}) \(n = (\d+);", text)  # fmt: skip
    assert match, "README.md no longer quotes the U-Net reference's test Dice"
    test = figures["dice_test"]
    n = str(len(figures["training"]["test_cases"]))
    assert match.groups() == (n, f"{test['dice_WT']:.3f}", f"{test['dice_TC']:.3f}", f"{test['dice_ET']:.3f}", n)
    match = re.search(r"trained on (\d+) real cases, its SAE at `(\w+)` \((\d+) latents on (\d+) channels, (\d+) of them", text)
    assert match, "README.md no longer describes the U-Net reference's SAE"
    tumour = sum(categories[c] for c in ("necrotic core", "edema", "enhancing tumour"))
    assert match.groups() == (str(len(figures["training"]["cases"])), figures["hook_point"], str(bundle["sae"]["d_sae"]),
                              str(bundle["sae"]["d_in"]), str(tumour))  # fmt: skip
    assert "alignments/unet-vs-segformer.json" in bundle["alignments"]
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
    assert re.search(rf"`Resources/adult-glioma-unet/` \({size:.0f} MB\)", text), f"the U-Net bundle is {size:.1f} MB"


def test_the_cross_architecture_figures_are_the_shipped_alignment():
    """What docs/measurements/model-diffing.md says of the two references' alignment is the shipped file's."""
    document = json.loads((REPO / "Resources" / "adult-glioma-unet" / "alignments" / "unet-vs-segformer.json").read_text(encoding="utf-8"))
    text = _flat(DOCS / "measurements" / "model-diffing.md")
    section = text[text.index("## Across architectures") :]
    correlations = [pair["corr"] for pair in document["pairs"]]
    info = document["info"]
    assert ("**No latent is shared**" in section) == (not document["shared_a"])
    assert f"correlate at {max(correlations):.2f} at most" in section
    assert f"{sum(c > 0.1 for c in correlations)} pairs exceed 0.1" in section
    assert f"{info['active_a']} of the U-Net's latents and all {info['active_b']} of the B0's fire" in section
    assert f"{info['positions']:,} brain positions" in section and document["method"] == "activation-correlation"


def test_the_unet_hint_figure_is_its_cards():
    """The README's one line on the U-Net's hint fix quotes that bundle's measured figures."""
    figures = json.loads((REPO / "Resources" / "adult-glioma-unet" / "bundle.json").read_text(encoding="utf-8"))["figures"]["hints"]
    match = re.search(r"On the U-Net reference after 3 clicks: \*\*([+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\])\*\* on its (\d+) failures",
                      _flat(README))  # fmt: skip
    assert match, "README.md no longer quotes the U-Net reference's hint fix"
    line = figures["summary_line"]
    assert f"mean Dice change {match.group(1)}" in line and f"Measured on {match.group(2)} real failures" in line
