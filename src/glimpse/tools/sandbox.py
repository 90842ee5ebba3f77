"""Isolated Python sessions for the code tool, shared by inference, evaluation and training.

Each trajectory gets its own session: a Python process that keeps the model's variables and imports between
calls and is killed when the trajectory ends. Two isolations exist; ``auto`` takes ``bwrap`` where it works.

``bwrap`` (bubblewrap, the sandbox Flatpak uses; ``apt-get install bubblewrap``):

* new user, PID, network, IPC, UTS and cgroup namespaces: **no network at all** (not even loopback to the
  host), the parent and every other process invisible and unreachable by signals, an unprivileged uid
  (65534) with no capabilities;
* a minimal read-only filesystem: the Python installation and its site-packages (so Pillow and NumPy import),
  system libraries, and the current images under ``/images``; the root and ``/dev`` are remounted read-only
  after the mounts, so the only writable places are ``/scratch`` (the working directory), ``/tmp`` (each
  ``scratch_mb``) and ``/dev/shm`` (``SHM_MB``), size-limited in-memory file systems that vanish with the
  session; the home folder, the project, credentials and everything else on the host are absent;
* an empty environment: API keys and every other variable of the parent are not visible;
* limits: address space per process (``memory_mb``), CPU seconds per session (``cpu_s``), the size of any one
  file (``file_mb``), open files, and, where cgroups can be written (as root, or with delegation), the number
  of processes and threads (``processes``, cgroup ``pids.max``), which stops fork bombs; wall time per call
  (``wall_s``) is enforced by the parent, which kills the whole session;
* output: at most ``output_chars`` characters of what the code prints come back, with a marker for the rest.

``process`` (the fallback where bubblewrap cannot run; a one-line warning is logged every time it is chosen):
the same worker with the same resource limits and an empty environment, in its own session and process group,
working in a scratch folder of its own. Run as root, each session also gets **a uid and gid of its own**
(``SESSION_UID_BASE`` upward, no supplementary groups, no capabilities): it cannot signal or trace the parent
or other sessions, read the parent's environment, or read or write files that are not world-readable or
world-writable, and ``RLIMIT_NPROC`` caps its processes even without a cgroup (where those ids are not mapped,
as for root of a rootless container, a session refuses to start). It has **no file-system or network
isolation**: world-readable host files (``/etc/passwd``, the project), the host's network, DNS and loopback
listeners, and world-writable folders (``/tmp``, ``/dev/shm``) are reachable, and the scratch folder has no
size cap beyond ``file_mb`` per file. Run as another user, the worker keeps that user's uid and can
read that user's files, read the parent's environment and signal the parent. ``tests/test_sandbox.py`` runs
every attack against both isolations and records which ones process isolation does not contain.

Nothing is left behind: each session keeps its files in its own folder under ``sandbox_state_dir()`` with a
note of the process that owns it; a process-mode worker kills its session's processes when its parent dies;
and a new process, when it makes its code tool or first session, removes what sessions of dead processes left
(their processes, cgroups, folders, and files their uid left at the top of ``SHARED_TMP``).

Not covered by either: side channels and CPU-cache attacks, kernel exploits, and denial of service through
the machine's shared disk or memory bandwidth beyond the limits above.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import pwd
import queue
import resource
import secrets
import select
import shutil
import signal
import site
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from glimpse.errors import ConfigError

log = logging.getLogger(__name__)

WORKER = Path(__file__).with_name("sandbox_worker.py")
NOBODY = 65534
# Each process-mode session run as root gets its own uid (and gid of the same number), claimed by creating a
# folder named after it. The range lies far above people's uids (1000 up), nobody (65534), systemd's dynamic
# users (61184-65519) and the usual /etc/subuid ranges (100000 up, 65536 per user), so no host file is
# owned by one of them.
SESSION_UID_BASE = 2_000_000_000
SESSION_UID_SPAN = 1_000_000
# /dev/shm inside bubblewrap: room for multiprocessing's semaphores and small shared arrays.
SHM_MB = 64
# Host folders any uid may write to: what a process-mode session's uid leaves at their top level is removed
# when the session ends (deeper world-writable folders are not searched).
SHARED_TMP = ("/tmp", "/var/tmp", "/dev/shm")
# A session folder with no owner note this old is debris of a process that died while making it.
_UNOWNED_GRACE_S = 60.0
# Largest answer line accepted from a worker: the text output and up to four PNG images.
_MAX_REPLY_BYTES = 96 * 1024 * 1024


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one session (see the module docstring)."""

    wall_s: float = 30.0
    cpu_s: int = 120
    memory_mb: int = 2048
    processes: int = 64
    file_mb: int = 64
    scratch_mb: int = 256
    output_chars: int = 20_000
    images_per_call: int = 4
    image_pixels: int = 8_000_000

    def __post_init__(self) -> None:
        for name in ("wall_s", "cpu_s", "memory_mb", "processes", "file_mb", "scratch_mb", "output_chars"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"sandbox limit {name} must be positive, got {getattr(self, name)}")


