"""JSON text that stays one line for every line splitter: SSE ``data:`` lines and JSONL results."""

from __future__ import annotations

import json
from typing import Any

# JSON leaves these three unescaped in strings, yet Python's ``str.splitlines`` — and with it
# httpx's ``iter_lines``, which hand-written SSE readers use — ends a line at each: a model that
# writes one would cut its event in two. Escaped, they read back as the same characters.
_SEPARATORS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def one_line(text: str) -> str:
    """``text``, JSON already, with the separators above escaped (they occur only inside strings)."""
    return text.translate(_SEPARATORS)


def dumps(data: Any) -> str:
    """Compact JSON, non-ASCII kept as UTF-8 but for the separators above."""
    return one_line(json.dumps(data, ensure_ascii=False, separators=(",", ":")))
