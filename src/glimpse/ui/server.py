"""``glimpse ui``: a local web app to ask questions about images and watch the model zoom, turn by turn.

Endpoints (the page in ``static/`` uses them; nothing else is needed, no CDN, no build step):

* ``GET /``: the page. ``GET /view/*``: the trajectory viewer's script and style, which the page shares.
* ``GET /api/defaults``: the form's defaults (from the same config as ``glimpse ask``) and whether local paths
  may be given.
* ``POST /api/images``: upload an image (the raw bytes); it is checked like ``glimpse ask`` checks a file.
* ``POST /api/runs``: start a run (JSON: ``question``, ``image`` (an uploaded id) or ``path``, ``model``,
  ``base_url``, ``protocol``, ``effort``, ``samples``, ``code``). ``GET /api/runs/ID/events``: its events as
  server-sent events (see ``glimpse.ui.live``). ``POST /api/runs/ID/stop``: stop it.
  ``GET /api/runs/ID/image``: its original image; ``GET /api/runs/ID/made/SAMPLE/N``: observation N of a sample
  when the code tool made it.
* ``GET /api/history``: the saved runs, newest first. ``GET /history/ID/``: a saved run in the viewer's
  trajectory page (the report ``glimpse view`` builds, made on first use).

Safety: the server listens on loopback unless told otherwise (``serve_ui`` warns when it is not). Uploads are
limited in bytes and, like every image Glimpse reads, by Pillow's decompression-bomb rule
(``GLIMPSE_MAX_IMAGE_PIXELS``). A path typed in the page, and a ``scripted:``/``hf:`` model path typed there,
are read only inside the allowed folders (after resolving links), and typed paths only when the server
is on loopback. The API key stays on the server: it is never sent to the page, and it goes only to the base
URL the server was configured with (a run pointed elsewhere from the page gets no key). Requests whose
``Origin`` or ``Host`` is not this server's are refused, so another web site cannot drive the app from the
user's browser.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import ipaddress
import json
import logging
import os
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from glimpse.agent import AgentLoop
from glimpse.api import backend_from_config, loop_from_config
from glimpse.config import AskConfig, UIConfig, public_dict
from glimpse.errors import ConfigError, GlimpseError, ImageInputError
from glimpse.images import ImageCache, image_from_bytes
from glimpse.models import BACKENDS
from glimpse.paths import write_atomically
from glimpse.trajectory import Sample
from glimpse.ui.live import LiveRun

log = logging.getLogger(__name__)

# Largest upload by default: a 100-megapixel JPEG is about 30-50 MB.
MAX_UPLOAD_MB = 64
# Samples one run may ask for from the page.
MAX_SAMPLES = 16
# Finished runs whose events stay in memory (a page may still be replaying them); the rest are on disk.
_KEEP_FINISHED = 64
# Agent loops (each with its backend) kept for runs with the same settings.
_KEPT_LOOPS = 8
_RUN_ID = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9a-f]{6}$")
_UPLOAD_ID = re.compile(r"^[0-9a-f]{64}$")
_STATIC = resources.files("glimpse.ui") / "static"
_VIEWER = resources.files("glimpse.view") / "static"
_PAGE_FILES = {"ui.js": "text/javascript", "ui.css": "text/css"}
_VIEWER_FILES = {"app.js": "text/javascript", "style.css": "text/css"}


class _Refused(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an interface to listen on) is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


MAX_RUN_BODY = 256 * 1024  # bytes of a POST /api/runs body (the question with the settings)


async def _body(request: Request, limit: int, what: str) -> bytes:
    """The request's body, read up to ``limit`` bytes (counted as it comes: a chunked body declares no length).

    Raises:
        _Refused: 413, the body is larger.
    """
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _Refused(f"{what} is {int(declared):,} bytes; this server accepts at most {limit:,}", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _Refused(f"{what} is over this server's limit of {limit:,} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def _image_response(path: str | os.PathLike[str]) -> Response:
    """An image file served as the image it is (the type from its bytes, never from its name, which could say
    .html), and never sniffed into something else by the browser."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            kind = "image/jpeg" if im.format == "MPO" else Image.MIME.get(im.format or "", "application/octet-stream")
    except (OSError, ValueError):
        kind = "application/octet-stream"
    return FileResponse(path, media_type=kind, headers={"X-Content-Type-Options": "nosniff"})


