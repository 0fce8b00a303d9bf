"""The csv source (kdpipe.data.sources.csv): generated CSVs with relative paths, given splits,
missing files, paths leading out of the CSV's folder and bad split values. Decoding itself is
shared with the imagefolder source (test_data_sources_imagefolder.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kdpipe.config import parse_params
from kdpipe.data import pipeline
from kdpipe.data.imagefiles import read_manifest
from kdpipe.data.prepare import split_dataset
from kdpipe.data.sources import csv as csv_source
from kdpipe.data.sources.csv import CsvSettings
from kdpipe.errors import ConfigError, KdpipeError
from tests.data_fixtures import SHAPES, make_shapes_folder, shape_image, write_shapes_csv


@pytest.fixture
def shapes(tmp_path) -> Path:
    """tmp/set/images/<shape>/NN.png, 4 per class; the CSVs go in tmp/set/."""
    return make_shapes_folder(tmp_path / "set" / "images", per_class=4)


def write_csv(path: Path, *rows: str) -> Path:
    path.write_text("\n".join(rows) + "\n")
    return path


def listed(tmp_path: Path, csv_path: Path, **settings):
    """download + load of ``csv_path``: (the download summary, the RawDataset)."""
    source = CsvSettings(path=str(csv_path), **settings)
    info = csv_source.download(tmp_path / "raw", source)
    return info, csv_source.load(tmp_path / "raw", source, 8)


def one_sentence(message: str) -> bool:
    return message.endswith(".") and "\n" not in message


def test_relative_paths_and_labels(tmp_path, shapes):
    info, raw = listed(tmp_path, write_shapes_csv(shapes.parent / "labels.csv", shapes))
    assert raw.class_names == SHAPES and info["files"] == 12 and raw.skipped == 0
    assert raw.train_images.shape == (12, 3, 8, 8) and torch.bincount(raw.train_labels).tolist() == [4, 4, 4]
    assert raw.val_images is None and raw.test_images is None


def test_missing_hidden_and_empty_files_are_skipped_and_named(tmp_path, shapes):
    (shapes / ".hidden.png").write_bytes((shapes / "circle" / "00.png").read_bytes())
    (shapes / "empty.png").write_bytes(b"")
    (shapes / "notes.txt").write_text("hello")
    csv_path = write_csv(shapes.parent / "labels.csv", "path,label",
                         *(f"images/{s}/0{i}.png,{s}" for s in SHAPES for i in range(2)),
                         "images/circle/gone.png,circle", "images/.hidden.png,circle", "images/empty.png,square",
                         "images/notes.txt,square", "images,square")
    info, raw = listed(tmp_path, csv_path)
    assert info["files"] == 7 and info["skipped_files"] == 4  # notes.txt is only found out when decoding
    assert len(raw.train_labels) == 6 and raw.skipped == 5
    assert raw.skipped_examples == ["images (not a file)", "images/.hidden.png (hidden)",
                                    "images/circle/gone.png (missing)", "images/empty.png (empty)",
                                    "images/notes.txt (not an image)"]


def test_split_column_is_kept_and_a_missing_split_is_drawn(tmp_path, shapes):
    rows = ["path,label,split"]
    for s in SHAPES:
        rows += [f"images/{s}/00.png,{s},val", f"images/{s}/01.png,{s},Test ", f"images/{s}/02.png,{s},",
                 f"images/{s}/03.png,{s},train"]
    _, raw = listed(tmp_path, write_csv(shapes.parent / "labels.csv", *rows))
    assert (len(raw.train_labels), len(raw.val_labels), len(raw.test_labels)) == (6, 3, 3)
    splits = split_dataset(raw, 0.15, 0.15, seed=0)
    assert torch.equal(splits["test"].images, raw.test_images) and torch.equal(splits["val"].images, raw.val_images)
    rows = ["path,label,split"] + [f"images/{s}/0{i}.png,{s},{'val' if i == 0 else ''}"
                                   for s in SHAPES for i in range(4)]
    _, raw = listed(tmp_path, write_csv(shapes.parent / "val_only.csv", *rows))
    assert len(raw.val_labels) == 3 and raw.test_images is None  # test: drawn from the 9 training rows
    assert torch.bincount(split_dataset(raw, 0.15, 1 / 3, seed=0)["test"].labels).tolist() == [1, 1, 1]


def test_windows_separators_a_byte_order_mark_extra_columns_and_row_order(tmp_path, shapes):
    rows = ["path,label,notes"] + [f"images\\{s}\\0{i}.png,{s},x" for s in SHAPES for i in range(4)]
    path = shapes.parent / "excel.csv"
    path.write_bytes(("\ufeff" + "\r\n".join(rows) + "\r\n").encode("utf-8"))
    info, raw = listed(tmp_path, path)
    assert info["files"] == 12 and raw.class_names == SHAPES
    manifest = read_manifest(tmp_path / "raw")
    shuffled = write_csv(shapes.parent / "shuffled.csv", rows[0], *reversed(rows[1:]))
    csv_source.download(tmp_path / "raw2", CsvSettings(path=str(shuffled)))
    assert read_manifest(tmp_path / "raw2")["files"] == manifest["files"]  # the row order is no change


def test_integer_labels_sort_as_numbers_and_classes_restricts(tmp_path, shapes):
    rows = ["path,label"] + [f"images/{s}/0{i}.png,{n}" for s, n in zip(SHAPES, ["10", "9", "2"]) for i in range(4)]
    csv_path = write_csv(shapes.parent / "numbers.csv", *rows)
    _, raw = listed(tmp_path, csv_path)
    assert raw.class_names == ["2", "9", "10"]
    _, raw = listed(tmp_path, csv_path, classes=["10", "2"])
    assert raw.class_names == ["10", "2"] and len(raw.train_labels) == 8


@pytest.mark.parametrize("rows, match", [
    (["path,label", "../outside.png,circle"],
     r"labels.csv line 2: the path '../outside.png' leads outside the CSV's folder .* \(a .. or a link\)"),
    (["path,label", "images/../../outside.png,circle"], r"line 2: the path 'images/../../outside.png' leads outside"),
    (["path,label", "/etc/passwd,circle"], r"line 2: the path '/etc/passwd' is absolute; write it relative"),
    (["path,label", "C:\\photos\\a.jpg,circle"], r"line 2: the path 'C:\\\\photos\\\\a.jpg' is absolute"),
    (["path,label,split", "images/circle/00.png,circle,train", "images/square/00.png,square,validation"],
     r"labels.csv line 3: split 'validation' is not allowed; use train, val or test \(empty means train\)."),
    (["file,class", "images/circle/00.png,circle"],
     r"has no 'path' column \(its header is file,class\); the first row"),
    (["path", "images/circle/00.png"], r"has no 'label' column"),
    (["path,label"], r"lists no images; add one row per image"),
    (["path,label", "images/circle/00.png,"], r"line 2: the path and the label must not be empty."),
    (["path,label", "images/circle/00.png,circle", "images/circle/00.png,square"],
     r"line 3: 'images/circle/00.png' is listed again \(first on line 2\); list each image once"),
    (["path,label", "images/circle/00.png,circle", "images/circle/01.png,circle"], r"has only 'circle' as classes"),
    (["path,label", "images/circle/00.png,circle", "images/square/gone.png,square"],
     r"class 'square' has no training images in .*labels.csv .*; add some, or leave it out with data.csv.classes."),
])
def test_csv_errors_are_one_sentence(tmp_path, shapes, rows, match):
    with pytest.raises(KdpipeError, match=match) as err:
        csv_source.download(tmp_path / "raw", CsvSettings(path=str(write_csv(shapes.parent / "labels.csv", *rows))))
    assert one_sentence(str(err.value))
    assert not (tmp_path / "raw" / "manifest.json").exists()


def test_a_link_out_of_the_csvs_folder_is_refused(tmp_path, shapes):
    outside = tmp_path / "secret.png"
    shape_image("circle", 1).save(outside)
    os.symlink(outside, shapes / "circle" / "link.png")
    csv_path = write_csv(shapes.parent / "labels.csv", "path,label", "images/circle/link.png,circle",
                         "images/square/00.png,square")
    with pytest.raises(KdpipeError, match=r"line 2: the path 'images/circle/link.png' leads outside the CSV's folder"):
        csv_source.download(tmp_path / "raw", CsvSettings(path=str(csv_path)))


def test_unreadable_csv_and_missing_file(tmp_path):
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("path,label\nimages/caf\xe9.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(KdpipeError, match=r"latin1.csv is not a readable UTF-8 CSV \(UnicodeDecodeError\); save it"):
        csv_source.download(tmp_path / "raw", CsvSettings(path=str(bad)))
    with pytest.raises(KdpipeError, match=r"data.csv.path='.*nope.csv' is not a file; point it at a CSV"):
        csv_source.download(tmp_path / "raw", CsvSettings(path=str(tmp_path / "nope.csv")))


def test_settings_are_validated():
    with pytest.raises(ConfigError, match=r"data.csv.path='~/labels.csv' is not allowed; expected a CSV file"):
        parse_params({"data": {"name": "csv", "csv": {"path": "~/labels.csv"}}})
    with pytest.raises(ConfigError, match=r"data.csv.classes=\['a', 'a'\] is not allowed"):
        parse_params({"data": {"csv": {"classes": ["a", "a"]}}})


def test_download_and_prepare_stages_on_a_csv(tmp_path, shapes, monkeypatch):
    csv_path = write_shapes_csv(shapes.parent / "labels.csv", shapes)
    params = parse_params({"data": {"name": "csv", "image_size": 16, "csv": {"path": str(csv_path)}}})
    monkeypatch.chdir(tmp_path)
    source = pipeline.data_source(params)
    assert source["name"] == "csv" and source["input"]["files"] == 1  # the CSV is the dependency
    pipeline.download(params)
    summary = pipeline.prepare(params)
    assert summary["image_shape"] == [3, 16, 16] and summary["skipped_images"] == 0
    assert sum(summary[f"{s}_images"] for s in ("train", "val", "test")) == 12