@dataclass
class CodeResult:
    """What one call produced.

    Attributes:
        stdout: what the code printed (and the value of a final bare expression), truncated.
        truncated: characters of output cut off.
        error: the traceback of an exception the code raised, or what stopped the session.
        images: PNG bytes of the images the code passed to ``show()``.
        notes: other messages for the model (images dropped, a session restarted).
        killed: the session was killed (wall time, CPU time, memory, or a broken protocol).
    """

    stdout: str = ""
    truncated: int = 0
    error: str | None = None
    images: list[bytes] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    killed: bool = False


def _result_of(reply: dict[str, Any], limits: SandboxLimits, notes: list[str]) -> CodeResult | None:
    """The worker's answer as a ``CodeResult``, held to the limits here as well (code in the session can write
    its own answer, with the right id, past the worker's checks); ``None`` when a field is not what the worker
    writes."""
    stdout, truncated, error = reply.get("stdout", ""), reply.get("truncated", 0), reply.get("error")
    encoded, dropped, problems = reply.get("images", []), reply.get("images_dropped", 0), reply.get("image_errors", [])
    counts = (truncated, dropped)
    if not (
        isinstance(stdout, str)
        and (error is None or isinstance(error, str))
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts)
        and isinstance(encoded, list)
        and all(isinstance(x, str) for x in encoded)
        and isinstance(problems, list)
        and all(isinstance(x, str) for x in problems)
    ):
        return None
    try:
        images = [base64.b64decode(x, validate=True) for x in encoded[: limits.images_per_call]]
    except ValueError:
        return None
    dropped += len(encoded) - len(images)
    if dropped:
        notes.append(
            f"Only the first {limits.images_per_call} images passed to show() are returned; {dropped} more were "
            "dropped."
        )
    notes += [x[:500] for x in problems[:4]]
    if len(stdout) > limits.output_chars:
        truncated += len(stdout) - limits.output_chars
        stdout = stdout[: limits.output_chars]
    if error is not None and len(error) > limits.output_chars:
        error = error[: limits.output_chars] + "\n[… the rest of the error was cut]"
    return CodeResult(stdout=stdout, truncated=truncated, error=error, images=images, notes=notes)


@cache
def bwrap_available() -> bool:
    """Whether bubblewrap is installed and can create the namespaces it needs here."""
    path = shutil.which("bwrap")
    if path is None:
        return False
    probe = [path, "--unshare-all", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "true"]
    try:
        return subprocess.run(probe, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


# One line each; as root the worker gets a uid of its own, as another user it keeps that user's.
_PROCESS_WARNING = {
    True: "the code tool runs with --sandbox process: model code gets resource limits, an empty environment and "
    "a uid of its own, but no file-system or network isolation (see the README's sandbox table)",
    False: "the code tool runs with --sandbox process as this user: model code gets resource limits only; it can "
    "read this user's files and glimpse's environment (API keys), signal glimpse and use the network "
    "(see the README's sandbox table)",
}


def resolve_isolation(isolation: str, *, warn: bool = True) -> str:
    """``auto`` becomes ``bwrap`` where it works, else ``process``.

    Args:
        isolation: ``auto``, ``bwrap`` or ``process``.
        warn: log a one-line warning when the result is ``process`` (a tool that makes many sessions warns
            once, when it is made, and passes ``warn=False`` to them).
    """
    if isolation not in ("auto", "bwrap", "process"):
        raise ConfigError(f"sandbox isolation must be auto, bwrap or process, got {isolation!r}")
    if isolation == "bwrap" and not bwrap_available():
        raise ConfigError(
            "bubblewrap is not usable here: install it (apt-get install bubblewrap) or choose "
            "--sandbox process, which does not isolate files or network"
        )
    if isolation == "auto":
        isolation = "bwrap" if bwrap_available() else "process"
        fallback = "bubblewrap cannot run here (apt-get install bubblewrap), so "
    else:
        fallback = ""
    if isolation == "process" and warn:
        log.warning(fallback + _PROCESS_WARNING[os.getuid() == 0])
    return isolation


# ------------------------------------------------------------------------------------------ host-side state
def sandbox_state_dir() -> Path:
    """The folder where sessions keep their files on the host (one folder per session), owned by this user."""
    path = Path(tempfile.gettempdir()) / f"glimpse-sandbox-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o711)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise ConfigError(f"{path} is not a folder that only this user can write; remove it and try again")
    return path


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot), which tells a live process from a reused pid."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()[19]