def inside(path: str | os.PathLike[str], roots: list[Path]) -> Path:
    """``path`` resolved (links followed), if it lies inside one of ``roots``.

    Raises:
        _Refused: it lies elsewhere.
    """
    try:
        resolved = Path(path).expanduser().resolve()
    except (ValueError, RuntimeError, OSError) as exc:  # a NUL byte, an unknown ~user, a loop of links
        raise _Refused(f"{str(path)[:200]!r} is not a usable path: {exc}", 400) from None
    for root in roots:
        if resolved == root or resolved.is_relative_to(root):
            return resolved
    where = ", ".join(str(r) for r in roots) or "none"
    raise _Refused(f"{path} is outside the folders this server may read ({where}); start it with --allow FOLDER", 403)


def build_app(
    ask: AskConfig,
    *,
    runs: str | os.PathLike[str],
    allow: list[str | os.PathLike[str]] | None = None,
    local_paths: bool = True,
    max_upload_mb: int = MAX_UPLOAD_MB,
) -> Starlette:
    """The ASGI app.

    Args:
        ask: the defaults of every run (the page may change model, base URL, protocol, effort, samples and
            the code tool); its API key is used only with its own base URL.
        runs: folder of the saved runs (created when the first run ends).
        allow: folders whose files the page may name (image paths, scripted and hf models); the server's own
            settings (``ask``) are trusted wherever they point.
        local_paths: accept paths and base URLs typed in the page (turn off when the server is reachable from
            elsewhere).
        max_upload_mb: largest upload accepted.
    """
    out = Path(runs).resolve()
    uploads = out / "uploads"
    roots = [Path(a).expanduser().resolve() for a in (allow or [])]
    max_upload = max_upload_mb * 1024 * 1024
    live: dict[str, LiveRun] = {}
    images = ImageCache()  # shared by every run: an image asked about again is decoded once
    loops = _Loops(images)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        # Shutting down (Ctrl-C): runs still going are stopped and saved, then every backend is closed.
        running = [r for r in live.values() if r.stop()]
        await asyncio.gather(*(r.task for r in running if r.task is not None), return_exceptions=True)
        for loop in loops.clear():
            await _close(loop)

    def defaults() -> dict[str, Any]:
        return {
            "model": ask.model or "builtin",
            "base_url": ask.base_url or "",
            "protocol": ask.protocol,
            "effort": ask.effort,
            "samples": ask.samples,
            "code": ask.code,
            "local_paths": local_paths,
            "backends": sorted(BACKENDS),
            "max_upload_mb": max_upload_mb,
            "max_samples": MAX_SAMPLES,
        }

    async def page(_: Request) -> Response:
        return Response((_STATIC / "index.html").read_bytes(), media_type="text/html")

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if request.url.path.startswith("/view/"):
            files, folder = _VIEWER_FILES, _VIEWER
        else:
            files, folder = _PAGE_FILES, _STATIC
        if name not in files:
            return _error("no such file", 404)
        return Response((folder / name).read_bytes(), media_type=files[name])

    async def health(_: Request) -> Response:
        return JSONResponse({"status": "ok", "runs": sum(r.status == "running" for r in live.values())})

    async def get_defaults(_: Request) -> Response:
        return JSONResponse(defaults())

    async def upload(request: Request) -> Response:
        try:
            data = await _body(request, max_upload, "the image")
        except _Refused as exc:
            return _error(str(exc), exc.status)
        name = request.headers.get("x-file-name") or "upload"
        try:
            original = await asyncio.to_thread(image_from_bytes, data, name)
        except ImageInputError as exc:
            return _error(str(exc), 400)
        uploads.mkdir(parents=True, exist_ok=True)
        target = uploads / original.sha256
        if not target.exists() or target.stat().st_size != len(data):  # absent, or cut short by a crash
            await asyncio.to_thread(write_atomically, target, data)
        return JSONResponse({"id": original.sha256, "width": original.image.width, "height": original.image.height})

    async def start_run(request: Request) -> Response:
        try:
            raw = await _body(request, MAX_RUN_BODY, "the request")  # a question and settings: never megabytes
        except _Refused as exc:
            return _error(str(exc), exc.status)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            return _error("the body must be JSON")
        loop = None
        try:
            image, config, question, samples = _run_request(body)
            # Off the event loop: a new hf backend loads its checkpoint here, and a large image decodes.
            loop, idle = await asyncio.to_thread(loops.acquire, config)
            for old in idle:
                await _close(old)
            original = await asyncio.to_thread(images.get, str(image))
        except (GlimpseError, _Refused) as exc:
            if loop is not None:
                await release(loop)
            if isinstance(exc, _Refused):
                return _error(str(exc), exc.status)
            return _error(str(exc), 400 if isinstance(exc, (ConfigError, ImageInputError)) else 502)
        run_id = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
        settings = {k: v for k, v in public_dict(config).items() if k not in ("save", "json", "quiet")}
        run = LiveRun(
            id=run_id,
            sample=Sample(id=Path(image).stem[:40] or "image", images=[str(image)], question=question),
            samples=samples,
            settings=settings,
            out=out,
        )
        live[run_id] = run
        finished = [k for k, r in live.items() if r.status != "running"]
        for k in finished[: max(0, len(finished) - _KEEP_FINISHED)]:  # older runs live on in the history
            del live[k]
        run.start(
            loop, width=original.image.width, height=original.image.height, close=functools.partial(release, loop)
        )
        return JSONResponse({"id": run_id})

    async def release(loop: AgentLoop) -> None:
        for old in loops.release_now(loop):
            await _close(old)

    def _run_request(body: Any) -> tuple[Path, AskConfig, str, int]:
        if not isinstance(body, dict):
            raise _Refused("the body must be a JSON object")
        question = str(body.get("question") or "").strip()
        if not question:
            raise _Refused("ask a question")
        if body.get("image"):
            upload_id = str(body["image"])
            if not _UPLOAD_ID.match(upload_id) or not (uploads / upload_id).exists():
                raise _Refused("no such uploaded image; upload it again", 404)
            image = uploads / upload_id
        elif body.get("path"):
            if not local_paths:
                raise _Refused("this server does not read paths typed in the page; upload the image", 403)
            image = inside(str(body["path"]), roots)
        else:
            raise _Refused("choose an image: upload one, or give a path")
        samples = body.get("samples", ask.samples)
        if not isinstance(samples, int) or not 1 <= samples <= MAX_SAMPLES:
            raise _Refused(f"samples must be a whole number from 1 to {MAX_SAMPLES}")
        changes: dict[str, Any] = {"samples": samples}
        for key in ("model", "protocol", "effort"):
            if body.get(key):
                changes[key] = str(body[key])
        if "code" in body:
            changes["code"] = bool(body["code"])
        base_url = str(body.get("base_url") or "").strip()
        if base_url and base_url != (ask.base_url or ""):
            if not local_paths:  # reachable from elsewhere: the page must not make this server call other hosts
                raise _Refused("this server only uses its configured base URL; start it with --base-url", 403)
            # Another endpoint than the configured one: it gets no key (the server's key never leaves for a
            # URL typed in the page).
            changes.update(base_url=base_url, api_key="")
        config = dataclasses.replace(ask, **changes)
        if config.protocol not in ("tags", "tools"):
            raise _Refused(f"protocol must be tags or tools, got {config.protocol!r}")
        if config.effort not in ("low", "medium", "high"):
            raise _Refused(f"effort must be low, medium or high, got {config.effort!r}")
        name, _, arg = (config.model or "").partition(":")
        if config.model != ask.model and name in ("scripted", "hf") and arg:  # a file or folder named in the page
            if not local_paths:
                raise _Refused(
                    f"this server does not load {name}: models named in the page; start it with --model", 403
                )
            found = inside(arg, roots)
            if name == "hf" and not found.is_dir():  # never a Hub id: the page must not make this server download
                raise _Refused(f"hf:{arg} is not a checkpoint folder on this server (Hub ids only with --model)", 404)
        return image, config, question, samples

    def _run(request: Request) -> LiveRun:
        run = live.get(request.path_params["run"])
        if run is None:
            raise _Refused("no such run", 404)
        return run

    async def events(request: Request) -> Response:
        try:
            run = _run(request)
        except _Refused as exc:
            return _error(str(exc), exc.status)
        last = request.headers.get("last-event-id") or request.query_params.get("from")
        try:
            start = int(last) + 1 if last else 0
        except ValueError:  # not a number we sent: replay from the start
            start = 0

        async def stream():
            async for i, event in run.follow(max(0, start)):
                yield f"id: {i}\nevent: {event['type']}\ndata: {_json(event)}\n\n".encode()
            yield b"event: end\ndata: {}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    async def stop(request: Request) -> Response:
        try:
            run = _run(request)
        except _Refused as exc:
            return _error(str(exc), exc.status)
        return JSONResponse({"stopped": run.stop()})

    async def run_image(request: Request) -> Response:
        try:
            run = _run(request)
        except _Refused as exc:
            return _error(str(exc), exc.status)
        return _image_response(run.sample.images[0])

    async def made_image(request: Request) -> Response:
        try:
            run = _run(request)
        except _Refused as exc:
            return _error(str(exc), exc.status)
        path = run.made_image(int(request.path_params["sample"]), int(request.path_params["index"]))
        if path is None or not Path(path).is_file():
            return _error("no such image", 404)
        return _image_response(path)

    async def history(_: Request) -> Response:
        return JSONResponse(await asyncio.to_thread(_history, out))

    async def saved(request: Request) -> Response:
        run_id, rest = request.path_params["run"], request.path_params.get("rest") or "index.html"
        if not _RUN_ID.match(run_id) or not (out / f"{run_id}.jsonl").exists():
            return _error("no such saved run", 404)
        folder = out / "reports" / run_id
        try:
            if (
                not (folder / "index.html").exists()
                or (folder / "index.html").stat().st_mtime < (out / f"{run_id}.jsonl").stat().st_mtime
            ):
                from glimpse.view import build_report

                await asyncio.to_thread(build_report, out / f"{run_id}.jsonl", folder, workers=1)
            target = inside(folder / rest, [folder.resolve()])
        except _Refused as exc:
            return _error(str(exc), exc.status)
        if not target.is_file():
            return _error("no such file", 404)
        return FileResponse(target)

    app = Starlette(
        lifespan=lifespan,
        middleware=[Middleware(_SameOrigin)],
        routes=[
            Route("/", page),
            Route("/static/{name}", static),
            Route("/view/{name}", static),
            Route("/health", health),
            Route("/api/defaults", get_defaults),
            Route("/api/images", upload, methods=["POST"]),
            Route("/api/runs", start_run, methods=["POST"]),
            Route("/api/runs/{run}/events", events),
            Route("/api/runs/{run}/stop", stop, methods=["POST"]),
            Route("/api/runs/{run}/image", run_image),
            Route("/api/runs/{run}/made/{sample:int}/{index:int}", made_image),
            Route("/api/history", history),
            Route("/history/{run}/", saved),
            Route("/history/{run}/{rest:path}", saved),
        ],
    )
    app.state.live = live
    app.state.loops = loops
    return app


