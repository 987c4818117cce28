"""The clamd client against a real clamd, and against small servers that misbehave.

Hostile-input case 36: clamd unreachable, timing out or answering anything but a clear
OK or detection gives an error result, never "clean".
"""

from __future__ import annotations

import asyncio
import base64
import io
import zipfile
from collections.abc import Awaitable, Callable

import pytest

from mailfilter.checks.clamd import ClamdClient, ClamdResult, clamd_findings, parse_reply
from tests.mailfilter.daemons import (  # noqa: F401
    MAX_FILE,
    STREAM_MAX,
    clamd_daemon,
    eicar,
    free_port,
    start_clamd,
)


def tcp_client(daemon, **options) -> ClamdClient:
    return ClamdClient(host=daemon.host, port=daemon.port, timeout=30, **options)


def scan(client: ClamdClient, data: bytes) -> ClamdResult:
    return asyncio.run(client.scan(data))


def mail_with_attachment(payload: bytes) -> bytes:
    encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    return (
        b"From: a@example.org\r\nTo: b@example.com\r\nSubject: file\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        b"--b1\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
        b'--b1\r\nContent-Type: application/octet-stream; name="x.bin"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + encoded + b"--b1--\r\n"
    )


def zipped(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, data)
    return buffer.getvalue()


# --- a real clamd -----------------------------------------------------------------------


def test_clamd_answers_ping_over_tcp_and_the_unix_socket(clamd):
    assert asyncio.run(tcp_client(clamd).ping()) is True
    assert asyncio.run(ClamdClient(path=clamd.path, timeout=30).ping()) is True


def test_eicar_in_a_plain_blob_is_found(clamd):
    result = scan(tcp_client(clamd), eicar())
    assert result.status == "found"
    assert result.names and "FOUND" not in result.names[0]


def test_eicar_is_found_over_the_unix_socket(clamd):
    assert scan(ClamdClient(path=clamd.path, timeout=30), eicar()).found


def test_clean_text_is_clean(clamd):
    assert scan(tcp_client(clamd), b"Hello, nothing to see here.\r\n" * 100).status == "clean"


def test_eicar_split_across_many_small_chunks_is_found(clamd):
    assert scan(tcp_client(clamd, chunk_size=7), b"padding " * 1000 + eicar()).found


def test_eicar_as_a_base64_attachment_of_the_raw_message_is_found(clamd):
    assert scan(tcp_client(clamd), mail_with_attachment(eicar())).found


def test_eicar_in_a_nested_zip_attachment_is_found(clamd):
    inner = zipped("eicar.com", eicar())
    assert scan(tcp_client(clamd), mail_with_attachment(zipped("inner.zip", inner))).found


def test_eicar_in_an_x_header_of_the_raw_message_is_found(clamd):
    message = b"From: a@example.org\r\nX-Test: " + eicar() + b"\r\n\r\nhello\r\n"
    assert scan(tcp_client(clamd), message).found


def test_eicar_in_an_attached_message_is_found(clamd):
    inner = mail_with_attachment(eicar())
    outer = (
        b"From: a@example.org\r\nTo: b@example.com\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="outer"\r\n\r\n'
        b"--outer\r\nContent-Type: text/plain\r\n\r\nForwarded.\r\n"
        b"--outer\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"\r\n--outer--\r\n"
    )
    assert scan(tcp_client(clamd), outer).found


@pytest.mark.parametrize("where", ["preamble", "epilogue"])
def test_eicar_in_a_multipart_preamble_or_epilogue_is_found(clamd, where):
    preamble = eicar() + b"\r\n" if where == "preamble" else b"This is MIME.\r\n"
    epilogue = eicar() + b"\r\n" if where == "epilogue" else b""
    message = (
        b"From: a@example.org\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n' + preamble
        + b"--b1\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b1--\r\n" + epilogue
    )
    assert scan(tcp_client(clamd), message).found


def test_a_stream_over_clamds_stream_max_length_is_an_error_not_clean(clamd):
    result = scan(tcp_client(clamd, max_stream=STREAM_MAX * 4), b"A" * (STREAM_MAX + 1024))
    assert result.status == "error"
    assert "size limit" in result.reason


def test_a_file_over_clamds_max_file_size_is_an_error_not_clean(clamd):
    # AlertExceedsMax makes clamd answer "Heuristics.Limits.Exceeded.MaxFileSize FOUND".
    result = scan(tcp_client(clamd), b"A" * (MAX_FILE * 2))
    assert result.status == "error"
    assert "Heuristics.Limits.Exceeded" in result.reason


