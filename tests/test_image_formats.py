"""Images as users have them: every common mode and format trains, equal to the HF image processor.

Each file is written on the spot with PIL into a LLaMA-Factory style folder (``mllm_demo.json``,
image paths relative to it) and loaded through ``ConversationDataset``. The reference is
transformers' PIL image processor (``Qwen2VLImageProcessorPil``: in transformers 5 the plain
``Qwen2VLImageProcessor`` is the torchvision one, which is not installable here) fed the image
the way a transformers user would: ``Image.open(path)`` with ``do_convert_rgb=True``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageOps

from openspeed.data.conversation import ConversationDataset, load_image
from openspeed.data.processor import VLProcessor
from openspeed.data.shapes import write_tiny_model_dir
from openspeed.errors import BadSampleError
from openspeed.tasks.samples import usable_samples

W, H = 60, 40  # most test images; wider than tall so a rotation shows in the grid
ORIENTATIONS = range(2, 9)
# What each EXIF orientation asks a viewer to do to the stored pixels (rows, columns, channels).
ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}
# Files whose left half is fully transparent (alpha 0, palette index or colour key).
TRANSPARENT_LEFT = (
    "rgba.png", "gray_alpha.png", "palette_transparent.png", "palette_transparent.gif",
    "colour_key.png", "rgba.webp",
)  # fmt: skip


def _noise(seed: int, channels: int, size=(W, H)) -> np.ndarray:
    shape = (size[1], size[0], channels) if channels > 1 else (size[1], size[0])
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _smooth(size=(W, H)) -> np.ndarray:
    """A gradient that survives JPEG nearly unchanged and looks different under every flip."""
    x = np.linspace(0, 255, size[0])[None, :]
    y = np.linspace(0, 255, size[1])[:, None]
    r, g = np.broadcast_to(x, (size[1], size[0])), np.broadcast_to(y, (size[1], size[0]))
    return np.stack([r, g, np.full_like(r, 128)], axis=-1).astype(np.uint8)


def _left_transparent(arr: np.ndarray) -> np.ndarray:
    arr = arr.copy()
    arr[:, : arr.shape[1] // 2, -1] = 0
    arr[:, arr.shape[1] // 2 :, -1] = 128  # half-transparent: blended with white
    return arr


def _palette_image() -> Image.Image:
    """Palette image with index 0 on the left half; index 0 is the transparent one where asked."""
    idx = (np.arange(W * H).reshape(H, W) % 15 + 1).astype(np.uint8)
    idx[:, : W // 2] = 0
    im = Image.fromarray(idx, "P")
    im.putpalette(_noise(11, 1, (48, 1)).ravel().tolist())
    return im


def _write_good_files(img: Path) -> dict[str, str]:
    """Every file that must train, name -> the mode PIL opens it in (checked by the tests)."""
    Image.fromarray(_smooth()).save(img / "photo.jpg", quality=90)
    Image.fromarray(_noise(1, 3)).save(img / "photo.bmp")
    Image.fromarray(_noise(2, 1)).save(img / "gray.png")
    Image.fromarray(_left_transparent(_noise(3, 2)), "LA").save(img / "gray_alpha.png")
    wide = np.random.default_rng(4).integers(0, 65536, size=(H, W)).astype(np.uint16)
    Image.fromarray(wide).save(img / "gray16.png")  # 16-bit PNG: mode I;16
    Image.fromarray(wide.astype(np.int32) - 300).save(img / "gray32.tif")  # mode I
    Image.fromarray(np.linspace(-20.0, 300.0, W * H, dtype=np.float32).reshape(H, W)).save(img / "float.tif")
    Image.fromarray(_noise(5, 4), "CMYK").save(img / "cmyk.jpg", quality=95)
    _palette_image().save(img / "palette.png")
    _palette_image().save(img / "palette_transparent.png", transparency=0)
    _palette_image().save(img / "palette.gif")
    _palette_image().save(img / "palette_transparent.gif", transparency=0)
    Image.fromarray(_left_transparent(_noise(6, 4)), "RGBA").save(img / "rgba.png")
    Image.fromarray(_left_transparent(_noise(7, 4)), "RGBA").save(img / "rgba.webp", lossless=True)
    key = _noise(8, 3)
    key[:, : W // 2] = (7, 7, 7)
    Image.fromarray(key).save(img / "colour_key.png", transparency=(7, 7, 7))  # RGB with a tRNS chunk
    frames = [Image.new("RGB", (W, H), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(img / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    for k in ORIENTATIONS:
        exif = Image.Exif()
        exif[0x0112] = k  # Orientation
        Image.fromarray(_smooth()).save(img / f"exif_{k}.jpg", quality=95, subsampling=0, exif=exif)
    Image.new("RGB", (1, 1), (200, 30, 90)).save(img / "dot_1x1.png")
    Image.fromarray(_noise(9, 3, (1, 200))).save(img / "sliver_1x200.png")  # aspect ratio 200: allowed
    huge = Image.new("RGB", (8000, 8000), (30, 120, 200))
    ImageDraw.Draw(huge).rectangle((1000, 2000, 5000, 3000), fill=(250, 10, 10))
    huge.save(img / "huge_8000.png", compress_level=1)  # a few hundred KB
    modes = {"photo.jpg": "RGB", "photo.bmp": "RGB", "gray.png": "L", "gray_alpha.png": "LA",
             "gray16.png": "I;16", "gray32.tif": "I", "float.tif": "F", "cmyk.jpg": "CMYK",
             "palette.png": "P", "palette_transparent.png": "P", "palette.gif": "P",
             "palette_transparent.gif": "P", "rgba.png": "RGBA", "rgba.webp": "RGBA",
             "colour_key.png": "RGB", "animated.gif": "P", "dot_1x1.png": "RGB",
             "sliver_1x200.png": "RGB", "huge_8000.png": "RGB"}  # fmt: skip
    modes.update({f"exif_{k}.jpg": "RGB" for k in ORIENTATIONS})
    return modes


def _write_bad_files(img: Path) -> dict[str, str]:
    """Every file that must be skipped, name -> the reason it is counted under."""
    Image.fromarray(_noise(10, 3, (1, 201))).save(img / "panorama_1x201.png")  # aspect ratio > 200
    jpeg = (img / "photo.jpg").read_bytes()
    (img / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    png = (img / "gray.png").read_bytes()
    (img / "truncated.png").write_bytes(png[: len(png) // 2])
    (img / "empty.jpg").write_bytes(b"")
    (img / "notes.png").write_text("these are my notes, not a picture\n")
    return {
        "panorama_1x201.png": "corrupt_media",
        "truncated.jpg": "corrupt_media",
        "truncated.png": "corrupt_media",
        "empty.jpg": "corrupt_media",
        "notes.png": "corrupt_media",
        "missing.jpg": "missing_file",
    }


def _record(k: int, name: str) -> dict:
    """LLaMA-Factory's mllm_demo record, alternating the messages and ShareGPT spellings."""
    if k % 2 == 0:
        return {
            "messages": [
                {"role": "user", "content": "<image>What is in the picture?"},
                {"role": "assistant", "content": f"the file {name}"},
            ],
            "images": [f"mllm_demo_data/{name}"],
        }
    return {
        "conversations": [
            {"from": "human", "value": "<image>What is in the picture?"},
            {"from": "gpt", "value": f"the file {name}"},
        ],
        "images": [f"mllm_demo_data/{name}"],
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("user_data")
    model_dir = write_tiny_model_dir(root / "model", ["What is in the picture?", "the file"])
    img = root / "mllm_demo_data"
    img.mkdir()
    good = _write_good_files(img)
    bad = _write_bad_files(img)
    names = [*good, *bad]
    (root / "mllm_demo.json").write_text(json.dumps([_record(k, n) for k, n in enumerate(names)], indent=1))
    proc = VLProcessor.from_pretrained(model_dir)
    dataset = ConversationDataset(root / "mllm_demo.json", proc, max_seq_len=1024)
    index = {n: k for k, n in enumerate(names)}
    return {"img": img, "proc": proc, "ds": dataset, "good": good, "bad": bad, "index": index}


def _reference(proc: VLProcessor, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    out = proc.image_processor(images=[image], return_tensors="pt", do_convert_rgb=True)
    return out["pixel_values"].float(), out["image_grid_thw"].long()


def test_every_good_image_trains_with_the_image_processors_values(folder):
    proc, ds = folder["proc"], folder["ds"]
    grids = {}
    for name, mode in folder["good"].items():
        path = folder["img"] / name
        with Image.open(path) as im:
            assert im.mode == mode, (name, im.mode)  # the file really is of the kind it stands for
            # transformers' processor does not read the EXIF orientation (its load_image does): the
            # reference is the processor on the image a viewer shows.
            pv_ref, grid_ref = _reference(
                proc, ImageOps.exif_transpose(im) if name.startswith("exif") else im
            )
        sample = ds[folder["index"][name]]
        assert torch.equal(sample["image_grid_thw"], grid_ref), name
        assert sample["pixel_values"].shape == pv_ref.shape, name
        torch.testing.assert_close(sample["pixel_values"], pv_ref, atol=1e-6, rtol=0, msg=name)
        n_pad = int((sample["input_ids"] == proc.image_token_id).sum())
        assert n_pad == int(grid_ref.prod()) // proc.merge_size**2, name
        grids[name] = grid_ref.tolist()
    # 1x1 is scaled up to min_pixels (56x56: 4x4 patches), a 1x200 sliver to 28x812; 8000x8000
    # (64 MP, under PIL's 89 MP limit) comes down to max_pixels (448x448: 32x32 patches).
    assert grids["dot_1x1.png"] == [[1, 4, 4]] and grids["sliver_1x200.png"] == [[1, 58, 2]]
    assert grids["huge_8000.png"] == [[1, 32, 32]]
    # EXIF orientations 5-8 turn the picture a quarter: its grid is the upright photo's, transposed.
    upright = grids["photo.jpg"][0]
    assert all(grids[f"exif_{k}.jpg"] == [[1, upright[2], upright[1]]] for k in (5, 6, 7, 8))
    assert all(grids[f"exif_{k}.jpg"] == [upright] for k in (2, 3, 4))


def test_transparency_is_composited_on_white(folder):
    for name in TRANSPARENT_LEFT:
        path = folder["img"] / name
        rgb = np.asarray(load_image(path))
        assert rgb.shape == (H, W, 3), name
        assert (rgb[:, : W // 2] == 255).all(), name
        with Image.open(path) as im:
            plain = np.asarray(im.convert("RGB"))
        assert not (plain[:, : W // 2] == 255).all(), name  # a plain convert("RGB") would not be white
    # Half-transparent pixels (alpha 128) are blended with white.
    with Image.open(folder["img"] / "rgba.png") as im:
        rgba = np.asarray(im).astype(int)
    blended = np.asarray(load_image(folder["img"] / "rgba.png"))[:, W // 2 :].astype(int)
    assert np.abs(blended - (rgba[:, W // 2 :, :3] * 128 + 255 * 127 + 127) // 255).max() <= 1
    # Grayscale without alpha comes out as three equal channels.
    gray = np.asarray(load_image(folder["img"] / "gray.png"))
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


def test_exif_orientation_is_applied(folder):
    stored = _smooth().astype(int)
    for k in ORIENTATIONS:
        shown = np.asarray(load_image(folder["img"] / f"exif_{k}.jpg")).astype(int)
        expected = ORIENT[k](stored)
        assert shown.shape == expected.shape, k
        assert np.abs(shown - expected).mean() < 2, k  # JPEG noise only
        if shown.shape == stored.shape:
            assert np.abs(shown - stored).mean() > 40, k  # the stored pixels as they are would not pass


def test_animated_gif_gives_its_first_frame(folder):
    path = folder["img"] / "animated.gif"
    with Image.open(path) as im:
        assert im.n_frames == 3
    rgb = np.asarray(load_image(path))
    assert (rgb == (255, 0, 0)).all()


def test_bad_files_are_skipped_and_counted_with_their_reason(folder):
    ds, index = folder["ds"], folder["index"]
    indices = [index[n] for n in folder["bad"]] + [index["photo.jpg"]]
    skips: dict[int, str] = {}
    samples = usable_samples(ds, indices, skips)
    assert len(samples) == 1  # only the good one
    assert skips == {index[n]: reason for n, reason in folder["bad"].items()}
    assert Counter(skips.values()) == {"corrupt_media": 5, "missing_file": 1}
    with pytest.raises(BadSampleError, match="aspect ratio"):
        ds[index["panorama_1x201.png"]]


def test_images_over_pils_pixel_limit_are_skipped(folder, tmp_path, monkeypatch):
    # A small limit stands in for PIL's 89 MP; PIL warns above it and refuses above twice it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)
    sizes = {"at_limit.png": (64, 64), "over_limit.png": (80, 64), "over_twice.png": (100, 100)}
    (tmp_path / "mllm_demo_data").mkdir()
    for name, size in sizes.items():
        Image.new("RGB", size, (5, 6, 7)).save(tmp_path / "mllm_demo_data" / name)
    (tmp_path / "mllm_demo.json").write_text(json.dumps([_record(k, n) for k, n in enumerate(sizes)]))
    ds = ConversationDataset(tmp_path / "mllm_demo.json", folder["proc"], max_seq_len=1024)
    skips: dict[int, str] = {}
    with pytest.warns(Image.DecompressionBombWarning):
        samples = usable_samples(ds, [0, 1, 2], skips)
    assert len(samples) == 1 and samples[0]["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert skips == {1: "image_too_large", 2: "image_too_large"}
    assert Image.MAX_IMAGE_PIXELS == 64 * 64  # the limit is read, never changed


def test_frame_folder_frames_are_read_like_images(folder, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    Image.fromarray(_left_transparent(_noise(12, 4)), "RGBA").save(frames / "frame_0.png")
    _palette_image().save(frames / "frame_1.gif", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_smooth()).save(frames / "frame_2.jpg", quality=95, subsampling=0, exif=exif)
    loaded, _ = folder["proc"].load_video(frames)
    assert [f.mode for f in loaded] == ["RGB"] * 3
    assert (np.asarray(loaded[0])[:, : W // 2] == 255).all() and (
        np.asarray(loaded[1])[:, : W // 2] == 255
    ).all()
    assert loaded[2].size == (H, W)  # rotated upright
    (frames / "frame_3.png").write_bytes(b"")
    with pytest.raises(BadSampleError) as err:
        folder["proc"].load_video(frames)
    assert err.value.reason == "corrupt_media"
