"""TLS between works: a certificate authority per app run, origin certificates, pinned clients.

docs/format.md ("Origin protocol", TLS) is the contract; docs/design.md ("Trust between
works") says what it protects against. In short:

- The flow makes a fresh CA (EC P-256 key, self-signed certificate) when an app run starts
  (:class:`CertificateAuthority`). Its private key exists only in the flow's memory: it is
  never written to disk and never sent (:class:`TlsConfig`, which every work receives,
  carries the CA *certificate* only; pickling it drops the CA, checked by tests).
- Each work makes its origin's key itself (:class:`OriginCredentials`) and sends the flow a
  certificate signing request (CSR) naming the host(s) its URL will use; the flow signs it
  (:meth:`TlsConfig.issue`). So no private key ever crosses a process boundary, let alone
  a network: the CSR and the certificate are public. The key is handed to OpenSSL through
  an anonymous in-memory file (``memfd``), or, where there is none, a 0600 file in a 0700
  folder of the work's state that is removed as soon as it is loaded.
- Consumers (:meth:`TlsConfig.client_context`) trust that CA and nothing else (no system
  roots), check the host or IP of the URL against the certificate's SAN, and speak TLS 1.2
  at least (both ends prefer 1.3, which is what they negotiate).

Certificates are short-lived: the CA and every origin certificate hold for ``VALIDITY``
from the app run's start (backdated by ``CLOCK_SKEW`` for machines whose clocks differ
slightly); a later app run makes a new CA, so nothing issued for one run is trusted by
another.

:func:`tls_enabled` is the rule that says whether an app run uses TLS; every runner asks it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import TlsError

#: Version of the TLS part of the origin protocol (docs/format.md).
TLS_PROFILE_VERSION = 1
#: How long the CA and the origin certificates of one app run hold (from the run's start).
VALIDITY = dt.timedelta(days=30)
#: How far back certificates are dated, for nodes whose clocks lag the flow's a little.
CLOCK_SKEW = dt.timedelta(minutes=5)
#: The one key type of this profile (P-256: every TLS stack and OpenSSL build has it).
CURVE = ec.SECP256R1
#: Origins and consumers refuse anything older.
MIN_VERSION = ssl.TLSVersion.TLSv1_2


def tls_enabled(tls: bool | None, cluster_is_local: bool) -> bool:
    """Whether an app run's works speak TLS to each other.

    ``tls`` is the user's ``App(tls=...)``: True or False decide; None (the default) means
    "on whenever the works may be on other machines", i.e. whenever the cluster is not
    local (local processes talk over loopback only, where TLS would protect nothing that
    the operating system does not already protect). Every runner (local processes, Ray)
    calls this one rule.
    """
    return (not cluster_is_local) if tls is None else bool(tls)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _san_entry(host: str) -> x509.GeneralName:
    """The SAN entry for a host a URL names: an IP address, else a DNS name. Wildcards and
    the unspecified addresses (0.0.0.0, ::) are refused: a client never connects to them."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        name = host.rstrip(".").lower()
        if not name or "*" in name or any(c.isspace() for c in name) or len(name) > 253:
            raise TlsError(f"{host!r} is not a host name an origin certificate may carry") from None
        return x509.DNSName(name)
    if ip.is_unspecified:
        raise TlsError(f"{host!r} is the unspecified address: a certificate must name the address clients connect to")
    return x509.IPAddress(ip)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


class CertificateAuthority:
    """The CA of one app run: signs the origin certificates of its works. Lives only in the
    flow's process; its key is never serialized (pickling refuses)."""

    def __init__(self, label: str, *, start: dt.datetime | None = None, validity: dt.timedelta = VALIDITY) -> None:
        start = start or _now()
        self._key = ec.generate_private_key(CURVE())
        self.not_before = start - CLOCK_SKEW
        self.not_after = start + validity
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pathapi"),
                          x509.NameAttribute(NameOID.COMMON_NAME, f"pathapi app run CA {label}"[:64])])
        public = self._key.public_key()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.not_before).not_valid_after(self.not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def __reduce__(self) -> Any:
        raise TypeError("the app run's CA never leaves the flow's process: send TlsConfig (its certificate) instead")

    def issue(self, name: str, csr_pem: bytes, *, not_before: dt.datetime | None = None,
              not_after: dt.datetime | None = None) -> bytes:
        """The certificate (PEM) of work ``name``'s origin for the key and hosts of ``csr_pem``.

        Accepted only: a CSR whose signature verifies (its sender holds the key), an EC P-256
        key, and a SAN of IP addresses and DNS names (no wildcard, no unspecified address).
        The certificate is for TLS servers only (not a CA), names the work as its CN, and
        holds from ``not_before`` to ``not_after`` (default: this CA's window; tests pass
        other windows to check that clients refuse them).
        """
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as e:
            raise TlsError(f"work {name!r} sent a certificate request that does not parse: {e}") from None
        if not csr.is_signature_valid:
            raise TlsError(f"work {name!r} sent a certificate request whose signature does not verify")
        key = csr.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, CURVE):
            raise TlsError(f"work {name!r} asked for a certificate of a {type(key).__name__}: only EC P-256 keys are issued")
        try:
            sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise TlsError(f"work {name!r} sent a certificate request naming no host") from None
        hosts: list[x509.GeneralName] = []
        for entry in sans:
            if isinstance(entry, x509.IPAddress):
                hosts.append(_san_entry(str(entry.value)))
            elif isinstance(entry, x509.DNSName):
                hosts.append(_san_entry(entry.value))
            else:
                raise TlsError(f"work {name!r} asked for a SAN entry of kind {type(entry).__name__}: only IP and DNS")
        if not hosts:
            raise TlsError(f"work {name!r} sent a certificate request naming no host")
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pathapi"),
                             x509.NameAttribute(NameOID.COMMON_NAME, name[:64] or "work")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(self.cert.subject).public_key(key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or self.not_before).not_valid_after(not_after or self.not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(hosts), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)


