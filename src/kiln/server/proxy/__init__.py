"""The reverse proxy: sandbox ports over HTTP and WebSocket, by path or published host.

front            the ASGI front: picks proxied and published requests, auth, wake
target           where a request goes; header rules (hop-by-hop, X-Forwarded-*, Location)
http_relay       one HTTP exchange, streamed both ways, through httpcore
websocket_relay  a WebSocket, through websockets' sans-I/O client protocol
pools            one httpcore connection pool per sandbox
backend          httpcore's network backend over the agent's forward channel
"""

from .front import ProxyFront

__all__ = ["ProxyFront"]
