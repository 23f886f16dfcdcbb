"""A TLS handshake and ``GET /health`` against a SuperLink, verified against a CA file.

Used by ``silo doctor``/``silo join`` and ``aggregator doctor``; one set of hints for both, so
the hospital and the consortium read the same words about the same fault.
"""

from __future__ import annotations

import email.utils
import socket
import ssl
import time
from pathlib import Path


def refusal_hint(reason: str, host: str) -> str:
    """How to fix a failed certificate verification, from OpenSSL's reason."""
    if "expired" in reason:
        return (
            "the SuperLink's certificate has expired; the consortium renews it with "
            "'aggregator renew'"
        )
    if "self-signed" in reason or "local issuer" in reason:
        return (
            "the SuperLink's certificate is not signed by the consortium CA held here; check "
            "the address, or get a fresh join bundle"
        )
    if "mismatch" in reason or "hostname" in reason.lower():
        return f"the SuperLink's certificate is not valid for {host}; check the address"
    return "check the SuperLink address and the consortium CA"


def _clock_skew(head: bytes) -> float | None:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"date:"):
            try:
                server = email.utils.parsedate_to_datetime(line[5:].decode().strip())
                return time.time() - server.timestamp()
            except (TypeError, ValueError):
                return None
    return None


def probe_tls(address: str, ca_file: Path, timeout: float = 5.0) -> tuple[bool, str, float | None]:
    """Handshake with ``HOST:PORT`` trusting only ``ca_file``, then ``GET /health``.

    Returns (ok, one line, clock skew in seconds from the server's Date header or None).
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    context = ssl.create_default_context(cafile=str(ca_file))
    try:
        with (
            socket.create_connection((host, int(port)), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            request = f"GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            tls.sendall(request.encode())
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = tls.recv(4096)
                if not chunk:
                    break
                head += chunk
    except ssl.SSLCertVerificationError as exc:
        reason = exc.verify_message or str(exc)
        hint = refusal_hint(reason, host)
        return False, f"TLS to {address} refused: {reason} ({hint})", None
    except (OSError, ValueError) as exc:
        return False, f"SuperLink {address} unreachable ({exc}); is it running, port open?", None
    status = head.split(b"\r\n", 1)[0].decode(errors="replace")
    return True, f"SuperLink {address} reachable with TLS ({status})", _clock_skew(head)
