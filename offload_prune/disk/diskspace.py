"""Disk space a run still needs in its output folder: checked before anything is written, and
named in the message when a write runs out of space or over the file-size limit anyway."""
from __future__ import annotations

import shutil
from pathlib import Path

from ..basics import OffloadPruneError, format_bytes
from .checkpoint import ShardLayout
from .durable import DiskFullError


def check_disk_space(save: Path, layout: ShardLayout, activation_bytes: int) -> None:
    """Refuse before anything is written when the output folder's file system cannot hold the run."""
    needed = _bytes_still_needed(save, layout, activation_bytes)
    free = _free_bytes(save)
    if needed > free:
        raise OffloadPruneError(f"--save {save}: the run needs about {format_bytes(needed)} of disk space there, "
                                f"{format_bytes(free)} is free; free space or choose another folder")


def disk_full_message(exc: DiskFullError, save: Path, layout: ShardLayout, activation_bytes: int) -> str:
    largest = max(layout.largest_shard_bytes(), activation_bytes)
    return (f"{exc}; the rest of the run needs about {format_bytes(_bytes_still_needed(save, layout, activation_bytes))} "
            f"in {save} ({format_bytes(_free_bytes(save))} free now; largest file about {format_bytes(largest)}). "
            "Finished blocks are kept: free space, then run the same command again to resume")


def _bytes_still_needed(save: Path, layout: ShardLayout, activation_bytes: int) -> int:
    """Output tensors not yet on disk, plus two activation files (the old one goes only after the new
    one is committed) and one shard's temporary copy."""
    save = save.expanduser().absolute()
    files = {save / name for names in layout.file_names for name in names}
    present = sum(path.stat().st_size for path in files if path.is_file())
    return max(layout.total_size - present, 0) + 2 * activation_bytes + layout.largest_shard_bytes()


def _free_bytes(save: Path) -> int:
    folder = save.expanduser().absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free
