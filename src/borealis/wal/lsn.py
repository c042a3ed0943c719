"""Log sequence numbers in PostgreSQL's text form and segment arithmetic.

An LSN is a 64-bit byte position in the WAL stream. PostgreSQL prints it as ``%X/%X``
(PG15) or ``%X/%08X`` (PG16+); both parse here.
"""

from __future__ import annotations

SEGMENT_SIZE = 16 * 1024 * 1024
PAGE_SIZE = 8192
MAX_LSN = (1 << 64) - 1


def format_lsn(lsn: int) -> str:
    """``0x1_0000A028`` -> ``'1/A028'``: PostgreSQL's form."""
    if not 0 <= lsn <= MAX_LSN:
        raise ValueError(f"LSN out of range: {lsn}")
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    hi, sep, lo = text.strip().partition("/")
    if not sep or not hi or not lo or len(hi) > 8 or len(lo) > 8:
        raise ValueError(f"not an LSN: {text!r}")
    try:
        return (int(hi, 16) << 32) | int(lo, 16)
    except ValueError:
        raise ValueError(f"not an LSN: {text!r}") from None


def segment_start(lsn: int, segment_size: int = SEGMENT_SIZE) -> int:
    return lsn - lsn % segment_size


def segment_number(lsn: int, segment_size: int = SEGMENT_SIZE) -> int:
    return lsn // segment_size


def segment_name(timeline: int, segno: int, segment_size: int = SEGMENT_SIZE) -> str:
    """PostgreSQL's file name for a segment: ``TTTTTTTTXXXXXXXXYYYYYYYY``."""
    per_xlogid = 0x100000000 // segment_size
    return f"{timeline:08X}{segno // per_xlogid:08X}{segno % per_xlogid:08X}"


def parse_segment_name(name: str, segment_size: int = SEGMENT_SIZE) -> tuple[int, int]:
    """``segment_name`` inverted: returns ``(timeline, segno)``."""
    if len(name) != 24:
        raise ValueError(f"not a segment name: {name!r}")
    try:
        tli, hi, lo = int(name[:8], 16), int(name[8:16], 16), int(name[16:], 16)
    except ValueError:
        raise ValueError(f"not a segment name: {name!r}") from None
    per_xlogid = 0x100000000 // segment_size
    if lo >= per_xlogid:
        raise ValueError(f"not a segment name: {name!r}")
    return tli, hi * per_xlogid + lo


def history_name(timeline: int) -> str:
    return f"{timeline:08X}.history"
