"""Archive listing under hostile input (security-tests cases 39-45).

Every hostile archive is built here, on the fly, with zipfile/tarfile or byte by byte
with struct where the standard library refuses to write it (overlaps, lies, encryption).
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import signal
import struct
import tarfile
import zipfile
import zlib
from contextlib import contextmanager

import pytest

from mailfilter.archives import BOMB, UNDECIPHERABLE, ArchiveLimits, list_archive

EXE = b"MZ" + b"\x90" * 58 + struct.pack("<I", 64) + b"PE\x00\x00" + b"\x00" * 64


@contextmanager
def finishes_within(seconds: int):
    """Fail the test (instead of hanging the run) when the block takes too long."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def make_zip(files: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def make_tar(files: dict[str, bytes], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def local_header(name: bytes, *, crc: int, csize: int, usize: int, method=0, flags=0) -> bytes:
    return (
        struct.pack(
            "<4s5H3L2H", b"PK\x03\x04", 20, flags, method, 0, 0, crc, csize, usize, len(name), 0
        )
        + name
    )


def central_entry(name: bytes, *, crc, csize, usize, offset, method=0, flags=0) -> bytes:
    return (
        struct.pack(
            "<4s6H3L5H2L",
            b"PK\x01\x02",
            20,
            20,
            flags,
            method,
            0,
            0,
            crc,
            csize,
            usize,
            len(name),
            0,
            0,
            0,
            0,
            0,
            offset,
        )
        + name
    )


def end_record(count: int, cd_size: int, cd_offset: int) -> bytes:
    return struct.pack(
        "<4s4H2LH", b"PK\x05\x06", 0, 0, count & 0xFFFF, count & 0xFFFF, cd_size, cd_offset, 0
    )


def craft_zip(entries: list[tuple[bytes, bytes, int, int, int]]) -> bytes:
    """Entries (name, compressed bytes, method, declared size, flags), headers as told.

    Deflated entries get a CRC of 0: the bombs here are never meant to be inflated fully.
    """
    body = bytearray()
    directory = bytearray()
    for name, data, method, usize, flags in entries:
        crc = zlib.crc32(data) if method == 0 else 0
        offset = len(body)
        body += local_header(
            name, crc=crc, csize=len(data), usize=usize, method=method, flags=flags
        )
        body += data
        directory += central_entry(
            name, crc=crc, csize=len(data), usize=usize, offset=offset, method=method, flags=flags
        )
    return bytes(body + directory + end_record(len(entries), len(directory), len(body)))


