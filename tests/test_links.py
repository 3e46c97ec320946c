"""Link handling: URL extraction, slug titles, and a LinkResolver run against a real aiohttp server on 127.0.0.1.

Every test that touches the network goes through the `connects` fixture: it records each socket connect on the
running loop and BLOCKS any that is not loopback, and it replaces DNS with a fixed table, so a bug in the code under
test can never send traffic off this machine.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.errors import LinkError
from bot.links import (
    LinkResolver,
    ResolvedStory,
    clean_title,
    extract_urls,
    hn_item_id,
    is_refused_address,
    title_from_url,
)

FAKE_DNS = {  # host -> addresses; anything else except localhost fails to resolve
    "evil.test": ["10.0.0.1"],
    "metadata.test": ["169.254.169.254"],
    "mixed.test": ["127.0.0.1", "10.0.0.1"],
    "alias.test": ["127.0.0.1"],
}
RELEASE = web.AppKey("release", asyncio.Event)
REQUESTS = web.AppKey("requests", list)


# --- extract_urls ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("look https://example.com/a.", ["https://example.com/a"]),
        ("a, https://example.com/a, b", ["https://example.com/a"]),
        ("wow https://example.com!", ["https://example.com"]),
        ("really https://example.com?", ["https://example.com"]),
        ("really https://example.com/?q=1", ["https://example.com/?q=1"]),
        ('"https://example.com/q"', ["https://example.com/q"]),
        ("'https://example.com/q'", ["https://example.com/q"]),
        ("(see https://example.com/x)", ["https://example.com/x"]),
        ("https://en.wikipedia.org/wiki/Foo_(bar)", ["https://en.wikipedia.org/wiki/Foo_(bar)"]),
        ("(https://en.wikipedia.org/wiki/Foo_(bar))", ["https://en.wikipedia.org/wiki/Foo_(bar)"]),
        ("<https://x.com|the label>", ["https://x.com"]),
        ("<https://x.com|https://x.com>", ["https://x.com"]),
        ("<https://x.com>", ["https://x.com"]),
        ("<https://x.com/?a=1&amp;b=2|x.com>", ["https://x.com/?a=1&b=2"]),
        ("hi <@U123> <#C1|general> <https://x.com/a>", ["https://x.com/a"]),
        ("[label](https://x.com/page)", ["https://x.com/page"]),
        ("[https://shown.com](https://target.com)", ["https://target.com"]),
        ("[wiki](https://en.wikipedia.org/wiki/A_(b)) ok", ["https://en.wikipedia.org/wiki/A_(b)"]),
        ("https://x.com> y", ["https://x.com"]),
        ("two https://a.com and http://b.com/x", ["https://a.com", "http://b.com/x"]),
        ("dupe https://a.com https://a.com <https://a.com>", ["https://a.com"]),
        ("ftp://x.com mailto:a@b.com <mailto:a@b.com|a> javascript:alert(1) file:///etc/passwd", []),
        ("https:// and http://", []),
        ("HTTPS://EXAMPLE.COM/Up", ["HTTPS://EXAMPLE.COM/Up"]),
        ("http://[::1]:8080/x", ["http://[::1]:8080/x"]),
        ("*https://x.com/bold*", ["https://x.com/bold"]),
        ("no links here", []),
    ],
)
def test_extract_urls_forms(text: str, expected: list[str]) -> None:
    assert extract_urls(text) == expected


def test_extract_urls_limit() -> None:
    text = " ".join(f"https://site{i}.com" for i in range(6))
    assert extract_urls(text) == ["https://site0.com", "https://site1.com", "https://site2.com"]
    assert extract_urls(text, limit=1) == ["https://site0.com"]
    assert extract_urls(text, limit=0) == []


_FRAGMENTS = st.sampled_from(
    ["https://", "http://", "a.com", "/p", "(", ")", "[", "]", "<", ">", "|", " ", ".", ",", "!", "?", '"', "'",
     "&amp;", "ftp://", "mailto:", "[::1]", ":80", ":99999", "%", "é", "\x00", "\n", "javascript:", "*", "label"]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.lists(_FRAGMENTS, max_size=30).map("".join)), st.integers(-1, 5))
def test_extract_urls_never_raises_and_returns_http(text: str, limit: int) -> None:
    urls = extract_urls(text, limit=limit)
    assert len(urls) <= max(limit, 0)
    assert len(set(urls)) == len(urls)
    for url in urls:
        assert url.lower().startswith(("http://", "https://"))
        assert url in text or "&amp;" in text  # taken from the text (Slack's &amp; is unescaped)
        assert not any(ch.isspace() for ch in url)


# --- hn_item_id, titles, addresses ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://news.ycombinator.com/item?id=123", 123),
        ("http://news.ycombinator.com/item?id=123", 123),
        ("https://www.news.ycombinator.com/item?id=42", 42),
        ("https://news.ycombinator.com/item?id=123&p=2", 123),
        ("https://news.ycombinator.com/item?p=2&id=7#frag", 7),
        ("https://news.ycombinator.com/item?id=abc", None),
        ("https://news.ycombinator.com/item?id=0", None),
        ("https://news.ycombinator.com/user?id=123", None),
        ("https://news.ycombinator.com/", None),
        ("https://evil.com/item?id=123", None),
        ("https://news.ycombinator.com.evil.com/item?id=123", None),
        ("ftp://news.ycombinator.com/item?id=123", None),
        ("http://[bad", None),
    ],
)
def test_hn_item_id(url: str, expected: int | None) -> None:
    assert hn_item_id(url) == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://example.com/2024/05/my-great-post.html", "My great post"),
        ("https://example.com/my_great_post/", "My great post"),
        ("https://www.example.com/", "example.com"),
        ("https://example.com", "example.com"),
        ("https://example.com/blog/", "example.com"),
        ("https://example.com/p/12345", "example.com"),
        ("https://example.com/news/why-rust-2024/index.php", "Why rust 2024"),
        ("https://medium.com/@someone/a-tale-of-two-caches-4f9a1c2b7d3e", "A tale of two caches"),
        ("https://example.com/iPhone-Review", "iPhone Review"),
        ("https://example.com/caf%C3%A9-cr%C3%A8me", "Café crème"),
    ],
)
def test_title_from_url(url: str, expected: str) -> None:
    assert title_from_url(url) == expected


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_title_from_url_never_raises(path: str) -> None:
    title = title_from_url("https://example.com/" + path)
    assert title and len(title) <= 200


def test_clean_title() -> None:
    assert clean_title("  a\n\tb \x00c\u202e  ") == "a b c"
    assert clean_title("family 👨\u200d👩\u200d👧") == "family 👨\u200d👩\u200d👧"
    long = clean_title("word " * 100)
    assert len(long) == 200 and long.endswith("…")


@pytest.mark.parametrize(
    "address",
    ["10.0.0.1", "192.168.1.1", "172.16.0.1", "169.254.169.254", "100.64.0.1", "0.0.0.0", "0.1.2.3", "224.0.0.1",
     "240.0.0.1", "255.255.255.255", "::", "fe80::1", "fc00::1", "ff02::1", "::ffff:10.0.0.1", "::ffff:169.254.1.1",
     "2002:a00:1::1", "64:ff9b::a00:1", "not-an-ip"],
)  # fmt: skip
def test_private_addresses_refused_even_with_loopback_allowed(address: str) -> None:
    assert is_refused_address(address)
    assert is_refused_address(address, allow_loopback=True)


def test_loopback_only_allowed_when_asked_and_public_allowed() -> None:
    for address in ("127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"):
        assert is_refused_address(address)
        assert not is_refused_address(address, allow_loopback=True)
    for address in ("93.184.216.34", "2606:4700::1111", "::ffff:8.8.8.8"):
        assert not is_refused_address(address)


# --- a real server on loopback --------------------------------------------------------------------------------------


@pytest.fixture
async def connects(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Addresses of all socket connects on this loop. Non-loopback connects are blocked; DNS is a fixed table."""
    loop = asyncio.get_running_loop()
    attempts: list[str] = []
    real_connect, real_getaddrinfo = loop.sock_connect, loop.getaddrinfo

    async def sock_connect(sock: socket.socket, address: tuple) -> None:
        attempts.append(address[0])
        if not ipaddress.ip_address(address[0].split("%")[0]).is_loopback:
            raise OSError(f"test guard: blocked a connect to {address[0]}")
        await real_connect(sock, address)

    async def getaddrinfo(host, port, *, family=0, type=0, proto=0, flags=0):  # noqa: A002
        if host in FAKE_DNS:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in FAKE_DNS[host]]
        if host in ("localhost", "127.0.0.1", "::1", None):
            return await real_getaddrinfo(host, port, family=family, type=type, proto=proto, flags=flags)
        raise socket.gaierror(socket.EAI_NONAME, f"test DNS: unknown host {host}")

    monkeypatch.setattr(loop, "sock_connect", sock_connect)
    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    return attempts


