"""load_image / decode_base64: validated RGB pixels plus a hash, and a 400 for anything wrong."""

from __future__ import annotations

import base64
import hashlib
import io
import random

import pytest
from PIL import Image as PILImage

from localvl.errors import InvalidRequestError
from localvl.media.images import MAX_SIDE, decode_base64, load_image, sniff_media_type
from tests.helpers import image_b64, image_bytes

FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp"}
WHITE = (255, 255, 255)


def encode(picture: PILImage.Image, fmt: str = "PNG", **save) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **save)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_each_format_decodes_to_rgb_of_the_right_size(fmt):
    data = image_bytes(fmt, size=(64, 48))
    image = load_image(data, FORMATS[fmt], "img")
    assert image.pixels.mode == "RGB"
    assert image.size == (64, 48)
    assert image.media_type == FORMATS[fmt]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_sha256_is_of_the_encoded_bytes(fmt):
    data = image_bytes(fmt)
    assert load_image(data, None, "img").sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_media_type_may_be_omitted_and_is_sniffed(fmt):
    assert load_image(image_bytes(fmt), None, "img").media_type == FORMATS[fmt]


def test_pixels_are_decoded_not_just_sized():
    data = image_bytes("PNG", size=(10, 10), color=(200, 30, 30))
    assert load_image(data, "image/png", "img").pixels.getpixel((5, 1)) == (200, 30, 30)


def test_sniff_media_type_of_unknown_bytes_is_none():
    assert sniff_media_type(b"hello world, not an image") is None


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "fmt, declared",
    [("PNG", "image/jpeg"), ("JPEG", "image/png"), ("GIF", "image/webp"), ("WEBP", "image/gif")],
)
def test_declared_media_type_that_does_not_match_the_bytes_is_refused(fmt, declared):
    with pytest.raises(InvalidRequestError) as caught:
        load_image(image_bytes(fmt), declared, "messages.0.content.0.source")
    message = caught.value.message
    assert FORMATS[fmt] in message
    assert declared in message
    assert message.startswith("messages.0.content.0.source")


def test_bytes_that_are_not_an_image_are_refused():
    with pytest.raises(InvalidRequestError):
        load_image(b"%PDF-1.7 this is a pdf, not an image", None, "img")


def test_bmp_is_not_a_supported_image():
    with pytest.raises(InvalidRequestError):
        load_image(image_bytes("BMP"), None, "img")


def test_empty_bytes_are_refused():
    with pytest.raises(InvalidRequestError):
        load_image(b"", "image/png", "img")


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("keep", [0.5, 0.2])
def test_truncated_image_is_refused(fmt, keep):
    data = image_bytes(fmt, size=(64, 48))
    with pytest.raises(InvalidRequestError):
        load_image(data[: int(len(data) * keep)], FORMATS[fmt], "img")


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_magic_number_alone_is_refused(fmt):
    data = image_bytes(fmt)
    with pytest.raises(InvalidRequestError):
        load_image(data[:12], None, "img")


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_corrupt_images_only_ever_raise_invalid_request(fmt):
    rng = random.Random(f"corrupt-{fmt}")
    original = image_bytes(fmt)
    for _ in range(60):
        data = bytearray(original)
        for _ in range(rng.randint(1, 6)):
            at = rng.randrange(12, len(data))  # keep the magic number, so decoding is attempted
            if rng.random() < 0.5:
                data[at] = rng.randrange(256)
            else:
                del data[at : at + rng.randint(1, 8)]
        try:
            image = load_image(bytes(data), None, "img")
        except InvalidRequestError:
            continue
        assert image.pixels.mode == "RGB"  # a corruption the decoder tolerated


def test_image_wider_than_the_limit_is_refused():
    data = encode(PILImage.new("L", (MAX_SIDE + 1, 1)))
    with pytest.raises(InvalidRequestError) as caught:
        load_image(data, "image/png", "img")
    assert str(MAX_SIDE + 1) in caught.value.message


def test_image_taller_than_the_limit_is_refused():
    with pytest.raises(InvalidRequestError):
        load_image(encode(PILImage.new("L", (1, MAX_SIDE + 1))), "image/png", "img")


def test_image_exactly_at_the_limit_is_accepted():
    assert load_image(encode(PILImage.new("1", (MAX_SIDE, 1))), "image/png", "img").size[0] == MAX_SIDE  # widened: 8000:1


# ----------------------------------------------------------------------------- base64


def test_base64_round_trips():
    data = image_bytes("PNG")
    assert decode_base64(base64.b64encode(data).decode(), "img") == data


