"""Sentence splitting for next-sentence-prediction pairs (pure, rule-based, no downloads).

BERT builds NSP pairs from sentences: segment A is a run of consecutive sentences, B either
their true continuation or text from another document, each with probability 1/2. With whole
paragraphs as units, a chunk is often a single paragraph longer than the target length, which
can only become a "random next" pair, so about two thirds of the default corpus' pairs were
random. Splitting paragraphs into sentences restores the balance.

The rule: a sentence ends at ``.``, ``!`` or ``?`` (with any closing quotes or brackets after
it) followed by whitespace and a character that can start a sentence (a capital letter, a digit
or an opening quote or bracket), except after a known abbreviation or a single capital letter
(initials, "U.S."). It is deterministic, so prepare-data stays reproducible; it errs towards not
splitting, which only makes some units longer.
"""

from __future__ import annotations

import re

# Words that end in a period without ending a sentence (compared without the period, lowercase).
ABBREVIATIONS = frozenset("""
    mr mrs ms dr st jr sr prof gen gov sen rep hon rev col capt lt sgt maj adm cmdr pres supt
    messrs mt ft vs etc no nos co corp inc ltd bros dept est approx fig vol art sec ch pp
    jan feb mar apr jun jul aug sep sept oct nov dec i.e e.g cf al viz
""".split())

_BOUNDARY = re.compile(r"""[.!?]+["'\u201d\u2019)\]]*(?=\s+["'\u201c\u2018(\[]*[A-Z0-9])""")
_LAST_WORD = re.compile(r"""(\S+)$""")


def _is_abbreviation(text_before: str) -> bool:
    match = _LAST_WORD.search(text_before)
    if match is None:
        return False
    word = match.group(1).lstrip("\"'(\u201c\u2018[").rstrip(".").lower()
    if word in ABBREVIATIONS:
        return True
    # initials and dotted abbreviations: "J.", "U.S.", "a.m."
    return (len(word) == 1 and word.isalpha()) or bool(re.fullmatch(r"(?:[a-z]\.)+[a-z]", word))


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text`` (a paragraph), stripped, none empty; joined with single spaces
    they give back the text up to whitespace."""
    sentences, start = [], 0
    for match in _BOUNDARY.finditer(text):
        end = match.end()
        if match.group(0).startswith(".") and _is_abbreviation(text[start:match.start() + 1]):
            continue
        piece = text[start:end].strip()
        if piece:
            sentences.append(piece)
        start = end
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


__all__ = ["ABBREVIATIONS", "split_sentences"]
