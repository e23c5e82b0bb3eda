"""Admin tokens from a file, not argv (issue #14 row 13): `--token @FILE` / `--admin-token @FILE`."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pd.errors import P2pdError
from p2pd.identity import token_value


def test_a_token_file_is_read_and_stripped(tmp_path: Path) -> None:
    f = tmp_path / "admin-token"
    f.write_text("s3cret-token\n")
    f.chmod(0o600)
    assert token_value(f"@{f}", "--token", argv=["p2p-tracker", f"@{f}"]) == "s3cret-token"


@pytest.mark.parametrize(
    ("mode", "text", "message"),
    [(0o644, "tok", "readable by every user"), (0o600, "\n", "empty"), (None, "", "cannot read")],
)
def test_a_bad_token_file_is_a_clear_error(tmp_path: Path, mode: int | None, text: str, message: str) -> None:
    f = tmp_path / "admin-token"
    if mode is not None:
        f.write_text(text)
        f.chmod(mode)
    with pytest.raises(P2pdError, match=message):
        token_value(f"@{f}", "--token", argv=[])


def test_a_token_on_the_command_line_works_with_a_warning(capsys: pytest.CaptureFixture[str]) -> None:
    assert token_value("tok", "--token", argv=["p2p-tracker", "--token", "tok"]) == "tok"
    assert "visible to every user" in capsys.readouterr().err
    assert token_value("tok", "--token", argv=["p2p-tracker"]) == "tok"  # from the environment: no warning
    assert capsys.readouterr().err == ""
    assert token_value(None, "--token") is None