def zeros_deflated(megabytes: int) -> bytes:
    """A raw deflate stream of `megabytes` MB of zeros, built without compressing them all."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = compressor.compress(bytes(2**20)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return chunk * megabytes + b"\x03\x00"


def problems(listing, kind):
    return [problem.reason for problem in listing.problems if problem.kind == kind]


def test_members_of_a_plain_zip_are_listed_with_their_bytes():
    listing = list_archive(make_zip({"a.txt": b"hello", "dir/b.exe": EXE}), name="x.zip")
    assert [(m.name, m.data) for m in listing.members] == [("a.txt", b"hello"), ("dir/b.exe", EXE)]
    assert listing.members[1].sniffed == "application/x-dosexec"
    assert listing.problems == []


def test_gzip_bzip2_and_xz_streams_are_decompressed_and_named():
    for data, name, inner in (
        (gzip.compress(EXE), "tool.exe.gz", "tool.exe"),
        (bz2.compress(EXE), "tool.exe.bz2", "tool.exe"),
        (lzma.compress(EXE), "tool.exe.xz", "tool.exe"),
    ):
        listing = list_archive(data, name=name)
        assert [(m.name, m.data) for m in listing.members] == [(inner, EXE)], name


def test_an_exe_in_a_zip_in_a_tgz_is_found_with_its_whole_path():
    inner = make_zip({"evil.exe": EXE})
    listing = list_archive(make_tar({"docs/inner.zip": inner}, "w:gz"), name="outer.tgz")
    paths = [member.path for member in listing.members]
    assert "outer.tgz/outer.tar/docs/inner.zip/evil.exe" in paths
    assert listing.problems == []


def test_a_tbz_is_listed_through_both_layers():
    listing = list_archive(make_tar({"run.exe": EXE}, "w:bz2"), name="a.tbz")
    assert "a.tbz/a.tar/run.exe" in [member.path for member in listing.members]


def test_recursively_nested_zips_stop_at_the_depth_limit():
    """Case 39: 42.zip-style nesting (two copies per level here) stops at depth 5."""
    data = make_zip({"0.dll": bytes(2**20)})
    for level in range(10):
        data = make_zip({f"{level}-a.zip": data, f"{level}-b.zip": data})
    with finishes_within(10):
        listing = list_archive(data, name="42.zip")
    assert any("nesting deeper than 5" in reason for reason in problems(listing, BOMB))


def test_zip_entries_sharing_bytes_are_reported_as_an_overlap_bomb():
    """Case 40: Fifield's construction; Python 3.11.7's zipfile would accept it."""
    kernel = zeros_deflated(2)
    second_name = b"b.bin"
    second = (
        local_header(
            second_name,
            crc=zlib.crc32(bytes(2 * 2**20)),
            csize=len(kernel),
            usize=2 * 2**20,
            method=8,
        )
        + kernel
    )
    # The first entry is "stored" and its data is the second entry, header and all.
    first_name = b"a.bin"
    first = (
        local_header(first_name, crc=zlib.crc32(second), csize=len(second), usize=len(second))
        + second
    )
    directory = central_entry(
        first_name, crc=zlib.crc32(second), csize=len(second), usize=len(second), offset=0
    )
    directory += central_entry(
        second_name,
        crc=zlib.crc32(bytes(2 * 2**20)),
        csize=len(kernel),
        usize=2 * 2**20,
        offset=len(first) - len(second),
        method=8,
    )
    data = first + directory + end_record(2, len(directory), len(first))
    assert len(zipfile.ZipFile(io.BytesIO(data)).infolist()) == 2
    listing = list_archive(data, name="overlap.zip")
    assert any("overlapping entries" in reason for reason in problems(listing, BOMB))


def test_a_zip_announcing_100000_entries_is_refused_before_they_are_read():
    """Case 41, entry count."""
    entry = b"x"
    body = bytearray()
    directory = bytearray()
    for number in range(100_000):
        name = f"{number}.txt".encode()
        offset = len(body)
        crc = zlib.crc32(entry)
        body += local_header(name, crc=crc, csize=1, usize=1) + entry
        directory += central_entry(name, crc=crc, csize=1, usize=1, offset=offset)
    data = bytes(body + directory + end_record(100_000, len(directory), len(body)))
    with finishes_within(10):
        listing = list_archive(data, name="many.zip")
    assert any("more than 1500 archive members" in reason for reason in problems(listing, BOMB))


def test_a_zip_hiding_its_entry_count_is_refused_after_reading_its_directory():
    data = make_zip({f"{n}.txt": b"" for n in range(2000)}, zipfile.ZIP_STORED)
    end = data.rfind(b"PK\x05\x06")
    data = data[: end + 8] + struct.pack("<2H", 1, 1) + data[end + 12 :]
    listing = list_archive(data, name="many.zip")
    assert any("more than 1500 archive members" in reason for reason in problems(listing, BOMB))


def test_a_gigabyte_of_zeros_in_one_entry_is_stopped_by_the_ratio_cap():
    """Case 41, ratio: 1 GB compressed 1000:1."""
    data = craft_zip([(b"zeros.bin", zeros_deflated(1024), 8, 2**30, 0)])
    with finishes_within(10):
        listing = list_archive(data, name="zeros.zip")
    reasons = problems(listing, BOMB)
    assert reasons and reasons[0].startswith("zip bomb: ratio ")
    assert "in member zeros.zip/zeros.bin" in reasons[0]


def test_the_total_cap_stops_many_members_of_moderate_ratio():
    noise = os.urandom(2**20)
    files = {f"{n}.bin": noise for n in range(6)}
    listing = list_archive(
        make_zip(files), name="big.zip", limits=ArchiveLimits(max_total_bytes=4 * 2**20)
    )
    assert any("expands beyond 4 MB" in reason for reason in problems(listing, BOMB))


def test_a_central_directory_claiming_10_bytes_is_not_believed():
    """Case 42: the data inflates to far more than the header says."""
    lying_zeros = craft_zip([(b"small.txt", zeros_deflated(1024), 8, 10, 0)])
    listing = list_archive(lying_zeros, name="lie.zip")
    assert problems(listing, BOMB)
    noise = os.urandom(200_000)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    lying_noise = craft_zip(
        [(b"small.txt", compressor.compress(noise) + compressor.flush(), 8, 10, 0)]
    )
    listing = list_archive(lying_noise, name="lie.zip")
    assert any("expands beyond its declared size" in r for r in problems(listing, BOMB))


def test_an_encrypted_member_is_undecipherable_but_its_name_is_listed():
    """Case 43: zipfile cannot write encryption; the flag bit is set by hand."""
    data = craft_zip([(b"evil.exe", b"\x00" * 12 + EXE, 0, 12 + len(EXE), 0x1)])
    listing = list_archive(data, name="locked.zip")
    assert any("encrypted member 'evil.exe'" in r for r in problems(listing, UNDECIPHERABLE))
    assert [(m.name, m.encrypted, m.data) for m in listing.members] == [("evil.exe", True, None)]


def test_rar_and_7z_archives_are_undecipherable():
    for data in (b"Rar!\x1a\x07\x00" + b"\x00" * 40, b"7z\xbc\xaf\x27\x1c" + b"\x00" * 40):
        assert problems(list_archive(data, name="x"), UNDECIPHERABLE)


@pytest.mark.parametrize(
    "data",
    [
        make_zip({"a.exe": os.urandom(5000)})[:3000],
        gzip.compress(os.urandom(5000))[:3000],
        bz2.compress(os.urandom(5000))[:3000],
        make_tar({"a.exe": os.urandom(5000)})[:3000],
        b"PK\x03\x04" + os.urandom(200),
    ],
    ids=["zip", "gzip", "bzip2", "tar", "garbage-zip"],
)
def test_truncated_or_corrupt_archives_are_undecipherable(data):
    """Case 44."""
    listing = list_archive(data, name="broken")
    assert problems(listing, UNDECIPHERABLE)


def test_a_member_whose_crc_does_not_match_is_undecipherable():
    data = bytearray(make_zip({"a.txt": b"hello world"}, zipfile.ZIP_STORED))
    data[data.find(b"hello")] = ord("j")
    assert problems(list_archive(bytes(data), name="x.zip"), UNDECIPHERABLE)


def test_a_name_cut_by_a_nul_is_listed_both_ways():
    data = craft_zip([(b"evil.exe\x00.txt", b"data", 0, 4, 0)])
    names = [member.name for member in list_archive(data, name="x.zip").members]
    assert "evil.exe" in names
    assert any(name.startswith("evil.exe") and name.endswith(".txt") for name in names)


def test_local_and_central_names_that_differ_are_undecipherable():
    data = bytearray(make_zip({"safe.txt": b"data"}, zipfile.ZIP_STORED))
    data[30:38] = b"evil.exe"
    assert problems(list_archive(bytes(data), name="x.zip"), UNDECIPHERABLE)


def test_a_sparse_tar_member_claiming_a_terabyte_is_read_with_a_cap():
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        info = tarfile.TarInfo("huge.bin")
        info.size = 10
        archive.addfile(info, io.BytesIO(b"0123456789"))
    data = bytearray(buffer.getvalue())
    # Claim 2 GB of content: the bytes are not there, the cap and the end of data stop it.
    data[124:136] = b"%011o\x00" % (2 * 2**30)
    data[148:156] = b"        "
    data[148:156] = b"%06o\x00 " % sum(data[:512])
    with finishes_within(10):
        listing = list_archive(bytes(data), name="x.tar")
    assert listing.problems