class _Loops:
    """Agent loops shared by the runs with the same settings: a backend is made once (an hf checkpoint loads once)
    and keeps its connections, and an image asked about again is resized and encoded once. The ``size`` most
    recently used are kept; a loop dropped from them is closed when its last run ends. Called from worker threads.
    """

    def __init__(self, images: ImageCache, size: int = _KEPT_LOOPS):
        self.images = images
        self.size = size
        self.kept: OrderedDict[str, AgentLoop] = OrderedDict()
        self.users: dict[int, int] = {}
        self.lock = threading.Lock()
        self.making: dict[str, threading.Lock] = {}

    def acquire(self, config: AskConfig) -> tuple[AgentLoop, list[AgentLoop]]:
        """The loop for ``config`` (made if needed), counted as in use; and loops dropped that are now idle."""
        key = json.dumps({**public_dict(config), "samples": None, "api_key": config.api_key}, default=str)
        with self.lock:
            making = self.making.setdefault(key, threading.Lock())
        with making:  # two runs asking for one new backend make it once
            with self.lock:
                loop = self.kept.get(key)
                if loop is not None:
                    self.kept.move_to_end(key)
                    self.users[id(loop)] += 1
                    return loop, []
            loop = loop_from_config(config, backend_from_config(config), self.images)
            with self.lock:
                self.kept[key] = loop
                self.users[id(loop)] = 1
                self.making.pop(key, None)
                idle = []
                while len(self.kept) > self.size:
                    _, old = self.kept.popitem(last=False)
                    if self.users.get(id(old), 0) == 0:
                        self.users.pop(id(old), None)
                        idle.append(old)
                return loop, idle

    def release_now(self, loop: AgentLoop) -> list[AgentLoop]:
        """A run ended: ``[loop]`` if it was dropped and nothing uses it any more (the caller closes it)."""
        with self.lock:
            self.users[id(loop)] -= 1
            if self.users[id(loop)] or any(k is loop for k in self.kept.values()):
                return []
            del self.users[id(loop)]
            return [loop]

    def clear(self) -> list[AgentLoop]:
        with self.lock:
            out = list(self.kept.values())
            self.kept.clear()
            return out


