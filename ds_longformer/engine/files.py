"""Writing files and folders so that a crash never leaves one half-written, and checking that a
folder can be written at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` all at once: a crash leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def replace_folder(new: Path, target: Path) -> None:
    """Put the complete folder ``new`` in the place of ``target`` (a folder or nothing): two renames,
    ``target`` -> ``.<name>.old`` and ``new`` -> ``target``. Readers see the old folder or the new
    one, whole, never a mix (at worst, after a crash between the renames, no folder until
    ``recover_folder`` runs)."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)


def staging_folder(target: Path) -> Path:
    """Where the next version of ``target`` is written before replace_folder (emptied)."""
    new = target.with_name(f".{target.name}.new")
    shutil.rmtree(new, ignore_errors=True)
    return new


def recover_folder(target: Path) -> None:
    """Finish (or undo) a replace_folder that a crash interrupted: once ``target`` was moved aside
    the new folder was complete, so it takes the place; a new folder written while ``target``
    stayed in place may be partial and is dropped."""
    old, new = target.with_name(f".{target.name}.old"), target.with_name(f".{target.name}.new")
    if old.exists() and not target.exists():
        os.rename(new if new.exists() else old, target)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(new, ignore_errors=True)


def writable_folder(folder: Path, what: str) -> None:
    """Check that ``folder`` can be written (or created: its nearest existing parent can be written),
    leaving nothing behind; raises UserError naming ``what`` (e.g. the flag) otherwise."""
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{what} {folder}: cannot write there ({existing} is a file, not a folder)")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise UserError(f"{what} {folder}: cannot write there ({existing}: {err.strerror or err})") from None
