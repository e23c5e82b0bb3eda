"""`p2pd run --upload-slots`: the seed's upload slot cap, settable so benchmarks can compare it on and off."""

from __future__ import annotations

from typer.testing import CliRunner


def test_a_negative_upload_slot_count_is_one_line_naming_the_option() -> None:
    from p2pd.cli import app

    r = CliRunner().invoke(app, ["run", "--tracker", "127.0.0.1:9", "--insecure", "--upload-slots", "-1"])
    assert r.exit_code == 2, r.output  # BAD_REQUEST
    assert r.stderr.count("\n") == 1
    assert r.stderr.startswith("p2pd: error: --upload-slots must be 0 (no cap) or a number of peers"), r.stderr