def _write_owner(folder: Path) -> None:
    note = {"pid": os.getpid(), "started": _start_time(os.getpid())}
    tmp = folder / "owner.part"
    tmp.write_text(json.dumps(note))
    tmp.replace(folder / "owner.json")


def _claim_folder(own_uid: bool) -> tuple[Path, int | None]:
    """A new session folder, and the uid it claims when ``own_uid`` (its name is the uid)."""
    state = sandbox_state_dir()
    for _ in range(100):
        uid = SESSION_UID_BASE + secrets.randbelow(SESSION_UID_SPAN) if own_uid else None
        if uid is not None:
            try:
                pwd.getpwuid(uid)
                continue  # a named user: not ours to take
            except KeyError:
                pass
        folder = state / (str(uid) if uid is not None else uuid.uuid4().hex[:16])
        try:
            folder.mkdir(mode=0o711 if own_uid else 0o700)
        except FileExistsError:
            continue
        _write_owner(folder)
        return folder, uid
    raise RuntimeError(f"no free sandbox session folder under {state} after 100 tries; is it full of debris?")


def _session_ids_mapped() -> bool:
    """Whether the session uids and gids exist here (not so in a user namespace that maps only a few ids, as a
    rootless container does)."""
    last = SESSION_UID_BASE + SESSION_UID_SPAN - 1
    for kind in ("uid_map", "gid_map"):
        try:
            ranges = [[int(x) for x in line.split()] for line in Path(f"/proc/self/{kind}").read_text().splitlines()]
        except (OSError, ValueError):
            return False
        if not any(start <= SESSION_UID_BASE and last < start + count for start, _, count in ranges):
            return False
    return True


def _session_uid(folder: Path) -> int | None:
    name = folder.name
    if name.isdigit() and SESSION_UID_BASE <= int(name) < SESSION_UID_BASE + SESSION_UID_SPAN:
        return int(name)
    return None


