"""Fetching the media a client names: http(s) URLs, data URLs and, when the
operator allowed a directory, local files inside it.

The rules, each one a guard against a known server-side request forgery or
resource attack:

- Schemes other than http, https, data (and file, when a local directory is
  allowed) are refused.
- A URL is parsed once, by `urllib.parse`, and the same parts are used for the
  check and for the connection. URLs with user info, backslashes or control
  characters are refused rather than interpreted.
- The host is resolved once. Every address it resolves to must be public
  (not loopback, private, link-local, multicast, reserved or unspecified;
  IPv4-mapped IPv6 is judged by its IPv4 address). Allowing private targets
  opens loopback and private ranges, never link-local (cloud metadata),
  multicast, unspecified or reserved ones. The connection then goes to that very address, with the
  original Host header and TLS server name, so a second DNS answer cannot
  move it.
- Redirects are followed by hand, at most `max_redirects` times, and every
  hop passes the same check.
- The body is read in a stream and abandoned at the byte cap; the whole fetch
  has one deadline, so a server that drips bytes cannot hold a request.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

from internvl_launch.errors import MediaError
from internvl_launch.vision.media import describe, read_media

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class RefusedMedia(MediaError):
    """A media reference the server's policy refuses (not a broken file)."""


@dataclass
class FetchPolicy:
    """What the operator allows. The defaults are the safe ones."""

    allow_private: bool = False
    allowed_domains: tuple[str, ...] = ()
    allowed_local_dir: Path | None = None
    max_redirects: int = 3
    timeout_s: float = 15.0
    connect_timeout_s: float = 5.0
    user_agent: str = "internvl-launch"
    resolver: object = field(default=None, repr=False)  # tests may inject a getaddrinfo
    tls: object = field(default=None, repr=False)  # an ssl.SSLContext; None: the system's trust store


