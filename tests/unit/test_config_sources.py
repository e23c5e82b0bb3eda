"""Settings of `p2pd run` and `p2p-tracker serve` from flag > environment > file > default (p2pd/config_sources.py).

Every key of both commands goes through the four precedence levels, read off the commands themselves, so a
flag added later is tested (and must be documented) without touching this file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from p2pd import config_sources as cs
from p2pd.cli import app as p2pd_app
from tracker.cli import app as tracker_app

runner = CliRunner()


def command(app: typer.Typer, name: str) -> Any:
    return typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]


COMMANDS = [pytest.param(p2pd_app, "run", id="p2pd-run"), pytest.param(tracker_app, "serve", id="tracker-serve")]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No stray P2PD_* / P2P_TRACKER_* variable of the caller, and no /etc/p2pd file, decides a test."""
    import os

    for name in list(os.environ):
        if name.startswith(("P2PD_", "P2P_TRACKER_")):
            monkeypatch.delenv(name)
    for app, name in ((p2pd_app, "run"), (tracker_app, "serve")):
        cls = type(command(app, name))
        monkeypatch.setattr(cls, "spec", dataclasses.replace(cls.spec, default_file=tmp_path / "absent.toml"))


def sample(param: Any, n: int) -> tuple[Any, str, list[str]]:
    """The n-th distinct value for a key: as TOML, as an environment string, as flag arguments."""
    kind = cs.kind(param)
    flag = [o for o in param.opts if o.startswith("--")][0]
    if kind == "boolean":
        value = n % 2 == 0
        if param.is_flag:
            args = [flag] if value else ([param.secondary_opts[0]] if param.secondary_opts else [])
        else:
            args = [flag, "true" if value else "false"]
        return value, "true" if value else "false", args
    if kind == "integer":
        return 1000 + n, str(1000 + n), [flag, str(1000 + n)]
    if kind == "float":
        return 0.5 + n, str(0.5 + n), [flag, str(0.5 + n)]
    if kind == "choice":
        c = cs.choices(param)[n % len(cs.choices(param))]
        return c, c, [flag, c]
    text = f"value{n}=x{n}" if param.multiple else f"h{n}.example:{7000 + n}"
    if param.multiple:
        return [text], text, [flag, text]
    return text, text, [flag, text]


def flag_is_expressible(param: Any, n: int) -> bool:
    """A plain on-switch (`--relay`) cannot be set to False from the command line: nothing to test there."""
    return bool(sample(param, n)[2])


def shown(app: typer.Typer, args: list[str], env: dict[str, str]) -> dict[str, Any]:
    r = runner.invoke(app, ["config", "show", "--json", *args], env=env)
    assert r.exit_code == 0, r.output
    return dict(json.loads(r.stdout)["settings"])


@pytest.mark.parametrize(("app", "name"), COMMANDS)
def test_every_key_follows_flag_env_file_default(app: typer.Typer, name: str, tmp_path: Path) -> None:
    cmd = command(app, name)
    spec = cmd.spec
    params = cs.keys(cmd)
    assert len(params) >= 10  # the commands' options really were found
    toml_lines, env, flags = [], {}, []
    expect: dict[str, tuple[Any, Any, Any]] = {}
    for key, p in params.items():
        file_v, _, _ = sample(p, 0)
        env_v, env_text, _ = sample(p, 1)
        flag_v, _, flag_args = sample(p, 2)
        toml_lines.append(f"{key} = {json.dumps(file_v)}")
        env[cs.env_name(spec, p)] = env_text
        flags += flag_args
        expect[key] = (file_v, env_v, flag_v if flag_args else None)
    conf = tmp_path / "c.toml"
    conf.write_text("\n".join(toml_lines) + "\n")

    def norm(v: Any) -> Any:
        return [str(x) for x in v] if isinstance(v, list) else v

    with_flags = shown(app, ["--config", str(conf), *flags], env)
    with_env = shown(app, ["--config", str(conf)], env)
    with_file = shown(app, ["--config", str(conf)], {})
    defaults = shown(app, [], {})
    for key, p in params.items():
        file_v, env_v, flag_v = expect[key]
        secret = any(w in key for w in cs.SECRET_WORDS)
        if flag_v is not None:
            assert with_flags[key]["source"] == "flag", key
            assert secret or norm(with_flags[key]["value"]) == norm(flag_v), key
        assert with_env[key]["source"] == "env" and with_env[key]["from"] == cs.env_name(spec, p), key
        assert secret or norm(with_env[key]["value"]) == norm(env_v), key
        assert with_file[key] == {"value": "***" if secret else file_v, "source": "file", "from": str(conf)}, key
        assert defaults[key]["source"] == "default", key


