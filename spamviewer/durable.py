"""Making file changes survive a crash: the one step both the quarantine store and the
relay map writer need after they rename a file into place."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_directory(path: Path | str) -> None:
    """Flush a directory's entries, so that a rename into it is on disk, not only the data."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