async def _close(loop: AgentLoop) -> None:
    close = getattr(loop.backend, "aclose", None)
    if close is not None:
        await close()


class _SameOrigin:
    """Refuses requests that another site's page makes from the user's browser: a foreign ``Origin``, or (on
    loopback) a ``Host`` that is not this machine's (DNS rebinding)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            host = headers.get("host", "")
            origin = headers.get("origin")
            name = host.rsplit(":", 1)[0].strip("[]")
            listening = str((scope.get("server") or ("",))[0])
            known = name in ("localhost", "127.0.0.1", "::1", listening) or not is_loopback(listening)
            if (origin is not None and urlsplit(origin).netloc != host) or not known:
                await _error("cross-site request refused", 403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _history(out: Path) -> list[dict[str, Any]]:
    rows = []
    for meta in out.glob("*.json"):
        if not _RUN_ID.match(meta.stem):
            continue
        try:
            data = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        rows.append(
            {
                "id": meta.stem,
                "question": data.get("question"),
                "answer": data.get("answer"),
                "status": data.get("status"),
                "model": (data.get("settings") or {}).get("model"),
                "stop_reasons": data.get("stop_reasons"),
                "started": data.get("started"),
                "url": f"/history/{meta.stem}/#/t/0",
            }
        )
    rows.sort(key=lambda r: r.get("started") or 0, reverse=True)
    return rows


def _json(value: Any) -> str:
    # ASCII: no character a line splitter might take for a line end (U+2028 …) reaches the event stream raw.
    return json.dumps(value, separators=(",", ":"))


def _error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def ask_settings(config: UIConfig) -> AskConfig:
    """The ``glimpse ask`` part of a ``UIConfig``: the defaults of every run."""
    return AskConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(AskConfig)})


def serve_ui(config: UIConfig) -> None:
    """Run the app until interrupted (blocking). Away from loopback it warns, and paths typed in the page are off."""
    import uvicorn

    local = is_loopback(config.host)
    if not local:
        log.warning(
            "glimpse ui is listening on %s, not on loopback: anyone who can reach it can run models with this "
            "server's settings and key. Paths typed in the page are refused; uploads still work.",
            config.host,
        )
    allow = [a.strip() for a in config.allow.split(",") if a.strip()] if config.allow else [os.getcwd()]
    app = build_app(
        ask_settings(config), runs=config.runs, allow=allow, local_paths=local, max_upload_mb=config.max_upload_mb
    )
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", access_log=False)
