"""The DATA reader fed in chunks: the end of data, transparency, bare CR/LF and the limits
come out the same wherever the chunks are cut, and the same as line by line."""

from __future__ import annotations

import random
import time

import pytest

from mailfilter.data import (
    BARE_LINE_END,
    NOMINAL,
    SLICE,
    TOO_BIG,
    TOO_LONG,
    TOO_MANY_HEADERS,
    DataAccumulator,
    DataLimits,
)

NORMALISE = DataLimits(
    max_size=1 << 20, max_line_length=998, max_header_count=100, normalise_bare=True
)
REJECT = DataLimits(
    max_size=1 << 20, max_line_length=998, max_header_count=100, normalise_bare=False
)


def read(chunks, limits=NORMALISE) -> tuple[DataAccumulator, bytes]:
    """Feed chunks until the end of data; returns the accumulator and what was left over
    for the command reader."""
    accumulator = DataAccumulator(limits)
    for index, chunk in enumerate(chunks):
        end = accumulator.feed(chunk)
        if end >= 0:
            return accumulator, chunk[end:] + b"".join(chunks[index + 1 :])
    raise AssertionError("no end of data")


def splits(stream: bytes):
    """The stream whole, byte by byte, and cut in two at every position."""
    yield [stream]
    yield [stream[i : i + 1] for i in range(len(stream))]
    for cut in range(1, len(stream)):
        yield [stream[:cut], stream[cut:]]


def reference(stream: bytes, limits: DataLimits) -> tuple[DataAccumulator, int] | None:
    """Line by line, as a reader taking one CRLF-ended line at a time does: the end is
    the line "." at a line start; returns the accumulator and the offset after the end."""
    accumulator = DataAccumulator(limits)
    position = 0
    while True:
        found = stream.find(b"\r\n", position)
        if found < 0:
            return None
        line = stream[position : found + 2]
        if accumulator.at_line_start and line == b".\r\n":
            return accumulator, found + 2
        accumulator._line(line)
        position = found + 2


def facts(accumulator: DataAccumulator) -> tuple:
    content = accumulator.content() if accumulator.state == NOMINAL else None
    return (
        accumulator.state,
        accumulator.size,
        accumulator.bare_seen,
        accumulator.eight_bit,
        accumulator.nul_seen,
        accumulator.header_count,
        content,
    )


# The end of data ------------------------------------------------------------------------


def test_end_of_data_cut_anywhere_ends_the_message_once_and_leaves_the_next_command():
    stream = b"Subject: a\r\n\r\nbody\r\n.\r\nQUIT\r\n"
    for chunks in splits(stream):
        accumulator, rest = read(chunks)
        assert accumulator.content() == b"Subject: a\r\n\r\nbody\r\n", chunks
        assert rest == b"QUIT\r\n", chunks


def test_empty_message_is_the_dot_line_alone():
    for chunks in splits(b".\r\nNOOP\r\n"):
        accumulator, rest = read(chunks)
        assert accumulator.content() == b""
        assert accumulator.size == 0
        assert rest == b"NOOP\r\n"


def test_a_dot_line_after_a_cut_long_line_is_text_not_the_end():
    accumulator = DataAccumulator(
        DataLimits(max_size=1 << 22, max_line_length=1 << 21, max_header_count=10,
                   normalise_bare=True)
    )
    long_line = b"x" * (SLICE + 10)
    assert accumulator.feed(b"\r\n" + long_line) == -1
    # The slice was passed on: the next octets are inside that line, not at its start.
    assert accumulator.at_line_start is False
    assert accumulator.feed(b".\r\n") == -1
    end = accumulator.feed(b".\r\n")
    assert end == 3
    assert accumulator.content() == b"\r\n" + long_line + b".\r\n"


def test_feeding_after_the_end_is_an_error():
    accumulator, _ = read([b".\r\n"])
    with pytest.raises(ValueError):
        accumulator.feed(b"more\r\n")


