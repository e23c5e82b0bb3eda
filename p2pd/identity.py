"""Where a node's credentials come from: its key in the state dir, the cluster's join secret.

- The node key is an Ed25519 private seed in `DATA_DIR/node_key`, created at first start with mode
  0600 (O_EXCL, so two starts never race to different keys) and never sent anywhere; the node id is
  derived from its public half. A key file readable by others is refused: whoever reads it can be
  this node.
- The join secret is read from a file (`--join-secret-file`, or `$P2PD_JOIN_SECRET_FILE`) or from
  `$P2PD_JOIN_SECRET` — never from argv, which every local user can read in `ps`. The same secret is
  given to the tracker and every node. `new_join_secret` makes one (256 random bits).
docs/security.md says who can do what with which of them.
"""

from __future__ import annotations

import os
import secrets
import stat
import sys
from collections.abc import Mapping
from pathlib import Path

from p2pd.errors import ErrorCode, P2pdError
from p2pd.protocol.auth import MIN_SECRET_BYTES, ClusterSecret, Identity, NodeKey

JOIN_SECRET_ENV = "P2PD_JOIN_SECRET"
JOIN_SECRET_FILE_ENV = "P2PD_JOIN_SECRET_FILE"
NODE_KEY_FILE = "node_key"
SEED_SIZE = 32
NO_SECRET_HINT = (
    "no cluster join secret: give the same secret to the tracker and every node with --join-secret-file FILE "
    f"or ${JOIN_SECRET_FILE_ENV} / ${JOIN_SECRET_ENV} (make one with `p2p-tracker new-secret FILE`), "
    "or pass --insecure to run an open cluster (docs/security.md)"
)


def new_join_secret() -> str:
    """A fresh join secret: 256 random bits, URL-safe text (fits a file, an env var, a k8s Secret)."""
    return secrets.token_urlsafe(32)


def write_join_secret(path: Path) -> None:
    """Create `path` (mode 0600, must not exist) holding a new join secret."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(new_join_secret() + "\n")


def read_join_secret(path: Path | None, env: Mapping[str, str] | None = None) -> bytes | None:
    """The join secret from `path`, else $P2PD_JOIN_SECRET_FILE, else $P2PD_JOIN_SECRET; None if none is set."""
    env = os.environ if env is None else env
    if path is None and env.get(JOIN_SECRET_FILE_ENV):
        path = Path(env[JOIN_SECRET_FILE_ENV])
    if path is not None:
        try:
            st = path.stat()
            data = path.read_bytes().strip()
        except OSError as e:
            raise P2pdError(ErrorCode.BAD_REQUEST, f"cannot read the join secret file {path}: {e.strerror}") from None
        if st.st_mode & stat.S_IROTH:
            raise P2pdError(
                ErrorCode.BAD_REQUEST, f"the join secret file {path} is readable by every user: chmod 600 {path}"
            )
        where = str(path)
    elif env.get(JOIN_SECRET_ENV):
        data, where = env[JOIN_SECRET_ENV].strip().encode(), f"${JOIN_SECRET_ENV}"
    else:
        return None
    if len(data) < MIN_SECRET_BYTES:
        raise P2pdError(
            ErrorCode.BAD_REQUEST,
            f"the join secret in {where} is {len(data)} bytes; use at least {MIN_SECRET_BYTES} "
            "(`p2p-tracker new-secret FILE` makes one)",
        )
    return data


def cluster_secret(path: Path | None, insecure: bool, env: Mapping[str, str] | None = None) -> ClusterSecret | None:
    """The cluster's secret as configured; None only with `insecure`. Refuses both, and neither."""
    data = read_join_secret(path, env)
    if data is None:
        if not insecure:
            raise P2pdError(ErrorCode.BAD_REQUEST, NO_SECRET_HINT)
        return None
    if insecure:
        raise P2pdError(ErrorCode.BAD_REQUEST, "--insecure and a join secret were both given: pick one")
    return ClusterSecret(data)


def load_node_key(data_dir: Path) -> NodeKey:
    """This node's key, created (0600) at first start; refuses a key file others can read or a damaged one."""
    p = data_dir / NODE_KEY_FILE
    if not p.exists():
        # written whole under a temporary name, then linked: a crash never leaves a half key, and two
        # starts racing agree on the one that was linked first
        tmp = data_dir / f".{NODE_KEY_FILE}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, secrets.token_bytes(SEED_SIZE))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, p)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    try:
        st = p.stat()
        seed = p.read_bytes()
    except OSError as e:
        raise P2pdError(ErrorCode.STORAGE, f"cannot read the node key {p}: {e.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise P2pdError(ErrorCode.STORAGE, f"the node key {p} is readable by others: chmod 600 {p}")
    if len(seed) != SEED_SIZE:
        raise P2pdError(
            ErrorCode.STORAGE,
            f"the node key {p} is damaged ({len(seed)} bytes, expected {SEED_SIZE}): "
            "delete it to give this node a new identity",
        )
    return NodeKey.from_seed(seed)


def node_identity(data_dir: Path, cluster: ClusterSecret | None) -> Identity:
    return Identity(load_node_key(data_dir), cluster)


def token_value(value: str | None, option: str, argv: list[str] | None = None) -> str | None:
    """A bearer token given as `@FILE` (read from the file, which no other user may read) or as itself.

    A token typed on the command line is visible to every user in `ps`: it still works, with a warning
    pointing at `@FILE` or the environment (issue #14 row 13).
    """
    if not value:
        return value
    if value.startswith("@"):
        path = Path(value[1:])
        try:
            st = path.stat()
            data = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise P2pdError(ErrorCode.BAD_REQUEST, f"{option} {value}: cannot read the token file: {e}") from None
        if st.st_mode & stat.S_IROTH:
            raise P2pdError(
                ErrorCode.BAD_REQUEST, f"{option} {value}: the file is readable by every user: chmod 600 {path}"
            )
        if not data:
            raise P2pdError(ErrorCode.BAD_REQUEST, f"{option} {value}: the token file is empty")
        return data
    if value in (sys.argv if argv is None else argv):
        print(
            f"warning: {option} on the command line is visible to every user (ps); "
            f"give {option} @FILE or set it in the environment instead",
            file=sys.stderr,
        )
    return value
