"""``pathapi ui``: the read-only storage browser, an aiohttp server on 127.0.0.1.

What is guaranteed:

- it binds to 127.0.0.1 only, and every page, API call, download and event stream needs the
  access token: in the URL once (``?token=…``: answered with a cookie and a redirect to the
  same page without it, so the token leaves the address bar), then in that cookie, or in an
  ``Authorization: Bearer`` or ``X-Pathapi-Token`` header. Anything else is answered 401;
- it never writes to the store: every answer is read from it (:mod:`.catalog`);
- downloads are streamed from verified chunks, a folder as a tar built on the fly, never
  staged whole; an image preview is at most the first 1 MiB of a file;
- pages carry a Content-Security-Policy that runs no script but ``/static/app.js`` and a
  ``Referrer-Policy: no-referrer``;
- ``/events`` (server-sent events) says ``change`` whenever the store's refs change (a
  persist, a new version, a transfer record): it polls the store every ``poll`` seconds
  while a page listens.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import quote

from aiohttp import web

from . import pages
from .catalog import Catalog, CatalogError, NotFoundError, Target, to_json

T = TypeVar("T")
HOST = "127.0.0.1"
HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
STATIC = {"app.js": "text/javascript", "style.css": "text/css"}
#: Bytes handed to the connection at once while a tar is streamed.
TAR_FLUSH = 1 << 20


class UiServer:
    """The browser over one :class:`Catalog`. ``start`` returns the URL with the token."""

    def __init__(self, catalog: Catalog, *, port: int = 0, token: str | None = None, poll: float = 1.0) -> None:
        self.catalog = catalog
        self.port = port
        self.token = token or secrets.token_urlsafe(24)
        self.poll = poll
        self.cookie = f"pathapi_ui_{port}"
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="pathapi-ui")
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()
        self.url = ""

    # -- lifecycle ----------------------------------------------------------------
    async def start(self) -> str:
        app = web.Application(middlewares=[self._auth])
        app.add_routes([
            web.get("/", self._landing), web.get("/path", self._path), web.get("/file", self._file),
            web.get("/diff", self._diff), web.get("/download", self._download), web.get("/raw", self._raw),
            web.get("/events", self._events), web.get("/static/{name}", self._static),
            web.get("/api/works", self._api_works), web.get("/api/path", self._api_path),
            web.get("/api/diff", self._api_diff), web.get("/api/file", self._api_file),
        ])
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.cookie = f"pathapi_ui_{self.port}"  # cookies ignore ports: one name per server
        self.url = f"http://{HOST}:{self.port}/?token={self.token}"
        return self.url

    async def stop(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- the token ----------------------------------------------------------------
    def _valid(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())

    @web.middleware
    async def _auth(self, request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if self._valid(request.query.get("token")):
            found = web.HTTPFound(str(request.rel_url.without_query_params("token")), headers=HEADERS)
            found.set_cookie(self.cookie, self.token, httponly=True, samesite="Strict", path="/")
            raise found
        bearer = request.headers.get("Authorization", "")
        given = [request.cookies.get(self.cookie), request.headers.get("X-Pathapi-Token"),
                 bearer[7:] if bearer.startswith("Bearer ") else None]
        if not any(self._valid(g) for g in given):
            return web.Response(status=401, text="401: this storage browser needs the token of the URL it printed\n",
                                headers=HEADERS)
        resp: web.StreamResponse
        try:
            resp = await handler(request)
        except NotFoundError as e:
            resp = self._error(request, 404, str(e))
        except CatalogError as e:
            resp = self._error(request, 400, str(e))
        if not resp.prepared:
            resp.headers.update({k: v for k, v in HEADERS.items() if k not in resp.headers})
        return resp

    def _error(self, request: web.Request, status: int, message: str) -> web.Response:
        if request.path.startswith("/api/"):
            return web.json_response({"error": message}, status=status, headers=HEADERS)
        return web.Response(status=status, text=pages.error_page(status, message, self.catalog.location),
                            content_type="text/html", headers=HEADERS)

    # -- pages --------------------------------------------------------------------
    def _html(self, body: str) -> web.Response:
        return web.Response(text=body, content_type="text/html")

    @staticmethod
    def _q(request: web.Request, key: str, default: str | None = None) -> str:
        value = request.query.get(key, default)
        if value is None:
            raise CatalogError(f"the request needs ?{key}=")
        return value

    async def _target(self, request: web.Request) -> Target:
        return await self._run(self.catalog.target, self._q(request, "work"), self._q(request, "rel"),
                               request.query.get("f", ""), request.query.get("v"))

    async def _landing(self, request: web.Request) -> web.Response:
        works = await self._run(self.catalog.works)
        drives = await self._run(self.catalog.drives)
        return self._html(pages.landing(works, drives, self.catalog.location))

    async def _path(self, request: web.Request) -> web.Response:
        d = await self._run(self.catalog.path, self._q(request, "work"), self._q(request, "rel"))
        return self._html(pages.path_page(d, self.catalog.location))

    async def _file(self, request: web.Request) -> web.Response:
        t = await self._target(request)
        if t.entry is None:
            raise CatalogError(f"{t.sub or t.path!r} is a folder: download it as a tar")
        preview = await self._run(self.catalog.preview, t)
        return self._html(pages.file_page(t, preview, self.catalog.location))

    async def _diff(self, request: web.Request) -> web.Response:
        d = await self._run(self.catalog.diff, self._q(request, "work"), self._q(request, "rel"),
                            request.query.get("a", "-2"), request.query.get("b", "-1"))
        return self._html(pages.diff_page(d, self.catalog.location))

    async def _raw(self, request: web.Request) -> web.Response:
        t = await self._target(request)
        data, mime = await self._run(self.catalog.image, t)
        return web.Response(body=data, content_type=mime)

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC:
            raise NotFoundError(f"no static file {name!r}")
        text = resources.files(__package__).joinpath("static", name).read_text(encoding="utf-8")
        return web.Response(text=text, content_type=STATIC[name])

    # -- downloads ----------------------------------------------------------------
    async def _download(self, request: web.Request) -> web.StreamResponse:
        t = await self._target(request)
        entry = t.entry
        filename = t.name if entry is not None else f"{t.name}.tar"
        resp = web.StreamResponse(headers={
            **HEADERS, "Content-Type": "application/octet-stream" if entry is not None else "application/x-tar",
            "Content-Disposition": f"attachment; filename*=UTF-8''{quote(filename, safe='')}",
        })
        if entry is not None:
            resp.content_length = entry.size
            await resp.prepare(request)
            it = self.catalog.iter_file(entry)
            while True:
                data = await self._run(next, it, None)
                if data is None:
                    break
                await resp.write(data)
        else:
            await resp.prepare(request)
            await self._stream_tar(t, resp)
        await resp.write_eof()
        return resp

    async def _stream_tar(self, t: Target, resp: web.StreamResponse) -> None:
        """The tar is written by a pool thread; each MiB it makes is handed to the connection
        and the thread waits until it is sent (so at most a MiB and a batch of chunks are held)."""
        loop = asyncio.get_running_loop()
        buf = bytearray()

        def write(data: bytes) -> None:
            buf.extend(data)
            if len(buf) >= TAR_FLUSH:
                flush()

        def flush() -> None:
            if buf:
                piece = bytes(buf)
                buf.clear()
                asyncio.run_coroutine_threadsafe(resp.write(piece), loop).result()

        def produce() -> None:
            self.catalog.write_tar(t, write)
            flush()

        await self._run(produce)

    # -- live ---------------------------------------------------------------------
    async def _events(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={**HEADERS, "Content-Type": "text/event-stream"})
        await resp.prepare(request)
        last = await self._run(self.catalog.fingerprint)
        await resp.write(b"retry: 2000\n: connected\n\n")
        try:
            while not self._closing.is_set():
                try:
                    await asyncio.wait_for(self._closing.wait(), self.poll)
                    break
                except asyncio.TimeoutError:
                    pass
                try:
                    now = await self._run(self.catalog.fingerprint)
                except CatalogError:
                    continue  # a ref replaced mid-read: look again next time
                if now != last:
                    last = now
                    await resp.write(b"event: change\ndata: {}\n\n")
                else:
                    await resp.write(b": idle\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        return resp

    # -- JSON ---------------------------------------------------------------------
    @staticmethod
    def _json(data: Any) -> web.Response:
        return web.Response(text=json.dumps(to_json(data), indent=1), content_type="application/json")

    async def _api_works(self, request: web.Request) -> web.Response:
        return self._json({"store": self.catalog.location, "works": await self._run(self.catalog.works),
                           "drives": await self._run(self.catalog.drives)})

    async def _api_path(self, request: web.Request) -> web.Response:
        return self._json(await self._run(self.catalog.path, self._q(request, "work"), self._q(request, "rel")))

    async def _api_diff(self, request: web.Request) -> web.Response:
        return self._json(await self._run(self.catalog.diff, self._q(request, "work"), self._q(request, "rel"),
                                          request.query.get("a", "-2"), request.query.get("b", "-1")))

    async def _api_file(self, request: web.Request) -> web.Response:
        t = await self._target(request)
        if t.entry is None:
            raise CatalogError(f"{t.sub or t.path!r} is a folder")
        return self._json(await self._run(self.catalog.preview, t))


def serve(catalog: Catalog, port: int = 0, *, announce: Callable[[str], None] = print) -> None:
    """Run the browser until Ctrl-C (or SIGTERM); ``announce`` gets the URL first."""

    async def main() -> None:
        server = UiServer(catalog, port=port)
        announce(await server.start())
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()

    asyncio.run(main())


class BackgroundUi:
    """The browser on a thread of its own (``App(..., ui=True)``): ``url`` once started."""

    def __init__(self, catalog: Catalog, port: int = 0, poll: float = 1.0) -> None:
        self.catalog = catalog
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pathapi-ui-loop", daemon=True)
        self._thread.start()
        self.server = UiServer(catalog, port=port, poll=poll)
        self.url = asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(30)

    def stop(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self.catalog.close()