def test_a_blob_over_the_clients_own_limit_is_not_sent_and_is_an_error(clamd):
    result = scan(tcp_client(clamd, max_stream=1000), b"A" * 1001)
    assert result.status == "error" and "1001 bytes" in result.reason


def test_scan_blobs_reports_found_names_with_their_labels(clamd):
    result = asyncio.run(
        tcp_client(clamd).scan_blobs([("message", b"clean"), ("part 2", eicar())])
    )
    assert result.found and result.names[0].endswith("(part 2)")
    findings = clamd_findings(result, score=3)
    assert [(f.category, f.score) for f in findings] == [("VIRUS", 3)]


def test_scan_blobs_with_a_failed_blob_is_an_error_not_clean(clamd):
    client = tcp_client(clamd, max_stream=100)
    result = asyncio.run(client.scan_blobs([("message", b"clean"), ("part 2", b"A" * 200)]))
    assert result.status == "error" and "part 2" in result.reason


# --- clamd down or misbehaving ----------------------------------------------------------


def test_a_clamd_that_was_stopped_gives_an_error_not_clean(tmp_path):
    daemon = start_clamd(tmp_path)
    try:
        assert scan(tcp_client(daemon), b"hello").clean
    finally:
        daemon.stop()
    assert scan(tcp_client(daemon), eicar()).status == "error"
    assert scan(ClamdClient(path=daemon.path, timeout=5), eicar()).status == "error"


def test_clamd_not_listening_is_an_error_not_clean():
    result = scan(ClamdClient(port=free_port(), timeout=5), eicar())
    assert result.status == "error" and "unreachable" in result.reason


def test_a_missing_unix_socket_is_an_error_not_clean(tmp_path):
    result = scan(ClamdClient(path=str(tmp_path / "no.sock"), timeout=5), b"hello")
    assert result.status == "error"


def test_ping_is_false_when_clamd_is_down():
    assert asyncio.run(ClamdClient(port=free_port(), timeout=5).ping()) is False


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _scan_against(handler: Handler, data: bytes, timeout: float) -> ClamdResult:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        return await ClamdClient(port=port, timeout=timeout).scan(data)
    finally:
        server.close()
        await server.wait_closed()


def fake_clamd(reply: bytes, *, close: bool = True) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readexactly(len(b"zINSTREAM\0"))
            writer.write(reply)
            await writer.drain()
            if not close:
                await asyncio.sleep(30)
        finally:
            writer.close()

    return handle


@pytest.mark.parametrize(
    "reply",
    [
        b"hello there\0",
        b"UNKNOWN COMMAND\0",
        b"INSTREAM size limit exceeded. ERROR\0",
        b"stream: Can't allocate memory ERROR\0",
        b"stream: Heuristics.Limits.Exceeded.MaxScanSize FOUND\0",
        b"stream: OK",  # no terminator before the connection closes
        b"",
        b"\xff\xfe\0",
        b"stream: OK but more\0",
    ],
)
def test_a_clamd_answering_anything_but_ok_or_found_is_an_error(reply):
    result = asyncio.run(_scan_against(fake_clamd(reply), b"data", timeout=5))
    assert result.status == "error", result


def test_a_clamd_that_never_answers_times_out_as_an_error():
    handler = fake_clamd(b"", close=False)
    result = asyncio.run(_scan_against(handler, b"data", timeout=0.5))
    assert result.status == "error" and "timed out" in result.reason


def test_an_endless_reply_is_an_error_not_a_hang():
    result = asyncio.run(_scan_against(fake_clamd(b"x" * 100_000, close=False), b"d", timeout=5))
    assert result.status == "error"


def test_reply_parsing_knows_ok_found_and_error():
    assert parse_reply(b"stream: OK") == ClamdResult(status="clean")
    assert parse_reply(b"stream: Win.Test.EICAR_HDB-1 FOUND").names == ("Win.Test.EICAR_HDB-1",)
    assert parse_reply(b"stream: Heuristics.Encrypted.Zip FOUND").found
    assert parse_reply(b"stream: Heuristics.Limits.Exceeded.MaxFiles FOUND").error
    assert parse_reply(b"INSTREAM size limit exceeded. ERROR").error
