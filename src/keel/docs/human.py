"""The human parts of the docs: files a person edits under ``docs/human/``, created with prompts, never overwritten.

Each file answers questions no record can (who the user is, how labels are made, what was traded away). A file
is *filled* once it holds text besides its prompt comments and no line starting with ``TODO``; until then the
docs show a visible "TO WRITE" hole and :func:`keel.docs.check_docs` names the file and its questions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from keel.io import atomic_write_text
from keel.spec import Spec

HUMAN_FOLDER = "docs/human"


@dataclass(frozen=True)
class Section:
    """One human-text file: its name, the title it gets in the docs, where it is used, and the questions."""

    name: str
    title: str
    used_in: str
    questions: tuple[str, ...]


SECTIONS: tuple[Section, ...] = (
    Section("decision", "User and product decision", "design doc",
            ("Who acts on the prediction day to day, and what do they do today without the model?",
             "What changes for them when the model runs, and what does a wrong decision cost them, in their words?")),
    Section("labels", "How labels are created", "design doc, evidence pack (data story)",
            ("Who decides that an event is positive, from what evidence, and how long after the event?",
             "Which positives are never labelled (e.g. fraud nobody reports), and how does that bias the labels?",
             "What did you change in the data because of what you learned (columns excluded, windows delayed)?")),
    Section("metric-choice", "Why this metric and threshold", "design doc, evidence pack (evaluation story)",
            ("Why does the headline metric match the decision and its error costs?",
             "Who agreed to the cost figures, and what did the error analysis change?")),
    Section("tradeoffs", "Trade-offs agreed with the product manager", "design doc, evidence pack (collaboration)",
            ("Which trade-offs were put to the product manager (review capacity vs missed positives, latency vs "
             "features, simplicity vs accuracy)?",
             "What did they choose, and what would make them choose differently?")),
    Section("limitations", "Known limitations", "model cards",
            ("Where must the model not be used? Which populations, periods or inputs has it not been checked on?",
             "What would make its numbers stop holding?")),
    Section("escalation", "Escalation", "operating note",
            ("Who is on call and how are they reached? Who may decide a rollback out of hours?",
             "Where are incidents recorded?")),
)

_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_TODO = re.compile(r"^\s*TODO\b", re.MULTILINE)


@dataclass(frozen=True)
class HumanText:
    """A human-text file as read: the text without prompt comments, and whether it is filled."""

    section: Section
    path: Path
    exists: bool
    text: str

    @property
    def filled(self) -> bool:
        return self.exists and bool(self.text.strip()) and not _TODO.search(self.text)


def human_dir(spec: Spec) -> Path:
    """Where the human-text files live: ``docs/human/`` beside keel.toml (whatever folder the docs go to)."""
    return spec.resolve(HUMAN_FOLDER)


def prompt_text(section: Section) -> str:
    """The first content of a human-text file: the questions as comments, and a TODO line to replace."""
    questions = "\n".join(f"     - {q}" for q in section.questions)
    return (
        f"<!-- {section.title} (used in the {section.used_in}).\n"
        "     Answer in your own words below: plain paragraphs and '- ' bullets. Delete the TODO line when done;\n"
        "     `keel docs --check` fails while it is there. `keel docs` never overwrites this file.\n"
        f"{questions}\n-->\n\nTODO: answer the questions above.\n"
    )


def ensure_human_files(folder: Path) -> list[Path]:
    """Create the missing human-text files with their prompts; return the ones created (existing are kept)."""
    created = []
    for section in SECTIONS:
        path = folder / f"{section.name}.md"
        if not path.exists():
            atomic_write_text(path, prompt_text(section))
            created.append(path)
    return created


def read_human(folder: Path) -> dict[str, HumanText]:
    """Every human-text section by name, read from ``folder`` (missing files read as empty, unfilled)."""
    out = {}
    for section in SECTIONS:
        path = folder / f"{section.name}.md"
        exists = path.is_file()
        raw = path.read_text(encoding="utf-8") if exists else ""
        out[section.name] = HumanText(section, path, exists, _COMMENT.sub("", raw).strip())
    return out


__all__ = ["HUMAN_FOLDER", "SECTIONS", "HumanText", "Section", "ensure_human_files", "human_dir", "prompt_text",
           "read_human"]
