"""The error-code vocabulary (p2pd/errors.py): its documentation, its wire form and the CLI exit statuses."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from typer.testing import CliRunner

from p2pd import errors
from p2pd.errors import EXIT_STATUS, ErrorCode, P2pdError
from p2pd.protocol.framing import FrameReader, RpcError, encode_frame
from p2pd.rpc import Emit, Handler, open_client, serve_connection
from p2pd.storage import StorageError

REPO = Path(__file__).resolve().parents[2]


def documented_codes() -> dict[str, list[str]]:
    """The rows of the table under '## Error codes' in docs/interfaces.md, by code."""
    text = (REPO / "docs" / "interfaces.md").read_text()
    section = text.split("## Error codes", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        m = re.fullmatch(r"`([a-z_]+)`", cells[0]) if line.startswith("|") else None
        if m:
            assert m.group(1) not in rows, f"{m.group(1)} is documented twice"
            rows[m.group(1)] = cells[1:]
    return rows


def test_every_code_is_documented_with_its_exit_status() -> None:
    rows = documented_codes()
    assert set(rows) == {c.value for c in ErrorCode}
    for code in ErrorCode:
        meaning, returned_by, what_to_do, exit_status = rows[code.value]
        assert meaning and returned_by and what_to_do, code
        assert int(exit_status) == code.exit_status, code


def test_every_code_has_a_comment_and_an_exit_status() -> None:
    source = Path(errors.__file__).read_text().splitlines()
    for code in ErrorCode:
        i = source.index(f'    {code.name} = "{code.value}"')
        assert source[i - 1].strip().startswith("# "), f"{code.name} needs a comment saying when it is used"
    assert set(EXIT_STATUS) == set(ErrorCode)
    assert all(s not in (0, errors.EXIT_INTERRUPTED) for s in EXIT_STATUS.values())


def test_decode() -> None:
    for code in ErrorCode:
        assert ErrorCode.decode(code.value) is code
    for legacy in ("tracker_unreachable", "daemon_unreachable", "unavailable"):  # codes of earlier versions
        assert ErrorCode.decode(legacy) is ErrorCode.UNREACHABLE
    for unknown in ("quota_exceeded", "", "NOT_FOUND", None, 404, b"not_found", ["not_found"]):
        assert ErrorCode.decode(unknown) is ErrorCode.INTERNAL, unknown


@pytest.mark.parametrize("code", list(ErrorCode))
def test_rpc_error_round_trips_through_the_frame_codec(code: ErrorCode) -> None:
    frame = encode_frame({"id": 7, "error": RpcError(code, f"it failed: {code}").to_wire()})
    [reply] = FrameReader().feed(frame)
    assert reply["error"] == {"code": code.value, "message": f"it failed: {code}"}  # plain strings on the wire
    err = RpcError.from_wire(reply["error"])
    assert err.code is code and err.message == str(err) == f"it failed: {code}"


def test_unknown_or_malformed_remote_errors_decode_to_internal() -> None:
    [reply] = FrameReader().feed(encode_frame({"id": 1, "error": {"code": "quota_exceeded", "message": "over"}}))
    err = RpcError.from_wire(reply["error"])
    assert err.code is ErrorCode.INTERNAL and err.message == "over"  # the remote's message is kept
    for bad in (None, "not_found", [1], {}, {"code": "not_found"}, {"message": "", "code": 3}):
        err = RpcError.from_wire(bad)
        assert isinstance(err.code, ErrorCode) and err.message, bad
    assert RpcError.from_wire({"code": "not_found"}).code is ErrorCode.NOT_FOUND


async def test_client_reads_an_unknown_code_from_a_newer_server_as_internal() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()

    async def newer_server() -> None:
        reader = FrameReader()
        while True:
            for req in reader.feed(bytes(await server_stream.receive_some(65536))):
                err = {"code": "quota_exceeded", "message": "over quota: ask your admin"}
                await server_stream.send_all(encode_frame({"id": req["id"], "error": err}))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(newer_server)
        async with open_client(client_stream) as client:
            with pytest.raises(RpcError) as ei:
                await client.call("fetch", {"name": "m:1"}, timeout=5)
        nursery.cancel_scope.cancel()
    assert ei.value.code is ErrorCode.INTERNAL and ei.value.message == "over quota: ask your admin"


async def test_a_handler_failing_with_any_p2pd_error_reports_its_code() -> None:
    async def disk(params: dict[str, Any], emit: Emit) -> Any:
        raise StorageError("not enough disk space", ErrorCode.DISK_FULL)

    async def conflict(params: dict[str, Any], emit: Emit) -> Any:
        raise P2pdError(ErrorCode.CONFLICT, "taken")

    handlers: dict[str, Handler] = {"disk": disk, "conflict": conflict}
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, server_stream, handlers)
        async with open_client(client_stream) as client:
            for method, code, message in [
                ("disk", ErrorCode.DISK_FULL, "not enough disk space"),
                ("conflict", ErrorCode.CONFLICT, "taken"),
            ]:
                with pytest.raises(RpcError) as ei:
                    await client.call(method, timeout=5)
                assert (ei.value.code, ei.value.message) == (code, message)
        nursery.cancel_scope.cancel()


def test_p2pd_cli_exit_status_follows_the_code(tmp_path: Path) -> None:
    from p2pd.cli import app

    runner = CliRunner()
    for args, status, needle in [
        (["status", "--socket", str(tmp_path / "nope.sock")], 4, "cannot reach the p2pd daemon"),
        (["publish", str(tmp_path / "missing"), "--name", "x:1"], 2, "does not exist"),
        (["pack-env", "--name", "e:1", "--socket", str(tmp_path / "nope.sock")], 2, "give exactly one of"),
    ]:
        r = runner.invoke(app, args)
        assert r.exit_code == status and needle in r.output, (args, r.exit_code, r.output)


def test_every_close_reason_is_documented() -> None:
    text = (REPO / "docs" / "interfaces.md").read_text()
    section = text.split("## Why a peer connection closed", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.M))
    assert documented == {r.value for r in errors.CloseReason}
