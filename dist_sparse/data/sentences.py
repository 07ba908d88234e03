"""Sentence splitting for next-sentence-prediction pairs (pure, rule-based, no downloads).

BERT builds NSP pairs from sentences: segment A is a run of consecutive sentences, B either
their true continuation or text from another document, each with probability 1/2. With whole
paragraphs as units, a chunk is often a single paragraph longer than the target length, which
can only become a "random next" pair, so about two thirds of the default corpus' pairs were
random. Sentences are the units BERT used and keep A|B on a sentence boundary; together with
pairs of at least two units (``examples.chunk_end``) they restore the balance.

The rule: a sentence ends at ``.``, ``!`` or ``?`` (with any closing quotes or brackets after
it) followed by whitespace and a character that can start a sentence (a capital letter, a digit
or an opening quote or bracket), except after a title or other abbreviation ("Mr.", "Jan.",
"etc."), an initial ("J.", but not the pronoun "I."), a dotted abbreviation ("U.S.", "G.I.")
or, before a digit only, a numbering word ("No. 5", "Art. 2"; "the answer is no. We" does end
a sentence). It is deterministic, so prepare-data stays reproducible; it errs towards not
splitting, which only makes some units longer.
"""

from __future__ import annotations

import re

# Words that end in a period without ending a sentence (compared without the period, lowercase).
ABBREVIATIONS = frozenset("""
    mr mrs ms dr st jr sr prof gen gov sen rep hon rev col capt lt sgt maj adm cmdr pres supt
    messrs mt ft vs etc co corp inc ltd bros dept approx
    jan feb mar apr jun jul aug sep sept oct nov dec i.e e.g cf al viz
""".split())
# Abbreviations that are also ordinary words ending sentences ("no", "art"): they keep a
# sentence together only when a number follows ("No. 5", "Art. 2", "pp. 10").
NUMBERING_WORDS = frozenset("no nos art sec vol fig ch pp".split())

# group 1: the first letter or digit of the next sentence (read, not consumed)
_BOUNDARY = re.compile(r"""[.!?]+["'\u201d\u2019)\]]*(?=\s+["'\u201c\u2018(\[]*([A-Z0-9]))""")
_LAST_WORD = re.compile(r"""(\S+)$""")


def _is_abbreviation(text_before: str, next_char: str) -> bool:
    """Whether the period ending ``text_before`` belongs to an abbreviation rather than ending
    the sentence; ``next_char`` starts the text after the whitespace."""
    match = _LAST_WORD.search(text_before)
    if match is None:
        return False
    word = match.group(1).lstrip("\"'(\u201c\u2018[").rstrip(".")
    lower = word.lower()
    if lower in ABBREVIATIONS:
        return True
    if lower in NUMBERING_WORDS:
        return next_char.isdigit()
    # an initial ("J."), but "I." is the pronoun far more often than an initial
    if len(word) == 1 and word.isalpha():
        return word != "I"
    return bool(re.fullmatch(r"(?:[a-z]\.)+[a-z]", lower))  # dotted: "U.S.", "G.I.", "a.m."


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text`` (a paragraph), stripped, none empty; joined with single spaces
    they give back the text up to whitespace."""
    sentences, start = [], 0
    for match in _BOUNDARY.finditer(text):
        end = match.end()
        if match.group(0).startswith(".") and _is_abbreviation(
            text[start : match.start() + 1], match.group(1)
        ):
            continue
        piece = text[start:end].strip()
        if piece:
            sentences.append(piece)
        start = end
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


__all__ = ["ABBREVIATIONS", "NUMBERING_WORDS", "split_sentences"]
