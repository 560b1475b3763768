"""Outbound fetches that a caller controls: no server-side request forgery, bounded in time.

Anyone who can start a deployment chooses ``audio_file`` and the speaker-sample URLs, so an
http(s) fetch must not reach the worker's own network: the cloud metadata service
(169.254.169.254), loopback services, the private LAN. :func:`session` returns a ``requests``
session whose every connection (the first one and each redirect's) resolves the host, refuses
loopback, link-local, private (RFC 1918, ULA, CGNAT), multicast, reserved and unspecified
addresses, and connects to the very address it checked (no second DNS lookup, so no DNS
rebinding). TLS still verifies the certificate against the host name.

``ALLOW_PRIVATE_URLS=1`` turns the address check off; ``FETCH_ALLOW_HOSTS`` lists hosts (or
``host:port``) allowed whatever they resolve to. A refusal reads the same whether or not
something listens there, so it cannot be used to scan ports.

:mod:`speech.policy` holds the matching rules for local paths and the rest of a request from
someone else; :class:`Deadline` bounds a download's total time and minimum rate
(curl's ``--max-time`` and ``--speed-limit``/``--speed-time``).
"""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import time
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from speech.errors import FetchError, TransientFetchError
from speech.settings import Settings


class BlockedURL(FetchError):
    """The URL (or a redirect) points at an address this worker must not fetch from."""


# cloud metadata and host-agent services on public-looking addresses (169.254.169.254, AWS's
# fd00:ec2::254 and Alibaba's 100.100.100.200 are already link-local, ULA or CGNAT)
METADATA_ADDRESSES = frozenset({
    ipaddress.ip_address("168.63.129.16"),  # Azure WireServer (VM agent, extensions, health probes)
})


# NAT64's well-known prefix (RFC 6052): the last 32 bits are the IPv4 address the gateway reaches
NAT64 = ipaddress.ip_network("64:ff9b::/96")


def address_blocked(ip: str) -> bool:
    """True for loopback, link-local, private, shared (CGNAT), multicast, reserved and
    unspecified addresses, IPv4 ones inside IPv6 (mapped, 6to4, Teredo, NAT64) included, and cloud
    metadata services."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address):  # an IPv4 address inside an IPv6 one is judged as itself
        if addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        elif addr.sixtofour is not None:  # 6to4, 2002::/16
            addr = addr.sixtofour
        elif addr.teredo is not None:  # Teredo, 2001::/32: the client's address
            addr = addr.teredo[1]
        elif addr in NAT64:  # a NAT64 gateway reaches the embedded IPv4 address
            addr = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return (addr in METADATA_ADDRESSES or addr.is_loopback or addr.is_link_local or addr.is_private or addr.is_multicast
            or addr.is_reserved or addr.is_unspecified or not addr.is_global)


def _allowed_hosts(settings: Settings) -> set[str]:
    return {h.strip().lower() for h in settings.fetch_allow_hosts.split(",") if h.strip()}


def resolve_checked(host: str, port: int, settings: Settings) -> list[tuple[Any, ...]]:
    """``getaddrinfo`` results for ``host:port`` that may be connected to; a :class:`BlockedURL`
    when the host resolves to any blocked address (one bad answer is enough: a resolver may
    rotate)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise TransientFetchError(f"cannot resolve host {host!r}") from None
    open_to_all = settings.allow_private_urls or host.lower() in _allowed_hosts(settings) \
        or f"{host.lower()}:{port}" in _allowed_hosts(settings)
    if not open_to_all and any(address_blocked(info[4][0]) for info in infos):
        raise BlockedURL(f"refused to fetch from {host!r}: it is not a public address (set ALLOW_PRIVATE_URLS=1 "
                         "or list the host in FETCH_ALLOW_HOSTS to allow it)")
    return infos


def connect_checked(conn: Any, settings: Settings, on_socket: Optional[Any] = None) -> socket.socket:
    """A socket for urllib3 connection ``conn`` (its ``_new_conn``), to an address
    :func:`resolve_checked` allows, the checked address itself (no second lookup: DNS rebinding
    between the check and the connect does not help)."""
    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
    from urllib3.util.connection import create_connection

    last: Optional[OSError] = None
    for *_, address in resolve_checked(conn._dns_host, conn.port, settings):
        try:
            sock = create_connection(address[:2], conn.timeout, source_address=conn.source_address,
                                     socket_options=conn.socket_options)
            if on_socket is not None:
                on_socket(sock)
            return sock
        except socket.timeout as exc:
            raise ConnectTimeoutError(conn, f"connection to {conn.host} timed out") from exc
        except OSError as exc:
            last = exc
    raise NewConnectionError(conn, f"failed to connect to {conn.host}: {last}")


def pinned_pools(connect: Callable[[Any], socket.socket], http: tuple[type, type], https: tuple[type, type],
                 mixin: Optional[type] = None) -> dict[str, type]:
    """urllib3 pool classes by scheme (``http``/``https``: a connection class and its pool class,
    urllib3's or botocore's) whose connections open their socket with ``connect(conn)``."""
    pools = {}
    for scheme, (conn_base, pool_base) in (("http", http), ("https", https)):
        conn = type(f"Pinned{conn_base.__name__}", (*([mixin] if mixin else []), conn_base),
                    {"_new_conn": lambda self: connect(self)})
        pools[scheme] = type(f"Pinned{pool_base.__name__}", (pool_base,), {"ConnectionCls": conn})
    return pools