def _kill_uid(uid: int) -> None:
    """SIGKILL every live process whose real, effective or saved uid is ``uid``, until none is left."""
    for _ in range(50):
        found = False
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                status = Path(entry.path, "status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if str(uid) in fields.get("Uid", "").split() and not fields.get("State", "").strip().startswith("Z"):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(entry.name), signal.SIGKILL)
                    found = True
        if not found:
            return
        time.sleep(0.005)


def _remove_files_of(uid: int) -> None:
    """Remove what ``uid`` left at the top of the shared world-writable folders."""
    for top in SHARED_TMP:
        with contextlib.suppress(OSError):
            for entry in os.scandir(top):
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_uid != uid:
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        os.unlink(entry.path)


def _remove_session(folder: Path) -> None:
    """Kill a session's processes and remove its cgroup, its folder and the files its uid left."""
    uid = _session_uid(folder)
    cgroup = _PidsCgroup.find(f"glimpse-{folder.name}")
    if cgroup is not None:
        cgroup.kill_members()
    if uid is not None:
        _kill_uid(uid)
        _remove_files_of(uid)
    if cgroup is not None:
        cgroup.remove()
    shutil.rmtree(folder, ignore_errors=True)


_cleaned_pid: int | None = None
_clean_lock = threading.Lock()


def clean_stale_sessions() -> int:
    """Remove what sessions of processes that died without closing them left behind.

    Runs once per process (``PythonTool`` and the first ``PythonSession`` call it). Returns how many sessions
    were cleaned.
    """
    global _cleaned_pid
    with _clean_lock:
        if _cleaned_pid == os.getpid():
            return 0
        _cleaned_pid = os.getpid()
        cleaned = 0
        for folder in sandbox_state_dir().iterdir():
            try:
                note = json.loads((folder / "owner.json").read_text())
                alive = _start_time(int(note["pid"])) == note["started"]
            except (OSError, ValueError, KeyError, TypeError):
                with contextlib.suppress(OSError):
                    if time.time() - folder.lstat().st_mtime < _UNOWNED_GRACE_S:
                        continue  # being made by a live process right now
                alive = False
            if not alive:
                _remove_session(folder)
                cleaned += 1
        if cleaned:
            log.info("removed what %d sandbox sessions of ended processes left behind", cleaned)
        return cleaned


class _PidsCgroup:
    """A cgroup that caps a session's processes and threads (v2 or v1 pids controller), if one can be made."""

    BASES = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/pids"))

    def __init__(self, path: Path | None):
        self.path = path

    @classmethod
    def make(cls, name: str, limit: int) -> _PidsCgroup:
        for base in cls.BASES:
            if base == cls.BASES[0] and not (base / "cgroup.controllers").exists():
                continue  # not cgroup v2
            path = base / name
            try:
                path.mkdir()
                (path / "pids.max").write_text(str(limit))
                return cls(path)
            except OSError:
                with contextlib.suppress(OSError):
                    path.rmdir()
        return cls(None)

    @classmethod
    def find(cls, name: str) -> _PidsCgroup | None:
        for base in cls.BASES:
            if (base / name / "cgroup.procs").exists():
                return cls(base / name)
        return None

    @property
    def procs(self) -> str | None:
        return str(self.path / "cgroup.procs") if self.path else None

    def kill_members(self) -> None:
        if self.path is None:
            return
        for _ in range(50):
            try:
                pids = [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
            except OSError:
                return
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.005)

    def remove(self) -> None:
        if self.path is not None:
            for _ in range(50):
                try:
                    self.path.rmdir()
                    return
                except OSError:
                    time.sleep(0.05)


def _site_packages() -> list[str]:
    paths = list(dict.fromkeys([*site.getsitepackages(), site.getusersitepackages()]))
    return [p for p in paths if os.path.isdir(p)]


def _bwrap_command(limits: SandboxLimits, image_dir: Path) -> list[str]:
    """The bubblewrap command line. Mounts apply in order: the in-memory ``/scratch`` and ``/tmp`` come first,
    so binds below them (a virtual environment under ``/tmp``, say) stay visible; the root and ``/dev`` are
    remounted read-only last, so that only the size-limited file systems can be written."""
    size = str(limits.scratch_mb * 1024 * 1024)
    cmd = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    cmd += ["--uid", str(NOBODY), "--gid", str(NOBODY)]
    cmd += ["--size", size, "--tmpfs", "/scratch", "--size", size, "--tmpfs", "/tmp"]
    for top in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64"):
        if os.path.islink(top):
            cmd += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            cmd += ["--ro-bind", top, top]
    for etc in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/localtime"):
        if os.path.exists(etc):
            cmd += ["--ro-bind", etc, etc]
    prefixes = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}
    for path in sorted(prefixes | {os.path.realpath(p) for p in _site_packages()}):
        if not path.startswith("/usr"):
            cmd += ["--ro-bind", path, path]
    cmd += ["--ro-bind", str(WORKER), "/sandbox/worker.py", "--ro-bind", str(image_dir), "/images"]
    cmd += ["--proc", "/proc", "--dev", "/dev", "--size", str(SHM_MB * 1024 * 1024), "--tmpfs", "/dev/shm"]
    cmd += ["--remount-ro", "/dev", "--remount-ro", "/", "--clearenv"]
    env = {
        "HOME": "/scratch",
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "GLIMPSE_SCRATCH": "/tmp",
        "MPLCONFIGDIR": "/tmp",
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
    }
    for key, value in env.items():
        cmd += ["--setenv", key, value]
    cmd += ["--chdir", "/scratch", "--", os.path.realpath(sys.executable), "-I", "-S", "-B", "/sandbox/worker.py"]
    return cmd + _site_packages()


_launcher_jobs: queue.Queue[tuple[tuple, dict, Future]] = queue.Queue()
_launcher_lock = threading.Lock()
_launcher: threading.Thread | None = None


def _launch(*args: object, **kwargs: object) -> subprocess.Popen[bytes]:
    """``subprocess.Popen`` from a thread that lives as long as this process.

    bubblewrap's ``--die-with-parent`` (``PR_SET_PDEATHSIG``) fires when the *thread* that started it exits,
    so a session started from a short-lived thread (the pool's, an executor's) would be killed with it.
    """
    global _launcher
    if threading.current_thread() is threading.main_thread():
        return subprocess.Popen(*args, **kwargs)
    with _launcher_lock:
        if _launcher is None or not _launcher.is_alive():
            _launcher = threading.Thread(target=_launch_forever, name="glimpse-sandbox-launcher", daemon=True)
            _launcher.start()
    done: Future = Future()
    _launcher_jobs.put((args, kwargs, done))
    return done.result()


