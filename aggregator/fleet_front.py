"""The fleet-only front that `aggregator start` puts on the SuperLink's public address.

Flower 1.42's ``flower-superlink`` serves the Fleet API (``/v1/fleet/*``), the Control API
(``/v1/control/*``: register nodes, start runs; no account authentication in the open-source
SuperLink) and the ServerApp runtime API on ONE ``--host``/``--port``; its ``--fleet-api-address``
and ``--control-api-address`` flags are deprecated and only feed an internal gRPC path that
SuperNodes no longer use. So `aggregator start` binds flower-superlink to loopback and serves the
public address with this front: TLS with the SuperLink's certificate, ``POST /v1/fleet/*`` and
``GET /health`` forwarded to the loopback SuperLink (TLS, verified against the consortium CA),
everything else answered 403 without touching the SuperLink. It is the same rule as
``deploy/compose/nginx-fleet-only.conf``.

Run as ``python -m aggregator.fleet_front --listen HOST:PORT --upstream 127.0.0.1:PORT
--certfile ... --keyfile ... --cafile ...``.
"""

from __future__ import annotations

import argparse
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

FLEET_PREFIX = "/v1/fleet/"
# hop-by-hop headers (RFC 9110 7.6.1) and those the two HTTP stacks recompute themselves
_DROP_HEADERS = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}
REFUSAL = b"fedsilo fleet-only front: only the Fleet API is served on this address\n"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def is_forwarded(method: str, path: str) -> bool:
    """True for the requests a SuperNode makes: POST /v1/fleet/* and GET /health."""
    if path == "/health":
        return method in ("GET", "HEAD")
    # no path tricks: '/v1/fleet/../control/x' reaches neither uvicorn's router nor ours
    return method == "POST" and path.startswith(FLEET_PREFIX) and "/.." not in path


class FleetOnlyFront:
    """ASGI app: forward Fleet API requests to the loopback SuperLink, refuse the rest (403)."""

    def __init__(self, upstream: str, cafile: str, timeout: float = 300.0) -> None:
        import httpx

        context = ssl.create_default_context(cafile=cafile)
        self.client = httpx.AsyncClient(
            base_url=f"https://{upstream}", verify=context, timeout=timeout
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI request (lifespan events close the upstream client)."""
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if not is_forwarded(scope["method"], scope["path"]):
            await _reply(send, 403, REFUSAL)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k.decode("latin-1").lower() not in _DROP_HEADERS
        ]
        target = scope["path"]
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        import httpx

        try:
            answer = await self.client.request(
                scope["method"], target, content=body, headers=headers
            )
        except httpx.HTTPError as exc:
            await _reply(send, 502, f"SuperLink unreachable ({type(exc).__name__})\n".encode())
            return
        out = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in answer.headers.multi_items()
            if k.lower() not in _DROP_HEADERS and k.lower() != "content-encoding"
        ]
        out.append((b"content-length", str(len(answer.content)).encode()))
        await send({"type": "http.response.start", "status": answer.status_code, "headers": out})
        await send({"type": "http.response.body", "body": answer.content})


async def _reply(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> None:
    """Serve the front until SIGTERM (uvicorn handles the signal)."""
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT of the public Fleet address")
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the loopback SuperLink")
    parser.add_argument("--certfile", required=True)
    parser.add_argument("--keyfile", required=True)
    parser.add_argument("--cafile", required=True)
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    uvicorn.run(
        FleetOnlyFront(args.upstream, args.cafile),
        host=host.strip("[]"),
        port=int(port),
        ssl_certfile=args.certfile,
        ssl_keyfile=args.keyfile,
        log_level="info",
        access_log=False,
        lifespan="on",
    )


if __name__ == "__main__":
    main()
