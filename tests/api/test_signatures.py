import pytest

from localvl.api.signatures import ThinkingSigner


def test_a_signature_holds_only_for_its_thinking():
    signer = ThinkingSigner(b"k" * 32)
    signature = signer.sign("because 2 + 2 = 4")
    assert signer.recover("because 2 + 2 = 4", signature) == "because 2 + 2 = 4"
    assert signer.recover("because 2 + 2 = 5", signature) is None
    assert ThinkingSigner(b"x" * 32).recover("because 2 + 2 = 4", signature) is None
    for bad in ("", None, "not base64!", signature[:-4]):
        assert signer.recover("because 2 + 2 = 4", bad) is None


def test_an_embedded_signature_carries_its_thinking_for_display_omitted():
    signer = ThinkingSigner(b"k" * 32)
    signature = signer.sign("想一想 " * 50, embed=True)
    assert signer.recover("", signature) == "想一想 " * 50  # the client saw an empty block
    assert signer.recover("想一想 " * 50, signature) == "想一想 " * 50
    assert signer.recover("something else", signature) is None
    forged = signature.replace(signature.split(".")[1], ThinkingSigner(b"k" * 32).sign("x", embed=True).split(".")[1])
    assert signer.recover("", forged) is None


def test_the_key_is_kept_across_restarts(tmp_path):
    a = ThinkingSigner.from_settings(None, tmp_path)
    b = ThinkingSigner.from_settings(None, tmp_path)
    assert b.recover("t", a.sign("t")) == "t"
    assert (tmp_path / "thinking.key").stat().st_mode & 0o777 == 0o600
    with pytest.raises(ValueError):
        ThinkingSigner(b"short")


def test_a_forged_embedded_signature_is_not_unpacked_past_a_cap():
    # Its MAC is checked after unpacking: 200 KB of compressed zeros must not become 200 MiB.
    import base64
    import tracemalloc
    import zlib

    signer = ThinkingSigner(b"k" * 32)
    bomb = base64.b64encode(zlib.compress(b"a" * (200 << 20), 9)).decode()
    mac = base64.b64encode(b"x" * 32).decode()
    tracemalloc.start()
    try:
        assert signer.recover("", f"lvl1.{bomb}.{mac}") is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20
    cut = signer.sign("think", embed=True)
    packed, mac = cut[len("lvl1."):].split(".")
    truncated = base64.b64encode(base64.b64decode(packed)[:-3]).decode()
    assert signer.recover("", f"lvl1.{truncated}.{mac}") is None
