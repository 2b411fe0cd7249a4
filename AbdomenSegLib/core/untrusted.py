"""Rules for what the engine did not write itself: JSON it reads, files it opens as input, text it prints.

- `load_json` / `loads_json`: every JSON the engine reads (model cards, catalogs, scheduler files, training
  configs, worker requests) goes through one bounded loader: at most MAX_JSON_BYTES and nested at most
  MAX_JSON_DEPTH deep, else `AbdomenSegError` (a card nested 100,000 deep raised RecursionError).
- `require_regular_file`: an input must be a regular file before it is opened; a FIFO blocks the opener
  forever (and kept the output's lock), a device or socket is no image either.
- `printable`: text from cards and file names has its control characters escaped before a terminal sees it
  (an escape sequence in a card title could rewrite the screen).
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any, Union

from AbdomenSegLib.core.errors import AbdomenSegError

MAX_JSON_BYTES = 16 * 1024 * 1024  # cards, catalogs, configs and requests are kilobytes
MAX_JSON_DEPTH = 64  # the deepest the engine writes is 5

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")
# C0 and C1 controls and DEL, which a terminal may act on (ESC starts a sequence); tab is kept.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def json_depth(text: str) -> int:
    """How deep objects and arrays nest in `text` (brackets inside strings do not count)."""
    depth = deepest = 0
    for match in _BRACKET.finditer(_STRING.sub("", text)):
        depth += 1 if match.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def loads_json(
    text: Union[str, bytes],
    what: str,
    fix: str,
    *,
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
) -> Any:
    """Parse `text` (described as `what` in the error, e.g. "model card 'x/card.json'") within the bounds."""
    if len(text) > max_bytes:
        raise AbdomenSegError(f"{what} is larger than {max_bytes:,} bytes", fix)
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise AbdomenSegError(f"{what} is not UTF-8 text ({exc.reason} at byte {exc.start})", fix) from None
    depth = json_depth(text)
    if depth > max_depth:
        raise AbdomenSegError(f"{what} nests {depth:,} levels deep, more than the {max_depth} allowed", fix)
    try:
        return json.loads(text)
    except ValueError as exc:  # JSONDecodeError, and numbers too long to convert
        raise AbdomenSegError(f"{what} is not valid JSON ({str(exc)[:200]})", fix) from None
    except RecursionError:  # cannot happen below max_depth; kept so that no input can crash the caller
        raise AbdomenSegError(f"{what} nests too deep", fix) from None


def load_json(
    path: Union[str, os.PathLike[str]],
    what: str,
    fix: str,
    *,
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
) -> Any:
    """Read and parse the JSON file `path` (a regular file, at most `max_bytes`); errors name it as `what`."""
    path = Path(path)
    label = f"{what} '{printable(str(path))}'"
    require_regular_file(path, what)  # its own fix: the content's fix does not apply to a FIFO or folder
    try:
        with open(path, "rb") as stream:
            data = stream.read(max_bytes + 1)
    except OSError as exc:
        raise AbdomenSegError(f"{label} cannot be read ({exc.strerror or exc})", fix) from None
    return loads_json(data, label, fix, max_bytes=max_bytes, max_depth=max_depth)


def require_regular_file(path: Union[str, os.PathLike[str]], what: str = "input", fix: str = "") -> None:
    """Refuse, without opening it, anything at `path` that is not a regular file (symlinks are followed)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise AbdomenSegError(
            f"{what} '{printable(str(path))}' does not exist", fix or "check the path and spelling"
        ) from None
    except OSError as exc:
        raise AbdomenSegError(f"{what} '{printable(str(path))}' cannot be read ({exc.strerror or exc})", fix) from None
    if not stat.S_ISREG(mode):
        raise AbdomenSegError(
            f"{what} '{printable(str(path))}' is {_kind(mode)}, not a regular file",
            fix or "give the path of a file",
        )


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a file"


def printable_lines(text: str) -> str:
    """`text` made `printable` line by line: its own line breaks stay, every other control character is escaped."""
    return "\n".join(printable(line) for line in text.split("\n"))


def printable(text: str) -> str:
    """`text` with every control character (escape sequences, carriage returns, newlines) shown as an escape:
    safe to print on one terminal line."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)