def client_context(ca_pem: bytes) -> ssl.SSLContext:
    """A client context that trusts ``ca_pem`` alone (no system roots), requires a
    certificate that chains to it and names the URL's host or IP, and TLS 1.2 or newer."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    ctx.minimum_version = MIN_VERSION
    ctx.load_verify_locations(cadata=ca_pem.decode("ascii"))
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@dataclass(frozen=True)
class TlsConfig:
    """The TLS trust of one app run, as every work receives it: the CA certificate (PEM).

    In the flow's process it also holds the CA itself (``issue`` signs origin
    certificates); pickled (to a work's process, a Ray actor), the CA is dropped, so a
    work holds nothing that can sign. Equality and the pickle look at the certificate only.
    """

    ca_pem: bytes
    _ca: CertificateAuthority | None = field(default=None, compare=False, repr=False)

    @classmethod
    def new(cls, label: str) -> TlsConfig:
        """A fresh CA for an app run (``label`` goes into its name, for operators)."""
        ca = CertificateAuthority(label)
        return cls(ca.cert_pem, ca)

    def __reduce__(self) -> Any:
        return (TlsConfig, (self.ca_pem,))

    @property
    def can_issue(self) -> bool:
        """True in the flow's process (it holds the CA), False in a work's."""
        return self._ca is not None

    def issue(self, name: str, csr_pem: bytes) -> bytes:
        """Sign work ``name``'s certificate request (see :meth:`CertificateAuthority.issue`)."""
        if self._ca is None:
            raise RuntimeError("only the flow holds the app run's CA: a work cannot issue certificates")
        return self._ca.issue(name, csr_pem)

    def client_context(self) -> ssl.SSLContext:
        """A client context that pins this run's CA (see :func:`client_context`)."""
        return client_context(self.ca_pem)


class OriginCredentials:
    """A work's origin key (made here, kept in memory) and its certificate request.

    ``hosts`` are what the origin's URL will name (the address it is reached at, not
    0.0.0.0); they become the certificate's SAN, which clients check.
    """

    def __init__(self, name: str, hosts: Sequence[str]) -> None:
        if not hosts:
            raise TlsError(f"work {name!r}: an origin certificate must name at least one host")
        self.name = name
        self.hosts = list(hosts)
        self._key = ec.generate_private_key(CURVE())
        self.csr_pem = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64] or "work")]))
            .add_extension(x509.SubjectAlternativeName([_san_entry(h) for h in self.hosts]), critical=False)
            .sign(self._key, hashes.SHA256())
            .public_bytes(serialization.Encoding.PEM)
        )

    def __reduce__(self) -> Any:
        raise TypeError("an origin's private key never leaves the work that made it")

    def server_context(self, cert_pem: bytes, spill_dir: str | None = None) -> ssl.SSLContext:
        """The origin's server context: this key with ``cert_pem`` (the flow's answer to
        :attr:`csr_pem`), TLS 1.2 or newer. ``cert_pem`` must be for this key (else
        :class:`TlsError`). ``spill_dir`` is where the key may be written for the moment
        OpenSSL reads it, when this system has no in-memory files (0600, removed at once)."""
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as e:
            raise TlsError(f"work {self.name!r} got a certificate that does not parse: {e}") from None
        if cert.public_key() != self._key.public_key():
            raise TlsError(f"work {self.name!r} got a certificate for another key")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = MIN_VERSION
        ctx.options |= ssl.OP_NO_COMPRESSION
        _load_chain(ctx, _pem_key(self._key) + cert_pem, spill_dir)
        return ctx


def _load_chain(ctx: ssl.SSLContext, pem: bytes, spill_dir: str | None) -> None:
    """``ctx.load_cert_chain`` of key + certificate ``pem`` without leaving the key on disk:
    Python's ssl reads them only from a path, so they go through an anonymous in-memory
    file, or (no memfd) a 0600 file in a fresh 0700 folder, removed once loaded."""
    memfd = getattr(os, "memfd_create", None)
    if memfd is not None:
        fd = memfd("pathapi-origin-key", getattr(os, "MFD_CLOEXEC", 0))
        try:
            os.write(fd, pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
            return
        except OSError:
            pass  # e.g. no /proc: fall back to a private file
        finally:
            os.close(fd)
    base = spill_dir or tempfile.gettempdir()
    os.makedirs(base, mode=0o700, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="tls-", dir=base)  # 0700
    path = os.path.join(folder, "origin.pem")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, pem)
        finally:
            os.close(fd)
        ctx.load_cert_chain(path)
    finally:
        try:
            os.remove(path)
        finally:
            os.rmdir(folder)
