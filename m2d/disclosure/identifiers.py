"""The dataset's identifier values (patient ids, case names, case and image paths),
found in export text without the index holding them in the clear.

The index keeps keyed hashes (BLAKE2b with a salt of its own) of each value,
lower-cased, and of each value's first word. A text is cut into words (runs of
ASCII letters and digits); wherever a word is the first word of some value, the
spans of 1..max_words words from there are hashed and looked up. A value is thus
found whole, between non-alphanumeric characters ("P1" in "P1,0.93" or
"case=P1", never in "P10" or "MP1"), in any case. In bytes that are not text
(weights, compressed data) only values of at least BINARY_MIN_LENGTH characters
count, since a short value like "P1" turns up in random bytes by chance; there a
vectorised prefilter (numpy) finds the few offsets where a word starts whose first
four characters hash into a bitmap of the values' first four characters, and only
those are looked at (45 MB of random weights hold ~300,000 printable runs; a few
dozen word starts pass the filter).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WORD = re.compile(r"[A-Za-z0-9]+")
BINARY_MIN_LENGTH = 5
PREFIX_BITS = 22  # the prefilter's bitmap: 4 Mbit
_ALNUM = np.zeros(256, dtype=bool)
_ALNUM[[*range(48, 58), *range(65, 91), *range(97, 123)]] = True
_LOWER = np.arange(256, dtype=np.uint8)
_LOWER[65:91] += 32
# The CLaM CSVs' identifier columns, and what a reason calls a value of each.
COLUMNS = {"Patient_Id": "a patient id", "CaseName": "a case name", "CasePath": "a case path",
           "ImagePath": "an image path"}
MISSING = {"", "NULL", "NA", "NaN", "None"}


@dataclass(frozen=True)
class Found:
    kind: str  # "a patient id"...
    start: int  # character offset in the text searched
    end: int


def _prefix_hash(grams: np.ndarray) -> np.ndarray:
    """Bitmap positions of four lower-cased bytes packed little-endian in a uint32."""
    return ((grams.astype(np.uint64) * np.uint64(2654435761)) & np.uint64(0xFFFFFFFF)) >> np.uint64(32 - PREFIX_BITS)


class IdentifierIndex:
    def __init__(self, salt: bytes, values: dict[bytes, str], first_words: set[bytes], max_words: int,
                 prefixes: set[int] | None = None, max_length: int = 0):
        self.salt, self.values, self.first_words, self.max_words = salt, values, first_words, max_words
        self.prefixes, self.max_length = prefixes or set(), max_length
        self.bitmap = np.zeros(1 << PREFIX_BITS, dtype=bool)
        self.bitmap[list(self.prefixes)] = True

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
            value = value.strip()
            index.values.setdefault(index._h(value), kind)
            index.first_words.add(index._h(words[0]))
            index.max_words = max(index.max_words, len(words))
            index.max_length = max(index.max_length, len(value))
            head = value.lower().encode("utf-8", "replace")[:4]
            if len(value) >= BINARY_MIN_LENGTH and value[0].isascii() and value[0].isalnum():
                index.prefixes.add(int(_prefix_hash(np.array([int.from_bytes(head, "little")], dtype=np.uint32))[0]))
        index.bitmap[list(index.prefixes)] = True
        return index

    def save(self, folder: Path) -> None:
        data = {"salt": self.salt.hex(), "max_words": self.max_words,
                "values": {h.hex(): kind for h, kind in self.values.items()},
                "first_words": sorted(h.hex() for h in self.first_words),
                "prefixes": sorted(self.prefixes), "max_length": self.max_length}
        (folder / "identifiers.json").write_text(json.dumps(data))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> IdentifierIndex:
        data = json.loads((Path(folder) / "identifiers.json").read_text())
        return cls(bytes.fromhex(data["salt"]), {bytes.fromhex(h): k for h, k in data["values"].items()},
                   {bytes.fromhex(h) for h in data["first_words"]}, int(data["max_words"]),
                   set(data["prefixes"]), int(data["max_length"]))

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

    def find_in_binary(self, data, block: int = 8 << 20, tick=None) -> list[tuple[int, str]]:
        """Identifier values of BINARY_MIN_LENGTH+ characters in ``data``: (byte offset, kind)."""
        out = []
        view = np.frombuffer(data, dtype=np.uint8)
        taken_until = -1
        for begin in range(0, max(len(view) - 3, 0), block):
            if tick:
                tick()
            part = view[begin:begin + block + 3]
            alnum = _ALNUM[part]
            # word starts: alphanumeric after a byte that is not (the block's first byte: after its left neighbour)
            starts = np.flatnonzero(alnum[1:-3] & ~alnum[:-4]) + 1
            if alnum[0] and not (begin and _ALNUM[view[begin - 1]]):
                starts = np.concatenate(([0], starts))
            grams = (_LOWER[part[starts]].astype(np.uint32) | _LOWER[part[starts + 1]].astype(np.uint32) << 8
                     | _LOWER[part[starts + 2]].astype(np.uint32) << 16 | _LOWER[part[starts + 3]].astype(np.uint32) << 24)
            for c in starts[self.bitmap[_prefix_hash(grams)]]:
                at = begin + int(c)
                if at < taken_until:
                    continue
                window = bytes(view[at:at + self.max_length + 1]).decode("latin-1")
                found = self.find_in_text(window, BINARY_MIN_LENGTH)
                if found and found[0].start == 0:
                    out.append((at, found[0].kind))
                    taken_until = at + found[0].end
        return out
