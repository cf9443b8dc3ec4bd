"""Small helpers shared by tests."""

from __future__ import annotations

import base64
import io


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (64, 48), color=(200, 30, 30), **save) -> bytes:
    from PIL import Image

    mode = "RGBA" if fmt in ("PNG", "WEBP") and len(color) == 4 else "RGB"
    picture = Image.new(mode, size, color)
    # a little structure, so encoders do not produce degenerate files
    for x in range(0, size[0], 7):
        picture.putpixel((x, x % size[1]), (0, 0, 0) if mode == "RGB" else (0, 0, 0, 255))
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def image_b64(fmt: str = "PNG", **kwargs) -> str:
    return base64.b64encode(image_bytes(fmt, **kwargs)).decode()


def prompt_tokens(usage) -> int:
    """All prompt tokens of an Anthropic usage (SDK object or dict): uncached + cache writes + cache reads."""
    get = usage.get if isinstance(usage, dict) else lambda name: getattr(usage, name)
    return get("input_tokens") + (get("cache_creation_input_tokens") or 0) + (get("cache_read_input_tokens") or 0)
