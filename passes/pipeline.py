"""The textual pipeline: ``"fold-bn,dce,prune-channels{ratio=0.5,criterion=l1}"``.

Grammar::

    pipeline := item ("," item)*
    item     := NAME ("{" option ("," option)* "}")?
    option   := KEY "=" VALUE          VALUE may be a bracketed list: [a,b]

Values are converted with the pass's option dataclass, exactly as the Python API does,
so a pipeline string and ``Pass(**options)`` build the same thing.

>>> parse_pipeline("dce, fold-bn")
[dce, fold-bn]
>>> parse_pipeline("dce{")
Traceback (most recent call last):
  ...
slimfx.errors.PipelineError: pipeline 'dce{': unclosed '{' at column 4
"""

from __future__ import annotations

from slimfx.errors import PipelineError

from .base import Pass, get_pass, make_options

__all__ = ["parse_pipeline", "split_items"]


def _fail(text: str, msg: str, pos: int) -> PipelineError:
    return PipelineError(f"pipeline {text!r}: {msg} at column {pos + 1}")


def split_items(text: str) -> list[tuple[str, dict[str, str]]]:
    """Split a pipeline into ``(pass name, {option: raw text})`` pairs, checking syntax."""
    items: list[tuple[str, dict[str, str]]] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t,":
            if text[i] == "," and (not items or text[:i].rstrip().endswith(",")):
                raise _fail(text, "empty pass name", i)
            i += 1
        if i >= n:
            break
        start = i
        while i < n and text[i] not in ",{} \t":
            i += 1
        name = text[start:i]
        if not name:
            raise _fail(text, f"unexpected {text[i]!r}", i)
        opts: dict[str, str] = {}
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] == "{":
            brace = i
            i += 1
            body_start = i
            depth = 0
            while i < n and not (text[i] == "}" and depth == 0):
                depth += {"[": 1, "]": -1}.get(text[i], 0)
                i += 1
            if i >= n:
                raise _fail(text, "unclosed '{'", brace)
            opts = _parse_options(text, text[body_start:i], body_start)
            i += 1
        elif i < n and text[i] == "}":
            raise _fail(text, "unmatched '}'", i)
        items.append((name, opts))
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] != ",":
            raise _fail(text, f"expected ',' between passes, found {text[i]!r}", i)
    return items


def _parse_options(text: str, body: str, offset: int) -> dict[str, str]:
    opts: dict[str, str] = {}
    parts, depth, cur, starts, s = [], 0, [], [], 0
    for j, c in enumerate(body):
        if c == "," and depth == 0:
            parts.append("".join(cur))
            starts.append(s)
            cur, s = [], j + 1
            continue
        depth += {"[": 1, "]": -1}.get(c, 0)
        cur.append(c)
    parts.append("".join(cur))
    starts.append(s)
    for part, st in zip(parts, starts):
        if not part.strip():
            raise _fail(text, "empty option", offset + st)
        if "=" not in part:
            raise _fail(text, f"option {part.strip()!r} needs a value (key=value)", offset + st)
        key, value = part.split("=", 1)
        key = key.strip()
        if not key:
            raise _fail(text, "option without a name", offset + st)
        if key in opts:
            raise _fail(text, f"option '{key}' given twice", offset + st)
        opts[key] = value.strip()
    return opts


def parse_pipeline(text: str) -> list[Pass]:
    """Parse a pipeline into configured pass instances (unknown names/options are errors)."""
    passes = []
    for name, opts in split_items(text):
        cls = get_pass(name)
        passes.append(cls(make_options(cls, opts)))
    if not passes:
        raise PipelineError(f"pipeline {text!r} names no pass")
    return passes