# Transparency -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        (b"..\r\n", b".\r\n"),
        (b"..x\r\n", b".x\r\n"),
        (b".x\r\n", b"x\r\n"),
        (b"a\r\n..\r\nb\r\n", b"a\r\n.\r\nb\r\n"),
        (b"a\r\n...\r\n", b"a\r\n..\r\n"),
        (b"a\r\n.b.\r\n", b"a\r\nb.\r\n"),
    ],
)
def test_the_first_dot_of_a_line_is_removed_wherever_the_chunks_are_cut(sent, kept):
    for chunks in splits(sent + b".\r\n"):
        accumulator, rest = read(chunks)
        assert accumulator.content() == kept, chunks
        assert accumulator.size == len(kept)
        assert rest == b""


def test_a_dot_after_a_bare_lf_is_not_a_line_start_and_stays():
    for chunks in splits(b"a\n.b\r\n.\r\n"):
        accumulator, _ = read(chunks)
        assert accumulator.content() == b"a\r\n.b\r\n"


@pytest.mark.parametrize(
    ("sent", "verbatim"),
    [
        (b"Subject: a\r\n\r\nbody\r\n", True),
        (b"a\r\nb.\r\n", True),
        (b"a\r\n..\r\n", False),
        (b"..x\r\n", False),
        (b"a\n.b\r\n", False),
        (b"a\rb\r\n", False),
        (b"x" * 900 + b"\r\n", True),
    ],
)
def test_content_is_verbatim_only_when_no_line_of_it_starts_with_a_dot(sent, verbatim):
    """What the relay may send after DATA as it is (relay.wire_text)."""
    from mailfilter.relay import wire_text

    for chunks in splits(sent + b".\r\n"):
        accumulator, _ = read(chunks)
        content = accumulator.content()
        assert accumulator.verbatim == verbatim, chunks
        if verbatim:
            assert wire_text(content, verbatim=True) == wire_text(content)


def test_line_at_the_limit_with_a_stuffed_dot_passes():
    limits = DataLimits(max_size=1 << 20, max_line_length=998, max_header_count=10,
                        normalise_bare=True)
    stream = b"S: e\r\n\r\n." + b"z" * 998 + b"\r\n.\r\n"
    for cut in range(0, len(stream), 97):
        accumulator, _ = read([stream[:cut], stream[cut:]] if cut else [stream], limits)
        assert accumulator.state == NOMINAL
        assert accumulator.content().endswith(b"\r\n" + b"z" * 998 + b"\r\n")


# Bare CR and LF ---------------------------------------------------------------------------

ENDINGS = [
    b"\n.\n", b"\r.\r", b"\r.\n", b"\n.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r",
]
SMUGGLED = b"MAIL FROM:<evil@remote.example>\r\nRCPT TO:<v@example.test>\r\nDATA\r\nx\r\n"


@pytest.mark.parametrize("ending", ENDINGS, ids=[repr(e)[2:-1] for e in ENDINGS])
def test_no_other_ending_ends_the_message_wherever_the_chunks_are_cut(ending):
    stream = b"Subject: s\r\n\r\nbody" + ending + SMUGGLED + b".\r\nNOOP\r\n"
    for chunks in splits(stream):
        accumulator, rest = read(chunks)
        assert rest == b"NOOP\r\n"
        content = accumulator.content()
        assert b"MAIL FROM:<evil@remote.example>\r\n" in content
        assert content.count(b"\r") == content.count(b"\n") == content.count(b"\r\n")
        assert accumulator.bare_seen
        refused, _ = read(chunks, REJECT)
        assert refused.state == BARE_LINE_END
        with pytest.raises(ValueError):
            refused.content()


def test_a_crlf_cut_between_its_cr_and_its_lf_is_not_bare():
    accumulator, _ = read([b"Subject: a\r", b"\n\r\nb\r", b"\n.\r", b"\n"], REJECT)
    assert accumulator.state == NOMINAL
    assert not accumulator.bare_seen
    assert accumulator.content() == b"Subject: a\r\n\r\nb\r\n"