HN_ITEMS = {
    123: {
        "id": 123,
        "type": "story",
        "title": "Show HN: A &amp;-free   title",
        "url": "https://example.org/story",
    },
    124: {"id": 124, "type": "story", "title": "Ask HN: How do you test?"},
    200: {"id": 200, "type": "comment", "parent": 201, "text": "reply"},
    201: {"id": 201, "type": "comment", "parent": 123, "text": "top"},
    400: {"id": 400, "type": "comment", "parent": 400},
    401: {"id": 401, "type": "story", "deleted": True},
}


def _html(head: str, body: str = "<p>hello</p>") -> web.Response:
    return web.Response(
        text=f"<!doctype html><html><head>{head}</head><body>{body}</body></html>", content_type="text/html"
    )


def _static(make):
    """An async handler returning make() (aiohttp wants coroutine handlers)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        return make()

    return handler


async def _slow_headers(request: web.Request) -> web.Response:
    await asyncio.wait_for(request.app[RELEASE].wait(), 5)
    return _html("<title>Too late</title>")


async def _slow_body(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/html"})
    await response.prepare(request)
    await response.write(b"<html><head><meta charset=utf-8>")
    await asyncio.wait_for(request.app[RELEASE].wait(), 5)
    return response


def _redirect(location: str, status: int = 302):
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": location.format(port=request.url.port)})

    return handler


async def _chain(request: web.Request) -> web.Response:
    n = int(request.match_info["n"])
    location = f"/chain/{n - 1}" if n > 0 else f"http://127.0.0.1:{request.url.port}/og"
    return web.Response(status=301 if n % 2 else 307, headers={"Location": location})


async def _hn_item(request: web.Request) -> web.Response:
    item_id = int(request.match_info["id"])
    if item_id == 500:
        return web.Response(status=500, text="boom")
    return web.Response(text=json.dumps(HN_ITEMS.get(item_id)), content_type="application/json")


@pytest.fixture
async def server(connects: list[str]):
    app = web.Application()
    app[RELEASE] = asyncio.Event()
    app[REQUESTS] = []

    @web.middleware
    async def record(request: web.Request, handler):
        request.app[REQUESTS].append((request.path, dict(request.headers)))
        return await handler(request)

    app.middlewares.append(record)
    huge_tail = "<!-- " + "x" * 300_000 + " -->"

    async def og(request: web.Request) -> web.Response:
        response = _html(
            '<title>Plain title</title><meta property="og:title" content="OG &amp; Title  here">'
        )
        response.set_cookie("session", "secret")
        return response

    routes = {
        "/og": og,
        "/title": _static(lambda: _html("<title>\n  Only a &lt;title&gt;\n</title>")),
        "/svg-title": _static(lambda: _html("", "<svg><title>icon</title></svg>")),
        "/notitle": _static(lambda: _html('<meta name="description" content="x">')),
        "/huge-late": _static(lambda: _html(huge_tail + "<title>Late</title>")),
        "/huge-early": _static(lambda: _html("<title>Early</title>", huge_tail)),
        "/latin1": _static(
            lambda: web.Response(
                body="<html><head><title>Caf\xe9</title></head></html>".encode("latin-1"),
                headers={"Content-Type": "text/html; charset=iso-8859-1"},
            )
        ),
        "/pdf": _static(
            lambda: web.Response(body=b"%PDF-1.4 <title>nope</title>", content_type="application/pdf")
        ),
        "/gone": _static(
            lambda: web.Response(status=404, text="<title>Not found</title>", content_type="text/html")
        ),
        "/slow": _slow_headers,
        "/slow-body": _slow_body,
        "/chain/{n}": _chain,
        "/loop": _redirect("/loop"),
        "/loop-a": _redirect("/loop-b"),
        "/loop-b": _redirect("/loop-a"),
        "/to-private": _redirect("http://10.0.0.1/"),
        "/to-metadata": _redirect("http://169.254.169.254/latest"),
        "/to-evil": _redirect("http://evil.test:{port}/og"),
        "/to-ftp": _redirect("ftp://127.0.0.1/file"),
        "/to-alias": _redirect("http://alias.test:{port}/title"),
        "/v0/item/{id}.json": _hn_item,
    }
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield {"base": f"http://127.0.0.1:{port}", "port": port, "requests": app[REQUESTS]}
    finally:
        app[RELEASE].set()
        await runner.cleanup()


@pytest.fixture
async def resolver(server):
    async with LinkResolver(allow_private=True, timeout=2.0, hn_api_base=f"{server['base']}/v0") as links:
        yield links


async def test_og_title_wins_and_no_cookies_are_kept(resolver: LinkResolver, server) -> None:
    story = await resolver.resolve_url(f"{server['base']}/og")
    assert story == ResolvedStory("OG & Title here", f"{server['base']}/og", "page")
    await resolver.resolve_url(f"{server['base']}/title")
    headers = [h for path, h in server["requests"] if path == "/title"][0]
    assert "Cookie" not in headers
    assert headers["User-Agent"] == "HNaaS/0.1 (+link preview)"


async def test_title_tag(resolver: LinkResolver, server) -> None:
    story = await resolver.resolve_url(f"{server['base']}/title#frag")
    assert (story.title, story.source, story.note) == ("Only a <title>", "page", None)


async def test_charset_from_header(resolver: LinkResolver, server) -> None:
    assert (await resolver.resolve_url(f"{server['base']}/latin1")).title == "Café"


@pytest.mark.parametrize("path", ["/notitle", "/svg-title"])
async def test_page_without_title_uses_slug(resolver: LinkResolver, server, path: str) -> None:
    story = await resolver.resolve_url(f"{server['base']}{path}")
    assert story.source == "url" and story.url == f"{server['base']}{path}"
    assert story.title == path.strip("/").replace("-", " ").capitalize()
    assert "no title" in story.note


async def test_size_cap(server) -> None:
    async with LinkResolver(allow_private=True, max_bytes=20_000) as links:
        late = await links.resolve_url(f"{server['base']}/huge-late")
        early = await links.resolve_url(f"{server['base']}/huge-early")
    assert late.source == "url" and late.title == "Huge late" and "too large" in late.note
    assert early == ResolvedStory("Early", f"{server['base']}/huge-early", "page")


@pytest.mark.parametrize("path", ["/slow", "/slow-body"])
async def test_timeout(server, path: str) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with LinkResolver(allow_private=True, timeout=0.3) as links:
        story = await links.resolve_url(f"{server['base']}{path}")
    assert loop.time() - started < 1.5
    assert story.source == "url" and "timed out" in story.note


@pytest.mark.parametrize(
    ("path", "reason"),
    [("/pdf", "not a web page"), ("/gone", "HTTP 404"), ("/loop", "redirect loop"), ("/loop-a", "redirect loop"),
     ("/chain/5", "too many redirects"), ("/to-ftp", "non-web link")],
)  # fmt: skip
async def test_failed_fetch_falls_back_to_slug(
    resolver: LinkResolver, server, path: str, reason: str
) -> None:
    story = await resolver.resolve_url(f"{server['base']}{path}")
    assert story.source == "url" and story.url == f"{server['base']}{path}"
    assert story.title == title_from_url(story.url)
    assert reason in story.note


async def test_redirect_chain(resolver: LinkResolver, server) -> None:
    story = await resolver.resolve_url(f"{server['base']}/chain/4")  # 5 redirects: the most allowed
    assert story == ResolvedStory("OG & Title here", f"{server['base']}/og", "page")
    assert [p for p, _ in server["requests"]] == [
        "/chain/4",
        "/chain/3",
        "/chain/2",
        "/chain/1",
        "/chain/0",
        "/og",
    ]


async def test_redirect_to_checked_host_name(resolver: LinkResolver, server, connects: list[str]) -> None:
    story = await resolver.resolve_url(f"{server['base']}/to-alias")
    assert story.source == "page" and story.url == f"http://alias.test:{server['port']}/title"
    assert set(connects) == {"127.0.0.1"}


@pytest.mark.parametrize("path", ["/to-private", "/to-metadata", "/to-evil"])
async def test_redirect_to_private_is_refused_without_connecting(
    resolver: LinkResolver, server, connects: list[str], path: str
) -> None:
    story = await resolver.resolve_url(f"{server['base']}{path}")
    assert story.source == "url" and story.url == f"{server['base']}{path}"
    assert "redirects to a private network address" in story.note
    assert [p for p, _ in server["requests"]] == [path]
    assert set(connects) == {"127.0.0.1"}  # nothing else was even attempted


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "127.1", "2130706433", "0x7f.1"]
)
async def test_loopback_refused_by_default(server, connects: list[str], host: str) -> None:
    async with LinkResolver() as links:
        with pytest.raises(LinkError) as error:
            await links.resolve_url(f"http://{host}:{server['port']}/og")
    assert error.value.user_message == "That link points to a private network address, so I won't fetch it."
    assert connects == [] and server["requests"] == []


@pytest.mark.parametrize(
    "url",
    ["http://10.0.0.1/", "http://192.168.1.1/admin", "http://169.254.169.254/latest", "http://[::ffff:10.0.0.1]/",
     "http://100.64.0.1/", "http://0.0.0.0:80/", "http://0x0a000001/", "http://10.1/", "http://0/", "http://[fe80::1]/", "http://evil.test/", "http://mixed.test/",
     "https://metadata.test/latest"],
)  # fmt: skip
async def test_private_refused_even_when_loopback_allowed(connects: list[str], url: str) -> None:
    async with LinkResolver(allow_private=True) as links:
        with pytest.raises(LinkError) as error:
            await links.resolve_url(url)
    assert "private network address" in error.value.user_message
    assert connects == []


async def test_unresolvable_host_falls_back(connects: list[str]) -> None:
    async with LinkResolver() as links:
        story = await links.resolve_url("https://no-such-host.test/some-article")
    assert story.title == "Some article" and story.source == "url" and "couldn't find that site" in story.note
    assert connects == []


@pytest.mark.parametrize(
    "url", ["ftp://example.com/file", "javascript:alert(1)", "not a link", "https://", "http:///x"]
)
async def test_unusable_links_raise(connects: list[str], url: str) -> None:
    async with LinkResolver() as links:
        with pytest.raises(LinkError):
            await links.resolve_url(url)


# --- Hacker News ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        (123, ResolvedStory("Show HN: A &amp;-free title", "https://example.org/story", "hn")),
        (124, ResolvedStory("Ask HN: How do you test?", None, "hn")),
        (200, ResolvedStory("Show HN: A &amp;-free title", "https://example.org/story", "hn")),
    ],
)
async def test_hn_items(resolver: LinkResolver, server, connects: list[str], item: int, expected) -> None:
    assert await resolver.resolve_url(f"https://news.ycombinator.com/item?id={item}&p=2") == expected
    assert set(connects) == {"127.0.0.1"}  # only the fake API; news.ycombinator.com is never fetched


@pytest.mark.parametrize(("item", "reason"), [(999, "couldn't find"), (400, "couldn't find"), (401, "couldn't find"),
                                              (500, "HTTP 500")])  # fmt: skip
async def test_hn_fallbacks(resolver: LinkResolver, server, item: int, reason: str) -> None:
    link = f"https://news.ycombinator.com/item?id={item}"
    story = await resolver.resolve_url(link)
    assert story == ResolvedStory(f"Hacker News item {item}", link, "url", story.note)
    assert reason in story.note


@pytest.mark.parametrize("url", ["https://news.ycombinator.com/item?id=notanumber", "https://news.ycombinator.com/item?id=0",
                                 "https://news.ycombinator.com/item", "https://news.ycombinator.com/item/?id=-5"])
async def test_hn_item_link_without_an_id_is_refused_without_fetching(connects: list[str], url: str) -> None:
    async with LinkResolver() as links:
        with pytest.raises(LinkError) as error:
            await links.resolve_url(url)
        with pytest.raises(LinkError):
            await links.resolve_text(f"what do you think of {url} ?")
    assert error.value.user_message == "That Hacker News link has no item number (it should end in item?id=123)."
    assert connects == []


async def test_hn_api_base_is_checked_too(connects: list[str]) -> None:
    async with LinkResolver(allow_private=True, hn_api_base="http://10.0.0.1/v0") as links:
        story = await links.resolve_url("https://news.ycombinator.com/item?id=123")
    assert story.source == "url" and "Hacker News" in story.note
    assert connects == []


# --- resolve_text ---------------------------------------------------------------------------------------------------


async def test_resolve_text_plain_title() -> None:
    async with LinkResolver() as links:
        story = await links.resolve_text("  Why   SQLite\n is\x07 enough  ")
        assert story == ResolvedStory("Why SQLite is enough", None, "title")
        assert len((await links.resolve_text("x" * 500)).title) == 200
        assert (await links.resolve_text("Note: ftp is old")).source == "title"


@pytest.mark.parametrize("text", ["", "   \n ", "\x00\x01", "ftp://example.com/file", "mailto:a@b.com"])
async def test_resolve_text_rejects(connects: list[str], text: str) -> None:
    async with LinkResolver() as links:
        with pytest.raises(LinkError):
            await links.resolve_text(text)


async def test_resolve_text_with_links_uses_first(resolver: LinkResolver, server) -> None:
    story = await resolver.resolve_text(f"thoughts? <{server['base']}/title|here> and {server['base']}/og")
    assert story.title == "Only a <title>"


async def test_not_started() -> None:
    with pytest.raises(RuntimeError):
        await LinkResolver().resolve_url("https://example.com/")
