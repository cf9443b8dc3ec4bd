"""The byte-level BPE alphabet (GPT-2's), which Qwen's tokenizers use: each byte has a printable stand-in."""

from __future__ import annotations


def bytes_to_unicode() -> dict[int, str]:
    """Byte → the printable character that stands for it in vocabulary entries (a bijection)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}