def test_a_cr_at_the_end_of_a_chunk_then_no_lf_is_bare():
    accumulator, _ = read([b"S: a\r\n\r\na\r", b"b\r\n.\r\n"])
    assert accumulator.bare_seen
    assert accumulator.content() == b"S: a\r\n\r\na\r\nb\r\n"
    refused, _ = read([b"S: a\r\n\r\na\r", b"b\r\n.\r\n"], REJECT)
    assert refused.state == BARE_LINE_END


LONG_LINES = DataLimits(
    max_size=1 << 22, max_line_length=1 << 21, max_header_count=10, normalise_bare=False
)


def test_a_long_line_whose_crlf_is_cut_between_cr_and_lf_is_not_bare():
    line = b"y" * (SLICE + 10)
    accumulator, _ = read([b"S: a\r\n\r\n" + line + b"\r", b"\n.\r\n"], LONG_LINES)
    assert accumulator.state == NOMINAL
    assert accumulator.content() == b"S: a\r\n\r\n" + line + b"\r\n"


def test_a_crlf_cut_before_a_long_line_ends_the_line_before_it():
    line = b"y" * (SLICE + 10)
    accumulator, _ = read([b"S: a\r\n\r\nab\r", b"\n" + line, b"\r\n.\r\n"], LONG_LINES)
    assert accumulator.state == NOMINAL
    assert accumulator.content() == b"S: a\r\n\r\nab\r\n" + line + b"\r\n"


def test_bare_cr_in_a_header_becomes_a_line_of_its_own():
    stream = b"Subject: a\rBcc: victim@example.test\r\nX-LF: b\nX-Two: c\r\n\r\nbody\r\n.\r\n"
    for chunks in splits(stream):
        accumulator, _ = read(chunks)
        assert accumulator.content() == (
            b"Subject: a\r\nBcc: victim@example.test\r\nX-LF: b\r\nX-Two: c\r\n\r\nbody\r\n"
        )
        assert accumulator.header_count == 4


# Limits -------------------------------------------------------------------------------------


def test_a_long_line_is_refused_wherever_it_is_cut_and_nothing_is_kept():
    stream = b"Subject: long\r\n\r\n" + b"y" * 1_000_000 + b"\r\n.\r\n"
    for size in (1, 1000, 4096, 65536, len(stream)):
        if size == 1:
            chunks = [stream[:200]] + [stream[i : i + 1] for i in range(200, 3000)]
            chunks.append(stream[3000:])
        else:
            chunks = [stream[i : i + size] for i in range(0, len(stream), size)]
        accumulator, _ = read(chunks)
        assert accumulator.state == TOO_LONG
        assert len(accumulator._out) == 0
        assert len(accumulator._pending) <= SLICE
        assert accumulator.size == len(stream) - 3


def test_line_one_over_the_limit_is_refused_when_cut_inside_it():
    limits = DataLimits(max_size=1 << 20, max_line_length=50, max_header_count=10,
                        normalise_bare=True)
    ok = b"S: x\r\n\r\n" + b"a" * 50 + b"\r\n.\r\n"
    over = b"S: x\r\n\r\n" + b"a" * 51 + b"\r\n.\r\n"
    for cut in range(1, len(ok)):
        assert read([ok[:cut], ok[cut:]], limits)[0].state == NOMINAL
        assert read([over[:cut], over[cut:]], limits)[0].state == TOO_LONG


def test_size_limit_counts_unstuffed_octets_to_the_octet():
    body = b"S: x\r\n\r\n..\r\n" + b"b" * 20 + b"\r\n"
    kept = len(body) - 1
    for limit, state in ((kept, NOMINAL), (kept - 1, TOO_BIG)):
        limits = DataLimits(max_size=limit, max_line_length=998, max_header_count=10,
                            normalise_bare=True)
        for chunks in splits(body + b".\r\n"):
            accumulator, _ = read(chunks, limits)
            assert accumulator.state == state
            assert accumulator.size == kept


