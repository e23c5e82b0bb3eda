"""The settings of a long-running command (`p2pd run`, `p2p-tracker serve`) from four sources.

Precedence: a flag on the command line > an environment variable (`P2PD_<KEY>`, `P2P_TRACKER_<KEY>`)
> the TOML file (`--config PATH`, else $P2PD_CONFIG / $P2P_TRACKER_CONFIG, else /etc/p2pd/p2pd.toml or
/etc/p2pd/tracker.toml when it exists) > the flag's default.

The keys are read off the command's own options, so a flag added to `p2pd run` is a file key and an
environment variable at once, with nothing else to maintain: key = the option's parameter name
(`--egress-limit` -> `egress_limit`; `egress-limit` is accepted in the file too). The file and the
environment are checked here, before the command parses its flags, so a typo is one line naming the key,
the file (or variable) and what is expected, never a value silently ignored. The command then sees file
and environment values as its defaults (click's default_map), so it converts and checks them exactly as it
does flags.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
import tomllib
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand

SECRET_WORDS = ("token", "password", "secret")  # a key containing one is shown as *** by `config show`


@dataclass(frozen=True)
class ConfigSpec:
    """Where one command looks for its settings."""

    program: str  # for messages: "p2pd", "p2p-tracker"
    command: str  # the subcommand the file configures: "run", "serve"
    env_prefix: str  # "P2PD": --egress-limit is $P2PD_EGRESS_LIMIT
    default_file: Path  # read when it exists and no file is named

    @property
    def file_env(self) -> str:
        return f"{self.env_prefix}_CONFIG"


P2PD_RUN = ConfigSpec("p2pd", "run", "P2PD", Path("/etc/p2pd/p2pd.toml"))
TRACKER_SERVE = ConfigSpec("p2p-tracker", "serve", "P2P_TRACKER", Path("/etc/p2pd/tracker.toml"))


class ConfigError(ValueError):
    """A setting from the file or the environment that cannot be used; the message is the whole story."""


@dataclass(frozen=True)
class Source:
    """Where one effective value came from."""

    kind: str  # "flag", "env", "file" or "default"
    where: str | None = None  # the variable's name (env) or the file's path (file)

    def __str__(self) -> str:
        return f"{self.kind} {self.where}" if self.where else self.kind


def keys(command: Any) -> dict[str, Any]:
    """Every settable option of a click command by key (its parameter name): what a file may hold."""
    return {
        p.name: p
        for p in command.params
        if p.param_type_name == "option" and p.name and p.expose_value and p.name != "help"
    }


def env_name(spec: ConfigSpec, param: Any) -> str:
    """The environment variable of an option: its own (`envvar=`) if it declares one, else PREFIX_KEY."""
    if isinstance(param.envvar, str):
        return param.envvar
    return f"{spec.env_prefix}_{param.name.upper()}"


def flag_of(param: Any) -> str:
    longs = [o for o in param.opts if o.startswith("--")]
    text = longs[0] if longs else param.opts[0]
    if param.secondary_opts:
        text += "/" + param.secondary_opts[0]
    return str(text)


def kind(param: Any) -> str:
    """The type of one value of an option: boolean, integer, float, choice, path or text.

    Read from typer's own type descriptor (typer >= 0.29, which carries its own click) or from click's
    parameter type (older typer), so this works with either.
    """
    desc = getattr(param, "type_descriptor", None)
    if desc is None:
        name = str(param.type.name)
        return {"integer range": "integer", "float range": "float", "file": "path", "directory": "path"}.get(name, name)
    if desc.is_choice:
        return "choice"
    if desc.is_path:
        return "path"
    ann = desc.annotation
    if desc.is_list:
        ann = typing.get_args(ann)[0]
    return {bool: "boolean", int: "integer", float: "float"}.get(ann, "text")


def choices(param: Any) -> list[str]:
    desc = getattr(param, "type_descriptor", None)
    raw = desc.choices if desc is not None else param.type.choices
    return [str(getattr(c, "value", c)) for c in raw or ()]


def expected(param: Any) -> str:
    """What a value of this option looks like, for error messages and the docs."""
    k = kind(param)
    one = {
        "boolean": "true or false",
        "integer": "an integer",
        "float": "a number",
        "path": "a path (string)",
    }.get(k, "a string")
    if k == "choice":
        one = "one of " + ", ".join(choices(param))
    if param.multiple:
        return f"a list of values, each {one}"
    return one


def config_file(spec: ConfigSpec, args: Sequence[str], environ: Mapping[str, str]) -> tuple[Path | None, str]:
    """The file to read and why it is that one: --config, then $PREFIX_CONFIG, then the default if it exists."""
    for i, a in enumerate(args):
        if a == "--":
            break
        if a == "--config":
            if i + 1 >= len(args):
                raise ConfigError("--config needs a PATH")
            return Path(args[i + 1]), "--config"
        if a.startswith("--config="):
            return Path(a.split("=", 1)[1]), "--config"
    if environ.get(spec.file_env):
        return Path(environ[spec.file_env]), f"${spec.file_env}"
    if spec.default_file.is_file():
        return spec.default_file, "default"
    return None, "none"


def without_config(args: Sequence[str]) -> list[str]:
    """The arguments without `--config PATH` / `--config=PATH` (read by `config_file`)."""
    out: list[str] = []
    skip = False
    for i, a in enumerate(args):
        if skip:
            skip = False
            continue
        if a == "--":
            out += args[i:]
            break
        if a == "--config":
            skip = True
            continue
        if not a.startswith("--config="):
            out.append(a)
    return out


def load_file(path: Path, why: str) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} (from {why}) does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 text") from None


def _suggest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _typed_ok(param: Any, value: Any) -> bool:
    """Whether a TOML value has the right type for one value of `param` (TOML is typed; we stay strict)."""
    k = kind(param)
    if k == "boolean":
        return isinstance(value, bool)
    if k == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if k == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if k == "choice":
        return isinstance(value, str) and value in choices(param)
    return isinstance(value, str)


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def _from_text(param: Any, text: str, where: str) -> Any:
    """One value of `param` from an environment string; ConfigError says what was expected."""
    k = kind(param)
    try:
        if k == "boolean":
            word = text.strip().lower()
            if word in TRUE_WORDS + FALSE_WORDS:
                return word in TRUE_WORDS
            raise ValueError(text)
        if k == "integer":
            return int(text)
        if k == "float":
            return float(text)
        if k == "choice" and text not in choices(param):
            raise ValueError(text)
    except ValueError:
        raise ConfigError(f"{where}: expected {expected(param)}") from None
    return text


def file_value(param: Any, key: str, value: Any, path: Path) -> Any:
    """A file's value for `param`, checked; ConfigError names the key, the file and what is expected."""
    where = f"{path}: {key} = {json.dumps(value, default=str)}"
    if param.multiple:
        if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
            value = [f"{k}={v}" for k, v in value.items()]  # [label] zone = "eu-1a"  ->  --label zone=eu-1a
        if not isinstance(value, list) or not all(_typed_ok(param, v) for v in value):
            raise ConfigError(f"{where}: expected {expected(param)}")
        return list(value)
    if not _typed_ok(param, value):
        raise ConfigError(f"{where}: expected {expected(param)}")
    return value


