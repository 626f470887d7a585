"""Below everything: the error every refusal raises, and sizes and counts as people write them (20GiB, 1.5B)
and as the tool prints them."""
from __future__ import annotations


class OffloadPruneError(Exception):
    """An error the user can act on; the CLI prints it as one line and exits non-zero."""


def parse_bytes(text: str) -> int:
    """'20GiB', '512MB', '1.5G', '1000000' -> bytes (K/M/G/T are powers of 1024, as nvidia-smi counts)."""
    units = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    cleaned = text.strip().lower().removesuffix("ib").removesuffix("b")
    number, unit = (cleaned[:-1], cleaned[-1]) if cleaned and cleaned[-1] in units else (cleaned, "")
    try:
        return int(float(number) * units[unit])
    except ValueError:
        raise OffloadPruneError(f"not a memory size: {text!r} (e.g. 20GiB, 512MiB)") from None


def format_bytes(value: int | None) -> str:
    """Bytes in the largest binary unit that keeps the number at 1 or more: 0.54 GiB as 553 MiB, not 0.00 GiB."""
    if value is None:
        return "-"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value} B"


def parse_count(text: str) -> int:
    """'135M', '1.5B', '7e9', '100000' -> a number of parameters (K/M/B/T are powers of 1000)."""
    units = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
    cleaned = text.strip().lower()
    number, unit = (cleaned[:-1], cleaned[-1]) if cleaned and cleaned[-1] in units else (cleaned, "")
    try:
        value = int(float(number) * units[unit])
    except ValueError:
        raise OffloadPruneError(f"not a number of parameters: {text!r} (e.g. 100M, 1.5B)") from None
    if value < 1:
        raise OffloadPruneError(f"--target-params must be positive, got {text!r}")
    return value
