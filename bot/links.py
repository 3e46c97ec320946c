"""Turn what a user pasted (a link, an HN item link or a plain title) into a story to discuss.

`extract_urls` finds http(s) links in a chat message (Slack `<url|label>`, Discord `<url>`, markdown `[label](url)`,
bare links with trailing punctuation). `LinkResolver` turns one of them, or a plain title, into a `ResolvedStory`.

Safety, because the bot fetches whatever a stranger pastes:
- Only http and https. Every host is checked before anything connects to it: the session's connector uses
  `_GuardedResolver`, which resolves the name itself and refuses it if ANY address is private, loopback, link-local,
  multicast, reserved, unspecified, CGNAT (100.64/10), in 0.0.0.0/8, or an IPv6 form embedding such an IPv4 address
  (::ffff:10.0.0.1, 6to4, Teredo, NAT64). aiohttp connects to exactly the addresses that resolver returned, so a DNS
  answer cannot change between the check and the connection (no rebinding). aiohttp never calls the resolver for IP
  literals, so those (legacy forms like 127.1 and 2130706433 included) are checked by `_check_literal`
  before each request.
- Redirects are followed by hand (at most `MAX_REDIRECTS`), re-checking scheme and address at every hop. One overall
  deadline (`timeout`) covers all hops and the body; connecting has its own 3 s limit. No cookies, no proxies from the
  environment, a clear User-Agent.
- `allow_private=True` (HNAAS_ALLOW_PRIVATE_FETCH=1, for tests) lets loopback through and nothing else.

What the user gets back (decisions):
- `LinkError` only when no job can come of the input: not http(s), not a valid link, an empty title, a link whose
  own host is a private address, or an HN item link without a valid item id (`item?id=abc`, `item?id=0`).
- Everything else yields a story. If fetching fails (timeout, HTTP error, not HTML, redirect loop, connection error)
  the title comes from the URL (`title_from_url`), `source="url"`, and `note` says why. A redirect to a private address
  is the same: the redirect is not followed and the note says it was refused. A page without a title also gets a
  URL-derived title, with a note.
- Size cap: at most `max_bytes` of the (decompressed) body are read. A title found within them is used, even if the
  page is longer (titles sit in <head>); when the cap is reached without a title the page counts as too large.
  Reading stops early once `og:title` is seen or <head> has ended with a <title>.
- After a successful fetch `url` is the final URL (after redirects, so shorteners show the real site); otherwise it is
  the link as given, without any user:password part.
- HN item links are read from the HN API (`{hn_api_base}/item/{id}.json`); a comment is followed up through `parent`
  (a poll option through `poll`) for a few hops. A missing item or a failing API gives the title
  "Hacker News item {id}" with a note. The HN API host goes through the same address checks.
"""

from __future__ import annotations

import asyncio
import codecs
import ipaddress
import json
import logging
import re
import socket
import unicodedata
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver
from yarl import URL

from bot.errors import LinkError

log = logging.getLogger(__name__)

MAX_TITLE_CHARS = 200  # longer titles are cut, ending with "…"
MAX_REDIRECTS = 5  # hops followed after the first request
MAX_HN_HOPS = 4  # comment -> parent -> ... -> story
CONNECT_TIMEOUT = 3.0  # seconds to open a connection (DNS included)
READ_CHUNK = 16_384  # bytes per body read; parsing stops as soon as the title is known

PRIVATE_ADDRESS_MESSAGE = "That link points to a private network address, so I won't fetch it."
BAD_HN_ITEM_MESSAGE = "That Hacker News link has no item number (it should end in item?id=123)."
_REDIRECT_STATUSES = {301, 302, 303, 307, 308}
_HTML_TYPES = {"text/html", "application/xhtml+xml"}
_HN_HOSTS = {"news.ycombinator.com", "www.news.ycombinator.com"}
# Ranges `ipaddress` does not flag on its own (or not on every Python version).
_EXTRA_BLOCKED = tuple(
    ipaddress.ip_network(n)
    for n in ("0.0.0.0/8", "100.64.0.0/10", "192.0.0.0/24", "198.18.0.0/15", "64:ff9b:1::/48")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True)
class ResolvedStory:
    """What a job is about. `source`: "hn", "page", "url" (title made from the link) or "title" (typed by the user)."""

    title: str
    url: str | None
    source: str
    note: str | None = None  # a short remark for the user when something went wrong but the job can go ahead


