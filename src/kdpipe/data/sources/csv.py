"""Your own images, listed in a CSV file (``data.csv.path``) with a header row::

    path,label,split
    photos/0001.jpg,scratch,train
    photos/0002.jpg,ok,test
    photos/0003.jpg,ok,

``path`` is relative to the CSV's folder, and must stay inside it (no ``..`` out of it, no
link out of it); ``label`` is the class name; ``split`` (optional column) is ``train``,
``val`` or ``test``, empty meaning ``train``. Splits that are given are kept; a missing val or
test split is drawn from the training rows (seeded, stratified). Class names are the labels,
sorted (numerically when they are all integers); ``data.csv.classes`` picks some of them and
sets their order. Listed files that are missing, hidden or empty are left out and counted; so
are files that are not decodable images (found by ``prepare``). Extra columns are ignored.

Nothing is copied: ``download`` lists the files with their sha256 in
``data/raw/csv/manifest.json`` (see :mod:`kdpipe.data.imagefiles`).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Literal, Optional

from kdpipe.data.imagefiles import (SPLIT_NAMES, Entry, Listing, check_classes, check_settings, inside, is_hidden,
                                    load_images, order_classes, write_manifest)
from kdpipe.data.sources import RawDataset, register
from kdpipe.data.store import ImageStore
from kdpipe.errors import KdpipeError
from kdpipe.validation import Settings

KEY = "data.csv"
DEFAULT_IMAGE_SIZE = 64
COLUMNS = ("path", "label")


@dataclass(frozen=True)
class CsvSettings(Settings):
    path: str = "examples/shapes.csv"  # a CSV with columns path, label (and split); paths relative to its folder
    classes: Optional[list[str]] = None  # these labels, in this order (null: every label, sorted)
    resize: Literal["crop", "pad", "stretch"] = "crop"  # to a square: cut the centre, add black borders, or squash

    def check(self, key: str) -> None:
        check_settings(self.path, self.classes, key, "a CSV file with columns path and label")


def read_rows(csv_path: Path) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) for every data row, with the header checked."""
    if not csv_path.is_file():
        raise KdpipeError(f"{KEY}.path={str(csv_path)!r} is not a file; point it at a CSV with columns path and label.")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:  # -sig: the byte-order mark Excel writes
            reader = csv.DictReader(fh)
            header = [name.strip() for name in reader.fieldnames or []]
            reader.fieldnames = header
            rows = [(reader.line_num, row) for row in reader]
    except (csv.Error, UnicodeDecodeError) as exc:
        raise KdpipeError(f"{csv_path} is not a readable UTF-8 CSV ({type(exc).__name__}); save it as CSV with a "
                          "header row path,label[,split].") from None
    missing = [name for name in COLUMNS if name not in header]
    if missing:
        raise KdpipeError(f"{csv_path} has no {missing[0]!r} column (its header is {','.join(header) or 'empty'}); "
                          "the first row must name the columns path,label[,split].")
    if not rows:
        raise KdpipeError(f"{csv_path} lists no images; add one row per image: path,label[,split].")
    return rows


def _split(value: Optional[str], where: str) -> str:
    split = (value or "").strip().lower() or "train"
    if split not in SPLIT_NAMES:
        raise KdpipeError(f"{where}: split {value!r} is not allowed; use train, val or test (empty means train).")
    return split


def _relative(text: str, root: Path, where: str) -> PurePosixPath:
    """The row's path as a relative POSIX path that stays inside ``root``."""
    rel = PurePosixPath(text.replace("\\", "/"))
    if rel.is_absolute() or PureWindowsPath(text).drive:
        raise KdpipeError(f"{where}: the path {text!r} is absolute; write it relative to the CSV's folder {root}.")
    if not inside(root / rel, root):
        raise KdpipeError(f"{where}: the path {text!r} leads outside the CSV's folder {root} (a .. or a link); keep "
                          "the images inside that folder.")
    return rel


def _reason(path: Path, rel: PurePosixPath) -> Optional[str]:
    """Why a listed file is left out, or None when it is a candidate image."""
    if any(is_hidden(part) for part in rel.parts):
        return "hidden"
    if not path.exists():
        return "missing"
    if not path.is_file():
        return "not a file"
    return "empty" if path.stat().st_size == 0 else None


def scan(settings: CsvSettings) -> Listing:
    """The files the CSV lists, their classes and splits, and what was left out."""
    csv_path = Path(settings.path)
    root = csv_path.parent
    entries, skipped, first_line, labels = [], [], {}, set()
    for line, row in read_rows(csv_path):
        where = f"{csv_path} line {line}"
        text, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        if not text or not label:
            raise KdpipeError(f"{where}: the path and the label must not be empty.")
        split, rel = _split(row.get("split"), where), _relative(text, root, where)
        real = (root / rel).resolve()
        if real in first_line:
            raise KdpipeError(f"{where}: {text!r} is listed again (first on line {first_line[real]}); list each image "
                              "once, or it may land in two splits.")
        first_line[real] = line
        labels.add(label)
        reason = _reason(root / rel, rel)
        if reason is None:
            entries.append(Entry(rel.as_posix(), label, split))
        else:
            skipped.append((rel.as_posix(), reason))
    classes = order_classes(labels, settings.classes, str(csv_path), KEY)
    listing = Listing(root, [e for e in entries if e.label in classes], classes, skipped)
    check_classes(listing, str(csv_path), f"leave it out with {KEY}.classes")
    return listing


def download(raw_dir: Path, settings: CsvSettings) -> dict:
    return write_manifest(raw_dir, scan(settings), origin=settings.path)


def load(raw_dir: Path, settings: CsvSettings, size: int, store: ImageStore | None = None) -> RawDataset:
    return load_images(raw_dir, Path(settings.path).parent, size, settings.resize, "csv", store)


register("csv", CsvSettings, download, load, DEFAULT_IMAGE_SIZE, local_input=lambda s: s.path)
