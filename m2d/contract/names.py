"""A name a job wrote (bytes) as text that shows every byte: the one spelling the gateway's
listing, the disclosure report and the review page share."""
from __future__ import annotations

import re


def escape(name: bytes) -> str:
    """``name`` as text that shows every byte and is never the text of another
    name: UTF-8 stays as it is; a backslash becomes two; a byte that is not
    UTF-8, or an ASCII control character, becomes ``\\xNN``; other characters
    that hide or reorder text (C1 controls, line separators, bidi overrides)
    become ``\\uNNNN``. ``unescape`` gives the bytes back."""
    out = []
    for char in name.decode("utf-8", "surrogateescape"):
        code = ord(char)
        if char == "\\":
            out.append("\\\\")
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8 (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif 0x80 <= code < 0xA0 or code in _HIDING:
            out.append(f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


_HIDING = {0x2028, 0x2029, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A), 0xFEFF}


def unescape(text: str) -> bytes:
    """The bytes ``escape`` showed as ``text``; ValueError for text it never makes."""
    out, i = bytearray(), 0
    while i < len(text):
        char, kind = text[i], text[i + 1:i + 2]
        if char != "\\":
            out += char.encode("utf-8")
            i += 1
        elif kind == "\\":
            out += b"\\"
            i += 2
        elif kind == "x" and re.fullmatch(r"[0-9a-f]{2}", text[i + 2:i + 4]):
            out.append(int(text[i + 2:i + 4], 16))
            i += 4
        elif kind == "u" and re.fullmatch(r"[0-9a-f]{4}", text[i + 2:i + 6]):
            out += chr(int(text[i + 2:i + 6], 16)).encode("utf-8")
            i += 6
        else:
            raise ValueError(f"{text!r} is not a name as escape() writes it")
    return bytes(out)
