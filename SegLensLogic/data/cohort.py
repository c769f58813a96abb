"""Cohorts: a named list of cases, the population a segmenter is trained on and compared across.

A cohort is a folder of case folders, a single case folder, or a text file that lists case folders (one per
line, relative to the file, ``#`` starts a comment). The population of a case is data, not code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import InputFileError
from ..storage import read_text
from .cases import Case, find_case, is_case_folder


@dataclass
class Cohort:
    """A named, ordered list of cases."""

    name: str
    cases: list[Case]

    def __len__(self) -> int:
        return len(self.cases)

    def __iter__(self):
        return iter(self.cases)

    def __getitem__(self, index):
        return self.cases[index]

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modalities every case of the cohort has (what a model trained on it can take)."""
        common = set(self.cases[0].modalities)
        for case in self.cases[1:]:
            common &= set(case.modalities)
        return tuple(m for m in self.cases[0].modalities if m in common)

    def split(self, n_holdout: int) -> tuple["Cohort", "Cohort"]:
        """The first ``len - n_holdout`` cases and the last ``n_holdout`` ones, as two cohorts."""
        n_keep = len(self.cases) - n_holdout
        return (
            Cohort(f"{self.name}-train", self.cases[:n_keep]),
            Cohort(f"{self.name}-holdout", self.cases[n_keep:]),
        )


def load_cohort(source: str | Path, name: str | None = None) -> Cohort:
    """Load a cohort from a folder of case folders, a case folder, or a text file of case folders.

    Raises:
        InputFileError: the source does not exist, lists a folder that holds no case, or holds no case at all.
    """
    source = Path(source)
    if source.is_file():
        cases = []
        for lineno, raw in enumerate(read_text(source, what="a cohort list (case folders, one per line)").splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            folder = Path(line) if Path(line).is_absolute() else source.parent / line
            try:
                cases.append(find_case(folder))
            except InputFileError as exc:
                raise InputFileError(source, f"line {lineno}: {exc}") from None
        if not cases:
            raise InputFileError(source, "lists no case folders")
        return Cohort(name or source.stem, cases)
    if not source.is_dir():
        raise InputFileError(source, "cohort not found (expected a folder of case folders or a text file of them)")
    if is_case_folder(source):
        return Cohort(name or source.name, [find_case(source)])
    cases = [find_case(sub) for sub in sorted(p for p in source.iterdir() if p.is_dir()) if is_case_folder(sub)]
    if not cases:
        raise InputFileError(source, "holds no case folders with recognised image names")
    return Cohort(name or source.name, cases)