def env_value(param: Any, name: str, text: str) -> Any:
    """An environment variable's value for `param` (a list: split at whitespace), checked."""
    where = f"${name}={text!r}"
    if param.multiple:
        return [_from_text(param, v, where) for v in text.split()]
    return _from_text(param, text, where)


@dataclass(frozen=True)
class Defaults:
    """What the file and the environment set, as the command's default_map, and where each came from."""

    values: dict[str, Any]
    sources: dict[str, Source]
    file: Path | None


def gather(command: Any, spec: ConfigSpec, args: Sequence[str], environ: Mapping[str, str]) -> Defaults:
    """The file's and the environment's settings for `command`; ConfigError for anything unusable."""
    params = keys(command)
    values: dict[str, Any] = {}
    sources: dict[str, Source] = {}
    path, why = config_file(spec, args, environ)
    if path is not None:
        data = load_file(path, why)
        for raw_key, value in data.items():
            key = raw_key.replace("-", "_")
            param = params.get(key)
            if param is None:
                valid = sorted(params)
                raise ConfigError(
                    f"{path}: unknown key {raw_key!r}{_suggest(key, valid)}; "
                    f"`{spec.program} config show` lists the valid keys"
                )
            if key in values:
                raise ConfigError(f"{path}: {key} is set twice (as {key!r} and with dashes)")
            values[key] = file_value(param, raw_key, value, path)
            sources[key] = Source("file", str(path))
    for key, param in params.items():
        name = env_name(spec, param)
        text = environ.get(name)
        if text:  # an empty variable counts as unset, as click does
            values[key] = env_value(param, name, text)
            sources[key] = Source("env", name)
    return Defaults(values, sources, path)


