"""The Python session inside the sandbox: runs the model's code, one request at a time, keeping its state.

Started by ``glimpse.tools.sandbox`` as ``python -I -S sandbox_worker.py SITE_PACKAGES...`` inside the sandbox; it
imports nothing from Glimpse. Requests arrive on stdin as JSON lines ``{"code": "..."}``; each answer is one
JSON line on the original stdout, which the worker keeps to itself before pointing file descriptors 1 and 2
at a capture file, so everything the code prints (from Python or from C) is captured and truncated.

In the code's namespace: ``images`` (the current images as PIL images, by name: ``original_image``, with
several originals also ``image_1``, ``image_2`` …, then ``observation_1`` …, at full resolution, loaded on
first use from ``/images``) and ``show(image)``, which returns an image to the model as a new observation.
A final bare expression is printed, as in a notebook.

The first line on stdin holds the session's settings. Under process isolation run as root, they name the
session's own uid: the worker drops to it (and to the gid of the same number, with no supplementary groups)
before it reads any code, keeping the Python installation importable through open folder descriptors where
that uid could not reach it (an interpreter under ``/root``, say). Under process isolation the worker also
watches its parent: if the parent dies, it kills its session's processes and exits.
"""

import ast
import base64
import importlib
import io
import json
import os
import signal
import stat
import sys
import threading
import time
import traceback

IMAGE_DIR = os.environ.get("GLIMPSE_IMAGES", "/images")
CAPTURE = os.path.join(os.environ.get("GLIMPSE_SCRATCH", "/tmp"), ".glimpse-output")


def main() -> None:
    sys.path[:0] = [p for p in sys.argv[1:] if p]
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file grown past the limit raises instead of killing us
    limits = json.loads(sys.stdin.readline() or "{}")
    own_uid = limits.get("uid") is not None
    if own_uid:
        _drop_to(int(limits["uid"]))
    if limits.get("watch_parent"):
        threading.Thread(target=_watch_parent, args=(os.getppid(), own_uid), daemon=True).start()
    max_chars = int(limits.get("output_chars", 20000))
    max_images = int(limits.get("images_per_call", 4))
    max_pixels = int(limits.get("image_pixels", 8_000_000))
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8")
    capture = os.open(CAPTURE, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(capture, 1)
    os.dup2(capture, 2)
    sys.stdout = open(1, "w", encoding="utf-8", errors="replace", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = sys.stdout
    shown: list = []

    class Images(dict):
        """The current images by name, loaded on first use."""

        def __missing__(self, name: str):
            path = os.path.join(IMAGE_DIR, f"{name}.png")
            if not os.path.exists(path):
                raise KeyError(f"no image {name!r}; available: {', '.join(available())}")
            from PIL import Image

            with Image.open(path) as img:
                img.load()
                value = img.copy()
            self[name] = value
            return value

        def keys(self):
            return available()

        def __iter__(self):  # ``for name in images`` and ``sorted(images)`` list every image, loaded or not
            return iter(available())

        def __len__(self):
            return len(available())

        def __contains__(self, name) -> bool:
            return name in available()

        def items(self):
            return [(name, self[name]) for name in available()]

        def values(self):
            return [self[name] for name in available()]

    def available() -> list:
        names = [f[:-4] for f in os.listdir(IMAGE_DIR) if f.endswith(".png")] if os.path.isdir(IMAGE_DIR) else []
        return sorted(names, key=lambda n: (n != "original_image", not n.startswith("image_"), len(n), n))

    def show(image) -> None:
        """Return an image (PIL, or a NumPy array) to the model as a new observation."""
        shown.append(image)

    namespace = {"__name__": "__main__", "images": Images(), "show": show}

    for line in sys.stdin:
        request = json.loads(line)
        shown.clear()
        error = None
        try:
            tree = ast.parse(request["code"], "<code>", "exec")
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            exec(compile(tree, "<code>", "exec"), namespace)
            if last is not None:
                value = eval(compile(ast.Expression(last.value), "<code>", "eval"), namespace)
                if value is not None:
                    print(repr(value))
        except BaseException as exc:  # the model's code may raise anything, SystemExit included
            lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
            kept = [ln for ln in lines if 'File "<code>"' in ln or not ln.startswith("  File ")]
            error = "".join(kept[-12:]).strip()
        sys.stdout.flush()
        size = os.lseek(capture, 0, os.SEEK_END)
        os.lseek(capture, 0, os.SEEK_SET)
        text = os.read(capture, max_chars * 4 + 4).decode("utf-8", errors="replace")
        os.ftruncate(capture, 0)
        os.lseek(capture, 0, os.SEEK_SET)
        dropped = max(0, len(text) - max_chars) + max(0, size - max_chars * 4 - 4)
        images, image_errors = [], []
        for item in shown[:max_images]:
            try:
                images.append(_png(item, max_pixels))
            except Exception as exc:
                image_errors.append(f"show() could not use {type(item).__name__}: {exc}")
        proto.write(
            json.dumps(
                {
                    "id": request.get("id"),
                    "stdout": text[:max_chars],
                    "truncated": dropped,
                    "error": error,
                    "images": images,
                    "images_dropped": max(0, len(shown) - max_images),
                    "image_errors": image_errors,
                }
            )
            + "\n"
        )
        proto.flush()
    if limits.get("watch_parent"):  # stdin closed: the parent is gone
        _end_session(own_uid)


def _drop_to(uid: int) -> None:
    """Become ``uid`` for good, keeping every folder on ``sys.path`` (and of the packages loaded so far)
    reachable: those this uid could not reach are opened now and read through ``/proc/self/fd`` from then on."""
    moved = {}
    for i, entry in enumerate(sys.path):
        if entry and os.path.isdir(entry) and not _open_to_others(entry):
            fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
            moved[entry] = sys.path[i] = f"/proc/self/fd/{fd}"
    for module in list(sys.modules.values()):
        path = getattr(module, "__path__", None)
        if isinstance(path, list):
            for i, entry in enumerate(path):
                for old, new in moved.items():
                    if entry == old or entry.startswith(old + "/"):
                        path[i] = new + entry[len(old) :]
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    if (os.getuid(), os.geteuid(), os.getgid(), os.getegid()) != (uid, uid, uid, uid):
        raise SystemExit(f"could not become uid {uid}")
    importlib.invalidate_caches()


def _open_to_others(path: str) -> bool:
    """Whether a uid that owns nothing and belongs to no group can list ``path`` and reach it."""
    path = os.path.abspath(path)
    if not os.stat(path).st_mode & stat.S_IROTH:
        return False
    while True:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        if path == "/":
            return True
        path = os.path.dirname(path)


def _watch_parent(parent: int, own_uid: bool) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    _end_session(own_uid)


def _end_session(own_uid: bool) -> None:
    """Kill this session's processes (all of its own uid's, or its process group) and exit."""
    try:
        if own_uid:
            os.kill(-1, signal.SIGKILL)  # every process this uid may signal, which is this session's, but us
        else:
            os.killpg(0, signal.SIGKILL)
    except OSError:
        pass
    os._exit(0)


def _png(item, max_pixels: int) -> str:
    from PIL import Image

    if not isinstance(item, Image.Image):
        item = Image.fromarray(item)
    if item.width * item.height > max_pixels:
        scale = (max_pixels / (item.width * item.height)) ** 0.5
        item = item.resize((max(1, int(item.width * scale)), max(1, int(item.height * scale))))
    if item.mode not in ("RGB", "RGBA", "L"):
        item = item.convert("RGB")
    buf = io.BytesIO()
    item.save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


if __name__ == "__main__":
    main()
