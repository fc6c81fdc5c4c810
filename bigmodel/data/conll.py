"""CoNLL files: a token a line, whitespace-separated columns, the token first and the tag last
(CoNLL-2003: token POS chunk NER), a blank line between sentences, `-DOCSTART-` lines skipped.

Tags are IOB: `O`, `B-TYPE`, `I-TYPE`, in either IOB1 (an entity may start with I-; B- only
separates two adjacent entities of one type, as in the original CoNLL-2003 files) or IOB2 (every
entity starts with B-). `to_iob2` turns either into IOB2, which the rest of the package uses.
IOBES tags (E-, S-) are refused rather than guessed at: the error says what is valid.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from bigmodel.errors import BigModelError

_TAG = re.compile(r"O|[BI]-\S+")


def read_conll(path: Path) -> list[tuple[list[str], list[str]]]:
    """The sentences of a CoNLL file as (tokens, tags), tags as written (IOB1 or IOB2)."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise BigModelError(f"{path}: no such CoNLL file") from None
    except UnicodeDecodeError as e:
        raise BigModelError(f"{path}: not UTF-8 text (bad byte at offset {e.start}); "
                            f"save it as UTF-8") from None
    sentences: list[tuple[list[str], list[str]]] = []
    tokens: list[str] = []
    tags: list[str] = []
    for number, line in enumerate(text.split("\n"), start=1):
        columns = line.split()
        if not columns or columns[0] == "-DOCSTART-":
            if tokens:
                sentences.append((tokens, tags))
                tokens, tags = [], []
            continue
        if len(columns) == 1:
            raise BigModelError(f"{path}:{number}: one column ({line.strip()!r}); a CoNLL line "
                                f"holds a token first and its tag last, separated by whitespace")
        tag = columns[-1]
        if not _TAG.fullmatch(tag):
            raise BigModelError(f"{path}:{number}: tag {tag!r} is not valid; tags are O, B-TYPE "
                                f"or I-TYPE (IOB1 or IOB2; IOBES's E-/S- are not read)")
        tokens.append(columns[0])
        tags.append(tag)
    if tokens:
        sentences.append((tokens, tags))
    if not sentences:
        raise BigModelError(f"{path}: no sentences (the file is empty or holds only "
                            f"-DOCSTART- lines)")
    return sentences


def to_iob2(tags: list[str]) -> list[str]:
    """IOB1 → IOB2: an I-X that does not continue an X entity starts one, so it becomes B-X.
    IOB2 tags come back unchanged."""
    out = []
    previous = "O"
    for tag in tags:
        if tag.startswith("I-") and previous[2:] != tag[2:]:  # after O, another type, or first
            tag = "B-" + tag[2:]
        out.append(tag)
        previous = tag
    return out


def detect_scheme(sentences: list[tuple[list[str], list[str]]]) -> Literal["IOB1", "IOB2"]:
    """IOB1 when some entity starts with I-, else IOB2 (where no entity does, the two schemes
    read the same entities, so IOB2 is the answer that needs no conversion)."""
    for _, tags in sentences:
        if to_iob2(tags) != tags:
            return "IOB1"
    return "IOB2"
