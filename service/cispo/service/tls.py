"""TLS (and mTLS) server credentials that re-read the certificate files when they change
(cert-manager rotates the mounted Secret), checked once up front."""

from __future__ import annotations

import logging
import os
import ssl
import threading
from pathlib import Path

import grpc

log = logging.getLogger(__name__)


class TlsConfigError(ValueError):
    """TLS files that cannot be used; the message names the file."""


def check_tls_files(cert_file, key_file, client_ca_file=None) -> None:
    """Raise TlsConfigError unless the key matches the certificate and each file is valid PEM."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for flag, path in (
        ("--tls-cert-file", cert_file),
        ("--tls-key-file", key_file),
        ("--tls-client-ca-file", client_ca_file),
    ):
        if path is not None and not os.access(path, os.R_OK):
            why = "no such file" if not os.path.exists(path) else "not readable"
            raise TlsConfigError(f"{flag} {path}: {why}")
    try:
        context.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        if reason == "KEY_VALUES_MISMATCH":
            raise TlsConfigError(
                f"--tls-key-file {key_file} is not the private key of --tls-cert-file {cert_file}"
            ) from None
        raise TlsConfigError(
            f"--tls-cert-file {cert_file} / --tls-key-file {key_file}: not a PEM certificate "
            f"chain and its private key ({reason})"
        ) from None
    if client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(client_ca_file))
        except (ssl.SSLError, OSError) as exc:
            raise TlsConfigError(
                f"--tls-client-ca-file {client_ca_file}: not PEM CA certificates "
                f"({getattr(exc, 'reason', None) or exc})"
            ) from None


class CertificateFiles:
    """The TLS files of one port, followed: `changed()` is true once each time they change (and
    still check out). Each port keeps its own, so each sees every change."""

    def __init__(self, cert_file, key_file, client_ca_file=None):
        self.files = tuple(Path(p) for p in (cert_file, key_file, client_ca_file) if p is not None)
        self.cert_file, self.key_file = Path(cert_file), Path(key_file)
        self.client_ca_file = Path(client_ca_file) if client_ca_file is not None else None
        self._lock = threading.Lock()
        check_tls_files(self.cert_file, self.key_file, self.client_ca_file)
        self._stamp = self._stat()

    def _stat(self):
        # Secret volumes swap a symlink: stat() follows it, so any rotation changes the stamp.
        return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in (p.stat() for p in self.files))

    def changed(self) -> bool:
        try:
            with self._lock:
                stamp = self._stat()
                if stamp == self._stamp:
                    return False
                check_tls_files(self.cert_file, self.key_file, self.client_ca_file)
                self._stamp = stamp
            log.info("TLS certificate files changed; new connections use the new certificate")
            return True
        except Exception as exc:
            log.warning("TLS certificate files changed but cannot be used yet (%s); keeping the current ones", exc)
            return False

    def grpc_configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.key_file.read_bytes(), self.cert_file.read_bytes())],
            root_certificates=self.client_ca_file.read_bytes() if self.client_ca_file else None,
        )

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        if self.client_ca_file is not None:
            context.load_verify_locations(self.client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
        return context


def _check_pairing(cert_file, key_file) -> None:
    if (cert_file is None) != (key_file is None):
        raise TlsConfigError("--tls-cert-file and --tls-key-file go together")
    if cert_file is None:
        raise TlsConfigError("--tls-client-ca-file needs --tls-cert-file and --tls-key-file")


def tls_server_credentials(cert_file, key_file, client_ca_file=None) -> grpc.ServerCredentials:
    """TLS server credentials that follow changes to the files; with `client_ca_file`, clients
    must present a certificate signed by it (mTLS). Raises TlsConfigError for unusable files.
    gRPC asks on every new connection; the answer is a new configuration only after a change."""
    _check_pairing(cert_file, key_file)
    files = CertificateFiles(cert_file, key_file, client_ca_file)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        """A configuration of the new files after a change; None keeps the current one."""
        return files.grpc_configuration() if files.changed() else None

    return grpc.dynamic_ssl_server_credentials(
        files.grpc_configuration(),
        fetch,  # type: ignore[arg-type]  # grpc's stub omits the None its documentation allows
        require_client_authentication=client_ca_file is not None,
    )


def tls_server_context(cert_file, key_file, client_ca_file=None) -> ssl.SSLContext:
    """The HTTP port's TLS context, following changes to the files as the gRPC port's does:
    every handshake checks them and, after a change, goes on with a context of the new ones."""
    _check_pairing(cert_file, key_file)
    files = CertificateFiles(cert_file, key_file, client_ca_file)
    listening = files.ssl_context()
    current = listening

    def follow(connection: ssl.SSLObject, server_name: str | None, _context: ssl.SSLContext) -> None:
        nonlocal current
        if files.changed():
            current = files.ssl_context()
        if current is not listening:
            connection.context = current

    listening.sni_callback = follow
    return listening
