"""Text a host wrote, made safe to show to a person: on a terminal, a page or in JSON.

A host controls its state messages, its log names and their contents. Shown as they are, an ESC
starts an escape sequence (clear the screen, set the title, move the cursor over earlier lines);
C1 controls do the same on terminals that read them 8-bit (U+009B is CSI); a carriage return or
backspace rewrites what was printed; a bidi override (U+202E) makes text read otherwise than it
is. `safe` shows each such character escaped, Python style (`\\x1b`, `\\u202e`), and keeps every
other character as it is. It is the one place that decides what is unsafe: every admin surface
(status, trigger, logs, the page) shows host text through it, and rich markup never sees it as
markup (callers wrap it in `rich.text.Text`).
"""

import re
from typing import Final

# C0 and C1 controls, DEL, the bidi embeddings, overrides, isolates and marks, the Unicode line
# and paragraph separators, and lone surrogates (the undecodable bytes of a file name).
_CONTROLS: Final = "\x00-\x1f\x7f-\x9f"
_BIDI: Final = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_BREAKS: Final = "\u2028\u2029"
_SURROGATES: Final = "\ud800-\udfff"
_ONE_LINE: Final = re.compile(f"[{_CONTROLS}{_BIDI}{_BREAKS}{_SURROGATES}]")
_LINES: Final = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{_BIDI}{_BREAKS}{_SURROGATES}]")
# What JSON text may still hold raw after an encoder escaped C0, quotes and backslashes.
_JSON: Final = re.compile(f"[\x7f-\x9f{_BIDI}{_BREAKS}]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # a byte that did not decode (surrogateescape): show the byte
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(text: str, *, lines: bool = False) -> str:
    """`text` with every unsafe character shown escaped; with `lines`, newline and tab are kept
    (a log's contents), else they are escaped too (one table cell, one name)."""
    return (_LINES if lines else _ONE_LINE).sub(_escaped, text)


def safe_json(data: bytes) -> bytes:
    """UTF-8 JSON text with DEL, C1 controls, bidi controls and line separators written as
    `\\uXXXX` escapes: the same data for a JSON reader, nothing raw for a terminal."""
    return _JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", data.decode()).encode()