def test_header_fields_are_counted_across_chunks_and_folded_lines_are_not():
    limits = DataLimits(max_size=1 << 20, max_line_length=998, max_header_count=3,
                        normalise_bare=True)
    folded = b"To: a@x,\r\n b@x,\r\n\tc@x\r\nSubject: s\r\nFrom: f@x\r\n\r\nX: body\r\n.\r\n"
    too_many = b"A: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\nbody\r\n.\r\n"
    for chunks in splits(folded):
        accumulator, _ = read(chunks, limits)
        assert accumulator.state == NOMINAL
        assert accumulator.header_count == 3
    for chunks in splits(too_many):
        assert read(chunks, limits)[0].state == TOO_MANY_HEADERS


def test_the_first_failure_in_the_stream_is_the_one_reported():
    limits = DataLimits(max_size=60, max_line_length=20, max_header_count=10,
                        normalise_bare=False)
    # A long line first, then a bare LF, then too much: the long line wins.
    stream = b"S: x\r\n\r\n" + b"l" * 30 + b"\r\na\nb\r\n" + b"z" * 50 + b"\r\n.\r\n"
    for chunks in splits(stream):
        assert read(chunks, limits)[0].state == TOO_LONG


def test_eight_bit_and_nul_are_noticed_in_any_chunk():
    accumulator, _ = read([b"S: x\r\n\r\nplain\r\n", b"caf\xc3\xa9 \x00\r\n.\r\n"])
    assert accumulator.eight_bit and accumulator.nul_seen
    accumulator, _ = read([b"S: x\r\n\r\nplain\r\n.\r\n"])
    assert not accumulator.eight_bit and not accumulator.nul_seen


def test_a_trickle_of_single_octets_costs_linear_time():
    accumulator = DataAccumulator(
        DataLimits(max_size=1 << 22, max_line_length=1 << 21, max_header_count=10,
                   normalise_bare=True)
    )
    started = time.monotonic()
    for _ in range(3 * SLICE):
        assert accumulator.feed(b"q") == -1
    assert accumulator.feed(b"\r\n.\r\n") == 5
    assert time.monotonic() - started < 5
    assert accumulator.content() == b"q" * (3 * SLICE) + b"\r\n"


# The same as line by line ---------------------------------------------------------------

TOKENS = [b"a", b"bc", b" ", b"\t", b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.", b"\x00",
          b"\xc3\xa9", b"X: y\r\n", b"\r\n\r\n", b"\n.\r\n", b"\r\n.\n", b"z" * 40]


@pytest.mark.parametrize("seed", range(8))
def test_chunks_of_any_size_give_what_line_by_line_reading_gives(seed):
    rng = random.Random(seed)
    for _ in range(400):
        stream = b"".join(rng.choice(TOKENS) for _ in range(rng.randint(0, 60)))
        stream += b"\r\n.\r\n" + b"".join(rng.choice(TOKENS) for _ in range(rng.randint(0, 5)))
        limits = DataLimits(
            max_size=rng.choice([20, 100, 400, 1 << 20]),
            max_line_length=rng.choice([5, 30, 998]),
            max_header_count=rng.choice([1, 3, 100]),
            normalise_bare=rng.random() < 0.5,
        )
        expected = reference(stream, limits)
        assert expected is not None
        line_by_line, end = expected
        chunks, position = [], 0
        while position < len(stream):
            size = rng.choice([1, 2, 3, 7, 64, 4096])
            chunks.append(stream[position : position + size])
            position += size
        accumulator = DataAccumulator(limits)
        consumed = 0
        for chunk in chunks:
            found = accumulator.feed(chunk)
            if found >= 0:
                consumed += found
                break
            consumed += len(chunk)
        assert accumulator.done, stream
        assert consumed == end, stream
        assert facts(accumulator) == facts(line_by_line), (stream, limits)