class ConfiguredCommand(TyperCommand):
    """A typer command whose options may also come from the environment and a TOML file (`spec`)."""

    spec: ConfigSpec

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # `--config PATH` is taken off the command line before click parses it (the file must be read
        # first: its values are the defaults of the other options), so help mentions it here.
        self.epilog = (
            (self.epilog or "") + f"--config PATH: a TOML file of these options (default: ${self.spec.file_env}, else "
            f"{self.spec.default_file} if it exists); the environment ({self.spec.env_prefix}_<OPTION>) "
            "overrides it, flags override both."
        )

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        try:
            found = gather(self, self.spec, args, os.environ)
        except ConfigError as e:
            typer.echo(f"{self.spec.program}: error: {e}", err=True)
            raise typer.Exit(2) from None  # the exit status of a usage error (ErrorCode.BAD_REQUEST's)
        extra["default_map"] = {**found.values, **(extra.get("default_map") or {})}
        ctx = super().make_context(info_name, without_config(args), parent, **extra)
        ctx.meta["config_sources"] = found
        return ctx


def configured(spec: ConfigSpec) -> type[ConfiguredCommand]:
    """The command class for `app.command(cls=...)` reading `spec`'s file and environment."""
    return type(f"Configured_{spec.command}", (ConfiguredCommand,), {"spec": spec})


# ------------------------------------------------------------------------------------ config show
def _source_of(ctx: Any, param: Any, found: Defaults, spec: ConfigSpec) -> Source:
    src = ctx.get_parameter_source(param.name)
    kind = src.name if src is not None else "DEFAULT"
    if kind == "COMMANDLINE":
        return Source("flag")
    if kind == "ENVIRONMENT":
        return Source("env", env_name(spec, param))
    if kind == "DEFAULT_MAP":
        return found.sources.get(param.name, Source("default"))
    return Source("default")


def _jsonable(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, tuple | list):
        return [_jsonable(x) for x in v]
    return v


def effective(command: Any, args: list[str]) -> tuple[Defaults, list[dict[str, Any]]]:
    """Every setting of `command` given `args` and this process's environment: key, value, source.

    ConfigError for a bad file or variable; a flag that does not parse raises typer's (click's) usage error.
    """
    spec: ConfigSpec = command.spec
    try:
        ctx = command.make_context(spec.command, list(args))
    except typer.BadParameter as e:  # a required setting missing is worth showing; anything else is an error
        if type(e).__name__ != "MissingParameter":
            raise
        ctx = command.make_context(spec.command, list(args), resilient_parsing=True)
    found: Defaults = ctx.meta["config_sources"]
    rows = []
    for key, param in keys(command).items():
        value = ctx.params.get(key)
        secret = any(w in key for w in SECRET_WORDS)
        rows.append(
            {
                "key": key,
                "value": "***" if secret and value else _jsonable(value),
                "source": _source_of(ctx, param, found, spec),
                "missing": param.required and value is None,
            }
        )
    return found, rows