# --- finding links in a message ------------------------------------------------------------------------------------

_URL_TOKEN = re.compile(
    # Slack <url|label> and <url>, Discord <url> (embed suppressed). Other <...> (mentions, mailto) are consumed.
    r"<(?P<angle>[^<>|\s]+)(?:\|[^<>]*)?>"
    # markdown [label](url), with one level of parentheses allowed inside the url (Wikipedia links)
    r"|\[[^\[\]]*\]\((?P<md>https?://[^\s()<>]*(?:\([^\s()<>]*\)[^\s()<>]*)*)\)"
    # a bare link; trailing punctuation is trimmed afterwards
    r"|(?P<bare>https?://[^\s<>\"`|\\^{}\x00-\x20\x7f]+)",
    re.IGNORECASE,
)
_TRAILING = set(".,!?;:'\"*_~>…。，、！？»”’")
_FOREIGN_LINK = re.compile(
    r"(?:[a-z][a-z0-9+.-]*://|(?:mailto|javascript|data|file|tel|ftp):)\S+", re.IGNORECASE
)


def extract_urls(text: str, limit: int = 3) -> list[str]:
    """The http(s) links in a chat message, in order of appearance, without duplicates, at most `limit`."""
    found: list[str] = []
    if limit <= 0:
        return found
    for match in _URL_TOKEN.finditer(text):
        if match.group("angle") is not None:
            url = match.group("angle").replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
        elif match.group("md") is not None:
            url = match.group("md")
        else:
            url = _trim_trailing(match.group("bare"))
        if _is_http_url(url) and url not in found:
            found.append(url)
            if len(found) >= limit:
                break
    return found


def _trim_trailing(url: str) -> str:
    while url and (url[-1] in _TRAILING or _unbalanced_close(url)):
        url = url[:-1]
    return url


def _unbalanced_close(url: str) -> bool:
    """A closing ")" or "]" with no opening partner belongs to the sentence, not the link."""
    pairs = {")": "(", "]": "["}
    last = url[-1]
    return last in pairs and url.count(pairs[last]) < url.count(last)


def _is_http_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a malformed port
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)


def hn_item_id(url: str) -> int | None:
    """The item id of a Hacker News item link (`https://news.ycombinator.com/item?id=123`), else None."""
    query = _hn_item_query(url)
    return None if query is None else _item_id_in(query)


def _item_id_in(query: str) -> int | None:
    """The positive item id in an HN item link's query string, else None."""
    ids = parse_qs(query).get("id")
    if not ids or not re.fullmatch(r"[0-9]{1,15}", ids[0]):
        return None
    return int(ids[0]) or None


def _hn_item_query(url: str) -> str | None:
    """The query string of a link to news.ycombinator.com/item, whatever its id; None for any other link."""
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or host not in _HN_HOSTS:
        return None
    return parts.query if parts.path.rstrip("/") == "/item" else None


# --- titles ---------------------------------------------------------------------------------------------------------

_PAGE_EXTENSION = re.compile(r"\.(?:s?html?|php\d?|aspx?|jsp|cgi|md|txt)$", re.IGNORECASE)
_GENERIC_SEGMENTS = {
    "index", "default", "home", "item", "view", "show", "article", "articles", "post", "posts", "story", "stories",
    "amp", "p", "blog", "news", "page", "comments", "entry", "watch", "read",
}  # fmt: skip
_HEX_ID = re.compile(r"[0-9a-f]{8,}")


def clean_title(text: str, limit: int = MAX_TITLE_CHARS) -> str:
    """Whitespace collapsed, control and format characters removed (ZWJ kept for emoji), at most `limit` chars."""
    kept = []
    for ch in text:
        if ch.isspace():
            kept.append(" ")
        elif ch == "\u200d" or unicodedata.category(ch) not in ("Cc", "Cf", "Cs"):
            kept.append(ch)
    title = " ".join("".join(kept).split())
    if len(title) > limit:
        title = title[: limit - 1].rstrip() + "…"
    return title


