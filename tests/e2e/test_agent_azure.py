"""cacheagent inside a real tritonserver, on an Azure repository (Azurite behind a proxy).

Triton's own ``as://`` client always dials ``https://<account>.blob.core.windows.net``
and aborts the process when that fails, so it cannot be pointed at Azurite
directly (DESIGN.md §3). This module gives it a way there that stays on the
loopback:

* ``HTTPS_PROXY`` names :class:`TlsTerminatingProxy`, which answers Triton's
  ``CONNECT``, terminates TLS with a certificate for ``*.blob.core.windows.net``
  from a throwaway CA, and forwards each request as plain HTTP to the rig's
  counting proxy (then Azurite).
* Triton trusts that CA because it runs in a private mount namespace
  (``unshare -m``) where a bundle holding the system CAs plus the test CA is
  bind-mounted over ``/etc/ssl/certs/ca-certificates.crt``; nothing changes
  outside that namespace.
* Azurite serves path-style URLs (``/devstoreaccount1/<container>/<blob>``), which
  is also what the rig's counters understand, so the proxy prefixes the account
  to every path. That changes the Shared Key string-to-sign, so the proxy signs
  the request again with the (public) Azurite key.

The agent's adlfs client does not use that path: it reaches the rig's proxy
through ``AZURE_STORAGE_CONNECTION_STRING`` over plain HTTP. Requests are
attributed by User-Agent (Triton: azsdk-cpp; the agent: adlfs).

Needs root (or unprivileged user namespaces) for the mount namespace; skipped
otherwise.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import hmac
import os
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from harness.emulators import AZURITE_ACCOUNT, AZURITE_KEY, StorageRig
from harness.triton import TritonPaths, TritonServer, check_first_start_then_restart

pytestmark = pytest.mark.e2e

Factory = Callable[..., TritonServer]

SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")  # where Triton's libcurl looks
AZURE_HOST = f"{AZURITE_ACCOUNT}.blob.core.windows.net"


# ---- a throwaway CA ----


def write_test_pki(directory: Path) -> tuple[Path, Path, Path]:
    """Write a CA and a server certificate for ``*.blob.core.windows.net``.

    Returns (CA certificate, server certificate, server key), all PEM.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cacheagent e2e test CA")])
    ca_usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(ca_usage, critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, AZURE_HOST)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(AZURE_HOST), x509.DNSName("*.blob.core.windows.net")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem, cert_pem, key_pem = (
        directory / "ca.pem",
        directory / "server.pem",
        directory / "key.pem",
    )
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_pem.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_pem, cert_pem, key_pem


# ---- Shared Key signing, exactly as Azurite checks it ----

_SIGNED_HEADERS = (
    "content-encoding",
    "content-language",
    "content-length",
    "content-md5",
    "content-type",
    "date",
    "if-modified-since",
    "if-match",
    "if-none-match",
    "if-unmodified-since",
    "range",
)


def shared_key_authorization(
    method: str, target: str, headers: dict[str, str], account: str, key: str
) -> str:
    """The ``Authorization: SharedKey`` value for a request (lower-cased header names)."""
    path, _, query = target.partition("?")
    values = [headers.get(name, "") for name in _SIGNED_HEADERS]
    if headers.get("content-length") == "0":
        values[_SIGNED_HEADERS.index("content-length")] = ""
    canonical_headers = "".join(
        f"{name}:{headers[name].lstrip()}\n"
        for name in sorted(n for n in headers if n.startswith("x-ms-"))
    )
    resource = f"/{account}{path}"
    params = {}
    for part in query.split("&") if query else []:
        name, eq, value = part.partition("=")
        if name and eq and "=" not in value:
            params[name.lower()] = value
    for name in sorted(params):
        resource += f"\n{name}:{unquote(params[name].replace('+', '%20'))}"
    to_sign = "\n".join([method.upper(), *values]) + "\n" + canonical_headers + resource
    digest = hmac.new(base64.b64decode(key), to_sign.encode(), hashlib.sha256).digest()
    return f"SharedKey {account}:{base64.b64encode(digest).decode()}"


# ---- the TLS-terminating CONNECT proxy ----


