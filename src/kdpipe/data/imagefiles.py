"""A user's own image files as a data source: what the ``imagefolder`` and ``csv`` sources share.

Nothing is copied into the project. ``download`` lists the files (relative path, split, class,
size, sha256) into ``data/raw/<name>/manifest.json``, which DVC versions; ``prepare`` reads
every listed file from the user's folder, refuses one whose bytes changed since, and decodes
it (in parallel threads: PIL releases the GIL while decoding) into the prepare stage's image
store, a chunk at a time. So the prepared data always
matches the manifest, and the manifest names exactly which images a model was trained on.

DVC notices a changed folder through ``check_params``: it depends on the folder (or the CSV)
and writes :func:`fingerprint` into ``data/data_source.json``, on which ``download`` depends.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from kdpipe.data.images import UnreadableImage, decode_image, map_in_order
from kdpipe.data.sources import RawDataset
from kdpipe.data.store import ImageStore, chunk_rows, take, with_channels
from kdpipe.errors import KdpipeError
from kdpipe.io import file_digest, read_json, write_json

MANIFEST = "manifest.json"
SPLIT_NAMES = ("train", "val", "test")
EXAMPLES_SHOWN = 5  # skipped files named in metrics/data.json (all of them are in the manifest)


@dataclass(frozen=True)
class Entry:
    """One image file: ``path`` relative to the root ("/"-separated), its class and split."""

    path: str
    label: str
    split: str = "train"


@dataclass
class Listing:
    """What a source found under ``root``: the image files, the classes in label order and
    the files left out, as (relative path, reason)."""

    root: Path
    entries: list[Entry]
    classes: list[str]
    skipped: list[tuple[str, str]]


def is_hidden(name: str) -> bool:
    """Dot files and folders (.DS_Store, ._photo.jpg, .git): never images of the data set."""
    return name.startswith(".")


def inside(path: Path, root: Path) -> bool:
    """Whether ``path``, with every link and ``..`` resolved, lies in the resolved ``root``."""
    return path.resolve().is_relative_to(root.resolve())


def relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def check_classes(listing: Listing, where: str, hint: str) -> None:
    """At least two classes, each with a training file; ``hint`` says how to leave one out."""
    if len(listing.classes) < 2:
        found = f"only {listing.classes[0]!r}" if listing.classes else "none"
        raise KdpipeError(f"{where} has {found} as classes; a classifier needs at least two.")
    counts = Counter(e.label for e in listing.entries if e.split == "train")
    empty = [name for name in listing.classes if counts[name] == 0]
    if empty:
        raise KdpipeError(f"class {empty[0]!r} has no training images in {where} (hidden, empty and missing files do "
                          f"not count); add some, or {hint}.")


def write_manifest(raw_dir: Path, listing: Listing, origin: str) -> dict[str, Any]:
    """Hash every listed file into ``raw_dir/manifest.json``; return the download stage's summary."""
    files = []
    # a canonical order: reordering the CSV's rows changes nothing downstream
    entries = sorted(listing.entries, key=lambda e: (SPLIT_NAMES.index(e.split), e.path))
    for entry in tqdm(entries, desc="listing images", unit="file", mininterval=1.0):
        path = listing.root / entry.path
        files.append({"path": entry.path, "label": entry.label, "split": entry.split,
                      "bytes": path.stat().st_size, "sha256": file_digest(path)})
    manifest = {"origin": origin, "classes": listing.classes, "files": files,
                "skipped": [{"path": p, "reason": r} for p, r in listing.skipped]}
    raw_dir.mkdir(parents=True, exist_ok=True)
    write_json(raw_dir / MANIFEST, manifest)
    splits = Counter(f["split"] for f in files)
    return {"origin": origin, "classes": listing.classes, "files": len(files), "skipped_files": len(listing.skipped),
            **{f"{name}_files": splits[name] for name in SPLIT_NAMES if splits[name]}}


def read_manifest(raw_dir: Path) -> dict[str, Any]:
    path = raw_dir / MANIFEST
    if not path.is_file():
        raise KdpipeError(f"{path} not found; run the download stage first (dvc repro download).")
    return read_json(path)


def _read_checked(path: Path, sha256: str) -> bytes:
    """The file's bytes, provided they are the ones the download stage listed."""
    try:
        data = path.read_bytes()
    except OSError:
        data = None
    if data is None or hashlib.sha256(data).hexdigest() != sha256:
        raise KdpipeError(f"{path} changed or disappeared after the download stage listed it; list the images again "
                          "with `dvc repro -f -s download`, then run `dvc repro`.")
    return data


def _decode_all(root: Path, files: list[dict], size: int, resize: str, name: str) -> Iterator[np.ndarray | str]:
    """Decoded images in manifest order (a reason string for each file that cannot be decoded),
    decoded by parallel threads, at most a chunk of them waiting in memory at any time."""
    def one(item: dict) -> np.ndarray | str:
        path = root / item["path"]
        if not inside(path, root):
            raise KdpipeError(f"{item['path']} leads outside {root}; run the download stage again.")
        try:
            return decode_image(_read_checked(path, item["sha256"]), size, resize)
        except UnreadableImage as exc:
            return str(exc)

    decoded = map_in_order(one, files, chunk_rows((3, size, size)))
    yield from tqdm(decoded, total=len(files), desc=f"decoding {name}", unit="img", mininterval=1.0)