def _launch_forever() -> None:
    while True:
        args, kwargs, done = _launcher_jobs.get()
        try:
            done.set_result(subprocess.Popen(*args, **kwargs))
        except BaseException as exc:  # handed to the caller, which raises it
            done.set_exception(exc)


class PythonSession:
    """One isolated, stateful Python process.

    Args:
        limits: resource limits.
        isolation: ``auto``, ``bwrap`` or ``process`` (see the module docstring).
        warn: log the warning when the isolation is ``process`` (see ``resolve_isolation``).
    """

    def __init__(self, limits: SandboxLimits | None = None, isolation: str = "auto", *, warn: bool = True):
        self.limits = limits or SandboxLimits()
        self.isolation = resolve_isolation(isolation, warn=warn)
        clean_stale_sessions()
        own_uid = self.isolation == "process" and os.getuid() == 0
        if own_uid and not _session_ids_mapped():
            raise ConfigError(
                f"--sandbox process run as root gives each session its own uid from {SESSION_UID_BASE:,}, but this "
                "user namespace does not map those ids (see /proc/self/uid_map): run glimpse as an ordinary user, "
                "or make bubblewrap usable"
            )
        self.folder, self.uid = _claim_folder(own_uid)
        self.image_dir = self.folder / "images"
        self.image_dir.mkdir(mode=0o750 if own_uid else 0o700)
        if self.uid is not None:
            os.chown(self.image_dir, -1, self.uid)  # the session may read the images, not change them
        self._scratch: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._cgroup: _PidsCgroup | None = None
        self._buffer = b""
        self._lost = False
        self.calls = 0
        self.restarts = 0

    # ------------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the process (a call starts it on demand too)."""
        if self._proc is not None and self._proc.poll() is None:
            return
        limits = self.limits
        self._cgroup = _PidsCgroup.make(f"glimpse-{self.folder.name}", limits.processes)
        procs = self._cgroup.procs
        own_uid = self.uid is not None

        def preexec() -> None:  # runs in the child before exec: limits that bwrap and its children inherit
            if procs:
                with open(procs, "w") as fh:
                    fh.write(str(os.getpid()))
            mb = 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mb,) * 2)
            resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 5))
            resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_mb * mb,) * 2)
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            if own_uid:  # the session's own uid has no other process: the cap is exact, cgroup or not
                resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes,) * 2)
            elif not procs and os.getuid() != 0:  # without a cgroup, a non-root user can still cap its processes
                resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes + _own_processes(),) * 2)

        if self.isolation == "bwrap":
            cmd, cwd, env = _bwrap_command(limits, self.image_dir), None, {"PATH": "/usr/bin:/bin"}
        else:
            self._scratch = self.folder / "scratch"
            self._scratch.mkdir(mode=0o700, exist_ok=True)
            if self.uid is not None:
                os.chown(self._scratch, self.uid, self.uid)
            cmd = [sys.executable, "-I", "-S", "-B", str(WORKER), *_site_packages()]
            cwd = str(self._scratch)
            env = {
                "PATH": "/usr/bin:/bin",
                "HOME": cwd,
                "LANG": "C.UTF-8",
                "GLIMPSE_SCRATCH": cwd,
                "MPLCONFIGDIR": cwd,
                "OPENBLAS_NUM_THREADS": "1",
                "OMP_NUM_THREADS": "1",
                "GLIMPSE_IMAGES": str(self.image_dir),
            }
        self._proc = _launch(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=cwd,
            env=env,
            preexec_fn=preexec,
            start_new_session=True,
        )
        self._buffer = b""
        settings = {
            "output_chars": limits.output_chars,
            "images_per_call": limits.images_per_call,
            "image_pixels": limits.image_pixels,
            # process isolation: the worker drops to the session's uid before it reads any code, and ends
            # its session's processes if this process dies
            "uid": self.uid,
            "watch_parent": self.isolation == "process",
        }
        self._send(json.dumps(settings))

    def run(self, code: str) -> CodeResult:
        """Run ``code`` in the session, within the limits. Never raises for anything the code does."""
        notes: list[str] = []
        if self._proc is not None and self._proc.poll() is not None:
            self._lost = True
        if self._lost:
            self._reset()
            notes.append(
                "The previous Python session was ended, so a new one was started: earlier variables "
                "and imports are gone."
            )
        self.start()
        self.calls += 1
        call_id = uuid.uuid4().hex
        deadline = time.monotonic() + self.limits.wall_s
        try:
            self._send(json.dumps({"code": code, "id": call_id}))
            while True:  # answers to other ids (written by the code itself) are skipped
                line = self._read_line(deadline - time.monotonic())
                try:
                    reply = json.loads(line)
                except ValueError:
                    continue
                if isinstance(reply, dict) and reply.get("id") == call_id:
                    break
        except TimeoutError:
            self._end()
            return CodeResult(
                error=f"stopped: the code ran longer than {self.limits.wall_s:g} seconds. The "
                "session was ended; variables are gone.",
                notes=notes,
                killed=True,
            )
        except (BrokenPipeError, ConnectionError, EOFError):
            reason = self._death_reason()
            self._end()
            return CodeResult(
                error=f"stopped: {reason} The session was ended; variables are gone.", notes=notes, killed=True
            )
        result = _result_of(reply, self.limits, notes)
        if result is None:
            self._end()
            return CodeResult(
                error="stopped: the session sent something that is not an answer (did the code "
                "write to the tool's own output channel?). It was ended.",
                notes=notes,
                killed=True,
            )
        return result

    def kill(self) -> None:
        """Kill the session's processes: its process group, and every process in its cgroup or, without one,
        of its own uid (children that left the group with ``setsid``)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            if self._cgroup is not None and self._cgroup.path is not None:
                self._cgroup.kill_members()
            elif self.uid is not None:
                _kill_uid(self.uid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        if self._cgroup is not None:
            self._cgroup.remove()
            self._cgroup = None

    def close(self) -> None:
        """End the session and remove its files, and those its uid left in the shared temporary folders."""
        self.kill()
        if self.uid is not None:
            _remove_files_of(self.uid)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> PythonSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------------
    def _end(self) -> None:
        """Kill a session a call broke; the next call starts a new one and says so."""
        self.kill()
        self._lost = True

    def _reset(self) -> None:
        self.kill()
        self._lost = False
        self.restarts += 1
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
        if self.uid is not None:
            _remove_files_of(self.uid)

    def _send(self, line: str) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(line.encode("utf-8") + b"\n")
        self._proc.stdin.flush()

    def _read_line(self, timeout: float) -> bytes:
        assert self._proc is not None and self._proc.stdout is not None
        if timeout <= 0:
            raise TimeoutError
        deadline = time.monotonic() + timeout
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise EOFError
            self._buffer += chunk
            if len(self._buffer) > _MAX_REPLY_BYTES:
                raise EOFError
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _death_reason(self) -> str:
        assert self._proc is not None
        try:
            code = self._proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return "the session stopped answering."
        if code in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
            return f"the session used up its {self.limits.cpu_s} seconds of CPU time."
        if code in (-signal.SIGKILL, 137, -signal.SIGSEGV, 139):
            return f"the session was killed (out of memory: the limit is {self.limits.memory_mb} MB?)."
        return f"the Python process exited (status {code}); the code may have ended it."


def _own_processes() -> int:
    uid = os.getuid()
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += 1
    return count


class SessionPool:
    """Keeps ``size`` fresh sessions started in the background, so a trajectory's first call does not wait.

    Sessions are never reused: each one serves one trajectory and is closed after it.
    """

    def __init__(self, size: int, limits: SandboxLimits | None = None, isolation: str = "auto", *, warn: bool = True):
        self.size = size
        self.limits = limits or SandboxLimits()
        self.isolation = resolve_isolation(isolation, warn=warn)
        self._ready: queue.Queue[PythonSession] = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        for _ in range(size):
            self._refill()

    def _refill(self) -> None:
        def start() -> None:
            session = PythonSession(self.limits, self.isolation, warn=False)
            try:
                session.start()
            except OSError:
                session.close()
                return
            if self._closed:
                session.close()
            else:
                self._ready.put(session)

        threading.Thread(target=start, daemon=True).start()

    def acquire(self) -> PythonSession:
        """A started session (from the pool if one is ready, else a new one); the pool starts a replacement."""
        try:
            session = self._ready.get_nowait()
        except queue.Empty:
            session = PythonSession(self.limits, self.isolation, warn=False)
        if self.size:
            self._refill()
        return session

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._ready.get_nowait().close()
            except queue.Empty:
                return
