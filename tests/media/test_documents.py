"""PDFs become pages: an image of each page and its text layer, within the limits."""

import numpy as np
import pytest

from localvl.conversation import Image, Text
from localvl.errors import InvalidRequestError
from localvl.media.documents import PdfOptions, pdf_parts
from tests.helpers import pdf_bytes


def test_each_page_is_its_picture_and_its_text():
    parts = pdf_parts(pdf_bytes(["Invoice 4711 total 99 EUR", "Page two says thanks"]), "doc")
    assert [type(p) for p in parts] == [Text, Image, Text, Text, Image, Text]
    assert parts[0].text == "Page 1:\n" and "Invoice 4711 total 99 EUR" in parts[2].text
    assert parts[3].text == "Page 2:\n" and "Page two says thanks" in parts[5].text
    page = parts[1].pixels
    # US letter at 150 DPI would be 1275 x 1650: the 1280 x 1280 pixel budget holds it to just under that
    assert 0.97 * 1280 * 1280 < page.width * page.height <= 1280 * 1280
    assert abs(page.width / page.height - 612 / 792) < 0.01
    blue = np.asarray(page)[..., 2] > 200
    assert (np.asarray(page)[..., 0] < 50)[blue].any()  # the drawn box is there
    assert parts[1].sha256 != parts[4].sha256 and parts[1].sha256 == pdf_parts(pdf_bytes(["Invoice 4711 total 99 EUR", "Page two says thanks"]), "d")[1].sha256


def test_the_pixel_budget_bounds_the_rendering():
    parts = pdf_parts(pdf_bytes(["x"]), "doc", PdfOptions(page_pixels=200_000))
    assert parts[1].pixels.width * parts[1].pixels.height <= 200_000


# A page tree that counts two pages and holds one: PDFium opens it, then fails on page 2.
BROKEN_PAGE_TREE = (
    b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\n"
    b"2 0 obj\n<< /Type /Pages /Kids [3 0 R] /Count 2 >>\nendobj\n"
    b"3 0 obj\n<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>\nendobj\n"
    b"trailer\n<< /Root 1 0 R >>\n%%EOF\n"
)


@pytest.mark.parametrize(
    "data, options, message",
    [
        (b"not a pdf at all", PdfOptions(), "not a PDF"),
        (b"%PDF-1.4\ngarbage", PdfOptions(), "could not be read"),
        (pdf_bytes(["a", "b", "c"]), PdfOptions(max_pages=2), "3 pages; at most 2"),
        (pdf_bytes(["a"]), PdfOptions(max_bytes=100), "at most 100 are accepted"),
        (BROKEN_PAGE_TREE, PdfOptions(), "page 2 of the PDF could not be read"),
    ],
    ids=["not-pdf", "corrupt", "too-many-pages", "too-large", "page-tree-promising-more"],
)
def test_what_cannot_be_read_is_a_400_that_says_why(data, options, message):
    with pytest.raises(InvalidRequestError, match=message):
        pdf_parts(data, "messages.0.content.0.source", options)


def test_an_encrypted_pdf_is_refused_as_such(tmp_path):
    pytest.importorskip("pypdfium2")
    encrypted = _encrypted_pdf()
    if encrypted is None:
        pytest.skip("no way to make an encrypted PDF here")
    with pytest.raises(InvalidRequestError, match="encrypted"):
        pdf_parts(encrypted, "doc")


def test_an_empty_pdf_is_not_blamed_for_the_document_before_it():
    # PDFium's last error is process-wide: it used to call an empty PDF "encrypted" after an encrypted one
    import io

    import pypdfium2

    empty = io.BytesIO()
    pypdfium2.PdfDocument.new().save(empty)
    encrypted = _encrypted_pdf()
    for earlier in ([encrypted] if encrypted is not None else []) + [b"%PDF-1.4\ngarbage"]:
        with pytest.raises(InvalidRequestError):
            pdf_parts(earlier, "earlier")
        with pytest.raises(InvalidRequestError) as caught:
            pdf_parts(empty.getvalue(), "doc")
        assert caught.value.message == "doc: the PDF could not be read: it is damaged or has no pages"


def test_pdfs_converted_on_many_threads_at_once_all_come_out_whole():
    from concurrent.futures import ThreadPoolExecutor

    documents = [pdf_bytes([f"page {i}-{j}" for j in range(3)]) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda data: pdf_parts(data, "doc"), documents * 3))
    for i, parts in enumerate(results):
        texts = "".join(p.text for p in parts if isinstance(p, Text))
        assert all(f"page {i % 8}-{j}" in texts for j in range(3))


def _encrypted_pdf() -> bytes | None:
    # A standard-security-handler PDF (RC4 40-bit, user password "secret"), built by hand.
    import hashlib

    padding = bytes.fromhex("28BF4E5E4E758A4164004E56FFFA01082E2E00B6D0683E802F0CA9FE6453697A")
    user, owner = b"secret", b"owner"
    o_key = hashlib.md5((owner + padding)[:32]).digest()[:5]
    o_value = _rc4(o_key, (user + padding)[:32])
    permissions = -4
    file_id = b"0123456789abcdef"
    key = hashlib.md5((user + padding)[:32] + o_value + permissions.to_bytes(4, "little", signed=True) + file_id).digest()[:5]
    u_value = _rc4(key, padding)
    body = pdf_bytes(["hidden"]).split(b"trailer")[0]
    xref_at = body.rindex(b"xref")
    encrypt = b"<< /Filter /Standard /V 1 /R 2 /O <%s> /U <%s> /P %d >>" % (o_value.hex().encode(), u_value.hex().encode(), permissions)
    head = body[:xref_at]
    number = head.count(b" 0 obj") + 1
    offset = len(head)
    head += b"%d 0 obj\n" % number + encrypt + b"\nendobj\n"
    xref = len(head)
    trailer = (b"xref\n0 1\n0000000000 65535 f \n%d 1\n%010d 00000 n \ntrailer\n<< /Size %d /Root 1 0 R /Encrypt %d 0 R "
               b"/ID [<%s> <%s>] >>\nstartxref\n%d\n%%%%EOF\n") % (number, offset, number + 1, number, file_id.hex().encode(),
                                                                   file_id.hex().encode(), xref)
    return head + trailer


def _rc4(key: bytes, data: bytes) -> bytes:
    s, j = list(range(256)), 0
    for i in range(256):
        j = (j + s[i] + key[i % len(key)]) % 256
        s[i], s[j] = s[j], s[i]
    out, i, j = bytearray(), 0, 0
    for byte in data:
        i = (i + 1) % 256
        j = (j + s[i]) % 256
        s[i], s[j] = s[j], s[i]
        out.append(byte ^ s[(s[i] + s[j]) % 256])
    return bytes(out)
