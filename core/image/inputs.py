"""What a command is given: the files that paths, folders and glob patterns name, checked before any work.

`blastq run` and `blastq submit` expand their arguments here, the same way. Folders and globs are
treated as the watcher treats its folder: only regular files, no symlink leading out of the folder,
and neither `blastq synth`'s truth nor `blastq run`'s own outputs (those are skipped, and said so). A
file named on the command line is taken as given, once it is a regular file. No Celery, no database.
"""

from __future__ import annotations

import glob
import os
import re
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import tifffile

from blastq.core.common import InvalidConfig, InvalidSlide, SlideTooLarge
from blastq.core.image.slide import DEFAULT_MAX_PIXELS, image_size
from blastq.core.image.wsi import TIFF_MAGICS, is_whole_slide

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# A labelled image's truth masks (core.synth.field writes them): beside an image, they are not images to run.
TRUTH_SUFFIXES = (".mask.png", ".nuclei.png", ".instances.tif")
# What `blastq run --out` writes into OUT/<name>/ (core.outputs.artifacts.ARTIFACT_NAMES, and the whole-slide
# pyramidal TIFFs); skipped in a folder that holds a summary.json, i.e. a result folder.
OUTPUT_NAMES = frozenset(
    {
        "mask.png",
        "nuclei.png",
        "instances.tif",
        "mask.tif",
        "nuclei.tif",
        "overlay.png",
        "cells.csv",
        "cells.geojson",
        "gallery.png",
        "gallery-labels.png",
        "gallery.json",
        "summary.json",
        "report.html",
    }
)
# Enough of a file for every header core.image.slide reads (a JPEG's frame header sits after its APP
# segments, each at most 64 KiB); TIFFs are opened by tifffile, which reads only the IFDs.
HEADER_BYTES = 1 << 20
MAX_NAME_CHARS = 200  # an output folder name; file systems allow 255 bytes


@dataclass(frozen=True)
class Refused:
    """An argument that names nothing usable, or a file that is not taken: why, in one line."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class Inputs:
    """The files to process, in order and each once; what was refused; what folders held besides smears."""

    files: tuple[Path, ...]
    refused: tuple[Refused, ...] = ()
    skipped: tuple[Path, ...] = ()  # truth and result files found in folders and globs, left out

    def skipped_line(self) -> str | None:
        """One line saying what was left out of folders and globs, or None."""
        if not self.skipped:
            return None
        truth = [p for p in self.skipped if p.name.lower().endswith(TRUTH_SUFFIXES)]
        outputs = [p for p in self.skipped if p not in truth]
        parts = [
            f"{len(found)} {what} ({_examples(found)})"
            for found, what in ((truth, "synthetic truth file(s)"), (outputs, "blastq output file(s)"))
            if found
        ]
        return f"skipped {' and '.join(parts)}: not smears"


def expand_inputs(paths: Iterable[str | Path]) -> Inputs:
    """Files named, the images directly inside folders named, and the files glob patterns match."""
    files: list[Path] = []
    refused: list[Refused] = []
    skipped: list[Path] = []
    for arg in map(str, paths):
        path = Path(arg)
        already = len(refused)
        if path.is_dir():
            found = _folder_images(path, refused, skipped)
            if not found and len(refused) == already:
                refused.append(Refused(arg, "no images in this folder"))
        elif path.exists() or path.is_symlink():
            reason = _not_regular(path)
            found = [] if reason else [path]
            if reason:
                refused.append(Refused(arg, reason))
        elif glob.has_magic(arg):
            found = _glob_files(arg, refused, skipped)
            if not found and len(refused) == already:
                refused.append(Refused(arg, "no files match"))
        else:
            found = []
            refused.append(Refused(arg, "no such file"))
        files.extend(found)
    seen: set[Path] = set()
    unique = []
    for f in files:
        if (key := f.resolve()) not in seen:
            seen.add(key)
            unique.append(f)
    return Inputs(tuple(unique), tuple(refused), tuple(skipped))


def _folder_images(folder: Path, refused: list[Refused], skipped: list[Path]) -> list[Path]:
    root = folder.resolve()
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        refused.append(Refused(str(folder), f"cannot list the folder ({exc.strerror or exc})"))
        return []
    found = []
    for entry in entries:
        # Hidden names (".", and "~" office locks) are left out as a glob's `*` leaves them out.
        if entry.name.startswith((".", "~")) or not entry.name.lower().endswith(IMAGE_SUFFIXES):
            continue
        if entry.is_dir():
            continue
        path = Path(entry.path)
        if _not_a_smear(path):
            skipped.append(path)
        elif reason := _outside(path, root) or _not_regular(path):
            refused.append(Refused(str(path), reason))
        else:
            found.append(path)
    return found


def _glob_files(pattern: str, refused: list[Refused], skipped: list[Path]) -> list[Path]:
    found = []
    for match in sorted(glob.glob(pattern)):
        path = Path(match)
        if path.is_dir():
            continue
        if _not_a_smear(path):
            skipped.append(path)
        elif reason := _outside(path, path.parent.resolve()) or _not_regular(path):
            refused.append(Refused(match, reason))
        else:
            found.append(path)
    return found


def _not_a_smear(path: Path) -> bool:
    """`blastq synth`'s truth (older layout: beside the image), or a file of a `blastq run` result folder."""
    name = path.name.lower()
    if name.endswith(TRUTH_SUFFIXES):
        return True
    return name in OUTPUT_NAMES and (path.parent / "summary.json").is_file()