def load_images(raw_dir: Path, root: Path, size: int, resize: str, name: str,
                store: ImageStore | None = None) -> RawDataset:
    """Decode the manifest's files (read from ``root``) into a RawDataset at ``size``×``size``,
    writing them into ``store`` (None: memory) as they come.

    Images are 1-channel when every kept image is greyscale, else 3-channel (greys repeated).
    """
    manifest = read_manifest(raw_dir)
    classes, files = list(manifest["classes"]), list(manifest["files"])
    label_of = {c: i for i, c in enumerate(classes)}
    writer = (store or ImageStore()).writer((3, size, size))  # row k: the k-th decodable file
    kept, grey = torch.zeros(len(files), dtype=torch.bool), True
    skipped = [f"{s['path']} ({s['reason']})" for s in manifest["skipped"]]
    failed: dict[str, str] = {}  # class -> its first unreadable training file
    for i, (item, decoded) in enumerate(zip(files, _decode_all(root, files, size, resize, name))):
        if isinstance(decoded, str):
            skipped.append(f"{item['path']} ({decoded})")
            if item["split"] == "train":
                failed.setdefault(item["label"], skipped[-1])
            continue
        writer.append(decoded)  # a 1×H×W grey image is repeated into all three channels
        grey = grey and decoded.shape[0] == 1
        kept[i] = True
    images = writer.finish()
    skipped.sort()
    if skipped:
        print(f"skipped {len(skipped)} file(s) that are not usable images (hidden, empty, unreadable), "
              f"e.g. {skipped[0]}")
    labels = torch.tensor([label_of[f["label"]] for f in files], dtype=torch.int64)[kept]
    split_of = [f["split"] for f, k in zip(files, kept.tolist()) if k]
    splits = {s: torch.tensor([x == s for x in split_of], dtype=torch.bool) for s in SPLIT_NAMES}
    _check_decoded(labels[splits["train"]], classes, failed, name)
    # every image grey: one channel (the grey value itself: the luma of equal R, G, B is that value)
    channels = 1 if grey and bool(kept.any()) else 3
    tensors = {s: (with_channels(take(images, torch.nonzero(mask).flatten()), channels), labels[mask])
               for s, mask in splits.items()}
    # a split the user gave stays given, even when none of its files could be decoded
    given = {s: tensors[s] if any(f["split"] == s for f in files) else (None, None) for s in ("val", "test")}
    return RawDataset(
        train_images=tensors["train"][0], train_labels=tensors["train"][1], class_names=classes,
        flip=True,  # most photos keep their label when mirrored; data.augment.flip: false turns it off
        test_images=given["test"][0], test_labels=given["test"][1],
        val_images=given["val"][0], val_labels=given["val"][1],
        skipped=len(skipped), skipped_examples=skipped[:EXAMPLES_SHOWN],
    )


def _check_decoded(train_labels: torch.Tensor, classes: list[str], failed: dict[str, str], name: str) -> None:
    """Every class keeps at least one training image after the unreadable files are skipped."""
    counts = torch.bincount(train_labels, minlength=len(classes)).tolist()
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if empty:
        raise KdpipeError(f"class {empty[0]!r} has no readable training images (e.g. {failed[empty[0]]}); add images "
                          f"that can be decoded, or leave the class out with data.{name}.classes.")


def _files(root: Path) -> Iterable[Path]:
    if root.is_file():
        yield root
        return
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            yield Path(folder) / name


def fingerprint(path: str, key: str) -> dict[str, Any]:
    """What ``check_params`` records of a user's folder or file: a digest of every file's path,
    size and modification time. Only a stat per file, no reading, since it runs on every params
    change; DVC itself hashes the contents (the folder is a dependency of check_params)."""
    root = Path(path)
    if not root.exists():
        raise KdpipeError(f"params.yaml: {key}={path!r} does not exist; point it at your images.")
    digest, count, total = hashlib.sha256(), 0, 0
    for file in _files(root):
        try:
            stat = file.stat()
        except OSError:  # a dangling link: its own entry still counts
            stat = file.lstat()
        digest.update(f"{relative(file, root) if file != root else '.'}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        count, total = count + 1, total + stat.st_size
    return {"path": path, "files": count, "bytes": total, "stat_sha256": digest.hexdigest()}


# --- settings shared by the two sources ----------------------------------------------------------

def check_settings(path: str, classes: list[str] | None, key: str, what: str) -> None:
    """The rules of ``data.<name>.path`` and ``.classes`` (``what``: what the path must name)."""
    from kdpipe.validation import fail

    if not path.strip():
        fail(f"{key}.path", path, what)
    if path.startswith("~"):
        fail(f"{key}.path", path, f"{what}, as an absolute path or one relative to the project root (DVC does not "
                                  "expand ~)")
    if classes is not None and (len(classes) < 2 or len(set(classes)) != len(classes) or not all(classes)):
        fail(f"{key}.classes", classes, "null (every class) or a list of at least two different class names")


def order_classes(found: Iterable[str], wanted: list[str] | None, where: str, key: str) -> list[str]:
    """The classes in label order: ``wanted`` (``data.<name>.classes``) when given, else ``found``
    sorted (numerically when every name is an integer, so 10 comes after 9)."""
    found = set(found)
    if wanted is None:
        numeric = all(name.lstrip("-").isdigit() for name in found)
        return sorted(found, key=lambda name: (int(name), name) if numeric else (0, name))
    unknown = [name for name in wanted if name not in found]
    if unknown:
        listed = ", ".join(sorted(found)[:10]) or "none"
        raise KdpipeError(f"{key}.classes names {unknown[0]!r}, which {where} does not have; its classes are: "
                          f"{listed}.")
    return list(wanted)
