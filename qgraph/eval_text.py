"""The English text a perplexity is measured on: a file the user names, or by default licence texts Debian installs.

A perplexity means something only with its text named, and it must be obtainable offline. Debian and its derivatives
install the full texts of common free-software licences in ``/usr/share/common-licenses``; the default text is five of
them (about 23k SmolLM2 tokens, 104 KB of English prose), concatenated in a fixed order with a blank line between them.
Near-duplicates (GFDL-1.2, LGPL-2, the LGPL-3 preamble that points at GPL-3) are left out so no passage is scored twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qgraph.errors import QGraphError

COMMON_LICENSES_DIR = Path("/usr/share/common-licenses")
DEFAULT_LICENSES = ("GPL-3", "GPL-2", "Apache-2.0", "GFDL-1.3", "MPL-2.0")
SEPARATOR = "\n\n"


@dataclass(frozen=True)
class EvalText:
    """A text and a description of where it came from (printed beside every result)."""

    text: str
    source: str


def common_licenses_text(directory: Path = COMMON_LICENSES_DIR, names: tuple[str, ...] = DEFAULT_LICENSES) -> EvalText:
    """``names`` from Debian's common-licenses ``directory``, in that order, joined by a blank line."""
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        where = f"{directory} has no {', '.join(missing)}" if directory.is_dir() else f"{directory} does not exist"
        raise QGraphError(
            f"the default evaluation text is Debian's licence texts ({', '.join(names)}) but {where} (this system is "
            "not Debian-based?): give an English text file with --text FILE (or text= in Python)"
        )
    parts = [(directory / n).read_text(encoding="utf-8") for n in names]
    source = f"Debian common-licenses: {', '.join(names)} ({directory})"
    return EvalText(SEPARATOR.join(p.strip() for p in parts), source)


def file_text(path: str | Path) -> EvalText:
    """The UTF-8 text of ``path``, refused with a message when it is missing, not text, or empty."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise QGraphError(f"text file {path} does not exist: give an existing UTF-8 text file with --text FILE")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise QGraphError(f"text file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if not text.strip():
        raise QGraphError(f"text file {path} is empty: give a file of English text (20k tokens or more is typical)")
    return EvalText(text, f"file {path}")