def guard_botocore(client: Any, settings: Settings) -> Any:
    """``client`` (boto3) connecting only where :func:`connect_checked` allows, with no proxy
    (a proxy would connect on its behalf, unchecked), and no connection living longer than
    ``HTTP_MAX_SECONDS`` (a timer shuts it: botocore's timeouts are per read, so a server that
    answers a byte a minute would otherwise hold the run for ever): for an S3 endpoint a request
    chose."""
    import threading

    from botocore.awsrequest import AWSHTTPConnection, AWSHTTPConnectionPool, AWSHTTPSConnection, AWSHTTPSConnectionPool
    from botocore.httpsession import ProxyConfiguration

    def timed(conn: Any) -> socket.socket:
        sock = connect_checked(conn, settings)

        def shut() -> None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

        conn._lifetime = threading.Timer(settings.http_max_seconds, shut)
        conn._lifetime.daemon = True
        conn._lifetime.start()
        return sock

    class Lifetime:
        def close(self) -> None:
            timer = getattr(self, "_lifetime", None)
            if timer is not None:
                timer.cancel()
            super().close()  # type: ignore[misc]

    http = client._endpoint.http_session  # botocore's URLLib3Session (botocore pinned in constraints.txt)
    http._pool_classes_by_scheme = pinned_pools(timed, (AWSHTTPConnection, AWSHTTPConnectionPool),
                                                (AWSHTTPSConnection, AWSHTTPSConnectionPool), mixin=Lifetime)
    http._manager.pool_classes_by_scheme = http._pool_classes_by_scheme
    http._proxy_config = ProxyConfiguration()
    return client


class _WithoutURLs(logging.Filter):
    """urllib3's retry warnings end with the request's path and query (a presigned URL's
    signature, a webhook's token): they are logged without it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple("(URL withheld)" if isinstance(a, str) and a.startswith("/") else a
                                for a in record.args)
        return True


_URL_FILTER = _WithoutURLs()


def session(settings: Settings, on_socket: Optional[Any] = None, retries: Any = 0) -> Any:
    """A ``requests.Session`` whose connections go only to addresses :func:`resolve_checked`
    allows, pinned to the address checked; at most 5 redirects. ``on_socket(sock)`` sees every
    socket it opens (:meth:`Deadline.watch`); ``retries``: urllib3's ``Retry`` for the adapter
    (default none: a download's retries are the task's)."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    pool_log = logging.getLogger("urllib3.connectionpool")
    if _URL_FILTER not in pool_log.filters:
        pool_log.addFilter(_URL_FILTER)

    pools = pinned_pools(lambda conn: connect_checked(conn, settings, on_socket),
                         (HTTPConnection, HTTPConnectionPool), (HTTPSConnection, HTTPSConnectionPool))

    class GuardedAdapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = pools

    s = requests.Session()
    s.max_redirects = 5
    s.trust_env = False  # a proxy from the environment would connect on the URL's behalf, unchecked
    adapter = GuardedAdapter(max_retries=retries)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    return s


class DeadlineExceeded(TransientFetchError):
    """The download's whole budget (``HTTP_MAX_SECONDS``, every attempt together) is spent: not
    retried."""

    retryable = False


class Deadline:
    """A download's budget: ``max_seconds`` in all, counted from ``since`` (the first attempt's
    wall-clock start, so retries share it), connect and headers included; and no stretch of
    ``rate_seconds`` averaging under ``min_rate`` bytes/s. Used as a context manager it arms a
    timer that shuts the watched sockets (:meth:`watch`) when the budget runs out, so a server
    that trickles its headers or stops sending cannot hold the download; :meth:`tick` after every
    read checks the budget and the rate."""

    def __init__(self, label: str, settings: Settings, since: Optional[float] = None,
                 max_seconds: Optional[float] = None):
        import threading

        self.label = label
        self.max_seconds = settings.http_max_seconds if max_seconds is None else max_seconds
        self.min_rate, self.rate_seconds = settings.http_min_rate, settings.http_min_rate_seconds
        self.start = self.window_start = time.monotonic()
        spent = max(0.0, time.time() - since) if since is not None else 0.0
        self.end = self.start + self.max_seconds - spent
        self.window_bytes = 0
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer: Optional[threading.Timer] = None

    def exceeded(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"download of {self.label} took longer than {self.max_seconds:.0f} s "
                                "(HTTP_MAX_SECONDS, all attempts together)")

    def check(self) -> None:
        if self.expired or time.monotonic() >= self.end:
            raise self.exceeded()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                self._shut(sock)

    def __enter__(self) -> "Deadline":
        import threading

        self.check()
        self._timer = threading.Timer(max(0.0, self.end - time.monotonic()), self._expire)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def tick(self, nbytes: int) -> None:
        now = time.monotonic()
        if now >= self.end or self.expired:
            raise self.exceeded()
        self.window_bytes += nbytes
        elapsed = now - self.window_start
        if elapsed >= self.rate_seconds:
            if self.min_rate and self.window_bytes / elapsed < self.min_rate:
                raise TransientFetchError(
                    f"download of {self.label} stalled: {self.window_bytes / elapsed:.0f} bytes/s over "
                    f"{elapsed:.0f} s, under the {self.min_rate} bytes/s minimum (HTTP_MIN_BYTES_PER_SECOND)")
            self.window_start, self.window_bytes = now, 0