def title_from_url(url: str) -> str:
    """A readable title from a link: the last meaningful path segment ("my-great-post.html" -> "My great post"),
    else the domain without "www."."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        return clean_title(url) or "Untitled link"
    for segment in reversed(parts.path.split("/")):
        words = _slug_words(unquote(segment, errors="replace"))
        if words:
            if words == words.lower():
                words = words[0].upper() + words[1:]
            return clean_title(words)
    host = host.removeprefix("www.")
    return clean_title(host) or "Untitled link"


def _slug_words(segment: str) -> str:
    segment = _PAGE_EXTENSION.sub("", segment)
    tokens = re.sub(r"[-_+.~\s]+", " ", segment).split()
    while len(tokens) > 1 and _looks_like_id(
        tokens[-1]
    ):  # "my-post-4f9a1c2b7d" (Medium and friends); not years
        tokens.pop()
    text = " ".join(tokens)
    if not text or text.lower() in _GENERIC_SEGMENTS or not any(ch.isalpha() for ch in text):
        return ""
    if len(tokens) == 1 and _looks_like_id(tokens[0]):
        return ""
    return text


def _looks_like_id(token: str) -> bool:
    return (token.isdigit() and len(token) >= 5) or (
        _HEX_ID.fullmatch(token.lower()) is not None and any(c.isdigit() for c in token)
    )


class _TitleParser(HTMLParser):
    """Collects og:title and the first <title> outside <svg>/<math>; `done` once nothing better can follow."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)  # unescapes text and attribute values for us
        self.og_title: str | None = None
        self.title: str | None = None
        self.head_ended = False
        self._in_title = False
        self._title_parts: list[str] = []
        self._foreign_depth = 0

    @property
    def done(self) -> bool:
        return self.og_title is not None or (self.head_ended and self.title is not None)

    def best(self) -> str | None:
        if self.title is None and self._in_title:  # the page was cut inside <title>
            self.title = clean_title("".join(self._title_parts)) or None
        return self.og_title or self.title

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("svg", "math"):
            self._foreign_depth += 1
        elif tag == "meta" and self.og_title is None:
            values = {k: (v or "") for k, v in attrs}
            key = (values.get("property") or values.get("name") or "").strip().lower()
            if key == "og:title":
                self.og_title = clean_title(values.get("content", "")) or None
        elif tag == "title" and self.title is None and self._foreign_depth == 0:
            self._in_title = True
        elif tag == "body":
            self.head_ended = True

    def handle_endtag(self, tag: str) -> None:
        if tag in ("svg", "math"):
            self._foreign_depth = max(0, self._foreign_depth - 1)
        elif tag == "title" and self._in_title:
            self._in_title = False
            self.title = clean_title("".join(self._title_parts)) or None
            self._title_parts.clear()
        elif tag == "head":
            self.head_ended = True

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self._title_parts.append(data)


# --- address checks -------------------------------------------------------------------------------------------------


class _AddressRefused(Exception):
    """A host resolved to an address we won't connect to. Not an OSError, so aiohttp lets it through unwrapped."""

    def __init__(self, host: str, address: str) -> None:
        super().__init__(f"{host} -> {address}")
        self.host = host
        self.address = address


