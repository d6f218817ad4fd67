"""The dataset's identifier values (patient ids, case names, case and image paths),
found in export text without the index holding them in the clear.

The index keeps keyed hashes (BLAKE2b with a salt of its own) of each value,
lower-cased, and of each value's first word. A text is cut into words (runs of
ASCII letters and digits); wherever a word is the first word of some value, the
spans of 1..max_words words from there are hashed and looked up. A value is thus
found whole, between non-alphanumeric characters ("P1" in "P1,0.93" or
"case=P1", never in "P10" or "MP1"), in any case. In bytes that are not text
(weights, compressed data) only runs of printable characters are searched, and
only values of at least BINARY_MIN_LENGTH characters count there: a short value
like "P1" turns up in random bytes by chance.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

WORD = re.compile(r"[A-Za-z0-9]+")
PRINTABLE_RUN = re.compile(rb"[\x20-\x7e]{5,}")
BINARY_MIN_LENGTH = 5
# The CLaM CSVs' identifier columns, and what a reason calls a value of each.
COLUMNS = {"Patient_Id": "a patient id", "CaseName": "a case name", "CasePath": "a case path",
           "ImagePath": "an image path"}
MISSING = {"", "NULL", "NA", "NaN", "None"}


@dataclass(frozen=True)
class Found:
    kind: str  # "a patient id"...
    start: int  # character offset in the text searched
    end: int


class IdentifierIndex:
    def __init__(self, salt: bytes, values: dict[bytes, str], first_words: set[bytes], max_words: int):
        self.salt, self.values, self.first_words, self.max_words = salt, values, first_words, max_words

    def _h(self, text: str) -> bytes:
        return hashlib.blake2b(text.lower().encode("utf-8", "surrogatepass"), key=self.salt, digest_size=16).digest()

    @classmethod
    def build(cls, values: dict[str, str]) -> IdentifierIndex:
        """``values``: identifier value -> its kind."""
        index = cls(os.urandom(32), {}, set(), 1)
        for value, kind in values.items():
            words = WORD.findall(value)
            if value.strip() in MISSING or not words:
                continue
            index.values.setdefault(index._h(value.strip()), kind)
            index.first_words.add(index._h(words[0]))
            index.max_words = max(index.max_words, len(words))
        return index

    def save(self, folder: Path) -> None:
        data = {"salt": self.salt.hex(), "max_words": self.max_words,
                "values": {h.hex(): kind for h, kind in self.values.items()},
                "first_words": sorted(h.hex() for h in self.first_words)}
        (folder / "identifiers.json").write_text(json.dumps(data))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> IdentifierIndex:
        data = json.loads((Path(folder) / "identifiers.json").read_text())
        return cls(bytes.fromhex(data["salt"]), {bytes.fromhex(h): k for h, k in data["values"].items()},
                   {bytes.fromhex(h) for h in data["first_words"]}, int(data["max_words"]))

    def find_in_text(self, text: str, min_length: int = 1) -> list[Found]:
        """Every identifier value in ``text`` (positions and kinds only)."""
        words = [(m.start(), m.end()) for m in WORD.finditer(text)]
        found = []
        i = 0
        while i < len(words):
            start, end = words[i]
            if self._h(text[start:end]) in self.first_words:
                hit = None
                for n in range(min(self.max_words, len(words) - i), 0, -1):  # the longest value first
                    stop = words[i + n - 1][1]
                    if stop - start >= min_length and (kind := self.values.get(self._h(text[start:stop]))):
                        hit = Found(kind, start, stop)
                        break
                if hit:
                    found.append(hit)
                    i += n
                    continue
            i += 1
        return found

    def find_in_binary(self, data) -> list[tuple[int, str]]:
        """Identifier values in printable runs of ``data``: (byte offset, kind)."""
        out = []
        for run in PRINTABLE_RUN.finditer(data):
            text = run.group().decode("ascii")
            out.extend((run.start() + f.start, f.kind) for f in self.find_in_text(text, BINARY_MIN_LENGTH))
        return out
