"""The imagefolder source (kdpipe.data.sources.imagefolder) and the decoding it shares with the
csv source (kdpipe.data.images.decode_image): generated folders of mixed formats and modes,
with corrupt, non-image, empty and hidden files, empty classes and links out of the folder."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdpipe.config import parse_params
from kdpipe.data import imagefiles, pipeline
from kdpipe.data.images import UnreadableImage, decode_image, to_channels
from kdpipe.data.imagefiles import fingerprint, read_manifest
from kdpipe.data.prepare import split_dataset
from kdpipe.data.sources import SOURCES, imagefolder
from kdpipe.data.sources.imagefolder import ImagefolderSettings
from kdpipe.errors import ConfigError, KdpipeError
from tests.data_fixtures import SHAPES, make_shapes_folder, shape_image


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def colour(seed: int, size: tuple[int, int] = (20, 14)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def truncated_jpeg(seed: int) -> bytes:
    """A JPEG cut off in the middle of its image data (an interrupted copy)."""
    data = encode(colour(seed, (64, 64)), "JPEG")
    return data[: len(data) * 3 // 4]


def grey16(seed: int) -> Image.Image:
    values = np.random.default_rng(seed).integers(0, 65536, (12, 12)).astype(np.uint16)
    return Image.fromarray(values)  # mode I;16, saved as a 16-bit PNG


# Every kind of file a user's folder holds: (name, bytes, kept as an image).
MIXED = {
    "rgb.jpg": (lambda: encode(colour(1), "JPEG"), True),
    "rgba.png": (lambda: encode(colour(2).convert("RGBA"), "PNG"), True),
    "grey.bmp": (lambda: encode(colour(3).convert("L"), "BMP"), True),
    "photo.webp": (lambda: encode(colour(4), "WEBP"), True),
    "palette.png": (lambda: encode(colour(5).convert("P"), "PNG"), True),
    "deep.png": (lambda: encode(grey16(6), "PNG"), True),
    "anim.gif": (lambda: encode(colour(7).convert("P"), "GIF"), True),
    "camera.jpg": (lambda: encode(colour(10), "MPO", save_all=True, append_images=[colour(11)]), True),  # multi-picture
    "truncated.jpg": (lambda: truncated_jpeg(8), False),
    "notes.txt": (lambda: b"not an image at all\n", False),
    "empty.png": (lambda: b"", False),
    ".DS_Store": (lambda: b"\x00\x00\x00\x01Bud1", False),
    "._rgb.jpg": (lambda: encode(colour(9), "JPEG"), False),  # macOS resource fork: hidden
}


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_mixed_folder(root: Path) -> Path:
    """cat/: every kind of file in MIXED; dog/: three JPEGs, one in a sub-folder; a hidden folder and
    a loose file at the top."""
    for name, (make, _) in MIXED.items():
        write(root / "cat" / name, make())
    for i in range(2):
        write(root / "dog" / f"{i}.jpg", encode(colour(20 + i), "JPEG"))
    write(root / "dog" / "2019" / "old.jpg", encode(colour(30), "JPEG"))
    write(root / ".git" / "HEAD", b"ref: refs/heads/main\n")
    write(root / "labels.txt", b"cat dog\n")
    return root


def prepared(folder: Path, tmp_path: Path, **settings) -> tuple[dict, object]:
    """download + load: (the download summary, the RawDataset)."""
    source = ImagefolderSettings(path=str(folder), **settings)
    info = imagefolder.download(tmp_path / "raw", source)
    return info, imagefolder.load(tmp_path / "raw", source, 16)


# --------------------------------------------------------------------------- reading a folder


def test_mixed_formats_and_modes_are_decoded_and_the_rest_skipped_and_named(tmp_path, monkeypatch):
    monkeypatch.setattr(imagefiles, "EXAMPLES_SHOWN", 100)  # name them all
    folder = make_mixed_folder(tmp_path / "images")
    info, raw = prepared(folder, tmp_path)
    kept = sum(keep for _, keep in MIXED.values())
    assert raw.class_names == ["cat", "dog"]
    assert info["files"] == len(MIXED) - 3 + 3  # all but the two hidden and the empty file, plus dog's three
    assert raw.train_images.shape == (kept + 3, 3, 16, 16) and raw.train_images.dtype == torch.uint8
    assert raw.train_labels.tolist() == [0] * kept + [1] * 3
    assert raw.val_images is None and raw.test_images is None  # drawn from train by prepare
    # skipped: 2 hidden files + .git, the loose file, the empty file (download); truncated + text (prepare)
    assert raw.skipped == 7
    reasons = dict(s[:-1].rsplit(" (", 1) for s in raw.skipped_examples)
    assert reasons == {".git": "hidden", "cat/.DS_Store": "hidden", "cat/._rgb.jpg": "hidden", "cat/empty.png": "empty",
                       "cat/notes.txt": "not an image", "cat/truncated.jpg": "cannot be decoded: OSError",
                       "labels.txt": "not in a class folder"}
    assert raw.skipped_examples == sorted(raw.skipped_examples) and raw.flip


def test_manifest_lists_each_file_with_its_sha256_in_a_canonical_order(tmp_path):
    folder = make_mixed_folder(tmp_path / "images")
    imagefolder.download(tmp_path / "raw", ImagefolderSettings(path=str(folder)))
    files = read_manifest(tmp_path / "raw")["files"]
    assert [f["path"] for f in files] == sorted(f["path"] for f in files)
    import hashlib
    for f in files:
        assert f["sha256"] == hashlib.sha256((folder / f["path"]).read_bytes()).hexdigest()
    assert "dog/2019/old.jpg" in [f["path"] for f in files]


def test_all_greyscale_folder_gives_one_channel_and_data_channels_converts(tmp_path):
    folder = tmp_path / "grey"
    for c, name in enumerate(["a", "b"]):
        write(folder / name / "x.png", encode(colour(c).convert("L"), "PNG"))
        write(folder / name / "y.png", encode(grey16(c), "PNG"))
        write(folder / name / "z.gif", encode(colour(c).convert("L").convert("P"), "GIF"))  # a grey palette
    _, raw = prepared(folder, tmp_path)
    assert raw.train_images.shape == (6, 1, 16, 16)
    rgb = pipeline.with_channels(raw, 3).train_images
    assert rgb.shape == (6, 3, 16, 16) and torch.equal(rgb[:, 0], rgb[:, 2])
    assert pipeline.with_channels(raw, None) is raw
    assert torch.equal(pipeline.with_channels(pipeline.with_channels(raw, 3), 1).train_images, raw.train_images)


def test_one_colour_image_makes_the_whole_set_rgb(tmp_path):
    folder = tmp_path / "mostly_grey"
    write(folder / "a" / "x.png", encode(colour(1).convert("L"), "PNG"))
    write(folder / "b" / "y.png", encode(colour(2), "PNG"))
    _, raw = prepared(folder, tmp_path)
    assert raw.train_images.shape[1] == 3
    grey = raw.train_images[0]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])  # the grey image, repeated


def test_rgb_to_one_channel_is_pils_luma():
    images = torch.randint(0, 256, (5, 3, 7, 9), dtype=torch.uint8)
    expected = [np.asarray(Image.fromarray(img.permute(1, 2, 0).numpy()).convert("L")) for img in images]
    assert torch.equal(to_channels(images, 1)[:, 0], torch.from_numpy(np.stack(expected)))


# --------------------------------------------------------------------------- decoding


def test_transparent_pixels_become_white_and_16_bit_is_scaled():
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))  # fully transparent dark pixels
    assert decode_image(encode(rgba, "PNG"), 8, "crop").tolist() == np.full((3, 8, 8), 255).tolist()
    deep = Image.fromarray(np.array([[0, 257 * 100, 65535, 257 * 7]], dtype=np.uint16))
    assert decode_image(encode(deep, "PNG"), 4, "stretch")[0, 0, 0] == 0
    flat = Image.fromarray(np.full((4, 4), 257 * 100, dtype=np.uint16))
    assert decode_image(encode(flat, "PNG"), 4, "crop").max() == 100


def test_exif_orientation_is_applied():
    tall = Image.new("RGB", (20, 40), (200, 0, 0))
    tall.paste((0, 0, 200), (0, 0, 20, 20))  # blue on top
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90° clockwise
    data = encode(tall, "JPEG", exif=exif)
    decoded = decode_image(data, 10, "pad")  # landscape after the rotation: black bars top and bottom
    assert decoded[:, 0, :].max() == 0 and decoded[:, 5, :].max() > 100


def test_resize_modes():
    wide = Image.new("RGB", (40, 20), (255, 255, 255))
    wide.paste((0, 0, 0), (0, 0, 6, 20))  # a black band at the left edge
    crop, pad, stretch = (decode_image(encode(wide, "PNG"), 10, mode) for mode in ("crop", "pad", "stretch"))
    assert crop.min() == 255  # the centre 20×20 is all white
    assert pad[:, 0].max() == 0 and pad[:, 5, 9].min() == 255  # black borders above, the picture in the middle
    assert stretch[:, 5, 0].max() == 0 and stretch[:, 5, 9].min() == 255  # the band squeezed, still there


def test_non_images_are_unreadable_images():
    for data, reason in [(b"hello", "not an image"), (truncated_jpeg(1), "cannot be decoded"),
                         (b"%PDF-1.4\n", "not an image")]:
        with pytest.raises(UnreadableImage, match=reason):
            decode_image(data, 8, "crop")


# --------------------------------------------------------------------------- layouts and classes


def test_split_folders_are_kept_and_a_missing_split_is_drawn(tmp_path):
    folder = tmp_path / "splits"
    make_shapes_folder(folder / "train", per_class=6)
    make_shapes_folder(folder / "val", per_class=2, seed=1)
    _, raw = prepared(folder, tmp_path)
    assert raw.class_names == SHAPES
    assert len(raw.train_labels) == 18 and len(raw.val_labels) == 6 and raw.test_images is None
    splits = split_dataset(raw, val_fraction=0.2, test_fraction=0.5, seed=0)
    assert torch.equal(splits["val"].images, raw.val_images)  # given: kept as it is
    assert torch.bincount(splits["test"].labels).tolist() == [3, 3, 3]  # drawn from train, stratified
    assert len(splits["train"]) == 9


def test_train_val_test_folders_are_all_kept(tmp_path):
    folder = tmp_path / "splits"
    for split, n in [("train", 4), ("val", 1), ("test", 2)]:
        make_shapes_folder(folder / split, per_class=n, seed=n)
    _, raw = prepared(folder, tmp_path)
    splits = split_dataset(raw, 0.15, 0.15, seed=0)
    assert {name: len(s) for name, s in splits.items()} == {"train": 12, "val": 3, "test": 6}


def test_classes_setting_restricts_and_orders(tmp_path):
    folder = make_shapes_folder(tmp_path / "shapes", per_class=3)
    write(folder / "empty_class" / ".keep", b"")
    _, raw = prepared(folder, tmp_path, classes=["triangle", "circle"])
    assert raw.class_names == ["triangle", "circle"]
    assert torch.bincount(raw.train_labels).tolist() == [3, 3]


def test_numeric_class_folders_sort_as_numbers(tmp_path):
    folder = tmp_path / "numbers"
    for name in ["10", "9", "2"]:
        write(folder / name / "x.png", encode(colour(int(name)), "PNG"))
    _, raw = prepared(folder, tmp_path)
    assert raw.class_names == ["2", "9", "10"]


# --------------------------------------------------------------------------- one-sentence errors


def one_sentence(message: str) -> bool:
    return message.endswith(".") and "\n" not in message and "Traceback" not in message


@pytest.mark.parametrize("build, match", [
    (lambda f: (make_shapes_folder(f, per_class=2), write(f / "bird" / ".DS_Store", b"x")),
     r"class 'bird' has no training images in .*hidden, empty and missing files do not count.*"
     r"data.imagefolder.classes"),
    (lambda f: make_shapes_folder(f, per_class=2) and [p.unlink() for p in (f / "square").iterdir()],
     r"class 'square' has no training images"),
    (lambda f: write(f / "cat" / "x.png", encode(colour(1), "PNG")), r"has only 'cat' as classes; a classifier needs"),
    (lambda f: f.mkdir(), r"has none as classes"),
    (lambda f: (make_shapes_folder(f / "train", per_class=1), make_shapes_folder(f / "owl", per_class=1)),
     r"mixes split folders \(train\) with the folder owl/"),
    (lambda f: make_shapes_folder(f / "val", per_class=1), r"has val/ but no train/ folder"),
    (lambda f: (make_shapes_folder(f / "train", per_class=1), write(f / "test" / "owl" / "x.png", b"x")),
     r"has the class folder owl/, which .*train lacks"),
])
def test_folder_errors_are_one_sentence(tmp_path, build, match):
    folder = tmp_path / "images"
    build(folder)
    with pytest.raises(KdpipeError, match=match) as err:
        imagefolder.download(tmp_path / "raw", ImagefolderSettings(path=str(folder)))
    assert one_sentence(str(err.value))
    assert not (tmp_path / "raw" / "manifest.json").exists()


def test_a_class_whose_every_file_is_unreadable_stops_prepare(tmp_path):
    folder = make_shapes_folder(tmp_path / "images", per_class=2)
    for path in (folder / "circle").iterdir():
        path.write_bytes(b"garbage")
    with pytest.raises(KdpipeError, match=r"class 'circle' has no readable training images \(e.g. circle/00.png \(not "
                                          r"an image\)\); add images that can be decoded, or leave the class out "
                                          r"with data.imagefolder.classes.") as err:
        prepared(folder, tmp_path)
    assert one_sentence(str(err.value))


def test_links_out_of_the_folder_stop_download(tmp_path):
    outside = write(tmp_path / "elsewhere" / "secret.png", encode(colour(1), "PNG"))
    folder = make_shapes_folder(tmp_path / "images", per_class=2)
    os.symlink(outside, folder / "circle" / "link.png")
    with pytest.raises(KdpipeError, match=r"circle/link.png links to .*elsewhere/secret.png, outside "
                                          r"data.imagefolder.path=.*; copy the file into the folder") as err:
        imagefolder.download(tmp_path / "raw", ImagefolderSettings(path=str(folder)))
    assert one_sentence(str(err.value))
    (folder / "circle" / "link.png").unlink()
    os.symlink(tmp_path / "elsewhere", folder / "owl")  # a linked class folder, outside too
    with pytest.raises(KdpipeError, match=r"owl links to .*, outside data.imagefolder.path"):
        imagefolder.download(tmp_path / "raw", ImagefolderSettings(path=str(folder)))


def test_links_inside_the_folder_are_followed_once(tmp_path):
    folder = make_shapes_folder(tmp_path / "images", per_class=2)
    os.symlink(folder / "circle" / "00.png", folder / "square" / "alias.png")
    os.symlink(folder / "square", folder / "square" / "loop")  # a link back up: read once, no endless walk
    info, raw = prepared(folder, tmp_path)
    assert info["files"] == 7 and len(raw.train_labels) == 7


def test_unknown_class_in_the_classes_setting(tmp_path):
    folder = make_shapes_folder(tmp_path / "images", per_class=1)
    with pytest.raises(KdpipeError, match=r"data.imagefolder.classes names 'owl', which .* does not have; its classes "
                                          r"are: circle, square, triangle."):
        imagefolder.download(tmp_path / "raw", ImagefolderSettings(path=str(folder), classes=["owl", "circle"]))


def test_missing_folder(tmp_path):
    with pytest.raises(KdpipeError, match=r"data.imagefolder.path='.*nope' is not a folder; point it at a folder"):
        imagefolder.download(tmp_path / "raw", ImagefolderSettings(path=str(tmp_path / "nope")))


def test_a_file_changed_after_download_stops_prepare(tmp_path):
    folder = make_shapes_folder(tmp_path / "images", per_class=2)
    settings = ImagefolderSettings(path=str(folder))
    imagefolder.download(tmp_path / "raw", settings)
    shape_image("circle", 99).save(folder / "circle" / "00.png")
    with pytest.raises(KdpipeError, match=r"circle/00.png changed or disappeared after the download stage listed it; "
                                          r"list the images again with `dvc repro -f -s download`") as err:
        imagefolder.load(tmp_path / "raw", settings, 8)
    assert one_sentence(str(err.value))


@pytest.mark.parametrize("section, match", [
    ({"path": "~/photos"}, r"data.imagefolder.path='~/photos' is not allowed; expected .*DVC does not expand ~"),
    ({"path": ""}, r"data.imagefolder.path='' is not allowed"),
    ({"classes": ["cat"]}, r"data.imagefolder.classes=\['cat'\] is not allowed; expected null .* at least two"),
    ({"classes": ["cat", "cat"]}, r"data.imagefolder.classes"),
    ({"resize": "zoom"}, r"data.imagefolder.resize='zoom' is not allowed; expected one of 'crop', 'pad', 'stretch'"),
])
def test_settings_are_validated(section, match):
    with pytest.raises(ConfigError, match=match):
        parse_params({"data": {"name": "imagefolder", "imagefolder": section}})


def test_data_channels_is_validated():
    with pytest.raises(ConfigError, match=r"data.channels=2 is not allowed; expected null .*, 1 \(greyscale\) or 3"):
        parse_params({"data": {"channels": 2}})


# --------------------------------------------------------------------------- the DVC dependency


def test_fingerprint_changes_when_an_image_is_added_and_only_the_selected_source_is_fingerprinted(tmp_path):
    folder = make_shapes_folder(tmp_path / "images", per_class=2)
    before = fingerprint(str(folder), "data.imagefolder.path")
    assert before == fingerprint(str(folder), "data.imagefolder.path") and before["files"] == 6
    shape_image("circle", 7).save(folder / "circle" / "new.png")
    after = fingerprint(str(folder), "data.imagefolder.path")
    assert after["files"] == 7 and after["stat_sha256"] != before["stat_sha256"]
    params = parse_params({"data": {"name": "imagefolder", "imagefolder": {"path": str(folder)}}})
    assert pipeline.data_source(params) == {"name": "imagefolder", "input": after}
    assert pipeline.data_source(parse_params({})) == {"name": "digits"}  # the named data sets: unchanged
    assert SOURCES.get("imagefolder").factory.local_input(params.data.source) == str(folder)
    with pytest.raises(KdpipeError, match=r"params.yaml: data.imagefolder.path='.*gone' does not exist"):
        fingerprint(str(tmp_path / "gone"), "data.imagefolder.path")


def test_prepare_stage_writes_counts_and_skipped_examples(tmp_path, monkeypatch):
    folder = make_mixed_folder(tmp_path / "images")
    params = parse_params({"data": {"name": "imagefolder", "image_size": 12, "channels": 1, "val_fraction": 0.2,
                                    "test_fraction": 0.2, "imagefolder": {"path": str(folder), "resize": "pad"}}})
    monkeypatch.chdir(tmp_path)
    pipeline.download(params)
    summary = pipeline.prepare(params)
    assert summary["image_shape"] == [1, 12, 12] and summary["classes"] == 2
    assert summary["skipped_images"] == 7 and len(summary["skipped_examples"]) == 5
    assert sum(summary[f"{s}_images"] for s in ("train", "val", "test")) == 11
