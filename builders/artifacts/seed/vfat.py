"""A FAT12 volume labelled ``cidata`` holding the seed files, in pure Python.

``cloud-localds -f vfat`` makes this with ``mkfs.vfat`` and ``mcopy``; the
layout is simple enough to write directly, without root (no loop mount) and
without mtools: one boot sector, two FATs, a fixed root directory with the
volume label and one long-name (VFAT) entry per file, and the files in
contiguous clusters.  Everything, including the volume serial number and
the timestamps, comes from the inputs, so the image is reproducible.

The FAT layout follows Microsoft's FAT specification ("FAT: General
Overview of On-Disk Format"); real tools check the result in the tests
(``fsck.fat``, ``blkid``, ``mdir``/``mcopy``).
"""

from __future__ import annotations

import hashlib
import struct
import time

SECTOR = 512
ROOT_ENTRIES = 64                        # 4 sectors: the label + 4 files with long names
MIN_BYTES = 128 * 1024                   # what cloud-localds makes (truncate -s 128K)
FAT12_MAX_CLUSTERS = 4084                # more clusters would make readers take it as FAT16
MEDIA = 0xF8


def _dos_datetime(epoch: int) -> tuple[int, int]:
    t = time.gmtime(max(epoch, 315532800))           # FAT dates start in 1980
    date = ((t.tm_year - 1980) << 9) | (t.tm_mon << 5) | t.tm_mday
    clock = (t.tm_hour << 11) | (t.tm_min << 5) | (t.tm_sec // 2)
    return date, clock


def _short_names(names: list[str]) -> dict[str, bytes]:
    """8.3 aliases like USER-D~1 (the long names are the real ones)."""
    out: dict[str, bytes] = {}
    used: set[bytes] = set()
    for name in names:
        stem = "".join(c for c in name.upper() if c.isalnum() or c in "-_")
        n = 1
        while True:
            alias = f"{stem[:8 - 1 - len(str(n))]}~{n}".ljust(11).encode("ascii")
            if alias not in used:
                break
            n += 1
        used.add(alias)
        out[name] = alias
    return out


def _checksum(short: bytes) -> int:
    s = 0
    for c in short:
        s = (((s & 1) << 7) + (s >> 1) + c) & 0xFF
    return s


def _lfn_entries(name: str, short: bytes) -> list[bytes]:
    units = list(name.encode("utf-16-le"))
    chars = [bytes(units[i:i + 2]) for i in range(0, len(units), 2)]
    chunks = []
    for i in range(0, len(chars), 13):
        chunk = chars[i:i + 13]
        if len(chunk) < 13:
            chunk = chunk + [b"\x00\x00"] + [b"\xff\xff"] * (12 - len(chunk))
        chunks.append(b"".join(chunk))
    csum = _checksum(short)
    entries = []
    for seq, chunk in enumerate(chunks, 1):
        order = seq | (0x40 if seq == len(chunks) else 0)
        entries.append(struct.pack("<B10sBBB12sH4s", order, chunk[:10], 0x0F, 0, csum,
                                   chunk[10:22], 0, chunk[22:26]))
    return list(reversed(entries))                     # stored last part first


def _dir_entry(name11: bytes, attr: int, cluster: int, size: int, date: int, clock: int) -> bytes:
    return struct.pack("<11sBBBHHHHHHHI", name11, attr, 0, 0, clock, date, date,
                       0, clock, date, cluster, size)


def make_vfat(files: dict[str, bytes], epoch: int, label: str = "cidata") -> bytes:
    """The FAT12 image holding ``files`` (name -> bytes) at its root."""
    names = list(files)
    shorts = _short_names(names)
    root_sectors = ROOT_ENTRIES * 32 // SECTOR
    spc = 1
    while True:
        cbytes = spc * SECTOR
        need = sum(-(-len(d) // cbytes) for d in files.values())
        clusters = need
        while True:
            fat_sectors = -(-((clusters + 2) * 3 // 2 + 1) // SECTOR)
            total = 1 + 2 * fat_sectors + root_sectors + clusters * spc
            if total * SECTOR >= MIN_BYTES:
                break
            clusters += max(1, (MIN_BYTES // SECTOR - total) // spc)
        if clusters <= FAT12_MAX_CLUSTERS:
            break
        spc *= 2
        if spc > 128:
            raise ValueError("seed too large for a FAT12 volume")

    # FAT: files in contiguous clusters from 2 on
    fat = [0xF00 | MEDIA, 0xFFF] + [0] * clusters
    first: dict[str, int] = {}
    nxt = 2
    for name in names:
        n = -(-len(files[name]) // cbytes)
        first[name] = nxt if n else 0
        for i in range(n):
            fat[nxt + i] = nxt + i + 1 if i < n - 1 else 0xFFF
        nxt += n
    if len(fat) % 2:
        fat.append(0)
    packed = bytearray()
    for i in range(0, len(fat), 2):
        a, b = fat[i], fat[i + 1]
        packed += bytes((a & 0xFF, (a >> 8) | ((b & 0x0F) << 4), b >> 4))
    fat_bytes = bytes(packed).ljust(fat_sectors * SECTOR, b"\0")

    date, clock = _dos_datetime(epoch)
    # kept as given, as mkfs.vfat -n cidata does; cloud-init looks for either case
    label11 = label.encode("ascii")[:11].ljust(11)
    root = bytearray(_dir_entry(label11, 0x08, 0, 0, date, clock))
    for name in names:
        for e in _lfn_entries(name, shorts[name]):
            root += e
        root += _dir_entry(shorts[name], 0x20, first[name], len(files[name]), date, clock)
    if len(root) > root_sectors * SECTOR:
        raise ValueError("too many seed files for the root directory")
    root_bytes = bytes(root).ljust(root_sectors * SECTOR, b"\0")

    serial = int.from_bytes(hashlib.sha256(
        b"".join(n.encode() + b"\0" + files[n] for n in names)).digest()[:4], "little")
    boot = bytearray(SECTOR)
    struct.pack_into("<3s8sHBHBHHBHHHII", boot, 0, b"\xEB\x3C\x90", b"LABFORGE", SECTOR, spc,
                     1, 2, ROOT_ENTRIES, total if total < 65536 else 0, MEDIA, fat_sectors,
                     32, 64, 0, 0 if total < 65536 else total)
    struct.pack_into("<BBBI11s8s", boot, 36, 0x80, 0, 0x29, serial, label11, b"FAT12   ")
    boot[510:512] = b"\x55\xAA"

    data = bytearray()
    for name in names:
        d = files[name]
        data += d + b"\0" * (-len(d) % cbytes)
    data = bytes(data).ljust(clusters * cbytes, b"\0")
    image = bytes(boot) + fat_bytes + fat_bytes + root_bytes + data
    assert len(image) == total * SECTOR
    return image