def test_base64_with_embedded_newlines_and_spaces_is_accepted():
    encoded = image_b64("PNG")
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76)) + "\r\n"
    assert decode_base64(" " + wrapped, "img") == base64.b64decode(encoded)


@pytest.mark.parametrize(
    "bad",
    ["not base64 at all!", "abc", "QUJD$RA==", "data:image/png;base64,iVBORw0KGgo=", "ÄÖÜ"],
    ids=["punctuation", "bad_padding", "bad_character", "data_url", "non_ascii"],
)
def test_invalid_base64_is_refused(bad):
    with pytest.raises(InvalidRequestError) as caught:
        decode_base64(bad, "messages.0.content.0.source.data")
    assert caught.value.message.startswith("messages.0.content.0.source.data")


# ----------------------------------------------------------------------------- conversions


def test_rgba_becomes_rgb_with_transparent_as_white():
    picture = PILImage.new("RGBA", (4, 4), (0, 0, 0, 0))
    picture.putpixel((1, 1), (10, 20, 30, 255))
    pixels = load_image(encode(picture), "image/png", "img").pixels
    assert pixels.mode == "RGB"
    assert pixels.getpixel((0, 0)) == WHITE
    assert pixels.getpixel((1, 1)) == (10, 20, 30)


def test_rgba_webp_becomes_rgb_with_transparent_as_white():
    picture = PILImage.new("RGBA", (4, 4), (0, 0, 0, 0))
    pixels = load_image(encode(picture, "WEBP", lossless=True), "image/webp", "img").pixels
    assert pixels.mode == "RGB"
    assert pixels.getpixel((0, 0)) == WHITE


def test_grayscale_with_alpha_becomes_rgb_with_transparent_as_white():
    picture = PILImage.new("LA", (4, 4), (0, 0))
    assert load_image(encode(picture), "image/png", "img").pixels.getpixel((0, 0)) == WHITE


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_becomes_rgb_with_transparent_as_white(fmt):
    picture = PILImage.new("P", (4, 4), 0)
    picture.putpalette([0, 0, 0, 40, 50, 60] + [0] * (256 * 3 - 6))
    picture.putpixel((2, 2), 1)
    pixels = load_image(encode(picture, fmt, transparency=0), FORMATS[fmt], "img").pixels
    assert pixels.mode == "RGB"
    assert pixels.getpixel((0, 0)) == WHITE
    assert pixels.getpixel((2, 2)) == (40, 50, 60)


def test_palette_without_transparency_keeps_its_colours():
    picture = PILImage.new("P", (4, 4), 1)
    picture.putpalette([0, 0, 0, 40, 50, 60] + [0] * (256 * 3 - 6))
    assert load_image(encode(picture), "image/png", "img").pixels.getpixel((0, 0)) == (40, 50, 60)


@pytest.mark.parametrize("mode, value", [("L", 77), ("1", 0), ("CMYK", (0, 0, 0, 255))])
def test_other_modes_become_rgb(mode, value):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    picture = PILImage.new(mode, (4, 4), value)
    pixels = load_image(encode(picture, fmt), FORMATS[fmt], "img").pixels
    assert pixels.mode == "RGB"
    assert pixels.size == (4, 4)


def test_rgb_png_with_transparent_colour_key_becomes_white():
    picture = PILImage.new("RGB", (4, 4), (0, 0, 0))
    pixels = load_image(encode(picture, transparency=(0, 0, 0)), "image/png", "img").pixels
    assert pixels.getpixel((0, 0)) == WHITE


def test_16_bit_grayscale_keeps_its_brightness():
    picture = PILImage.new("I;16", (4, 4), 32768)
    r, g, b = load_image(encode(picture), "image/png", "img").pixels.getpixel((0, 0))
    assert 120 <= r <= 136


