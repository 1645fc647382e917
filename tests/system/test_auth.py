"""NATS authentication and TLS (``broker_client.NatsAuth``) against real nats-servers.

Each kind of auth gets a server configured for it alone, and a connection made exactly as
natserve makes it: ``broker_client.runtime.connect(url, name=..., **connect_options(auth))``.
A refused first connect must fail fast with a TransportError (nats-py alone retries it forever).

Key material is made in the test: NKeys with the ``nkeys`` package (nats-py's optional
dependency for NKey/JWT auth), a decentralized-auth JWT chain (operator → account → user,
signed with those NKeys; the server trusts the operator and preloads the accounts from a
MEMORY resolver) for the ``.creds`` case, and a CA with server and client certificates with
``cryptography`` for TLS.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import importlib.util
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nats.aio.msg import Msg

from broker_client import NatsAuth, TransportError, connect_options
from broker_client.runtime import NATSConnection, NatsTransport, connect
from registry_service import Registry
from tests.support.nats_server import running_nats_server

# Optional packages: nkeys is nats-py's extra for NKey/JWT auth (``nats-py[nkeys]``);
# cryptography only makes the test certificates.
needs_nkeys = pytest.mark.skipif(
    importlib.util.find_spec("nkeys") is None, reason="NKey and .creds auth need the nkeys package"
)
needs_cryptography = pytest.mark.skipif(
    importlib.util.find_spec("cryptography") is None,
    reason="the TLS tests make certificates with cryptography",
)

# A refused connect must come back well within this; nats-py's own loop would never end.
FAST = 5.0


@asynccontextmanager
async def connected(
    url: str, auth: NatsAuth | None, name: str = "natserve-test"
) -> AsyncIterator[NATSConnection]:
    nc = await asyncio.wait_for(connect(url, name=name, **connect_options(auth)), FAST)
    try:
        yield nc
    finally:
        await nc.close()


async def assert_round_trip(nc: NATSConnection, subject: str = "auth.echo") -> None:
    """The connection is really usable: it can subscribe and get its own request answered."""

    async def echo(msg: Msg) -> None:
        await msg.respond(b"pong:" + msg.data)

    sub = await nc.subscribe(subject, cb=echo)
    try:
        reply = await nc.request(subject, b"ping", timeout=FAST)
        assert reply.data == b"pong:ping"
    finally:
        await sub.unsubscribe()


async def assert_refused(url: str, auth: NatsAuth | None, match: str = "refused") -> TransportError:
    started = time.monotonic()
    with pytest.raises(TransportError, match=match) as info:
        # wait_for only turns a regression (retrying forever) into a failure instead of a hang.
        await asyncio.wait_for(connect(url, name="natserve-test", **connect_options(auth)), FAST * 2)
    assert time.monotonic() - started < FAST
    return info.value


# --------------------------------------------------------------------------- pure: the model


def test_connect_options_maps_every_field(tmp_path: Path) -> None:
    seed = tmp_path / "user.nk"
    seed.write_text("SUAAA\n")
    assert connect_options(None) == {}
    assert connect_options(NatsAuth(user="u", password="p")) == {"user": "u", "password": "p"}
    assert connect_options(NatsAuth(token="t0k")) == {"token": "t0k"}
    assert connect_options(NatsAuth(nkey_seed=seed)) == {"nkeys_seed": str(seed)}
    opts = connect_options(NatsAuth(token="t", tls_hostname="nats.example"))
    assert opts["tls_hostname"] == "nats.example"
    assert opts["tls"].check_hostname  # the system CAs and hostname checking, never CERT_NONE


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"user": "u", "password": "p", "token": "t"}, ("user", "token")),
        ({"token": "t", "creds": "/x.creds"}, ("token", "creds")),
        ({"user": "u", "password": "p", "nkey_seed": "/s"}, ("user", "nkey_seed")),
        ({"nkey_seed": "/s", "creds": "/x.creds"}, ("nkey_seed", "creds")),
        ({"user": "u"}, ("user", "password")),
        ({"password": "p"}, ("password", "user")),
        ({"tls_key": "/k.pem"}, ("tls_key", "tls_cert")),
    ],
)
def test_invalid_combinations_name_the_fields(fields: dict[str, str], named: tuple[str, ...]) -> None:
    with pytest.raises(ValueError) as info:
        NatsAuth.model_validate(fields)
    for name in named:
        assert name in str(info.value)


def test_secrets_stay_out_of_reprs_and_errors() -> None:
    auth = NatsAuth(user="u", password="hunter2")
    assert "hunter2" not in repr(auth)
    with pytest.raises(ValueError) as info:
        NatsAuth(user="u", password="hunter2", token="t0psecret")
    assert "hunter2" not in str(info.value)
    assert "t0psecret" not in str(info.value)


def test_from_env() -> None:
    assert NatsAuth.from_env({}) is None
    assert NatsAuth.from_env({"NATSERVE_NATS_USER": "", "OTHER": "x"}) is None
    auth = NatsAuth.from_env(
        {"NATSERVE_NATS_USER": "worker", "NATSERVE_NATS_PASSWORD": "pw", "NATSERVE_NATS_TLS_HOSTNAME": "n"}
    )
    assert auth == NatsAuth(user="worker", password="pw", tls_hostname="n")


def test_missing_or_malformed_files_fail_before_connecting(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"nkey_seed file .* does not exist"):
        connect_options(NatsAuth(nkey_seed=tmp_path / "nope.nk"))
    with pytest.raises(ValueError, match="tls_ca file"):
        connect_options(NatsAuth(tls_ca=tmp_path / "nope.pem"))
    # A .creds without its JWT block would make nats-py spin forever reading it.
    seed_only = tmp_path / "seed-only.creds"
    seed_only.write_text("-----BEGIN USER NKEY SEED-----\nSUAAA\n------END USER NKEY SEED------\n")
    with pytest.raises(ValueError, match="BEGIN NATS USER JWT"):
        connect_options(NatsAuth(creds=seed_only))


# --------------------------------------------------------------------------- user / password, token


async def test_user_password() -> None:
    with running_nats_server(
        config='authorization { users = [ { user: "alice", password: "s3cret" } ] }'
    ) as server:
        async with connected(server.url, NatsAuth(user="alice", password="s3cret")) as nc:
            await assert_round_trip(nc)
        error = await assert_refused(server.url, NatsAuth(user="alice", password="wrong"))
        assert "Authorization Violation" in str(error)
        await assert_refused(server.url, None)


async def test_token() -> None:
    with running_nats_server(config='authorization { token: "t0k3n-abc" }') as server:
        async with connected(server.url, NatsAuth(token="t0k3n-abc")) as nc:
            await assert_round_trip(nc)
        await assert_refused(server.url, NatsAuth(token="t0k3n-xyz"))


# --------------------------------------------------------------------------- NKey, .creds


def new_nkey(role: str) -> tuple[str, Any]:
    """A fresh NKey pair for ``role`` (user, account, operator): (seed, key pair)."""
    import nkeys

    prefix = {
        "user": nkeys.PREFIX_BYTE_USER,
        "account": nkeys.PREFIX_BYTE_ACCOUNT,
        "operator": nkeys.PREFIX_BYTE_OPERATOR,
    }[role]
    seed = nkeys.encode_seed(os.urandom(32), prefix).decode()
    return seed, nkeys.from_seed(bytearray(seed.encode()))


@needs_nkeys
async def test_nkey(tmp_path: Path) -> None:
    seed, pair = new_nkey("user")
    seed_file = tmp_path / "user.nk"
    seed_file.write_text(seed + "\n")
    other_seed, _ = new_nkey("user")
    other_file = tmp_path / "other.nk"
    other_file.write_text(other_seed)
    config = f'authorization {{ users = [ {{ nkey: "{pair.public_key.decode()}" }} ] }}'
    with running_nats_server(config=config) as server:
        async with connected(server.url, NatsAuth(nkey_seed=seed_file)) as nc:
            await assert_round_trip(nc)
        await assert_refused(server.url, NatsAuth(nkey_seed=other_file))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def signed_jwt(signer: Any, subject: str, name: str, nats: dict[str, Any]) -> str:
    """A NATS JWT (v2): ed25519-nkey signature by ``signer`` over header.claims."""
    claims: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": signer.public_key.decode(),
        "name": name,
        "sub": subject,
        "nats": {**nats, "version": 2},
    }
    digest = hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims).encode())
    return f"{header}.{body}.{_b64(signer.sign(f'{header}.{body}'.encode()))}"


_UNLIMITED_ACCOUNT = {
    "subs": -1,
    "data": -1,
    "payload": -1,
    "imports": -1,
    "exports": -1,
    "wildcards": True,
    "conn": -1,
    "leaf": -1,
}


@dataclass
class Operator:
    config: str  # the server's trust section
    account: Any  # key pair that signs user JWTs

    def user_creds(self, path: Path, name: str = "natserve") -> Path:
        seed, user = new_nkey("user")
        token = signed_jwt(
            self.account,
            user.public_key.decode(),
            name,
            {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1},
        )
        # The layout `nsc generate creds` writes, which nats-py parses.
        path.write_text(
            f"-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n"
            "************************* IMPORTANT *************************\n"
            "NKEY Seed printed below can be used to sign and prove identity.\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        )
        return path


def make_operator() -> Operator:
    _, operator = new_nkey("operator")
    _, account = new_nkey("account")
    # JetStream (the test servers run -js) needs a system account in operator mode.
    _, system = new_nkey("account")
    op_pub, acc_pub, sys_pub = (k.public_key.decode() for k in (operator, account, system))
    operator_jwt = signed_jwt(operator, op_pub, "natserve-op", {"type": "operator"})
    account_jwt = signed_jwt(operator, acc_pub, "NATSERVE", {"type": "account", "limits": _UNLIMITED_ACCOUNT})
    system_jwt = signed_jwt(operator, sys_pub, "SYS", {"type": "account", "limits": _UNLIMITED_ACCOUNT})
    config = (
        f'operator: "{operator_jwt}"\n'
        f"system_account: {sys_pub}\n"
        "resolver: MEMORY\n"
        f'resolver_preload: {{\n  {acc_pub}: "{account_jwt}"\n  {sys_pub}: "{system_jwt}"\n}}\n'
    )
    return Operator(config=config, account=account)


@needs_nkeys
async def test_creds_file_with_a_jwt_chain(tmp_path: Path) -> None:
    operator = make_operator()
    creds = operator.user_creds(tmp_path / "natserve.creds")
    # Same layout, but signed by an account the server does not know.
    stranger = make_operator().user_creds(tmp_path / "stranger.creds")
    with running_nats_server(config=operator.config) as server:
        async with connected(server.url, NatsAuth(creds=creds)) as nc:
            await assert_round_trip(nc)
        await assert_refused(server.url, NatsAuth(creds=stranger))
        await assert_refused(server.url, None)


# --------------------------------------------------------------------------- TLS


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    server_name: str


def make_pki(folder: Path, server_name: str) -> Pki:
    """A CA, a server certificate for ``server_name`` only and a client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return path

    def write_cert(cert: x509.Certificate, path: Path) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("natserve test CA"))
        .issuer_name(name("natserve test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(common_name: str, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName]) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(common_name))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    # No IP address in the server's names: connecting to 127.0.0.1 needs tls_hostname.
    server_key, server_cert = leaf(server_name, ExtendedKeyUsageOID.SERVER_AUTH, [x509.DNSName(server_name)])
    client_key, client_cert = leaf("natserve-worker", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    return Pki(
        ca=write_cert(ca_cert, folder / "ca.pem"),
        server_cert=write_cert(server_cert, folder / "server.pem"),
        server_key=write_key(server_key, folder / "server-key.pem"),
        client_cert=write_cert(client_cert, folder / "client.pem"),
        client_key=write_key(client_key, folder / "client-key.pem"),
        server_name=server_name,
    )


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path, "nats.natserve.test")


def tls_config(pki: Pki) -> str:
    return (
        "tls {\n"
        f'  cert_file: "{pki.server_cert}"\n'
        f'  key_file: "{pki.server_key}"\n'
        f'  ca_file: "{pki.ca}"\n'
        "  verify: true\n"
        "  timeout: 2\n"
        "}\n"
    )


@needs_cryptography
async def test_tls_with_ca_and_client_certificate(pki: Pki, tmp_path: Path) -> None:
    auth = NatsAuth(
        tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key, tls_hostname=pki.server_name
    )
    with running_nats_server(config=tls_config(pki)) as server:
        async with connected(server.url, auth) as nc:
            await assert_round_trip(nc)
            assert nc.connected_url is not None
        # The server's certificate names nats.natserve.test, not 127.0.0.1.
        await assert_refused(server.url, auth.model_copy(update={"tls_hostname": None}))
        # A server certificate from a CA the client does not trust.
        (tmp_path / "other").mkdir()
        stranger = make_pki(tmp_path / "other", pki.server_name)
        await assert_refused(server.url, auth.model_copy(update={"tls_ca": stranger.ca}))
        # No client certificate, but the server has verify: true.
        await assert_refused(server.url, NatsAuth(tls_ca=pki.ca, tls_hostname=pki.server_name))


@needs_cryptography
async def test_tls_and_user_password_together(pki: Pki) -> None:
    config = tls_config(pki) + 'authorization { users = [ { user: "bob", password: "pw" } ] }\n'
    tls = NatsAuth(
        tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key, tls_hostname=pki.server_name
    )
    with running_nats_server(config=config) as server:
        async with connected(server.url, tls.model_copy(update={"user": "bob", "password": "pw"})) as nc:
            await assert_round_trip(nc)
        # model_copy skips validation: the combined object is validated here on purpose.
        both = NatsAuth.model_validate({**tls.model_dump(), "user": "bob", "password": "nope"})
        await assert_refused(server.url, both)


# --------------------------------------------------------------------------- the registry with auth


async def test_registry_with_auth_serves_an_authenticated_client(sqlite_url: str) -> None:
    config = (
        "authorization { users = [\n"
        '  { user: "registry", password: "reg-pw" }\n'
        '  { user: "client", password: "cli-pw" }\n'
        "] }\n"
    )
    with running_nats_server(config=config) as server:
        registry = Registry(
            nats_url=server.url, db_url=sqlite_url, auth=NatsAuth(user="registry", password="reg-pw")
        )
        await registry.start()
        try:
            async with connected(server.url, NatsAuth(user="client", password="cli-pw")) as nc:
                transport = NatsTransport(nc)
                await transport.start()
                reply = await transport.request("natserve.registry.list", {}, timeout=FAST)
                assert reply == {"registrations": []}
                await transport.close()
        finally:
            await registry.stop()
        bad = Registry(nats_url=server.url, db_url=sqlite_url, auth=NatsAuth(user="registry", password="x"))
        with pytest.raises(TransportError, match="refused"):
            await asyncio.wait_for(bad.start(), FAST)
