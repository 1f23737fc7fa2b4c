"""The A1111 ``parameters`` text: formatting, parsing back, and the PNG chunk itself."""

from __future__ import annotations

from PIL import Image

from speedsd.pngmeta import SAMPLER_NAMES, GenerationParams, parse_parameters, read_parameters, save_png
from speedsd.schedulers import SCHEDULERS


def test_a1111_format() -> None:
    p = GenerationParams("a red fox", "blurry", 20, "pndm", 7.5, 42, 512, 768, "sd-v1-4")
    assert p.to_text() == (
        "a red fox\nNegative prompt: blurry\n"
        "Steps: 20, Sampler: PNDM, CFG scale: 7.5, Seed: 42, Size: 512x768, Model: sd-v1-4"
    )


def test_no_negative_line_and_extra_fields() -> None:
    p = GenerationParams("owl", "", 4, "dpmpp_2m_karras", 7.0, 1, 64, 64, "m", {"Batch size": 2, "Batch pos": 1})
    assert p.to_text() == (
        "owl\nSteps: 4, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 64x64, Model: m, "
        "Batch size: 2, Batch pos: 1"
    )


def test_every_scheduler_has_an_a1111_name() -> None:
    assert set(SAMPLER_NAMES) == set(SCHEDULERS)


def test_round_trip_multiline_prompt() -> None:
    p = GenerationParams("line one\nline two", "bad\nworse", 5, "euler_a", 3.5, 7, 32, 48, "tiny, model")
    fields = parse_parameters(p.to_text())
    assert fields["prompt"] == "line one\nline two"
    assert fields["negative_prompt"] == "bad\nworse"
    assert fields["Sampler"] == "Euler a" and fields["Seed"] == "7" and fields["Size"] == "32x48"
    assert fields["Model"] == "tiny  model"  # a comma would split the field list


def test_png_chunk(tmp_path) -> None:
    img = Image.new("RGB", (8, 8), (10, 20, 30))
    text = GenerationParams("caf\u00e9 \u732b", "", 2, "ddim", 7.5, 3, 8, 8, "m").to_text()  # non-Latin-1: iTXt
    save_png(img, tmp_path / "a.png", text)
    assert read_parameters(tmp_path / "a.png") == text
    with Image.open(tmp_path / "a.png") as im:
        assert im.getpixel((0, 0)) == (10, 20, 30)
    plain = GenerationParams("plain", "", 2, "ddim", 7.5, 3, 8, 8, "m").to_text()
    save_png(img, tmp_path / "b.png", plain)
    assert b"tEXtparameters\x00plain\n" in (tmp_path / "b.png").read_bytes()
