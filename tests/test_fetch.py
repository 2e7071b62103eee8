"""The media fetcher's guards, with real sockets on loopback: refused
addresses are never dialled (a counting listener proves it), redirects are
checked hop by hop, the checked address is the dialled one, parser tricks
and other schemes are refused, local files stay inside the allowed
directory, slow and endless bodies are cut off."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import pytest
from servers import CountingListener, png_bytes

from internvl_launch.errors import MediaError
from internvl_launch.server.fetch import FetchPolicy, MediaFetcher, RefusedMedia, is_refused

IMAGE = png_bytes((64, 64))


def fetch(ref: str, policy: FetchPolicy | None = None, max_bytes: int = 2**20) -> bytes:
    return asyncio.run(MediaFetcher(policy).fetch(ref, kind="image", max_bytes=max_bytes))


@pytest.fixture
def listener() -> CountingListener:
    served = CountingListener(IMAGE)
    yield served
    served.close()


# 1: loopback, private, link-local, unspecified, mapped and odd spellings


def test_refused_spellings_of_this_machine_are_never_dialled(listener: CountingListener) -> None:
    port = listener.port
    for host in (
        "127.0.0.1",
        "localhost",
        "LocalHost.",
        "2130706433",
        "0x7f000001",
        "0177.0.0.1",
        "127.1",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "0.0.0.0",
        "[::1]",
        "[::]",
    ):
        with pytest.raises(RefusedMedia, match="private or local"):
            fetch(f"http://{host}:{port}/a.png")
    assert listener.connections == 0


@pytest.mark.parametrize(
    "address",
    ["10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.64.0.1", "fd00::1", "fe80::1", "224.0.0.1",
     "2002:7f00:1::1", "255.255.255.255"],
)  # fmt: skip
def test_private_and_special_ranges_are_refused(address: str) -> None:
    import ipaddress

    assert is_refused(ipaddress.ip_address(address), allow_private=False)
    with pytest.raises(RefusedMedia):
        fetch(f"http://{'[' + address + ']' if ':' in address else address}/x.png")


def test_allowing_private_targets_never_opens_metadata_or_multicast() -> None:
    import ipaddress

    assert not is_refused(ipaddress.ip_address("127.0.0.1"), allow_private=True)
    assert not is_refused(ipaddress.ip_address("10.1.2.3"), allow_private=True)
    for address in ("169.254.169.254", "fe80::1", "224.0.0.1", "0.0.0.0", "::ffff:169.254.169.254"):
        assert is_refused(ipaddress.ip_address(address), allow_private=True)
    assert not is_refused(ipaddress.ip_address("93.184.216.34"), allow_private=False)


def test_allowed_private_fetch_and_domain_allowlist(listener: CountingListener) -> None:
    assert fetch(listener.url(), FetchPolicy(allow_private=True)) == IMAGE
    with pytest.raises(RefusedMedia, match="allowed domains"):
        fetch(listener.url(), FetchPolicy(allow_private=True, allowed_domains=("images.example.com",)))
    assert listener.connections == 1


# 2: redirects


def test_redirect_into_a_refused_address_is_refused_at_the_redirect(listener: CountingListener) -> None:
    with pytest.raises(RefusedMedia, match="private or local"):
        fetch(listener.url("/redirect?to=http://169.254.169.254/latest/meta-data/"), FetchPolicy(allow_private=True))
    assert listener.paths == ["/redirect?to=http://169.254.169.254/latest/meta-data/"]


def test_redirect_count_is_capped(listener: CountingListener) -> None:
    hops = listener.url("/img.png")
    for _ in range(5):
        hops = listener.url("/redirect?to=" + hops)
    with pytest.raises(RefusedMedia, match="more than 3 redirects"):
        fetch(hops, FetchPolicy(allow_private=True))
    assert len(listener.paths) == 4
    assert fetch(listener.url("/redirect?to=" + listener.url()), FetchPolicy(allow_private=True)) == IMAGE


# 3: one resolution, and the checked address is the one dialled


def test_the_checked_address_is_the_dialled_address(listener: CountingListener) -> None:
    answers = [[(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", listener.port))],
               [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.9.9.9", listener.port))]]  # fmt: skip
    calls: list[str] = []

    def rebinding_resolver(host: str, port: int, **kw: object) -> list:
        calls.append(host)
        return answers[min(len(calls) - 1, 1)]

    policy = FetchPolicy(allow_private=True, resolver=rebinding_resolver)
    assert fetch(f"http://media.test:{listener.port}/a.png", policy) == IMAGE
    assert calls == ["media.test"] and listener.connections == 1

    def public_then_private(host: str, port: int, **kw: object) -> list:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]  # fmt: skip

    with pytest.raises(RefusedMedia):  # every answer must pass, not just the first
        fetch(f"http://mixed.test:{listener.port}/a.png", FetchPolicy(resolver=public_then_private))
    assert listener.connections == 1


# 4: parser tricks


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}\\@example.com/",
        "http://example.com@127.0.0.1:{port}/",
        "http://user:pass@127.0.0.1:{port}/",
        "http://127.0.0.1:{port}#@example.com/",
        "http://127.0.0.1:{port}/a.png\r\nX-Injected: 1",
        "http://LOCALHOST:{port}/",
        "http://localhost.:{port}/",
    ],
)
def test_parser_tricks_are_refused(url: str, listener: CountingListener) -> None:
    with pytest.raises(RefusedMedia):
        fetch(url.format(port=listener.port))
    assert listener.connections == 0


# 5, 6: local paths and schemes


def test_local_paths_are_refused_unless_allowed_and_then_confined(tmp_path: Path) -> None:
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "in.png").write_bytes(IMAGE)
    (tmp_path / "secret.png").write_bytes(IMAGE)
    os.symlink(tmp_path / "secret.png", allowed / "link.png")
    for ref in ("in.png", str(allowed / "in.png"), "file://" + str(allowed / "in.png")):
        with pytest.raises(RefusedMedia, match="local"):
            fetch(ref)
    policy = FetchPolicy(allowed_local_dir=allowed)
    assert fetch("in.png", policy) == IMAGE
    assert fetch("file://" + str(allowed / "in.png"), policy) == IMAGE
    for ref in ("../secret.png", str(tmp_path / "secret.png"), "file://" + str(allowed) + "/%2e%2e/secret.png",
                "link.png", "/etc/passwd"):  # fmt: skip
        with pytest.raises(MediaError) as err:
            fetch(ref, policy)
        assert "outside" in err.value.message or "not found" in err.value.message


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "gopher://example.com/", "javascript:alert(1)",
                                 "jar:http://example.com/a!/b", "dict://127.0.0.1:11211/"])  # fmt: skip
def test_other_schemes_are_refused(url: str) -> None:
    with pytest.raises(MediaError):
        fetch(url)


# 7, 8: slow and endless bodies


def test_a_dripping_server_times_out_and_others_are_unaffected() -> None:
    slow = CountingListener(IMAGE, drip=0.2)
    fast = CountingListener(IMAGE)
    try:

        async def both() -> tuple[BaseException | bytes, bytes, float]:
            fetcher = MediaFetcher(FetchPolicy(allow_private=True, timeout_s=1.0))
            started = time.perf_counter()
            slow_task = asyncio.create_task(fetcher.fetch(slow.url(), kind="image", max_bytes=2**20))
            fast_result = await fetcher.fetch(fast.url(), kind="image", max_bytes=2**20)
            fast_at = time.perf_counter() - started
            try:
                slow_result: BaseException | bytes = await slow_task
            except MediaError as err:
                slow_result = err
            return slow_result, fast_result, fast_at

        slow_result, fast_result, fast_at = asyncio.run(both())
        assert isinstance(slow_result, MediaError) and "longer than 1 s" in slow_result.message
        assert fast_result == IMAGE and fast_at < 1.0
    finally:
        slow.close()
        fast.close()


def test_bodies_stop_at_the_byte_cap_with_or_without_a_length() -> None:
    big = os.urandom(3 * 2**20)
    for served in (
        CountingListener(big),
        CountingListener(big, drip=0.0, chunk=65536),
    ):  # drip: no Content-Length, streamed
        try:
            with pytest.raises(MediaError, match="over the 1 MiB limit"):
                fetch(served.url(), FetchPolicy(allow_private=True, timeout_s=30), max_bytes=2**20)
        finally:
            served.close()


# 9: data URLs


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("data:image/png;base64,@@@@", "invalid base64"),
        ("data:image/png,rawbytes", "not base64"),
        ("data:text/html;base64,PGh0bWw+", "text/html"),
        ("data:;base64", "Malformed"),
        ("data:image/png;base64,", "empty"),
    ],
)
def test_broken_data_urls(url: str, fragment: str) -> None:
    with pytest.raises(MediaError, match=fragment):
        fetch(url)


# 3, over TLS: the pinned address is dialled, and the certificate is checked for the URL's host


def _tls_server(tmp_path: Path, hostname: str) -> tuple[object, int, Path]:
    import datetime
    import ssl
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = tmp_path / f"{hostname}.pem", tmp_path / f"{hostname}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(IMAGE)))
            self.send_header("X-Seen-Host", self.headers.get("Host", ""))
            self.end_headers()
            self.wfile.write(IMAGE)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1], cert_path


def test_https_dials_the_checked_address_and_verifies_the_host(tmp_path: Path) -> None:
    import ssl

    server, port, cert = _tls_server(tmp_path, "media.test")
    try:

        def resolver(host: str, p: int, **kw: object) -> list:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", p))]

        trust = ssl.create_default_context(cafile=str(cert))
        policy = FetchPolicy(allow_private=True, resolver=resolver, tls=trust)
        assert fetch(f"https://media.test:{port}/a.png", policy) == IMAGE
        with pytest.raises(MediaError):  # the certificate names media.test, not other.test
            fetch(f"https://other.test:{port}/a.png", policy)
        with pytest.raises(MediaError):  # and an unknown issuer is not trusted
            fetch(f"https://media.test:{port}/a.png", FetchPolicy(allow_private=True, resolver=resolver))
    finally:
        server.shutdown()  # type: ignore[attr-defined]