def show(command: Any, args: list[str], as_json: bool) -> None:
    """Print `command`'s effective settings and where each came from (`p2pd config show`)."""
    spec: ConfigSpec = command.spec
    try:
        found, rows = effective(command, args)
    except ConfigError as e:
        typer.echo(f"{spec.program}: error: {e}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        doc = {
            "file": str(found.file) if found.file else None,
            "settings": {
                r["key"]: {
                    "value": r["value"],
                    "source": r["source"].kind,
                    "from": r["source"].where,
                    **({"missing": True} if r["missing"] else {}),
                }
                for r in rows
            },
        }
        typer.echo(json.dumps(doc, indent=2))
        return
    typer.echo(f"# {spec.program} {spec.command}: config file {found.file or '(none)'}")
    width = max(len(r["key"]) for r in rows)
    for r in rows:
        value = "(not set: required)" if r["missing"] else json.dumps(r["value"])
        typer.echo(f"{r['key']:<{width}}  {value}  # {r['source']}")


# ------------------------------------------------------------------------------------ docs
def docs_table(command: Any) -> str:
    """The Markdown table of every key of `command` (docs/configuration.md holds it; a test compares)."""
    spec: ConfigSpec = command.spec
    lines = [
        f"<!-- keys of `{spec.program} {spec.command}`: generated by `python -m p2pd.config_sources` -->",
        "| key | flag | environment | default | expects | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for key, param in keys(command).items():
        if param.required:
            default = "(required)"
        elif param.default is None or param.default == [] or param.default == ():
            default = ""
        else:
            default = f"`{json.dumps(_jsonable(param.default))}`"
        help_ = " ".join((param.help or "").split()).replace("|", "\\|")
        lines.append(
            f"| `{key}` | `{flag_of(param)}` | `{env_name(spec, param)}` | {default} | {expected(param)} | {help_} |"
        )
    return "\n".join(lines) + "\n"


def documented_commands() -> list[Any]:
    """The configured commands, as click commands, for the docs and their test."""
    from p2pd.cli import app as p2pd_app
    from tracker.cli import app as tracker_app

    out = []
    for app in (p2pd_app, tracker_app):
        group = typer.main.get_command(app)
        for cmd in group.commands.values():  # type: ignore[attr-defined]
            if isinstance(cmd, ConfiguredCommand):
                out.append(cmd)
    return out


DOCS = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
BEGIN, END = "<!-- BEGIN {} -->", "<!-- END {} -->"


def docs_with_tables(text: str) -> str:
    """docs/configuration.md's text with every generated table replaced by the current one."""
    for cmd in documented_commands():
        tag = f"{cmd.spec.program} {cmd.spec.command}"
        begin, end = BEGIN.format(tag), END.format(tag)
        head, sep, rest = text.partition(begin)
        if not sep:
            raise ConfigError(f"{DOCS} has no {begin} marker")
        _, sep2, tail = rest.partition(end)
        if not sep2:
            raise ConfigError(f"{DOCS} has no {end} marker")
        text = head + begin + "\n" + docs_table(cmd) + end + tail
    return text


def main() -> None:
    """Rewrite the generated tables of docs/configuration.md (run after adding or changing a flag)."""
    text = DOCS.read_text()
    new = docs_with_tables(text)
    if new != text:
        DOCS.write_text(new)
        print(f"updated {DOCS}", file=sys.stderr)


if __name__ == "__main__":  # run as the imported module, whose ConfiguredCommand the CLIs use
    from p2pd import config_sources

    config_sources.main()
