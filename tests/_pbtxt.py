"""A small parser for protobuf text format, enough for Triton's ``config.pbtxt`` (messages,
repeated fields as ``[...]`` lists or repeated keys, strings, numbers, enum identifiers)."""

from __future__ import annotations

import re
from typing import Any

_TOKEN = re.compile(
    r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|([{}\[\]:,])|([A-Za-z_][\w.]*)|(-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?))'
)


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"pbtxt: cannot parse at {text[pos : pos + 30]!r}")
        pos = m.end()
        comment, string, punct, ident, number = m.groups()
        if comment:
            continue
        if string:
            out.append(("str", string[1:-1]))
        elif punct:
            out.append(("p", punct))
        elif ident:
            out.append(("id", ident))
        else:
            out.append(("num", number))
    return out


def parse(text: str) -> dict[str, Any]:
    """``config.pbtxt`` text -> dict; every field maps to a list of values (protobuf fields can
    repeat); sub-messages are dicts, enums are strings, numbers are int or float."""
    toks = _tokens(text)
    i = 0

    def value():
        nonlocal i
        kind, tok = toks[i]
        i += 1
        if kind == "p" and tok == "{":
            return message("}")
        if kind == "p" and tok == "[":
            items = []
            while toks[i] != ("p", "]"):
                items.append(value())
                if toks[i] == ("p", ","):
                    i += 1
            i += 1
            return items
        if kind == "num":
            return float(tok) if any(c in tok for c in ".eE") else int(tok)
        if kind in ("str", "id"):
            return tok
        raise ValueError(f"pbtxt: unexpected {tok!r}")

    def message(end: str | None) -> dict[str, Any]:
        nonlocal i
        fields: dict[str, list] = {}
        while i < len(toks) and toks[i] != ("p", end):
            kind, key = toks[i]
            if kind != "id":
                raise ValueError(f"pbtxt: expected a field name, got {key!r}")
            i += 1
            if toks[i] == ("p", ":"):
                i += 1
            v = value()
            fields.setdefault(key, []).extend(v if isinstance(v, list) else [v])
            if i < len(toks) and toks[i] == ("p", ","):
                i += 1
        if end is not None:
            if i >= len(toks):
                raise ValueError("pbtxt: unterminated message")
            i += 1
        return fields

    return message(None)
