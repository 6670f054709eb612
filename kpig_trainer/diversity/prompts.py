"""Prompt templates: one ``.txt`` file per template, ours by default, overridable per file.

The package ships ``templates/extract.txt`` (key-part extraction) and one file per evolution
strategy (``concretizing``, ``reasoning``, ``constraint``, ``breadth``). A user folder
(``--templates DIR``) replaces any of them by a file of the same name; the others stay ours.

Placeholders are ``{instruction}``, ``{key_parts}`` (a JSON list), ``{input}`` and
``{output}``; only these four names are substituted, so other braces (JSON examples) are left
alone. ``{instruction}`` is required everywhere, ``{key_parts}`` in evolution templates.

Every line of a template that is a bracketed header alone (``[KEY PARTS]``) is a *marker*: an
evolved instruction containing one (or ``key parts:``) is the model echoing the prompt, and
is rejected.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from kpig_trainer.data.records import DataError

logger = logging.getLogger(__name__)

__all__ = ["EXTRACT", "EVOLUTION_STRATEGIES", "PromptTemplates", "TEMPLATE_DIR", "load_templates"]

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
EXTRACT = "extract"
EVOLUTION_STRATEGIES = ("concretizing", "reasoning", "constraint", "breadth")
_FIELDS = ("instruction", "key_parts", "input", "output")
_PLACEHOLDER = re.compile(r"\{(" + "|".join(_FIELDS) + r")\}")
_HEADER_LINE = re.compile(r"^[ \t]*(\[[^\[\]\n]{2,60}\])[ \t]*:?[ \t]*$", re.M)
# Echoes of the prompt that no real instruction contains, whatever the template says.
_FIXED_MARKERS = re.compile(r"\bkey[ _-]?parts?\s*[:#\]]|#\s*key[ _-]?parts?\s*#|\bnew instruction\s*:", re.I)


def _required(name: str) -> tuple[str, ...]:
    return ("instruction",) if name == EXTRACT else ("instruction", "key_parts")


@dataclass(frozen=True)
class PromptTemplates:
    """The templates in use, by name, with the files they came from."""

    texts: Mapping[str, str]
    sources: Mapping[str, str]

    def render(
        self, name: str, *, instruction: str, key_parts: Sequence[str] = (), input: str = "", output: str = ""
    ) -> str:
        """Fill template ``name``; key parts are written as a JSON list."""
        if name not in self.texts:
            raise KeyError(f"no prompt template {name!r}; have {sorted(self.texts)}")
        values = {
            "instruction": instruction,
            "input": input or "(none)",
            "output": output,
            "key_parts": json.dumps(list(key_parts), ensure_ascii=False),
        }
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.texts[name])

    @property
    def markers(self) -> tuple[str, ...]:
        """Bracketed header lines of every template (``[KEY PARTS]``, ...)."""
        found = {m.group(1) for text in self.texts.values() for m in _HEADER_LINE.finditer(text)}
        return tuple(sorted(found))

    def find_marker(self, text: str) -> str | None:
        """The first template marker (or ``key parts:``-like echo) found in ``text``, else None."""
        lowered = text.casefold()
        for marker in self.markers:
            if marker.casefold() in lowered:
                return marker
        match = _FIXED_MARKERS.search(text)
        return match.group(0) if match else None


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as error:
        raise DataError(f"{path}: cannot read prompt template ({error.strerror})") from None


def load_templates(directory: str | Path | None = None) -> PromptTemplates:
    """Our templates, with files of ``directory`` (same names, ``.txt``) replacing them.

    Raises:
        DataError: the folder does not exist, or a template lacks a required placeholder.
    """
    names = (EXTRACT, *EVOLUTION_STRATEGIES)
    texts, sources = {}, {}
    for name in names:
        path = TEMPLATE_DIR / f"{name}.txt"
        texts[name], sources[name] = _read(path), str(path)
    if directory is not None:
        directory = Path(directory)
        if not directory.is_dir():
            raise DataError(f"{directory}: template folder not found")
        for path in sorted(directory.glob("*.txt")):
            if path.stem not in names:
                logger.warning("%s: not a template name (%s); ignored", path, ", ".join(names))
                continue
            texts[path.stem], sources[path.stem] = _read(path), str(path)
    for name in names:
        missing = [f"{{{f}}}" for f in _required(name) if f"{{{f}}}" not in texts[name]]
        if missing:
            raise DataError(f"{sources[name]}: prompt template {name!r} lacks {', '.join(missing)}")
    return PromptTemplates(texts, sources)