class _Reader:
    """Buffered reads of HTTP/1.1 framing from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise EOFError
        self.buf += data

    def until(self, marker: bytes) -> bytes:
        while (end := self.buf.find(marker)) < 0:
            self._fill()
        out = bytes(self.buf[: end + len(marker)])
        del self.buf[: end + len(marker)]
        return out

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


def _parse_head(head: bytes) -> tuple[list[bytes], dict[str, str]]:
    lines = head[:-4].split(b"\r\n")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return lines, fields


def _relay_body(src: _Reader, dst: socket.socket, fields: dict[str, str]) -> None:
    if "chunked" in fields.get("transfer-encoding", "").lower():
        while True:
            size_line = src.until(b"\r\n")
            dst.sendall(size_line)
            if int(size_line.split(b";")[0], 16) == 0:
                while (trailer := src.until(b"\r\n")) != b"\r\n":
                    dst.sendall(trailer)
                dst.sendall(trailer)
                return
            dst.sendall(src.exactly(int(size_line.split(b";")[0], 16) + 2))
    remaining = int(fields.get("content-length") or 0)
    while remaining:
        part = src.exactly(min(remaining, 1 << 20))
        dst.sendall(part)
        remaining -= len(part)


class TlsTerminatingProxy:
    """What Triton's ``HTTPS_PROXY`` names: CONNECT, TLS, then path-style HTTP upstream.

    Every request gets ``/<account>`` prepended to its path, the upstream's Host,
    and a Shared Key signature for that new form. Keep-alive is kept on both sides.
    """

    def __init__(self, upstream_port: int, cert: Path, key: Path) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(cert, key)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self.tunnels: list[str] = []  # CONNECT targets, in order
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="tls-proxy", daemon=True).start()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``, for ``HTTPS_PROXY``."""
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        """Stop listening and drop every open connection."""
        self._listener.close()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.close()
            self._open.clear()

    def _track(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._open.add(sock)
        return sock

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(self._track(conn),), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            lines, _ = _parse_head(_Reader(conn).until(b"\r\n\r\n"))
            method, target, _ = lines[0].split(b" ", 2)
            if method != b"CONNECT":
                conn.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                return
            self.tunnels.append(target.decode())
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            tls = self._track(self._context.wrap_socket(conn, server_side=True))
            upstream = self._track(socket.create_connection(self.upstream))
            client, server = _Reader(tls), _Reader(upstream)
            while True:
                self._exchange(client, tls, server, upstream)
        except (OSError, EOFError, ValueError, ssl.SSLError):
            return
        finally:
            for sock in (upstream, conn):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()

    def _exchange(
        self, client: _Reader, tls: socket.socket, server: _Reader, upstream: socket.socket
    ) -> None:
        lines, fields = _parse_head(client.until(b"\r\n\r\n"))
        method, target, version = lines[0].decode("latin-1").split(" ", 2)
        target = f"/{AZURITE_ACCOUNT}{target}"
        head = [f"{method} {target} {version}"]
        for line in lines[1:]:
            name = line.partition(b":")[0].strip().lower()
            if name == b"host":
                head.append(f"Host: {self.upstream[0]}:{self.upstream[1]}")
            elif name == b"authorization":
                auth = shared_key_authorization(
                    method, target, fields, AZURITE_ACCOUNT, AZURITE_KEY
                )
                head.append(f"Authorization: {auth}")
            else:
                head.append(line.decode("latin-1"))
        upstream.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        _relay_body(client, upstream, fields)
        response = server.until(b"\r\n\r\n")
        tls.sendall(response)
        status_line, response_fields = _parse_head(response)
        status = int(status_line[0].split(b" ")[1])
        if method != "HEAD" and status not in (204, 304) and status >= 200:
            _relay_body(server, tls, response_fields)


# ---- Triton in a mount namespace that trusts the test CA ----


def _namespace_command(bundle: Path) -> list[str] | None:
    """An argv prefix that runs a command with ``bundle`` over the system CA bundle.

    ``unshare -m`` as root, else ``unshare -rm`` (an unprivileged user namespace);
    None if neither can bind-mount here.
    """
    unshare = shutil.which("unshare")
    if unshare is None or not SYSTEM_BUNDLE.is_file():
        return None
    script = f'mount --bind "$0" {SYSTEM_BUNDLE} && exec "$@"'
    for flags in (["-m"], ["-r", "-m"]) if os.geteuid() == 0 else (["-r", "-m"],):
        prefix = [unshare, *flags, "--", "sh", "-c", script, str(bundle)]
        probe = subprocess.run(
            [*prefix, "cmp", "-s", str(bundle), str(SYSTEM_BUNDLE)],
            capture_output=True,
            timeout=30,
        )
        if probe.returncode == 0:
            return prefix
    return None


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(CA bundle for Triton: system CAs + test CA, server certificate, server key)."""
    directory = tmp_path_factory.mktemp("azure-pki")
    ca, cert, key = write_test_pki(directory)
    bundle = directory / "ca-bundle.crt"
    bundle.write_bytes(SYSTEM_BUNDLE.read_bytes() + b"\n" + ca.read_bytes())
    return bundle, cert, key


@pytest.fixture(scope="module")
def triton_bin(triton_bin: TritonPaths, pki: tuple[Path, Path, Path]) -> TritonPaths:
    """The wheel's Triton, started through a wrapper that runs it in the CA namespace.

    Every ``exec`` keeps the pid, so the server object still sees Triton's own pid.
    """
    bundle = pki[0]
    prefix = _namespace_command(bundle)
    if prefix is None:
        pytest.skip(
            "cannot bind-mount a CA bundle in a private mount namespace here "
            "(needs root or unprivileged user namespaces, and /etc/ssl/certs/ca-certificates.crt)"
        )
    wrapper = bundle.parent / "tritonserver-in-namespace"
    quoted = " ".join(f"'{arg}'" for arg in prefix)
    wrapper.write_text(f'#!/bin/sh\nexec {quoted} "{triton_bin.binary}" "$@"\n')
    wrapper.chmod(0o755)
    return TritonPaths(root=triton_bin.root, binary=wrapper, backend_dir=triton_bin.backend_dir)


@pytest.fixture
def tls_proxy(azure_rig: StorageRig, pki: tuple[Path, Path, Path]) -> Iterator[TlsTerminatingProxy]:
    """The HTTPS proxy in front of this test's rig."""
    proxy = TlsTerminatingProxy(azure_rig.proxy.port, pki[1], pki[2])
    yield proxy
    proxy.close()


def test_first_start_misses_then_restart_hits(
    triton_factory: Factory,
    azure_rig: StorageRig,
    tls_proxy: TlsTerminatingProxy,
    repoagent_dir: Path,
    tmp_path: Path,
) -> None:
    first, restart = check_first_start_then_restart(
        triton_factory,
        azure_rig,
        repoagent_dir,
        tmp_path / "cache",
        1 << 20,
        env={"HTTPS_PROXY": tls_proxy.url, "https_proxy": tls_proxy.url},
    )
    # Triton really went through the TLS proxy (the rig counted it above as well).
    assert tls_proxy.tunnels and set(tls_proxy.tunnels) == {f"{AZURE_HOST}:443"}
    assert sum(size for _, size in first.agent.values()) >= 1 << 20
    assert restart.response_bytes < 64 * 1024, "a restart should cost listings only"
