"""Your own images, one folder per class: ``data.imagefolder.path`` holds either

    <class>/*.jpg                       every image; prepare draws val and test from them
    train/<class>/*.jpg                 or split folders: a given split is kept, a missing
    val/<class>/*.jpg   (optional)      val or test is drawn from train (seeded, stratified)
    test/<class>/*.jpg  (optional)

Class folders may hold sub-folders (read recursively). Class names are the folder names,
sorted; ``data.imagefolder.classes`` picks some of them and sets their order. Hidden files
(``.DS_Store``) and empty files are left out and counted; so are files that are not decodable
images (found by ``prepare``). A link leading outside the folder stops ``download``.

Nothing is copied: ``download`` lists the files with their sha256 in
``data/raw/imagefolder/manifest.json`` (see :mod:`kdpipe.data.imagefiles`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from kdpipe.data.imagefiles import (SPLIT_NAMES, Entry, Listing, check_classes, check_settings, inside, is_hidden,
                                    load_images, order_classes, relative, write_manifest)
from kdpipe.data.sources import RawDataset, register
from kdpipe.data.store import ImageStore
from kdpipe.errors import KdpipeError
from kdpipe.validation import Settings

KEY = "data.imagefolder"
DEFAULT_IMAGE_SIZE = 64


@dataclass(frozen=True)
class ImagefolderSettings(Settings):
    path: str = "examples/shapes"  # a folder of class folders, or of train/ (val/, test/) holding them
    classes: Optional[list[str]] = None  # these classes, in this order (null: every class folder, sorted)
    resize: Literal["crop", "pad", "stretch"] = "crop"  # to a square: cut the centre, add black borders, or squash

    def check(self, key: str) -> None:
        check_settings(self.path, self.classes, key, "a folder of class folders")


def _subfolders(folder: Path, root: Path) -> list[Path]:
    """The visible sub-folders of ``folder``; a link out of ``root`` is an error."""
    found = []
    for child in sorted(folder.iterdir()):
        if is_hidden(child.name):
            continue
        _refuse_outside(child, root)
        if child.is_dir():
            found.append(child)
    return found


def _refuse_outside(path: Path, root: Path) -> None:
    if path.is_symlink() and not inside(path, root):
        raise KdpipeError(f"{path} links to {os.readlink(path)}, outside {KEY}.path={str(root)!r}; copy the file into "
                          "the folder instead of linking to it.")


def _walk(folder: Path, root: Path, seen: set[Path]) -> Iterator[tuple[Path, Optional[str]]]:
    """Every file under ``folder`` with the reason it is left out (None: a candidate image)."""
    for child in sorted(folder.iterdir()):
        if is_hidden(child.name):
            yield child, "hidden"
            continue
        _refuse_outside(child, root)
        if child.is_dir():
            if child.resolve() not in seen:  # a link back to a folder already read
                seen.add(child.resolve())
                yield from _walk(child, root, seen)
        elif not child.is_file():
            yield child, "not a file"
        else:
            yield child, "empty" if child.stat().st_size == 0 else None


def _split_roots(root: Path) -> dict[str, Path]:
    """{split: folder of class folders}: the split folders when there are any, else the root."""
    top = _subfolders(root, root)
    splits = {d.name: d for d in top if d.name in SPLIT_NAMES}
    if not splits:
        return {"train": root}
    others = [d.name for d in top if d.name not in SPLIT_NAMES]
    if others:
        raise KdpipeError(f"{root} mixes split folders ({', '.join(sorted(splits))}) with the folder {others[0]}/; "
                          "put every class folder under train/ (and val/, test/).")
    if "train" not in splits:
        raise KdpipeError(f"{root} has {'/ and '.join(sorted(splits))}/ but no train/ folder; the training images go "
                          "in train/<class>/.")
    return splits


def scan(settings: ImagefolderSettings) -> Listing:
    """The image files under ``settings.path``, their classes and splits, and what was left out."""
    root = Path(settings.path)
    if not root.is_dir():
        raise KdpipeError(f"{KEY}.path={settings.path!r} is not a folder; point it at a folder with one sub-folder "
                          "per class.")
    roots = _split_roots(root)
    found = {split: [d.name for d in _subfolders(folder, root)] for split, folder in roots.items()}
    classes = order_classes(found["train"], settings.classes, f"{roots['train']}", KEY)
    for split in ("val", "test"):
        extra = [c for c in found.get(split, []) if c not in found["train"] and settings.classes is None]
        if extra:
            raise KdpipeError(f"{roots[split]} has the class folder {extra[0]}/, which {roots['train']} lacks; "
                              "add it to train/ or remove it.")
    entries, skipped = [], []
    seen = {root.resolve()}
    for split, folder in roots.items():
        loose = sorted(p for p in folder.iterdir() if is_hidden(p.name) or not p.is_dir())
        skipped += [(relative(p, root), "hidden" if is_hidden(p.name) else "not in a class folder") for p in loose]
        for label in classes:
            if not (folder / label).is_dir():
                continue
            seen.add((folder / label).resolve())
            for path, reason in _walk(folder / label, root, seen):
                if reason is None:
                    entries.append(Entry(relative(path, root), label, split))
                else:
                    skipped.append((relative(path, root), reason))
    listing = Listing(root, entries, classes, skipped)
    check_classes(listing, str(roots["train"]), f"leave it out with {KEY}.classes")
    return listing


def download(raw_dir: Path, settings: ImagefolderSettings) -> dict:
    return write_manifest(raw_dir, scan(settings), origin=settings.path)


def load(raw_dir: Path, settings: ImagefolderSettings, size: int, store: ImageStore | None = None) -> RawDataset:
    return load_images(raw_dir, Path(settings.path), size, settings.resize, "imagefolder", store)


register("imagefolder", ImagefolderSettings, download, load, DEFAULT_IMAGE_SIZE, local_input=lambda s: s.path)
