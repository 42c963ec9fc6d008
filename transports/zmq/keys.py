"""CURVE key pairs for the gateway and the agents, in ZeroMQ's certificate format (``zmq.auth``).

``make_keypair(directory, name)`` writes ``NAME.key`` (the public key: copy it to the other side) and
``NAME.key_secret`` (the secret key: keep it where it is, mode 0600). The gateway's allow-list is a
directory of agents' public ``.key`` files; an agent needs its own secret file and the gateway's public
file. ``flgraph keys DIR --name NAME`` does the same from the command line.

Example:
    >>> import tempfile
    >>> from flgraph.transports.zmq.keys import load_public, load_secret, make_keypair
    >>> d = tempfile.mkdtemp()
    >>> public, secret = make_keypair(d, "agent-1")
    >>> len(load_public(public)), load_secret(secret)[0] == load_public(public)
    (40, True)
"""

from __future__ import annotations

import os
from pathlib import Path

import zmq
import zmq.auth

from flgraph.errors import ConfigError

__all__ = ["allowed_keys", "load_public", "load_secret", "make_keypair"]


def make_keypair(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write a new CURVE key pair ``NAME.key`` / ``NAME.key_secret`` into ``directory``; return both paths."""
    if not zmq.has("curve"):
        raise ConfigError("this libzmq has no CURVE support", fix="install pyzmq from its wheels (they bundle it)")
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"key name {name!r}", fix="use a plain file name such as 'gateway' or 'agent-7'")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    public, secret = (d / f"{name}.key"), (d / f"{name}.key_secret")
    if public.exists() or secret.exists():
        raise ConfigError(f"{public} or {secret} exists already", fix="choose another name or remove the old pair")
    pub, sec = zmq.auth.create_certificates(str(d), name)
    os.chmod(sec, 0o600)
    return Path(pub), Path(sec)


def load_public(path: str | os.PathLike[str]) -> bytes:
    """The Z85 public key of a ``.key`` (or ``.key_secret``) certificate file."""
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read a CURVE public key from {path}: {e}",
                          fix="make keys with `flgraph keys DIR --name NAME`") from None
    return bytes(public)


def load_secret(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """``(public, secret)`` Z85 keys of a ``.key_secret`` certificate file."""
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read a CURVE key pair from {path}: {e}",
                          fix="pass the NAME.key_secret file made by `flgraph keys`") from None
    if not secret:
        raise ConfigError(f"{path} holds no secret key", fix="pass the NAME.key_secret file, not NAME.key")
    return bytes(public), bytes(secret)


def allowed_keys(directory: str | os.PathLike[str]) -> set[bytes]:
    """The Z85 public keys of every ``.key`` file in ``directory`` (the gateway's allow-list)."""
    d = Path(directory)
    if not d.is_dir():
        raise ConfigError(f"the allow-list directory {d} does not exist",
                          fix="make a directory holding the agents' public NAME.key files")
    return {load_public(p) for p in sorted(d.glob("*.key"))}
