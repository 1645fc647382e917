"""How a natserve process proves who it is to NATS, and how it checks the server: auth and TLS.

``NatsAuth`` holds one identity and the TLS material; ``connect_options`` turns it into the
keyword arguments of nats-py's ``connect()`` (and so of ``_transport.connect``,
``AsyncClient(**options)``, ``Registry(auth=...)``)::

    auth = NatsAuth(user="client", password="s3cret", tls_ca="/etc/natserve/ca.pem")
    nc = await connect(url, name="natserve-client", **connect_options(auth))

Identities (at most one): ``user`` + ``password``, ``token``, ``nkey_seed`` (a file holding an
NKey seed, ``SU...``, for a server listing the user's public key), ``creds`` (a ``.creds`` file:
user JWT + NKey seed, for decentralized JWT auth). TLS: ``tls_ca`` (the CA that signed the
server's certificate; the system's CAs if unset), ``tls_cert`` + ``tls_key`` (a client
certificate for servers with ``verify: true``), ``tls_hostname`` (the name to check in the
server's certificate when the URL holds an IP address or another name).

Environment variables (``NatsAuth.from_env``), the same for every process, so a deployment sets
them once per container: ``NATSERVE_NATS_USER``, ``_PASSWORD``, ``_TOKEN``, ``_NKEY_SEED``,
``_CREDS``, ``_TLS_CA``, ``_TLS_CERT``, ``_TLS_KEY``, ``_TLS_HOSTNAME``.

The local pool's token: ``natserve up`` starts its nats-server with a token that it creates on
first start and keeps in ``$NATSERVE_HOME/nats.token`` (mode 0600), so that other users of the
machine cannot reach the pool. A connection given no identity to servers on this machine only
(loopback addresses) uses that token when the file is there (:func:`with_local_token`): the
client and the CLI of the same user reach the pool with nothing to configure. Servers without
auth ignore a token, and the token never goes to another machine.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "ENV_PREFIX",
    "IDENTITY_OPTIONS",
    "LOCAL_TOKEN_FILE",
    "NatsAuth",
    "connect_options",
    "default_home",
    "is_local",
    "local_token",
    "with_local_token",
]

ENV_PREFIX = "NATSERVE_NATS_"
# The local pool's token, in NATSERVE_HOME.
LOCAL_TOKEN_FILE = "nats.token"
# nats-py connect() options that carry an identity: with one given, the local token stays out.
IDENTITY_OPTIONS = (
    "user",
    "password",
    "token",
    "nkeys_seed",
    "nkeys_seed_str",
    "user_credentials",
    "signature_cb",
    "user_jwt_cb",
)


class NatsAuth(BaseModel):
    """One NATS identity plus TLS settings; invalid combinations fail when built."""

    # Frozen: one object is shared by a process's connections; extra keys are typos; and a
    # validation error must not echo the password or token it was given.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    user: str | None = None
    # Secrets stay out of reprs (and so out of logs); plain str so callers pass plain strings.
    password: str | None = Field(default=None, repr=False)
    token: str | None = Field(default=None, repr=False)
    nkey_seed: Path | None = None
    creds: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_hostname: str | None = None

    @model_validator(mode="after")
    def _check_combinations(self) -> NatsAuth:
        # user and password make one identity; any two identities would be resolved by the
        # server ignoring one of them: refuse instead of guessing which one was meant.
        given = [
            name
            for name in ("user", "token", "nkey_seed", "creds")
            if getattr(self, name) is not None or (name == "user" and self.password is not None)
        ]
        if len(given) > 1:
            raise ValueError(
                "NATS auth takes one identity (user+password, token, nkey_seed or creds), "
                f"got {' and '.join(given)}"
            )
        if (self.user is None) != (self.password is None):
            present, missing = ("user", "password") if self.password is None else ("password", "user")
            raise ValueError(f"NATS auth: {present} is set but {missing} is not; give both")
        # tls_cert alone is fine: a PEM holding the certificate and its key is common.
        if self.tls_key is not None and self.tls_cert is None:
            raise ValueError("NATS auth: tls_key is set but tls_cert is not; give both")
        return self

    @property
    def uses_tls(self) -> bool:
        return any(v is not None for v in (self.tls_ca, self.tls_cert, self.tls_key, self.tls_hostname))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, prefix: str = ENV_PREFIX) -> NatsAuth | None:
        """The auth the ``NATSERVE_NATS_*`` variables describe, or None when none is set."""
        env = os.environ if environ is None else environ
        values: dict[str, str] = {}
        for name in cls.model_fields:
            value = env.get(prefix + name.upper())
            if value:  # an empty variable (compose's ``${X:-}``) means unset
                values[name] = value
        return cls.model_validate(values) if values else None


def _readable(path: Path, field: str) -> str:
    # nats-py reads seeds and creds lazily inside its signature callback, where a missing file
    # becomes an OSError that it retries forever; fail here, naming the setting.
    resolved = path.expanduser()
    if not resolved.is_file():
        raise ValueError(f"NATS auth: {field} file {str(path)!r} does not exist or is not a file")
    if not os.access(resolved, os.R_OK):
        raise ValueError(f"NATS auth: {field} file {str(path)!r} is not readable")
    return str(resolved)


def _creds_file(path: Path) -> str:
    name = _readable(path, "creds")
    text = Path(name).read_text(errors="replace")
    # nats-py scans for these markers line by line and, without the JWT block, loops forever
    # at end of file, blocking the event loop (nats-py 2.16): check before handing it over.
    for marker in ("BEGIN NATS USER JWT", "BEGIN USER NKEY SEED"):
        if marker not in text:
            raise ValueError(
                f"NATS auth: creds file {str(path)!r} has no '{marker}' block; a .creds file holds "
                "a user JWT and its NKey seed (`nsc generate creds`); for a bare seed use nkey_seed"
            )
    return name


def _ssl_context(auth: NatsAuth) -> ssl.SSLContext:
    cafile = _readable(auth.tls_ca, "tls_ca") if auth.tls_ca is not None else None
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
        if auth.tls_cert is not None:
            context.load_cert_chain(
                _readable(auth.tls_cert, "tls_cert"),
                _readable(auth.tls_key, "tls_key") if auth.tls_key is not None else None,
            )
    except ssl.SSLError as exc:
        raise ValueError(f"NATS auth: cannot load the TLS files: {exc}") from exc
    return context


def connect_options(auth: NatsAuth | None) -> dict[str, Any]:
    """nats-py ``connect()`` keyword arguments for ``auth`` (empty for None)."""
    if auth is None:
        return {}
    options: dict[str, Any] = {}
    if auth.user is not None and auth.password is not None:
        options["user"] = auth.user
        options["password"] = auth.password
    if auth.token is not None:
        options["token"] = auth.token
    if auth.nkey_seed is not None:
        options["nkeys_seed"] = _readable(auth.nkey_seed, "nkey_seed")
    if auth.creds is not None:
        options["user_credentials"] = _creds_file(auth.creds)
    if auth.uses_tls:
        options["tls"] = _ssl_context(auth)
    if auth.tls_hostname is not None:
        options["tls_hostname"] = auth.tls_hostname
    return options


def default_home(environ: Mapping[str, str] | None = None) -> Path:
    """``NATSERVE_HOME``, else ``~/.natserve``: where ``natserve up`` keeps its state."""
    env = os.environ if environ is None else environ
    return Path(env.get("NATSERVE_HOME") or "~/.natserve").expanduser()


def _servers(url: str | Sequence[str]) -> list[str]:
    given = [url] if isinstance(url, str) else list(url)
    return [s.strip() for u in given for s in u.split(",") if s.strip()]


def is_local(url: str | Sequence[str]) -> bool:
    """Whether every server of ``url`` (a URL, a comma-separated list, or a list) is on this
    machine, by a loopback address or ``localhost``, with no credentials in it."""
    servers = _servers(url)
    if not servers:
        return False
    for server in servers:
        try:
            parts = urlsplit(server if "://" in server else f"nats://{server}")
            host = parts.hostname
        except ValueError:
            return False
        if parts.username or parts.password or not host:
            return False
        if host != "localhost":
            try:
                if not ipaddress.ip_address(host).is_loopback:
                    return False
            except ValueError:
                return False
    return True


def local_token(url: str | Sequence[str], home: str | Path | None = None) -> str | None:
    """The token of the pool ``natserve up`` runs from ``home`` (``NATSERVE_HOME`` by default),
    when ``url`` is on this machine and the token file is there; else None."""
    if not is_local(url):
        return None
    path = (Path(home).expanduser() if home is not None else default_home()) / LOCAL_TOKEN_FILE
    try:
        token = path.read_text().strip()
    except OSError:
        return None
    return token or None


def with_local_token(
    url: str | Sequence[str], options: Mapping[str, Any], home: str | Path | None = None
) -> dict[str, Any]:
    """nats-py ``connect()`` options for ``url``: ``options``, plus the local pool's token when
    they carry no identity and ``url`` is on this machine (:func:`local_token`)."""
    result = dict(options)
    if any(result.get(name) is not None for name in IDENTITY_OPTIONS):
        return result
    token = local_token(url, home)
    if token is not None:
        result["token"] = token
    return result
