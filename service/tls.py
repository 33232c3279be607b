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
    for flag, path in (("--tls-cert-file", cert_file), ("--tls-key-file", key_file),
                       ("--tls-client-ca-file", client_ca_file)):
        if path is not None and not os.access(path, os.R_OK):
            why = "no such file" if not os.path.exists(path) else "not readable"
            raise TlsConfigError(f"{flag} {path}: {why}")
    try:
        context.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        if reason == "KEY_VALUES_MISMATCH":
            raise TlsConfigError(f"--tls-key-file {key_file} is not the private key of --tls-cert-file {cert_file}"
                                 ) from None
        raise TlsConfigError(f"--tls-cert-file {cert_file} / --tls-key-file {key_file}: not a PEM certificate "
                             f"chain and its private key ({reason})") from None
    if client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(client_ca_file))
        except (ssl.SSLError, OSError) as exc:
            raise TlsConfigError(f"--tls-client-ca-file {client_ca_file}: not PEM CA certificates "
                                 f"({getattr(exc, 'reason', None) or exc})") from None


class _CertificateFiles:
    """The fetcher of `grpc.dynamic_ssl_server_credentials`: gRPC calls it on every new
    connection; it returns a new configuration only when a file changed (and still checks out),
    else None to keep the current one."""

    def __init__(self, cert_file, key_file, client_ca_file=None):
        self.files = tuple(Path(p) for p in (cert_file, key_file, client_ca_file) if p is not None)
        self.cert_file, self.key_file = Path(cert_file), Path(key_file)
        self.client_ca_file = Path(client_ca_file) if client_ca_file is not None else None
        self._lock = threading.Lock()
        self._stamp = None

    def _stat(self):
        # Secret volumes swap a symlink: stat() follows it, so any rotation changes the stamp.
        return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in (p.stat() for p in self.files))

    def initial(self) -> grpc.ServerCertificateConfiguration:
        check_tls_files(self.cert_file, self.key_file, self.client_ca_file)
        with self._lock:
            self._stamp = self._stat()
            return self._configuration()

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.key_file.read_bytes(), self.cert_file.read_bytes())],
            root_certificates=self.client_ca_file.read_bytes() if self.client_ca_file else None)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            with self._lock:
                stamp = self._stat()
                if stamp == self._stamp:
                    return None
                check_tls_files(self.cert_file, self.key_file, self.client_ca_file)
                configuration = self._configuration()
                self._stamp = stamp
            log.info("TLS certificate files changed; new connections use the new certificate")
            return configuration
        except Exception as exc:  # noqa: BLE001 - a half-written rotation: keep the current certificate
            log.warning("TLS certificate files changed but cannot be used yet (%s); keeping the current ones", exc)
            return None


def tls_server_credentials(cert_file, key_file, client_ca_file=None) -> grpc.ServerCredentials:
    """TLS server credentials that follow changes to the files; with `client_ca_file`, clients
    must present a certificate signed by it (mTLS). Raises TlsConfigError for unusable files."""
    if (cert_file is None) != (key_file is None):
        raise TlsConfigError("--tls-cert-file and --tls-key-file go together")
    if cert_file is None:
        raise TlsConfigError("--tls-client-ca-file needs --tls-cert-file and --tls-key-file")
    files = _CertificateFiles(cert_file, key_file, client_ca_file)
    return grpc.dynamic_ssl_server_credentials(files.initial(), files,
                                               require_client_authentication=client_ca_file is not None)
