"""What converting a request's media needs beyond the request: the bytes fetched for its URLs, and
the limits. Dialect converters run in worker threads and read it from ``MEDIA``, which
``converting`` sets for the duration of one conversion."""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator, Mapping

from localvl.media.documents import PdfOptions
from localvl.media.images import ImageLimits, counting


@dataclass(frozen=True)
class Media:
    fetched: Mapping[str, bytes] = field(default_factory=dict)  # URL -> bytes, fetched beforehand
    pdf: PdfOptions = field(default_factory=PdfOptions)
    images: ImageLimits = field(default_factory=ImageLimits)


MEDIA: ContextVar[Media] = ContextVar("MEDIA", default=Media())


@contextlib.contextmanager
def converting(media: Media | None) -> Iterator[Media]:
    token = MEDIA.set(media or Media())
    try:
        with counting(MEDIA.get().images):
            yield MEDIA.get()
    finally:
        MEDIA.reset(token)