def test_the_file_and_environment_reach_the_command_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only `config show`: the values the command's function receives follow the same precedence."""
    seen: dict[str, Any] = {}
    app = typer.Typer()

    @app.command(cls=cs.configured(cs.ConfigSpec("x", "go", "XT", tmp_path / "none.toml")))
    def go(
        size: int = typer.Option(1, "--size"),
        name: str = typer.Option("a", "--name"),
        fast: bool = typer.Option(False, "--fast/--slow"),
        tag: list[str] = typer.Option([], "--tag"),
    ) -> None:
        seen.update(size=size, name=name, fast=fast, tag=tag)

    @app.command()
    def other() -> None:
        pass

    conf = tmp_path / "x.toml"
    conf.write_text('size = 5\nname = "file"\nfast = true\ntag = ["a", "b"]\n')
    r = runner.invoke(app, ["go", "--config", str(conf), "--name", "flag"], env={"XT_SIZE": "7"})
    assert r.exit_code == 0, r.output
    assert seen == {"size": 7, "name": "flag", "fast": True, "tag": ["a", "b"]}
    r = runner.invoke(app, ["go"], env={"XT_CONFIG": str(conf), "XT_TAG": "c d", "XT_FAST": "false"})
    assert r.exit_code == 0, r.output
    assert seen == {"size": 5, "name": "file", "fast": False, "tag": ["c", "d"]}


def errors(app: typer.Typer, args: list[str], env: dict[str, str] | None = None) -> str:
    r = runner.invoke(app, args, env=env or {})
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1, r.output
    return lines[0]


@pytest.mark.parametrize("sub", [["config", "show"], ["run"]])
def test_bad_files_and_variables_are_one_line_naming_key_and_file(tmp_path: Path, sub: list[str]) -> None:
    conf = tmp_path / "p2pd.toml"
    conf.write_text('tracker = "t:7070"\negress_limt = "10MB/s"\n')
    msg = errors(p2pd_app, [*sub, "--config", str(conf)])
    assert str(conf) in msg and "'egress_limt'" in msg and "did you mean 'egress_limit'" in msg

    conf.write_text('tracker = "t:7070"\npipeline = "four"\n')
    msg = errors(p2pd_app, [*sub, "--config", str(conf)])
    assert str(conf) in msg and "pipeline" in msg and "expected an integer" in msg

    conf.write_text("compress = 1\n")
    msg = errors(p2pd_app, [*sub, "--config", str(conf)])
    assert "compress" in msg and "expected true or false" in msg

    conf.write_text("tracker = [\n")
    msg = errors(p2pd_app, [*sub, "--config", str(conf)])
    assert str(conf) in msg and "not valid TOML" in msg

    msg = errors(p2pd_app, [*sub, "--config", str(tmp_path / "nope.toml")])
    assert "nope.toml" in msg and "does not exist" in msg

    msg = errors(p2pd_app, [*sub], env={"P2PD_MAX_PEERS": "many"})
    assert "$P2PD_MAX_PEERS='many'" in msg and "expected an integer" in msg


def test_tracker_file_errors_name_the_tracker_key(tmp_path: Path) -> None:
    conf = tmp_path / "tracker.toml"
    conf.write_text("intervall = 2.0\n")
    msg = errors(tracker_app, ["serve", "--config", str(conf)])
    assert msg.startswith("p2p-tracker: error:") and "'intervall'" in msg and "did you mean 'interval'" in msg
    conf.write_text('interval = "fast"\n')
    msg = errors(tracker_app, ["config", "show", "--config", str(conf)])
    assert "interval" in msg and "expected a number" in msg


def test_labels_as_a_table_and_the_admin_token_hidden(tmp_path: Path) -> None:
    conf = tmp_path / "p2pd.toml"
    conf.write_text('tracker = "t:7070"\n[label]\nzone = "eu-1a"\nrack = "r1"\n')
    got = shown(p2pd_app, ["--config", str(conf)], {})
    assert got["label"]["value"] == ["zone=eu-1a", "rack=r1"]
    got = shown(tracker_app, [], {"P2P_TRACKER_ADMIN_TOKEN": "s3cret"})
    assert got["admin_token"] == {"value": "***", "source": "env", "from": "P2P_TRACKER_ADMIN_TOKEN"}
    r = runner.invoke(tracker_app, ["config", "show"], env={"P2P_TRACKER_ADMIN_TOKEN": "s3cret"})
    assert "s3cret" not in r.output


def test_a_missing_required_setting_is_shown_not_fatal() -> None:
    got = shown(p2pd_app, [], {})
    assert got["tracker"]["missing"] is True and got["tracker"]["value"] is None
    r = runner.invoke(p2pd_app, ["config", "show"])
    assert "tracker" in r.stdout and "(not set: required)" in r.stdout


def test_the_docs_list_every_key_as_the_code_has_it() -> None:
    text = cs.DOCS.read_text()
    assert cs.docs_with_tables(text) == text, (
        "docs/configuration.md is out of date with the commands' options: run `python -m p2pd.config_sources`"
    )
    for cmd in cs.documented_commands():
        for key in cs.keys(cmd):
            assert f"| `{key}` |" in text, key
