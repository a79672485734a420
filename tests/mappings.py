"""Resident memory of this process's mappings, read from /proc/self/smaps (Linux): what residency tests assert on."""

from __future__ import annotations

from collections.abc import Callable


def resident_kib(keep: Callable[[int, int, str], bool]) -> int:
    """KiB resident of the mappings for which `keep(start, stop, path)` holds ('' for anonymous ones)."""
    total, inside = 0, False
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as smaps:
        for line in smaps:
            fields = line.split(maxsplit=5)
            if "-" in fields[0] and not fields[0].endswith(":"):
                start, stop = (int(x, 16) for x in fields[0].split("-"))
                inside = keep(start, stop, fields[5].strip() if len(fields) > 5 else "")
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total