def test_animated_gif_gives_its_first_frame():
    frames = [PILImage.new("RGB", (8, 6), colour) for colour in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert PILImage.open(io.BytesIO(data)).n_frames == 3  # the fixture really is animated
    pixels = load_image(data, "image/gif", "img").pixels
    assert pixels.mode == "RGB"
    assert pixels.size == (8, 6)
    red, green, blue = pixels.getpixel((3, 3))
    assert red > 200 and green < 50 and blue < 50


def test_exif_orientation_is_applied():
    picture = PILImage.new("RGB", (40, 20), (0, 0, 0))
    picture.paste((255, 255, 255), (0, 0, 10, 20))  # the left quarter is white
    exif = PILImage.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    data = encode(picture, "JPEG", exif=exif.tobytes(), quality=95)
    pixels = load_image(data, "image/jpeg", "img").pixels
    assert pixels.size == (20, 40)
    # rotated clockwise, the stored left edge ends up at the top
    assert pixels.getpixel((10, 2))[0] > 200
    assert pixels.getpixel((10, 37))[0] < 50


def test_request_limits_count_the_images_the_client_sent():
    from localvl.media.images import ImageLimits, check_images
    from tests.helpers import pdf_bytes

    limits = ImageLimits(max_images=3, max_bytes=10_000, max_side=300, many=2, max_side_many=100)
    small = [load_image(image_bytes("PNG", size=(90, 60)), "image/png", "x") for _ in range(2)]
    check_images(small, limits)
    with pytest.raises(InvalidRequestError, match="too many images: 4 > 3"):
        check_images(small * 2, limits)
    big = load_image(image_bytes("PNG", size=(250, 120)), "image/png", "x")
    check_images([big, small[0]], limits)  # two images: the 300 px side rule
    with pytest.raises(InvalidRequestError, match="image 1 is 250x120 px; at most 100x100 is allowed when a request has more than 2"):
        check_images([big, *small], limits)
    heavy = load_image(image_bytes("PNG", size=(299, 299), compress_level=0), "image/png", "x")
    with pytest.raises(InvalidRequestError, match="image 1 exceeds 10000 bytes maximum"):
        check_images([heavy], limits)
    from localvl.media.documents import pdf_parts

    pages = [p for p in pdf_parts(pdf_bytes(["a", "b", "c", "d"]), "doc") if not isinstance(p, str) and hasattr(p, "page")]
    check_images(pages, limits)  # document pages are not images the client sent


def test_a_decompression_bomb_is_refused_before_it_is_decoded(monkeypatch):
    bomb = io.BytesIO()
    PILImage.new("1", (20_000, 20_000)).save(bomb, "PNG")  # 400 megapixels in a few kilobytes
    data = bomb.getvalue()
    assert len(data) < 200_000

    def never(self, *args, **kwargs):
        raise AssertionError("the bomb was decoded")

    monkeypatch.setattr(PILImage.Image, "load", never)
    monkeypatch.setattr("PIL.PngImagePlugin.PngImageFile.load", never, raising=False)
    with pytest.raises(InvalidRequestError, match="20000x20000 px|too many pixels"):
        load_image(data, "image/png", "img")  # refused from its header


def test_a_requests_limits_refuse_an_image_from_its_header_before_decoding_it(monkeypatch):
    """Counted as their headers are read: the image past the count, or past the tighter side limit
    of a request with many images, is refused without a pixel decoded."""
    from localvl.media.images import ImageLimits, counting

    small, large = image_bytes("PNG", size=(40, 30)), image_bytes("PNG", size=(150, 20))
    limits = ImageLimits(max_images=3, max_side=8000, many=2, max_side_many=100)
    with counting(limits):
        load_image(large, "image/png", "a")
        load_image(small, "image/png", "b")

        def never(self, *args, **kwargs):
            raise AssertionError("decoded")

        with monkeypatch.context() as patched:
            patched.setattr(PILImage.Image, "load", never)
            patched.setattr("PIL.PngImagePlugin.PngImageFile.load", never, raising=False)
            with pytest.raises(InvalidRequestError, match="c: image is 150x20 px; at most 100x100 is allowed when a request has more than 2"):
                load_image(large, "image/png", "c")
            with pytest.raises(InvalidRequestError, match="too many images: 4 > 3 per request"):
                load_image(small, "image/png", "d")
    with counting(ImageLimits()):
        load_image(small, "image/png", "a fresh request counts from one")


def test_the_side_limit_is_the_setting_even_past_8000():
    from localvl.media.images import ImageLimits, counting

    wide = encode(PILImage.new("L", (10_000, 10)))
    with counting(ImageLimits(max_side=12_000)):
        assert load_image(wide, "image/png", "img").sent_size == (10_000, 10)
    with counting(ImageLimits(max_side=9_000)), pytest.raises(InvalidRequestError, match="at most 9000x9000"):
        load_image(wide, "image/png", "img")


def test_a_side_limit_error_names_the_size_sent_not_the_widened_one():
    from localvl.media.images import ImageLimits, check_images

    elongated = load_image(encode(PILImage.new("L", (2_001, 10))), "image/png", "x")
    assert elongated.size != (2_001, 10)  # widened on white to the processors' 200:1
    with pytest.raises(InvalidRequestError, match="image 1 is 2001x10 px"):
        check_images([elongated], ImageLimits(max_side=2_000))
