"""Repair what a killed writer leaves in an HDF5 superblock (version 2/3), in pure Python.

A writer of the newest file format sets "file is open for write" flags in the
superblock and clears them on close. After kill -9 they stay set and HDF5
refuses a plain reopen. `h5clear -s` fixes that, but it is not installed on
every cluster, so the store does the same thing itself: clear the flags byte
and recompute the superblock's Jenkins lookup3 checksum, only while the caller
holds the store's writer lock, so no live writer is affected. A file shorter
than the end-of-file address its superblock records is refused: a killed
writer leaves its file longer than that address (the data lands first), a
cut-short copy leaves it shorter.
"""

from __future__ import annotations

import os
import struct

SIGNATURE = b"\x89HDF\r\n\x1a\n"
_MASK = 0xFFFFFFFF
# HDF5 looks for the superblock at 0 and at 512, 1024, 2048 ... (after a user block).
_SEARCH_OFFSETS = (0,) + tuple(512 << i for i in range(16))


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _MASK


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' hashlittle (lookup3.c), the checksum HDF5 uses for metadata."""
    length = len(data)
    a = b = c = (0xDEADBEEF + length + initval) & _MASK
    i = 0
    while length > 12:
        a = (a + int.from_bytes(data[i : i + 4], "little")) & _MASK
        b = (b + int.from_bytes(data[i + 4 : i + 8], "little")) & _MASK
        c = (c + int.from_bytes(data[i + 8 : i + 12], "little")) & _MASK
        a = (a - c) & _MASK; a ^= _rot(c, 4); c = (c + b) & _MASK  # noqa: E702
        b = (b - a) & _MASK; b ^= _rot(a, 6); a = (a + c) & _MASK  # noqa: E702
        c = (c - b) & _MASK; c ^= _rot(b, 8); b = (b + a) & _MASK  # noqa: E702
        a = (a - c) & _MASK; a ^= _rot(c, 16); c = (c + b) & _MASK  # noqa: E702
        b = (b - a) & _MASK; b ^= _rot(a, 19); a = (a + c) & _MASK  # noqa: E702
        c = (c - b) & _MASK; c ^= _rot(b, 4); b = (b + a) & _MASK  # noqa: E702
        i += 12
        length -= 12
    if length == 0:
        return c
    tail = data[i:] + bytes(12 - length)
    a = (a + int.from_bytes(tail[0:4], "little")) & _MASK
    b = (b + int.from_bytes(tail[4:8], "little")) & _MASK
    c = (c + int.from_bytes(tail[8:12], "little")) & _MASK
    c ^= b; c = (c - _rot(b, 14)) & _MASK  # noqa: E702
    a ^= c; a = (a - _rot(c, 11)) & _MASK  # noqa: E702
    b ^= a; b = (b - _rot(a, 25)) & _MASK  # noqa: E702
    c ^= b; c = (c - _rot(b, 16)) & _MASK  # noqa: E702
    a ^= c; a = (a - _rot(c, 4)) & _MASK  # noqa: E702
    b ^= a; b = (b - _rot(a, 14)) & _MASK  # noqa: E702
    c ^= b; c = (c - _rot(b, 24)) & _MASK  # noqa: E702
    return c


def is_hdf5(path) -> bool:
    """True when an HDF5 signature sits where HDF5 looks for one."""
    return _find_superblock(path) is not None


def _find_superblock(path):
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        for offset in _SEARCH_OFFSETS:
            if offset + 8 > size:
                return None
            fh.seek(offset)
            if fh.read(8) == SIGNATURE:
                return offset
    return None


def read_status(path) -> dict:
    """Superblock facts: version, consistency flags, recorded end-of-file, actual size."""
    offset = _find_superblock(path)
    if offset is None:
        raise ValueError(f"{path} has no HDF5 signature")
    with open(path, "rb") as fh:
        fh.seek(offset)
        head = fh.read(64)
    version = head[8]
    info = {"offset": offset, "version": version, "flags": None, "eof": None, "size": os.path.getsize(path)}
    if version >= 2:
        size_of_offsets = head[9]
        fmt = {4: "<I", 8: "<Q"}[size_of_offsets]
        eof_at = 12 + 2 * size_of_offsets
        info["flags"] = head[11]
        info["eof"] = struct.unpack_from(fmt, head, eof_at)[0]
    return info


def repair_after_crash(path) -> list[str]:
    """Clear write flags left by a writer that did not close; returns what was done.

    Caller must hold the writer lock. A no-op on a cleanly closed file.
    """
    info = read_status(path)
    done = []
    if info["version"] < 2:
        return done
    offset = info["offset"]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        head = bytearray(fh.read(64))
        size_of_offsets = head[9]
        body = 12 + 4 * size_of_offsets
        stored = struct.unpack_from("<I", head, body)[0]
        if lookup3(bytes(head[:body])) != stored:
            raise ValueError(f"{path}: superblock checksum does not match; the file is damaged")
        if info["eof"] is not None and info["eof"] > info["size"]:
            raise ValueError(
                f"the file is truncated ({info['size']:,} of {info['eof']:,} bytes); a killed writer never leaves "
                "that, a cut-short copy does"
            )
        if head[11] != 0:
            head[11] = 0
            struct.pack_into("<I", head, body, lookup3(bytes(head[:body])))
            fh.seek(offset)
            fh.write(bytes(head[: body + 4]))
            done.append(f"cleared superblock write flags 0x{info['flags']:02x} left by a writer that did not close")
        fh.flush()
        os.fsync(fh.fileno())
    return done