def is_refused_address(address: str, *, allow_loopback: bool = False) -> bool:
    """True for any address that is not plainly public (loopback too, unless `allow_loopback`)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return True
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None or ip in _NAT64:  # judged by the IPv4 address it carries
            embedded = ip.ipv4_mapped or ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
            return is_refused_address(str(embedded), allow_loopback=allow_loopback)
        embedded = ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None and is_refused_address(str(embedded), allow_loopback=allow_loopback):
            return True
    if ip.is_loopback:
        return not allow_loopback
    return (
        not ip.is_global
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or any(ip in net for net in _EXTRA_BLOCKED if net.version == ip.version)
    )


def _ip_literal(host: str) -> str | None:
    """The address an IP-literal host names, legacy IPv4 forms included ("127.1", "0x7f000001", "2130706433")."""
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    if re.fullmatch(r"[0-9a-fA-FxX.]+", host):
        try:
            return socket.inet_ntoa(socket.inet_aton(host))  # parses locally; never a DNS query
        except OSError:
            return None
    return None


class _GuardedResolver(AbstractResolver):
    """Resolves with `loop.getaddrinfo` and refuses the host if any of its addresses is refused."""

    def __init__(self, allow_loopback: bool) -> None:
        self.allow_loopback = allow_loopback

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[Any]:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, family=family)
        if not infos:
            raise OSError(f"no addresses for {host}")
        results = []
        for fam, _, proto, _, sockaddr in infos:
            address = str(sockaddr[0])
            if is_refused_address(address, allow_loopback=self.allow_loopback):
                raise _AddressRefused(host, address)
            results.append(
                {
                    "hostname": host,
                    "host": address,
                    "port": sockaddr[1],
                    "family": fam,
                    "proto": proto,
                    "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
                }
            )
        return results

    async def close(self) -> None:
        pass


# --- resolving ------------------------------------------------------------------------------------------------------


class _FetchFailed(Exception):
    """A fetch that did not give a title; `reason` completes "Couldn't read that page (...)"."""

    def __init__(self, reason: str, note: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.note = note or f"Couldn't read that page ({reason}), so the title comes from the link."


def _parse_link(url: str) -> URL:
    """The link as a yarl URL without credentials; LinkError if it is not an http(s) link with a host."""
    try:
        parsed = URL(url.strip())
        scheme, host = parsed.scheme.lower(), parsed.host
    except (ValueError, TypeError) as exc:
        raise LinkError("That doesn't look like a valid link.", detail=f"unparsable url: {exc}") from exc
    if scheme not in ("http", "https"):
        raise LinkError("I can only read http:// and https:// links.", detail=f"scheme {scheme!r}")
    if not host:
        raise LinkError("That doesn't look like a valid link.", detail="no host")
    return parsed.with_user(None).with_password(None)


def _refusal(exc: BaseException | None) -> _AddressRefused | None:
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, _AddressRefused):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _failure_reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, socket.gaierror):
            return "couldn't find that site"
        return "couldn't connect"
    if isinstance(exc, aiohttp.InvalidURL):
        return "bad link"
    return "connection failed"


# What reading the HN API can raise besides _FetchFailed (an HTTP error status or a missing story)
_HN_API_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, _AddressRefused, LinkError)


class LinkResolver:
    """Owns one aiohttp session that only ever connects to addresses it checked. Use `async with` or start/close."""

    def __init__(
        self,
        *,
        hn_api_base: str = "https://hacker-news.firebaseio.com/v0",
        allow_private: bool = False,
        timeout: float = 8.0,
        max_bytes: int = 512_000,
        user_agent: str = "HNaaS/0.1 (+link preview)",
    ) -> None:
        self.hn_api_base = hn_api_base.rstrip("/")
        self.allow_private = allow_private
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is not None:
            return
        connector = aiohttp.TCPConnector(
            resolver=_GuardedResolver(allow_loopback=self.allow_private),
            use_dns_cache=False,  # every connection resolves (and is checked) afresh
            limit=20,
            limit_per_host=4,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(
                total=self.timeout, connect=min(CONNECT_TIMEOUT, self.timeout), sock_read=self.timeout
            ),
            headers={
                "User-Agent": self.user_agent,
                "Accept": "text/html,application/xhtml+xml;q=0.9,*/*;q=0.1",
                "Accept-Encoding": "gzip, deflate",
            },
            trust_env=False,  # never route through a proxy taken from the environment
        )

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def __aenter__(self) -> LinkResolver:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- public ----------------------------------------------------------------------------------------------------

    async def resolve_text(self, text: str) -> ResolvedStory:
        """A story from what a user typed: the first link in it, else the text itself as a title."""
        urls = extract_urls(text, limit=1)
        if urls:
            return await self.resolve_url(urls[0])
        if _FOREIGN_LINK.fullmatch(text.strip()):  # a lone ftp://, mailto:... link is not a title
            _parse_link(text)  # raises the LinkError that explains which links are accepted
        title = clean_title(text)
        if not title:
            raise LinkError("Give me a link or a title to talk about.", detail="empty title")
        return ResolvedStory(title=title, url=None, source="title")

    async def resolve_url(self, url: str) -> ResolvedStory:
        """A story from one link. Raises LinkError only when the link cannot become a job (see module docstring)."""
        link = _parse_link(url)
        query = _hn_item_query(str(link))
        if query is not None:
            item_id = _item_id_in(query)
            if item_id is None:
                # HN's own page for a bad id says only "No such item."; a thread about news.ycombinator.com helps no one
                raise LinkError(BAD_HN_ITEM_MESSAGE, detail=f"no item id in {str(link)[:200]!r}")
            return await self._resolve_hn(item_id, link)
        self._check_literal(link)  # a private IP literal is the user's error, not a failed fetch
        try:
            title, final = await asyncio.wait_for(self._fetch_title(link), self.timeout)
        except _FetchFailed as exc:
            log.info("fetch failed for %s: %s", link, exc.reason)
            return ResolvedStory(title_from_url(str(link)), str(link), "url", exc.note)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            reason = _failure_reason(exc)
            log.info("fetch failed for %s: %r", link, exc)
            return ResolvedStory(title_from_url(str(link)), str(link), "url", _FetchFailed(reason).note)
        if title is None:
            note = "That page has no title, so the title comes from the link."
            return ResolvedStory(title_from_url(str(link)), str(link), "url", note)
        return ResolvedStory(title, str(final), "page")

    # -- fetching --------------------------------------------------------------------------------------------------

    def _session_or_fail(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError(
                "LinkResolver is not started; use `async with LinkResolver(...)` or `await start()`"
            )
        return self._session

    def _check_literal(self, link: URL) -> None:
        """aiohttp skips the resolver for IP literals, so check those here, before any request."""
        address = _ip_literal(link.host or "")
        if address is not None and is_refused_address(address, allow_loopback=self.allow_private):
            raise LinkError(PRIVATE_ADDRESS_MESSAGE, detail=f"refused literal {address}")

    async def _fetch_title(self, link: URL) -> tuple[str | None, URL]:
        """The page title (None if it has none) and the final URL. Raises _FetchFailed, LinkError when the link's
        own host is private, or aiohttp/OS errors."""
        session = self._session_or_fail()
        current, seen = link.with_fragment(None), set()
        for hop in range(MAX_REDIRECTS + 1):
            if hop:
                try:
                    self._check_literal(current)
                except LinkError:
                    raise _FetchFailed("redirect refused", _REDIRECT_REFUSED_NOTE) from None
            seen.add(current)
            try:
                response = await session.get(current, allow_redirects=False)
            except Exception as exc:
                refused = _refusal(exc)  # raised by _GuardedResolver before any connection
                if refused is None:
                    raise
                if hop == 0:  # the link's own host name resolves to a private address
                    raise LinkError(PRIVATE_ADDRESS_MESSAGE, detail=f"refused {refused}") from exc
                raise _FetchFailed("redirect refused", _REDIRECT_REFUSED_NOTE) from None
            async with response:
                if response.status in _REDIRECT_STATUSES and "Location" in response.headers:
                    current = self._next_hop(current, response.headers["Location"])
                    if current in seen:
                        raise _FetchFailed("redirect loop")
                    continue
                if response.status >= 400 or response.status in _REDIRECT_STATUSES:
                    raise _FetchFailed(f"HTTP {response.status}")
                if response.content_type not in _HTML_TYPES:
                    raise _FetchFailed("not a web page")
                return await self._read_title(response), current
        raise _FetchFailed("too many redirects")

    @staticmethod
    def _next_hop(current: URL, location: str) -> URL:
        try:
            target = current.join(URL(location.strip()))
        except ValueError:
            raise _FetchFailed("bad redirect") from None
        if target.scheme.lower() not in ("http", "https") or not target.host:
            raise _FetchFailed("redirect to a non-web link")
        return target.with_user(None).with_password(None).with_fragment(None)

    async def _read_title(self, response: aiohttp.ClientResponse) -> str | None:
        """og:title, else <title>, from at most max_bytes of the body."""
        parser = _TitleParser()
        decoder = None
        read = 0
        while read < self.max_bytes:
            chunk = await response.content.read(min(READ_CHUNK, self.max_bytes - read))
            if not chunk:
                break
            read += len(chunk)
            if decoder is None:
                decoder = codecs.getincrementaldecoder(_charset(response, chunk))(errors="replace")
            try:
                parser.feed(decoder.decode(chunk))
            except Exception:  # html.parser is lenient, but a page must never crash a job
                log.debug("html.parser gave up on %s", response.url, exc_info=True)
                break
            if parser.done:
                break
        title = parser.best()
        if title is None and read >= self.max_bytes and await response.content.read(1):
            raise _FetchFailed("too large")
        return title

    async def _resolve_hn(self, item_id: int, link: URL) -> ResolvedStory:
        fallback = f"Hacker News item {item_id}"
        try:
            item = await asyncio.wait_for(self._hn_story(item_id), self.timeout)
        except _FetchFailed as exc:
            return ResolvedStory(fallback, str(link), "url", exc.note)
        except _HN_API_ERRORS as exc:
            log.warning("HN API failed for item %s: %r", item_id, exc)
            refused = isinstance(exc, LinkError) or _refusal(exc) is not None
            reason = "address refused" if refused else _failure_reason(exc)
            note = f"Couldn't reach Hacker News ({reason}), so the title comes from the link."
            return ResolvedStory(fallback, str(link), "url", note)
        story_url = item.get("url")
        if not (isinstance(story_url, str) and _is_http_url(story_url)):
            story_url = None
        return ResolvedStory(clean_title(str(item["title"])), story_url, "hn")

    async def front_page(self, count: int) -> list[ResolvedStory]:
        """The first ``count`` stories of the HN front page (``topstories``), in page order; dead, deleted and
        untitled items are skipped, and so is an item that cannot be read. Raises ``LinkError`` when the list itself
        cannot be read."""
        try:
            ids = await asyncio.wait_for(self._get_json(f"{self.hn_api_base}/topstories.json"), self.timeout)
        except (_FetchFailed, *_HN_API_ERRORS) as exc:
            raise LinkError("Couldn't read the Hacker News front page.", f"topstories: {exc!r}") from exc
        if not isinstance(ids, list):
            raise LinkError("Couldn't read the Hacker News front page.", f"topstories: {ids!r:.80}")
        stories: list[ResolvedStory] = []
        for item_id in ids[: 3 * count]:  # room for a few dead or unreadable ones, not the whole page
            if len(stories) == count:
                break
            try:
                item = await asyncio.wait_for(self._get_json(f"{self.hn_api_base}/item/{int(item_id)}.json"),
                                              self.timeout)
            except (_FetchFailed, TypeError, *_HN_API_ERRORS) as exc:
                log.warning("front page: item %r unreadable: %r", item_id, exc)
                continue
            if not isinstance(item, dict) or item.get("dead") or item.get("deleted"):
                continue
            title = item.get("title")
            if isinstance(title, str) and title.strip():
                url = item.get("url") if isinstance(item.get("url"), str) and _is_http_url(item["url"]) else None
                stories.append(ResolvedStory(clean_title(title), url, "hn"))
        return stories

    async def _hn_story(self, item_id: int) -> dict[str, Any]:
        """The story an item belongs to, following comments up to their story."""
        for _ in range(MAX_HN_HOPS + 1):
            item = await self._get_json(f"{self.hn_api_base}/item/{item_id}.json")
            if not isinstance(item, dict) or item.get("deleted"):
                raise _hn_missing()
            kind = item.get("type")
            if (
                kind in ("story", "job", "poll")
                and isinstance(item.get("title"), str)
                and item["title"].strip()
            ):
                return item
            parent = (
                item.get("parent") if kind == "comment" else item.get("poll") if kind == "pollopt" else None
            )
            if not isinstance(parent, int) or isinstance(parent, bool) or parent <= 0:
                raise _hn_missing()
            item_id = parent
        raise _hn_missing()

    async def _get_json(self, url: str) -> Any:
        target = URL(url)
        self._check_literal(target)
        async with self._session_or_fail().get(target, allow_redirects=False) as response:
            if response.status == 404:
                return None
            if response.status != 200:
                note = (
                    f"Couldn't reach Hacker News (HTTP {response.status}), so the title comes from the link."
                )
                raise _FetchFailed(f"HTTP {response.status}", note)
            body = await response.content.read(self.max_bytes)
        try:
            return json.loads(body)
        except ValueError:
            return None


def _hn_missing() -> _FetchFailed:
    return _FetchFailed(
        "no such story", "I couldn't find that Hacker News story, so the title comes from the link."
    )


_REDIRECT_REFUSED_NOTE = (
    "That page redirects to a private network address, so I didn't follow it; the title comes from the link."
)


def _charset(response: aiohttp.ClientResponse, first_chunk: bytes) -> str:
    """The header's charset, else a <meta charset> in the first bytes, else UTF-8."""
    candidates = [response.charset]
    sniffed = re.search(
        rb"<meta[^>]{0,200}?charset=[\"']?([A-Za-z0-9_.:-]{1,40})", first_chunk[:4096], re.IGNORECASE
    )
    if sniffed:
        candidates.append(sniffed.group(1).decode("ascii"))
    for name in candidates:
        if not name:
            continue
        try:
            return codecs.lookup(name).name
        except LookupError:
            continue
    return "utf-8"