def _outside(path: Path, root: Path) -> str | None:
    """Why a symlink in a folder is refused: it leads out of the folder (as the watcher rules)."""
    if not path.is_symlink():
        return None
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return "broken symlink"
    if not target.is_relative_to(root):
        return f"symlink to {target}, outside the folder {root}"
    return None


def _not_regular(path: Path) -> str | None:
    """Why a path is not read: a device, a pipe or a socket never ends or never answers."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "broken symlink" if path.is_symlink() else "no such file"
    except (OSError, RuntimeError) as exc:
        return f"cannot read file ({getattr(exc, 'strerror', None) or exc})"
    if stat.S_ISDIR(mode):
        return "is a directory, not an image file"
    if not stat.S_ISREG(mode):
        if stat.S_ISFIFO(mode):
            kind = "named pipe"
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            kind = "device"
        else:
            kind = "socket"
        return f"not a regular file (a {kind})"
    return None


def _examples(paths: list[Path], shown: int = 3) -> str:
    names = ", ".join(p.name for p in paths[:shown])
    return names + (", ..." if len(paths) > shown else "")


def check_image_header(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Refuse, from its header alone, a file the worker would refuse: not an image, zero-size, too many pixels.

    The checks of core.image.slide's decoder before it decodes (format by leading bytes, size from the
    header, the pixel limit); whole slides pass once their reader recognises them.
    """
    label = str(path)
    if reason := _not_regular(path):
        raise InvalidSlide(f"{reason}", path=label)
    try:
        with Path(path).open("rb") as fh:
            head = fh.read(HEADER_BYTES)
    except OSError as exc:
        raise InvalidSlide(f"cannot read file ({exc.strerror or exc})", path=label) from exc
    if is_whole_slide(path):
        return
    if head.startswith(TIFF_MAGICS):
        try:
            with tifffile.TiffFile(path) as tif:
                page = tif.pages.first
                width, height = int(page.imagewidth), int(page.imagelength)
        except Exception as exc:
            raise InvalidSlide(f"unreadable TIFF header ({exc})", path=label) from exc
    else:
        width, height = image_size(head, label)
    if width <= 0 or height <= 0:
        raise InvalidSlide(f"zero-size image ({width}x{height})", path=label)
    if width * height > max_pixels:
        raise SlideTooLarge(f"{width}x{height} pixels exceeds the maximum of {max_pixels}", path=label)


def check_writable_folder(folder: Path, what: str) -> None:
    """Create `folder` if needed and write a scratch file into it; InvalidConfig naming it otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".blastq-write-check-"):
            pass
    except OSError as exc:
        raise InvalidConfig(f"{what} {folder} is not writable ({exc.strerror or exc})") from exc


def output_folder_name(path: Path, used: set[str]) -> str:
    """A folder name for `path`'s outputs: one part (never `.`, `..`, or with a separator), unique in `used`.

    Two images with one name must not overwrite each other, and no name may lead out of OUT.
    """
    stem = re.sub(r"[/\\\x00]", "_", Path(path).stem).strip()[:MAX_NAME_CHARS]
    if not stem.strip("."):  # "", ".", "..", "...": the stem of "...png" is ".."
        stem = "image"
    name, i = stem, 2
    while name.lower() in used:
        name, i = f"{stem}-{i}", i + 1
    used.add(name.lower())
    return name
