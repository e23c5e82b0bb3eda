"""`p2pd run --nat-check-every`: how often the daemon re-checks its public address (issue #12 item 4)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner


@pytest.mark.parametrize("value", ["0", "-1", "nan", "7200"])
def test_a_nat_check_interval_out_of_range_is_one_line_naming_the_option(value: str) -> None:
    from p2pd.cli import app

    r = CliRunner().invoke(app, ["run", "--tracker", "127.0.0.1:9", "--insecure", "--nat-check-every", value])
    assert r.exit_code == 2, r.output  # BAD_REQUEST
    assert r.stderr.count("\n") == 1
    assert r.stderr.startswith("p2pd: error: --nat-check-every must be seconds in (0, 3600]"), r.stderr
