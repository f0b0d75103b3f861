"""TLS contexts for DICOM TLS (BCP 195 secure transport profile) and peer checks."""

from __future__ import annotations

import ssl

from ms_forecast_node.config.settings import NodeConfig, TLSConfig
from ms_forecast_node.errors import ConfigurationError

# BCP 195 (RFC 9325) recommended TLS 1.2 suites; TLS 1.3 suites are all acceptable.
BCP195_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
    ]
)


def _context(purpose: ssl.Purpose, tls: TLSConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_CIPHERS)
    try:
        if tls.cert_file is not None:
            ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
        if tls.ca_file is not None:
            ctx.load_verify_locations(cafile=str(tls.ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"TLS files cannot be loaded: {exc}", reason="tls_invalid"
        ) from exc
    return ctx


def server_context(tls: TLSConfig) -> ssl.SSLContext | None:
    if not tls.enabled:
        return None
    if tls.cert_file is None or tls.key_file is None:
        raise ConfigurationError("listen.tls needs cert_file and key_file", reason="tls_invalid")
    ctx = _context(ssl.Purpose.CLIENT_AUTH, tls)
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_NONE
    return ctx


def client_context(tls: TLSConfig, server_hostname: str | None = None) -> ssl.SSLContext | None:
    """Context for our associations to a destination: verify the peer against ``ca_file``."""
    if not tls.enabled:
        return None
    ctx = _context(ssl.Purpose.SERVER_AUTH, tls)
    # DICOM peers are usually addressed by IP; hostnames are checked only when given.
    ctx.check_hostname = server_hostname is not None
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def peer_refusal(config: NodeConfig, calling_ae: str, host: str) -> str | None:
    """Why a calling AE / host may not associate, or ``None`` when it may."""
    if config.accept_unknown_peers:
        return None
    peer = config.peer(calling_ae)
    if peer is None:
        return f"calling AE {calling_ae!r} is not an allowed peer"
    if peer.host is not None and peer.host != host:
        return f"calling AE {calling_ae!r} is allowed from {peer.host}, not from {host}"
    return None
