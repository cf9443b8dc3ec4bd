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


def pdf_bytes(pages: list[str], drawing: bool = True) -> bytes:
    """A small real PDF: one page per string (its text layer, in Helvetica) and a drawn blue box."""
    objects: list[bytes] = []
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(len(pages)))
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode())
    font = 3 + 2 * len(pages)
    for i, text in enumerate(pages):
        escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream = (f"BT /F1 18 Tf 72 700 Td ({escaped}) Tj ET" + (" 0 0 1 rg 72 400 200 120 re f" if drawing else "")).encode()
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {4 + 2 * i} 0 R "
                       f"/Resources << /Font << /F1 {font} 0 R >> >> >>".encode())
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref))
    return out.getvalue()


def static_server(routes: dict[str, tuple[int, dict[str, str], bytes]]):
    """A local HTTP server answering GET ``path`` with ``(status, headers, body)`` (404 otherwise),
    as a context manager that yields its base URL."""
    import contextlib
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            status, headers, body = routes.get(self.path.split("?")[0], (404, {}, b""))
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    @contextlib.contextmanager
    def running():
        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()

    return running()
