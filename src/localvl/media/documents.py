"""PDF documents → what a vision-language model reads: each page as an image, plus its text layer.

A scanned page has no text layer and a digital one may hold text its picture renders too small to
read, so both go in: ``Page N:``, the page rendered with pypdfium2 at up to 150 DPI within a pixel
budget per page (the model's own limit, and ``page_pixels``), then the page's text. Each page image
is keyed by the PDF's hash and the page number, so the same PDF sent again hits the image cache and
the prefix cache.

PDFium is not thread-safe (pypdfium2 says so) and its last error is process-wide, so one lock
serialises every use of it: two PDFs converted at once on the server's worker threads could crash
the process, and a failed load reported whatever error the previous document had left behind
(an empty PDF was called "encrypted" after someone else's password-protected one). Messages
therefore never quote PDFium.
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass
from typing import Any

from localvl.conversation import Image, Text
from localvl.errors import InvalidRequestError
from localvl.media.images import within_aspect

DPI = 150
_PDFIUM = threading.Lock()


@dataclass(frozen=True)
class PdfOptions:
    max_bytes: int = 32 * 1024 * 1024
    max_pages: int = 600
    page_pixels: int = 1280 * 1280  # the most pixels a page is rendered with


def pdf_parts(data: bytes, where: str, options: PdfOptions | None = None) -> list[Text | Image]:
    """The pages of a PDF as text and images; a 400 naming ``where`` for anything unreadable."""
    import pypdfium2 as pdfium

    if options is None:
        from localvl.media.context import MEDIA

        options = MEDIA.get().pdf
    if len(data) > options.max_bytes:
        raise InvalidRequestError(f"{where}: the PDF is {len(data)} bytes; at most {options.max_bytes} are accepted")
    if not data.lstrip()[:5] == b"%PDF-":
        raise InvalidRequestError(f"{where}: the data is not a PDF")
    with _PDFIUM:
        return _pages(pdfium, data, where, options)


def _pages(pdfium: Any, data: bytes, where: str, options: PdfOptions) -> list[Text | Image]:
    try:
        document = pdfium.PdfDocument(data)
    except pdfium.PdfiumError:
        if b"/Encrypt" in data:
            raise InvalidRequestError(f"{where}: the PDF is encrypted; send it without a password") from None
        raise InvalidRequestError(f"{where}: the PDF could not be read: it is damaged or has no pages") from None
    digest = hashlib.sha256(data).hexdigest()
    try:
        pages = len(document)
        if pages == 0:
            raise InvalidRequestError(f"{where}: the PDF has no pages")
        if pages > options.max_pages:
            raise InvalidRequestError(f"{where}: the PDF has {pages} pages; at most {options.max_pages} are accepted")
        parts: list[Text | Image] = []
        for index in range(pages):
            try:  # a page tree that promises more pages than it holds fails here
                page = document[index]
            except pdfium.PdfiumError:
                raise InvalidRequestError(f"{where}: page {index + 1} of the PDF could not be read") from None
            try:
                width, height = page.get_size()  # points, 1/72 inch
                scale = min(DPI / 72, math.sqrt(options.page_pixels / max(width * height, 1.0)))
                while math.ceil(width * scale) * math.ceil(height * scale) > options.page_pixels:
                    scale *= 0.995  # the renderer rounds sizes up
                picture = within_aspect(page.render(scale=scale).to_pil().convert("RGB"))
                textpage = page.get_textpage()
                text = textpage.get_text_bounded().replace("\r\n", "\n").strip()
                textpage.close()
            except pdfium.PdfiumError:
                raise InvalidRequestError(f"{where}: page {index + 1} of the PDF could not be rendered") from None
            finally:
                page.close()
            parts.append(Text(f"Page {index + 1}:\n"))
            key = f"{digest}#page{index + 1}@{scale:.4f}"
            parts.append(Image(pixels=picture, media_type="image/png", sha256=key, page=True))
            if text:
                parts.append(Text(text + "\n"))
        return parts
    finally:
        document.close()