def is_public(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return is_public(address.ipv4_mapped)
        if address.sixtofour is not None or address.teredo is not None:
            return False
    return address.is_global and not address.is_multicast


def is_refused(address: IPAddress, allow_private: bool) -> bool:
    """Whether a media fetch may not dial `address`. Allowing private targets
    opens loopback and private ranges only: link-local (the cloud metadata
    address), multicast, unspecified and reserved addresses stay refused."""
    if is_public(address):
        return False
    if not allow_private:
        return True
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_link_local or address.is_multicast or address.is_unspecified or address.is_reserved


def _literal_address(host: str) -> IPAddress | None:
    """The address a host names literally, including the old spellings that
    C resolvers accept (decimal `2130706433`, octal `0177.0.0.1`, short `127.1`)."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class _Target:
    url: str  # the URL as it was checked
    scheme: str
    host: str  # lower-case, no trailing dot
    port: int
    address: IPAddress
    path: str  # path + query as sent


class MediaFetcher:
    """Turns a client's media reference into bytes under a `FetchPolicy`."""

    def __init__(self, policy: FetchPolicy | None = None) -> None:
        self.policy = policy or FetchPolicy()
        self._tls: object = policy.tls if policy is not None else None

    def _tls_context(self) -> object:
        """The TLS trust settings, built once: loading the CA bundle costs tens
        of milliseconds, too much to pay on every fetch."""
        if self._tls is None:
            import httpx

            self._tls = httpx.create_ssl_context()
        return self._tls

    async def fetch(self, ref: str, *, kind: str, max_bytes: int) -> bytes:
        if not isinstance(ref, str) or not ref:
            raise MediaError(f"The {kind} URL is empty.")
        if ref.startswith("data:"):
            return read_media(ref, kind=kind, max_bytes=max_bytes)
        scheme = urlsplit(ref).scheme.lower() if "://" in ref else ""
        if scheme in ("http", "https"):
            return await self._fetch_remote(ref, kind=kind, max_bytes=max_bytes)
        if scheme in ("", "file"):
            return await asyncio.to_thread(self._read_local, ref, kind, max_bytes)
        raise RefusedMedia(
            f"{kind.capitalize()} URL scheme {scheme!r} is not supported.",
            hint="Send http(s) URLs or data URLs.",
        )

    # -- local files ----------------------------------------------------------

    def _read_local(self, ref: str, kind: str, max_bytes: int) -> bytes:
        root = self.policy.allowed_local_dir
        if root is None:
            raise RefusedMedia(
                f"{kind.capitalize()} {describe(ref)} is a local path; this server does not read local files.",
                hint="Send the image as a data URL or an http(s) URL (or start the server with "
                "--allowed-local-media-path DIR).",
            )
        raw = ref[len("file://") :] if ref.lower().startswith("file://") else ref
        raw = unquote(raw)
        candidate = Path(raw) if os.path.isabs(raw) else Path(root) / raw
        try:
            real = candidate.resolve(strict=True)
        except (OSError, RuntimeError):
            raise MediaError(
                f"{kind.capitalize()} {describe(ref)} was not found under the allowed directory."
            ) from None
        base = Path(root).resolve()
        if real != base and base not in real.parents:
            raise RefusedMedia(f"{kind.capitalize()} {describe(ref)} is outside the allowed directory.")
        return read_media(str(real), kind=kind, max_bytes=max_bytes)

    # -- remote URLs ----------------------------------------------------------

    async def _check(self, url: str, kind: str) -> _Target:
        if any(c in url for c in "\\\r\n\t\x00") or any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
            raise RefusedMedia(f"{kind.capitalize()} URL {describe(url)} contains characters that are not allowed.")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise RefusedMedia(f"{kind.capitalize()} URL {describe(url)} is malformed.") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise RefusedMedia(f"{kind.capitalize()} URL scheme {scheme!r} is not supported.")
        if "@" in parts.netloc:
            raise RefusedMedia(f"{kind.capitalize()} URL {describe(url)} carries user info, which is not allowed.")
        host = (parts.hostname or "").rstrip(".").lower()
        if not host:
            raise RefusedMedia(f"{kind.capitalize()} URL {describe(url)} has no host.")
        port = port or (443 if scheme == "https" else 80)
        domains = self.policy.allowed_domains
        if domains and not any(host == d or host.endswith("." + d) for d in domains):
            raise RefusedMedia(f"{kind.capitalize()} host {host} is not in the server's allowed domains.")
        literal = _literal_address(host)
        if literal is not None:
            addresses = [literal]
        else:
            addresses = await self._resolve(host, port, kind)
        for address in addresses:
            if is_refused(address, self.policy.allow_private):
                raise RefusedMedia(
                    f"{kind.capitalize()} URL {describe(url)} points at a private or local address; refused.",
                    hint="Media URLs must reach public addresses (the operator can allow private ones).",
                )
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return _Target(url, scheme, host, port, addresses[0], path)

    async def _resolve(self, host: str, port: int, kind: str) -> list[IPAddress]:
        resolve = self.policy.resolver or socket.getaddrinfo
        try:
            infos = await asyncio.wait_for(
                asyncio.to_thread(resolve, host, port, type=socket.SOCK_STREAM),  # type: ignore[operator]
                timeout=self.policy.connect_timeout_s,
            )
        except (OSError, TimeoutError):
            raise MediaError(f"{kind.capitalize()} host {host} could not be resolved.") from None
        addresses = []
        for info in infos:
            try:
                addresses.append(ipaddress.ip_address(info[4][0].split("%")[0]))
            except ValueError:
                continue
        if not addresses:
            raise MediaError(f"{kind.capitalize()} host {host} could not be resolved.")
        return addresses

    async def _fetch_remote(self, url: str, *, kind: str, max_bytes: int) -> bytes:
        try:
            return await asyncio.wait_for(self._follow(url, kind, max_bytes), timeout=self.policy.timeout_s)
        except TimeoutError:
            raise MediaError(
                f"Fetching {kind} {describe(url)} took longer than {self.policy.timeout_s:g} s; gave up."
            ) from None

    async def _follow(self, url: str, kind: str, max_bytes: int) -> bytes:
        import httpx

        timeout = httpx.Timeout(self.policy.timeout_s, connect=self.policy.connect_timeout_s)
        async with httpx.AsyncClient(
            timeout=timeout, follow_redirects=False, trust_env=False, verify=self._tls_context()
        ) as client:
            for _hop in range(self.policy.max_redirects + 1):
                target = await self._check(url, kind)
                host_for_url = f"[{target.address}]" if target.address.version == 6 else str(target.address)
                dial = urlunsplit((target.scheme, f"{host_for_url}:{target.port}", target.path, "", ""))
                default_port = target.port == (443 if target.scheme == "https" else 80)
                headers = {
                    "Host": target.host if default_port else f"{target.host}:{target.port}",
                    "User-Agent": self.policy.user_agent,
                    "Accept-Encoding": "identity",
                }
                extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
                try:
                    request = client.build_request("GET", dial, headers=headers, extensions=extensions)
                    response = await client.send(request, stream=True)
                except httpx.HTTPError:
                    raise MediaError(f"Could not fetch {kind} {describe(url)}.") from None
                try:
                    if response.status_code in (301, 302, 303, 307, 308):
                        location = response.headers.get("location")
                        if not location:
                            raise MediaError(f"Fetching {kind} {describe(url)}: a redirect without a location.")
                        url = urljoin(target.url, location)
                        continue
                    if response.status_code != 200:
                        raise MediaError(f"Fetching {kind} {describe(url)} answered HTTP {response.status_code}.")
                    declared = response.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > max_bytes:
                        raise _too_big(kind, url, max_bytes)
                    body = bytearray()
                    async for chunk in response.aiter_raw():
                        body += chunk
                        if len(body) > max_bytes:
                            raise _too_big(kind, url, max_bytes)
                    return bytes(body)
                except httpx.HTTPError:
                    raise MediaError(f"Fetching {kind} {describe(url)} failed mid-transfer.") from None
                finally:
                    await response.aclose()
        raise RefusedMedia(f"Fetching {kind} {describe(url)}: more than {self.policy.max_redirects} redirects.")


def _too_big(kind: str, url: str, max_bytes: int) -> MediaError:
    return MediaError(f"{kind.capitalize()} {describe(url)} is over the {max_bytes / 2**20:.0f} MiB limit.")
