"""The Files API through the official SDK: upload, list, retrieve, download, delete, and use by id."""

from __future__ import annotations

import base64
from pathlib import Path

import anthropic
import pytest

from tests.helpers import image_bytes, pdf_bytes

PNG = image_bytes("PNG", size=(120, 80))
PDF = pdf_bytes(["Invoice 4711: total 99 EUR"])


def test_upload_list_retrieve_download_delete(client):
    uploaded = [client.beta.files.upload(file=(f"f{i}.png", PNG, "image/png")) for i in range(3)]
    first = uploaded[0]
    assert first.id.startswith("file_") and first.type == "file" and first.filename == "f0.png"
    assert first.mime_type == "image/png" and first.size_bytes == len(PNG) and first.created_at is not None
    page = client.beta.files.list(limit=2)
    ids = [f.id for f in page.data]
    assert ids == [uploaded[2].id, uploaded[1].id] and page.has_next_page()  # newest first
    rest = page.get_next_page()
    assert [f.id for f in rest.data][:1] == [uploaded[0].id]
    assert {f.id for f in client.beta.files.list(limit=1)} >= {u.id for u in uploaded}  # the SDK pages through all
    chosen = client.beta.files.list(ids=[uploaded[0].id, uploaded[2].id])
    assert {f.id for f in chosen.data} == {uploaded[0].id, uploaded[2].id} and chosen.next_page is None
    short = client.beta.files.upload(file=("brief.png", PNG, "image/png"), expires_in_seconds=3600)
    assert short.expires_at is not None and (short.expires_at - short.created_at).total_seconds() == pytest.approx(3600, abs=2)
    assert client.beta.files.retrieve_metadata(first.id).size_bytes == len(PNG)
    assert client.beta.files.download(first.id).read() == PNG
    assert client.beta.files.delete(first.id).type == "file_deleted"
    with pytest.raises(anthropic.NotFoundError):
        client.beta.files.retrieve_metadata(first.id)


def test_a_file_id_reads_as_the_same_image_or_document_inline(client):
    picture = client.beta.files.upload(file=("invoice.png", PNG, "image/png"))
    document = client.beta.files.upload(file=("invoice.pdf", PDF, "application/pdf"))

    def count(image_source: dict, document_source: dict) -> int:
        content = [{"type": "image", "source": image_source}, {"type": "document", "source": document_source},
                   {"type": "text", "text": "Total?"}]
        return client.beta.messages.count_tokens(model="tiny-vl", messages=[{"role": "user", "content": content}],
                                                 betas=["files-api-2025-04-14"]).input_tokens

    by_id = count({"type": "file", "file_id": picture.id}, {"type": "file", "file_id": document.id})
    inline = count({"type": "base64", "media_type": "image/png", "data": base64.b64encode(PNG).decode()},
                   {"type": "base64", "media_type": "application/pdf", "data": base64.b64encode(PDF).decode()})
    assert by_id == inline
    in_document = [{"type": "document", "source": {"type": "content", "content": [{"type": "image", "source": source}]}}
                   for source in ({"type": "file", "file_id": picture.id},
                                  {"type": "base64", "media_type": "image/png", "data": base64.b64encode(PNG).decode()})]
    counts = [client.beta.messages.count_tokens(model="tiny-vl", messages=[{"role": "user", "content": [document]}],
                                                betas=["files-api-2025-04-14"]).input_tokens for document in in_document]
    assert counts[0] == counts[1]
    message = client.beta.messages.create(model="tiny-vl", max_tokens=4, betas=["files-api-2025-04-14"], messages=[
        {"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": picture.id}}]}])
    assert message.type == "message"
    with pytest.raises(anthropic.BadRequestError, match="file not found"):
        client.beta.messages.create(model="tiny-vl", max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "file_011nope"}}]}])


def test_an_expiry_past_any_date_or_not_a_number_is_a_400_and_keeps_nothing(client):
    before = {f.id for f in client.beta.files.list(limit=1000)}
    for expires in (10**17, "nan", "inf", 0, "soon"):
        with pytest.raises(anthropic.BadRequestError, match="expires_in_seconds"):
            client.beta.files.upload(file=("x.png", PNG, "image/png"), expires_in_seconds=expires)
    assert {f.id for f in client.beta.files.list(limit=1000)} == before


@pytest.mark.parametrize("content", [PNG, PDF, "héllo, 世界\n".encode(), bytes(range(256))], ids=["png", "pdf", "utf8", "every-byte"])
def test_bare_bytes_and_unnamed_streams_upload_byte_for_byte(client, content):
    """The SDK sends bytes and unnamed streams as a part without a filename (a plain form field)."""
    import io

    for file in (content, io.BytesIO(content)):
        uploaded = client.beta.files.upload(file=file)
        assert uploaded.filename == "upload" and uploaded.size_bytes == len(content)
        assert client.beta.files.download(uploaded.id).read() == content
    sniffed = {PNG: "image/png", PDF: "application/pdf"}.get(content)
    if sniffed:
        assert uploaded.mime_type == sniffed


def test_a_unicode_filename_keeps_its_characters(client):
    uploaded = client.beta.files.upload(file=("rechnung-größe-发票.png", PNG, "image/png"))
    assert uploaded.filename == "rechnung-größe-发票.png"


def test_a_file_whose_bytes_are_gone_is_a_404_not_a_500(client, server):
    uploaded = client.beta.files.upload(file=("gone.png", PNG, "image/png"))
    (Path(server.log_path.parent) / f"data-{server.port}" / "files" / uploaded.id).unlink()  # a disk lost, say
    with pytest.raises(anthropic.NotFoundError, match="file not found"):
        client.beta.files.download(uploaded.id)


def test_two_servers_on_one_postgresql_share_files(model_dir, tmp_path):
    from tests.e2e.conftest import API_KEY, Server
    from tests.store.conftest import POSTGRES, drop_postgres_database, fresh_postgres_database

    if not POSTGRES:
        pytest.skip("no PostgreSQL server (set LOCALVL_TEST_POSTGRES_URL; .ci/run starts one)")
    url, name = fresh_postgres_database()
    servers = []
    try:
        for k in range(2):  # each its own data directory, as on two machines
            servers.append(Server(model_dir("qwen2_vl"), tmp_path / f"files{k}.log", "--database-url", url))
        a, b = (anthropic.Anthropic(base_url=s.url, api_key=API_KEY, max_retries=0) for s in servers)
        content = bytes(range(256)) * 5000  # more than one piece of a mebibyte
        uploaded = a.beta.files.upload(file=("data.bin", content, "application/octet-stream"))
        picture = a.beta.files.upload(file=("p.png", PNG, "image/png"))
        assert b.beta.files.download(uploaded.id).read() == content
        message = b.beta.messages.create(model="tiny-vl", max_tokens=2, betas=["files-api-2025-04-14"], messages=[
            {"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": picture.id}}]}])
        assert message.usage.input_tokens > 0
        assert [f.id for f in b.beta.files.list()] == [picture.id, uploaded.id]
        b.beta.files.delete(uploaded.id)
        with pytest.raises(anthropic.NotFoundError):
            a.beta.files.download(uploaded.id)
    finally:
        for server in servers:
            server.stop()
        drop_postgres_database(name)
