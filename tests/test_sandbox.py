"""The code tool's sandbox against attacks, and the scripted trajectories of the code tool.

Every attack in ``ATTACKS`` runs in a fresh session of each isolation, ``bwrap`` and ``process``. An attack is
contained when nothing reached the host or the model that should not have (a secret, a connection, a file, a
killed process: the evidence ``escape_signs`` looks for, including the word ESCAPED, which each attack prints
once its forbidden step has succeeded) and the model got the expected message; after each one a new session
must still work. ``NOT_CONTAINED`` lists the attacks an isolation is known not to contain: for those the test
asserts that the attack does succeed, so the table in the README (made by ``bench/sandbox_attacks.py`` and
checked against this file by ``test_readme_table_matches_the_suite``) is measured, not written by hand.
Process isolation is measured as root, as CI runs (it then drops to a uid of its own). Without bubblewrap the
bwrap tests are skipped unless ``GLIMPSE_REQUIRE_SANDBOX=1`` (set by CI) makes that a failure.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from glimpse.agent import AgentLoop
from glimpse.models.scripted import ScriptedBackend
from glimpse.tools.sandbox import PythonSession, SandboxLimits, bwrap_available
from glimpse.trajectory import Sample, load_jsonl, render_image, save_jsonl

pytestmark = pytest.mark.slow

SECRET = "sk-glimpse-test-secret-7c1f"
MODES = ("bwrap", "process")
README = Path(__file__).resolve().parents[1] / "README.md"


def require_bwrap() -> None:
    if bwrap_available():
        return
    if os.environ.get("GLIMPSE_REQUIRE_SANDBOX") == "1":
        pytest.fail("GLIMPSE_REQUIRE_SANDBOX=1 but bubblewrap cannot run (apt-get install bubblewrap)")
    pytest.skip("bubblewrap is not available (apt-get install bubblewrap); CI runs these tests")


def require(mode: str) -> None:
    if mode == "bwrap":
        require_bwrap()
    elif os.getuid() != 0:
        # Without root the worker keeps this user's uid: `os.kill(-1, 9)` would kill every process of the user.
        pytest.skip("process isolation is measured as root (as CI runs); as another user it contains less")


@pytest.fixture
def host(tmp_path, monkeypatch):
    """Things on the host an attack must not reach: a secret file, an API key, a listening TCP port."""
    secret_file = tmp_path / "credentials.txt"
    secret_file.write_text(SECRET)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    accepted: list[str] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
                accepted.append("connected")
                conn.close()
            except TimeoutError:
                continue
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    # A host process with the key on its command line, as `glimpse ask --api-key ...` would be.
    keyed = subprocess.Popen(["sh", "-c", "sleep 600; :", "glimpse", "--api-key", SECRET])
    token = uuid.uuid4().hex[:12]
    yield {
        "dir": tmp_path,
        "secret_file": secret_file,
        "port": server.getsockname()[1],
        "accepted": accepted,
        "token": token,
        "host_tmp_file": Path(f"/tmp/glimpse-attack-{token}"),
    }
    server.close()
    keyed.kill()
    keyed.wait()


def fresh_session_works(mode: str) -> bool:
    with PythonSession(SandboxLimits(wall_s=10), mode) as s:
        return s.run("print(6 * 7)").stdout.strip() == "42"


# 8 files of 50 MB: each under the file-size limit, together over the 256 MB of /scratch and /tmp.
FILL = "for i in range(8):\n    with open(f'FOLDER/fill-{{i}}', 'wb') as f: f.write(b'x' * 50 * 1024**2)\n" + (
    "print('ESCAPED: 400 MB written')"
)

# name: (code, a pattern the model's answer matches when the attack is contained; None: only the evidence counts)
ATTACKS: dict[str, tuple[str, str | None]] = {
    # network
    "connect to the host": (
        "import socket; socket.create_connection(('127.0.0.1', {port}), timeout=3); print('ESCAPED')",
        "Connection refused",
    ),  # the sandbox's own loopback: nothing listens there
    "connect outside": (
        "import socket, errno\ntry:\n    socket.create_connection(('1.1.1.1', 80), timeout=3)\n"
        "    print('ESCAPED: connected')\nexcept OSError as e:\n"
        "    print('unreachable' if e.errno == errno.ENETUNREACH else f'ESCAPED: the host network was used: {{e}}')",
        "unreachable",
    ),
    "resolve a name": (
        "import socket\ntry:\n    socket.getaddrinfo('example.com', 80)\n    print('ESCAPED: resolved')\n"
        "except socket.gaierror as e:\n"
        "    print('ESCAPED: a name server answered' if e.errno == socket.EAI_NONAME else e)",
        "name resolution",
    ),
    "fetch a URL": (
        "import urllib.request, urllib.error\ntry:\n    urllib.request.urlopen('http://1.1.1.1', timeout=3)\n"
        "    print('ESCAPED: fetched')\nexcept urllib.error.HTTPError:\n    print('ESCAPED: a server answered')\n"
        "except urllib.error.URLError as e:\n    print(e.reason)",
        "unreachable",
    ),
    "list the network interfaces": (
        "import socket; names = [n for _, n in socket.if_nameindex()]\n"
        "print(f'ESCAPED: {{names}}' if set(names) - {{'lo'}} else names)",
        r"\['lo'\]",
    ),
    "raw socket": ("import socket; socket.socket(socket.AF_PACKET, socket.SOCK_RAW)", "Operation not permitted"),
    # files
    "read a host file": ("print(open({secret_file!r}).read())", "No such file|Permission denied"),
    "read a world-readable host file": ("print('ESCAPED', open('/etc/passwd').read()[:40])", "No such file"),
    "list the host folder": ("import os; print(os.listdir({dir!r}))", "No such file|Permission denied"),
    "read the home folder": (
        "import os; print(os.listdir(os.path.expanduser('~root')))",
        "No such file|Permission denied",
    ),
    "read /etc/shadow": ("print(open('/etc/shadow').read())", "No such file|Permission denied"),
    "write to a host folder": ("open({dir!r} + '/pwned', 'w').write('x')", "No such file|Permission denied"),
    "write into the system": ("open('/usr/lib/pwned', 'w').write('x')", "Read-only file system|Permission denied"),
    "write to the root folder": (
        "open('/pwned', 'w').write('x'); print('ESCAPED')",
        "Read-only file system|Permission denied",
    ),
    "write to /etc": (
        "import os; os.makedirs('/etc/pwned', exist_ok=True); print('ESCAPED')",
        "Read-only file system|Permission denied",
    ),
    "fill the root folder": (FILL.replace("FOLDER", ""), "Read-only file system|Permission denied"),
    "fill the scratch space": (FILL.replace("FOLDER", "."), "No space left on device"),
    "fill /dev/shm": (FILL.replace("FOLDER", "/dev/shm"), "No space left on device"),
    "fill the disk": ("f = open('big', 'wb')\nfor _ in range(2000): f.write(b'x' * 1024 * 1024)", "File too large"),
    "leave a file in the host's /tmp": ("open('/tmp/glimpse-attack-{token}', 'w').write('x'); print('written')", None),
    "delete the images": (
        "import os; os.remove('/images/original_image.png' if os.path.isdir('/images') else "
        "os.environ['GLIMPSE_IMAGES'] + '/original_image.png')",
        "Read-only file system|Permission denied",
    ),
    "symlink out": (
        "import os; os.symlink('/etc/passwd', 'h'); print('ESCAPED', open('h').read()[:40])",
        "No such file",
    ),
    "escape through /proc": ("print(open('/proc/1/root' + {secret_file!r}).read())", "No such file|Permission denied"),
    "read a device": ("print(open('/dev/mem', 'rb').read(16))", "No such file|Permission denied"),
    # environment and credentials
    "read the environment": ("import os; print(dict(os.environ))", None),
    "read the parent's environment": ("import os; print(open(f'/proc/{{os.getppid()}}/environ').read())", None),
    "search /proc for the key": (
        "import os, glob\nfor p in glob.glob('/proc/*/environ'):\n    try: print(open(p).read())\n"
        "    except OSError: pass",
        None,
    ),
    "read other processes' command lines": (
        "import glob\nfor p in glob.glob('/proc/[0-9]*/cmdline'):\n    try: line = open(p, 'rb').read()\n"
        "    except OSError: continue\n    if b'--api-key' in line: print(line.replace(bytes(1), b' ').decode())",
        None,
    ),
    # processes and signals
    "fork bomb": ("import os\nwhile True: os.fork()", "Resource temporarily unavailable"),
    "fork bomb that ignores errors": (
        "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass",
        "stopped",
    ),
    "thread bomb": (
        "import threading, time\nfor _ in range(100000):\n    threading.Thread(target=time.sleep, args=(60,)).start()",
        "Error",
    ),
    "subprocess bomb": ("import subprocess\nwhile True: subprocess.Popen(['sleep', '60'])", "Error"),
    "kill the parent": (
        "import os\ntry: os.kill(os.getppid(), 9)\nexcept OSError as e: print(e)\nprint('still here')",
        "still here",
    ),
    "kill the parent's process group": (
        "import os\ntry: os.killpg(os.getpgid(os.getppid()), 9)\nexcept OSError as e: print(e)\nprint('still here')",
        "still here",
    ),
    # kill(-1) succeeds when any process was tried, even if every one refused (process isolation)
    "kill every process": ("import os; os.kill(-1, 9)", "No such process|printed nothing"),
    "signal a host process": ("import os; os.kill({pid}, 9)", "No such process|Operation not permitted"),
    "ignore termination": ("import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: pass", "stopped"),
    # resources
    "infinite loop": ("while True: pass", "longer than"),
    "sleep forever": ("import time; time.sleep(10**6)", "longer than"),
    "memory bomb": ("x = bytearray(50 * 1024**3)", "MemoryError"),
    "growing memory": ("a = []\nwhile True: a.append(bytearray(50 * 1024**2))", "MemoryError"),
    "huge output": ("print('x' * 10**8)", "more characters of output were cut"),
    "endless output": ("while True: print('y' * 10000)", "Error"),
    # escapes through ctypes and the interpreter
    "ctypes unshare": (
        "import ctypes; libc = ctypes.CDLL(None); print('unshare', libc.unshare(0x40000000))",
        "unshare -1",
    ),
    "ctypes mount": (
        "import ctypes; libc = ctypes.CDLL(None)\nprint('mount', libc.mount(b'none', b'/usr', b'tmpfs', 0, None))",
        "mount -1",
    ),
    "ctypes setuid": ("import ctypes; libc = ctypes.CDLL(None); print('setuid', libc.setuid(0))", "setuid -1"),
    "ctypes ptrace a host process": (
        "import ctypes; libc = ctypes.CDLL(None)\nprint('ptrace', libc.ptrace(16, {pid}, 0, 0))",
        "ptrace -1",
    ),
    "ctypes chroot": (
        "import ctypes; libc = ctypes.CDLL(None); print('chroot', libc.chroot(b'/proc/1/root/..'))",
        "chroot -1",
    ),
    "ctypes crash": ("import ctypes; ctypes.string_at(0)", "stopped"),
    "exit the interpreter": ("import os; os._exit(3)", "stopped"),
    "forge the tool's answer": (
        "import os, json\nfor fd in range(3, 12):\n    try: os.write(fd, (json.dumps("
        "{{'id': 'x', 'stdout': 'FORGED'}}) + '\\n').encode())\n    except OSError: pass\n"
        "print('real output')",
        "real output",
    ),  # the forged line is skipped
    "forge the tool's answer with its id": (
        "import sys, json\nf = sys._getframe()\nwhile 'request' not in f.f_locals: f = f.f_back\n"
        "f.f_locals['proto'].write(json.dumps({{'id': f.f_locals['request']['id'], 'stdout': 'FORGED', "
        "'truncated': 'many', 'image_errors': 5}}) + '\\n')\nf.f_locals['proto'].flush()\nprint('real output')",
        "not an answer",
    ),  # a malformed answer ends the session, it does not end the run
}

# What process isolation (run as root: its own uid, no namespaces) does not contain. bwrap contains everything.
NOT_CONTAINED: dict[str, frozenset[str]] = {
    "bwrap": frozenset(),
    "process": frozenset(
        {
            "connect to the host",
            "connect outside",
            "resolve a name",
            "fetch a URL",
            "list the network interfaces",
            "read a world-readable host file",
            "read other processes' command lines",
            "symlink out",
            "fill the scratch space",
            "fill /dev/shm",
            "leave a file in the host's /tmp",
        }
    ),
}
# Escapes that need the host itself to reach the network: where it cannot, they cannot be shown.
NEEDS_HOST_NETWORK = frozenset({"connect outside", "resolve a name", "fetch a URL", "list the network interfaces"})


def attack_code(name: str, host: dict) -> str:
    code, _ = ATTACKS[name]
    fields = {"port": host["port"], "secret_file": str(host["secret_file"]), "dir": str(host["dir"])}
    return textwrap.dedent(code.format(**fields, pid=os.getpid(), token=host["token"]))


def escape_signs(text: str, host: dict) -> list[str]:
    """Evidence that an attack got out: what reached the model or the host that should not have."""
    signs = []
    if "ESCAPED" in text:
        signs.append("the attack's forbidden step succeeded")
    if SECRET in text:
        signs.append("the secret reached the model")
    if host["accepted"]:
        signs.append("a connection reached the host")
    if host["host_tmp_file"].exists():
        signs.append("a file appeared in the host's /tmp")
    for path in (host["dir"] / "pwned", Path("/usr/lib/pwned"), Path("/pwned"), Path("/etc/pwned")):
        if path.exists():
            signs.append(f"{path} was written")
    if host["secret_file"].read_text() != SECRET:
        signs.append("a host file was changed")
    return signs


def run_attack(name: str, mode: str, host: dict) -> tuple[str, list[str]]:
    """Run one attack in a fresh session; the text the model reads and the evidence, taken before the session
    is closed (closing a process-mode session removes what its uid left in the shared folders)."""
    from glimpse.tools.python import describe

    limits = SandboxLimits(wall_s=8, cpu_s=20, memory_mb=1024, processes=32)
    with PythonSession(limits, mode) as s:
        (s.image_dir / "original_image.png").write_bytes(b"not really a png")
        result = s.run(attack_code(name, host))
        text = describe(result, [])
        signs = escape_signs(text, host)
        if name == "forge the tool's answer":
            assert result.stdout.rstrip().endswith("real output")  # the answer came from the worker
    assert not host["host_tmp_file"].exists(), "a closed session left a file in the host's /tmp"
    return text, signs


def host_can(code: str) -> bool:
    """Whether the attack's forbidden step succeeds for an unsandboxed process on this host."""
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60)
    return "ESCAPED" in done.stdout


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack(name, mode, host):
    require(mode)
    text, signs = run_attack(name, mode, host)
    if name in NOT_CONTAINED[mode]:
        if not signs and name in NEEDS_HOST_NETWORK and not host_can(attack_code(name, host)):
            pytest.skip("this host cannot do it either, so the escape cannot be shown here")
        assert signs, (
            f"{mode} now contains {name!r} ({text[:300]!r}): take it out of NOT_CONTAINED and regenerate the "
            "README's table with bench/sandbox_attacks.py"
        )
    else:
        assert not signs, f"{name} escaped {mode}: {signs}; the model read {text[:500]!r}"
        _, expected = ATTACKS[name]
        if expected is not None:
            assert re.search(expected, text), f"{name}: unexpected answer {text[:500]!r}"
    assert fresh_session_works(mode), f"{name}: a new session no longer works"


def attack_table() -> list[str]:
    """The README's table rows, from ``ATTACKS`` and ``NOT_CONTAINED`` (which ``test_attack`` measures)."""
    rows = ["| attack | bwrap | process (as root) |", "|---|---|---|"]
    for name in ATTACKS:
        cells = ["**not contained**" if name in NOT_CONTAINED[mode] else "contained" for mode in MODES]
        rows.append(f"| {name} | {' | '.join(cells)} |")
    return rows


@pytest.mark.parametrize("mode", MODES)
def test_a_forged_answer_is_held_to_the_limits(mode):
    """Code that writes the worker's answer itself (with the right id) still gets no more output, images or
    pixels than the limits allow."""
    require(mode)
    code = textwrap.dedent(
        """
        import sys, json, io, base64
        from PIL import Image
        def png(w, h):
            out = io.BytesIO(); Image.new('RGB', (w, h)).save(out, 'PNG')
            return base64.b64encode(out.getvalue()).decode()
        f = sys._getframe()
        while 'request' not in f.f_locals: f = f.f_back
        answer = {'id': f.f_locals['request']['id'], 'stdout': 'x' * 50_000, 'error': 'y' * 50_000,
                  'images': [png(4000, 3000)] + [png(8, 8)] * 9, 'image_errors': ['z' * 5000] * 9}
        f.f_locals['proto'].write(json.dumps(answer) + '\\n'); f.f_locals['proto'].flush()
        """
    )
    from glimpse.tools.python import PythonTool

    tool = PythonTool(SandboxLimits(wall_s=20, output_chars=1000, images_per_call=4, image_pixels=1_000_000), mode)
    session = tool.session()
    try:
        result = tool.run(code, session, {})
    finally:
        session.close()
    assert len(result.images) == 3  # 4 kept of 10, and the first is over the pixel limit
    assert "4000×3000 is over the limit of 1,000,000 pixels" in result.text
    assert "6 more were dropped" in result.text
    assert len(result.text) < 1000 + 1000 + 4 * 500 + 1000  # output, error and notes each cut


def test_readme_table_matches_the_suite():
    text = README.read_text()
    rows = attack_table()
    assert rows[0] in text, "the README has no attack table; paste bench/sandbox_attacks.py's output"
    published = text[text.index(rows[0]) :].splitlines()[: len(rows)]
    assert published == rows, "the README's attack table differs from the suite: run bench/sandbox_attacks.py"


def test_cpu_time_limit():
    require_bwrap()
    with PythonSession(SandboxLimits(wall_s=30, cpu_s=2), "bwrap") as s:
        result = s.run("while True: pass")
    assert result.killed and "CPU time" in result.error


@pytest.mark.parametrize("mode", MODES)
def test_sessions_do_not_see_each_other(mode):
    require(mode)
    with PythonSession(SandboxLimits(), mode) as a, PythonSession(SandboxLimits(), mode) as b:
        a.run("import os; open('mine.txt', 'w').write('A'); secret = 'only in a'; where = os.getcwd()")
        where = a.run("print(where)").stdout.strip()
        assert re.search("No such file|Permission denied", b.run(f"print(open({where!r} + '/mine.txt').read())").error)
        assert "NameError" in (b.run("secret").error or "")
        assert a.run("secret").stdout.strip() == "'only in a'"
        if mode == "process":  # different uids: neither can signal the other
            pid_a = int(a.run("import os; print(os.getpid())").stdout)
            assert "Operation not permitted" in (b.run(f"import os; os.kill({pid_a}, 9)").error or "")


@pytest.mark.parametrize("mode", MODES)
def test_processes_are_gone_after_close(mode):
    require(mode)
    with PythonSession(SandboxLimits(wall_s=5), mode) as s:
        out = s.run("import subprocess; p = subprocess.Popen(['sleep', '300'], start_new_session=True); print(p.pid)")
        pid, folder = s._proc.pid, s.folder
        child = int(out.stdout) if mode == "process" else None  # bwrap's pids are its namespace's own
    assert s._proc is None and not folder.exists()
    for gone in (pid, child):
        if gone is not None and Path(f"/proc/{gone}").exists():
            assert "zombie" in Path(f"/proc/{gone}/status").read_text()


@pytest.mark.parametrize("mode", MODES)
def test_a_session_outlives_the_thread_that_started_it(mode):
    """bubblewrap's --die-with-parent follows the starting thread: the pool's threads and asyncio's executor
    threads come and go, the sessions they start must not."""
    require(mode)
    from glimpse.tools.sandbox import SessionPool

    with PythonSession(SandboxLimits(wall_s=10), mode) as s:
        starter = threading.Thread(target=s.run, args=("x = 5",))
        starter.start()
        starter.join()
        time.sleep(0.5)
        result = s.run("print(x)")
        assert result.stdout.strip() == "5" and not result.notes, result
    pool = SessionPool(2, SandboxLimits(wall_s=10), mode)
    try:
        deadline = time.monotonic() + 30
        while pool._ready.qsize() < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        session = pool.acquire()
        result = session.run("print(6 * 7)")
        session.close()
        assert result.stdout.strip() == "42" and not result.notes, "a pooled session was dead when taken"
    finally:
        pool.close()


def test_attack_count():
    """The suite's size, for the record: every attack above is a separate test in each isolation."""
    assert len(ATTACKS) == 52


# --------------------------------------------------------------------------------------- scripted trajectories
EDGES_CODE = """\
from itertools import product
# A 2x2 grid of unit squares has 12 unit edges: horizontal h[row][col] (3 rows of 2), vertical v[row][col] (2 of 3).
count = 0
for bits in product((0, 1), repeat=12):
    h = [bits[0:2], bits[2:4], bits[4:6]]
    v = [bits[6:9], bits[9:12]]
    if all(h[r][c] + h[r + 1][c] + v[r][c] + v[r][c + 1] == 2 for r in range(2) for c in range(2)):
        count += 1
print(count)"""


@pytest.mark.parametrize("protocol", ["tags", "tools"])
def test_scripted_trajectory_solves_the_82_colourings(make_image, protocol):
    require_bwrap()
    if protocol == "tags":
        script = [
            f"<think>Brute force all 2^12 colourings.</think><python>\n{EDGES_CODE}\n</python>",
            "<think>The code counted 82.</think><answer>82</answer>",
        ]
    else:
        script = [
            {"content": "", "tool_calls": [{"id": "c1", "name": "python", "arguments": {"code": EDGES_CODE}}]},
            {"content": "<answer>82</answer>"},
        ]
    backend = ScriptedBackend([script])
    loop = AgentLoop(backend, protocol=protocol, code=True, sandbox="bwrap")
    question = (
        "Colour each of the 12 unit edges of a 2x2 grid of squares red or blue so that every square has "
        "exactly two red sides. How many colourings are there?"
    )
    (traj,) = asyncio.run(loop.run(Sample(id="82", images=[str(make_image())], question=question, answer="82")))
    assert traj.answer == "82" and traj.stop_reason == "answer"
    assert traj.turns[0].kind == "code" and traj.turns[0].code_output == "Output:\n82"
    assert traj.metrics["code_calls"] == 1 and traj.metrics["code_errors"] == 0
    sent = backend.requests[1].messages
    assert "82" in sent[-1].text()
    if protocol == "tools":
        assert sent[-1].role == "tool" and sent[-1].tool_call_id == "c1"
    assert "python" in sent[0].text().lower() or backend.requests[0].params.tools[1]["function"]["name"] == "python"


def test_code_mistakes_are_observations_and_the_record_saves(make_image, tmp_path):
    """A one-pixel-thin image passed to show() and a traceback holding a lone surrogate are the model's business:
    the loop says so and goes on, and the trajectory can be written."""
    require_bwrap()
    script = [
        "<python>show(images['original_image'].crop((0, 0, 400, 1)))</python>",
        "<python>raise Exception('\\ud800 bad')</python>",
        "<answer>b</answer>",
    ]
    (traj,) = asyncio.run(
        AgentLoop(ScriptedBackend([script]), code=True, sandbox="bwrap").run(
            Sample(id="thin", images=[str(make_image())], question="Q?", answer="b")
        )
    )
    assert traj.stop_reason == "answer" and traj.answer == "b"
    assert "400×1 is too thin to show" in traj.turns[0].code_output and not traj.turns[0].made
    assert "\ufffd bad" in traj.turns[1].code_output
    save_jsonl([traj], tmp_path / "t.jsonl")
    assert load_jsonl(tmp_path / "t.jsonl")[0].turns[1].code_output == traj.turns[1].code_output


def test_scripted_trajectory_rotates_and_crops_through_code(tmp_path):
    require_bwrap()
    scene = Image.new("RGB", (800, 600), "white")
    ImageDraw.Draw(scene).rectangle((600, 60, 760, 140), fill=(200, 20, 20))
    path = tmp_path / "scene.png"
    scene.save(path)
    code = (
        "img = images['original_image']\nturned = img.rotate(90, expand=True)\n"
        "show(turned.crop((60, 40, 140, 200)))\nturned.size"
    )
    script = [
        f"<python>{code}</python>",
        '<grounding>{"bbox_2d": [0, 0, 1, 1], "source": "observation_1"}</grounding>',
        "<think>The crop is red.</think><answer>red</answer>",
    ]
    backend = ScriptedBackend([script])
    (traj,) = asyncio.run(
        AgentLoop(backend, code=True, sandbox="bwrap").run(
            Sample(id="rot", images=[str(path)], question="What colour is the box?")
        )
    )
    assert traj.answer == "red"
    code_turn = traj.turns[0]
    assert code_turn.code_output.startswith("Output:\n(600, 800)") and len(code_turn.made) == 1
    made = code_turn.made[0]
    assert (made.width, made.height) == (80, 160) and made.observation_index == 1
    # The code's image went to the model, and the record keeps it by path and hash.
    shown = backend.requests[1].messages[-1].images()
    assert len(shown) == 1
    pixels = render_image(traj, 1, full_resolution=True)
    assert pixels.size == (80, 160) and pixels.getpixel((40, 80)) == (200, 20, 20)
    # A code-made image cannot be zoomed into: the model is told so.
    assert traj.turns[1].error_kind == "made_source" and "made by your code" in traj.turns[1].error


def test_code_tool_off_means_no_python(make_image):
    backend = ScriptedBackend([["<python>print(1)</python>", "<answer>x</answer>"]])
    (traj,) = asyncio.run(AgentLoop(backend).run(Sample(id="x", images=[str(make_image())], question="?")))
    assert traj.turns[0].error_kind == "unknown_tool"
    assert "python" not in backend.requests[0].messages[0].text().lower()


def test_process_isolation_still_limits_resources():
    limits = SandboxLimits(wall_s=3, memory_mb=512, processes=16, file_mb=8, cpu_s=30)
    with PythonSession(limits, "process") as s:
        assert "MemoryError" in (s.run("x = bytearray(4 * 1024**3)").error or "")
        assert s.run("while True: pass").killed
        assert "OPENAI" not in s.run("import os; print(sorted(os.environ))").stdout
        got = s.run(
            "import os, resource\nprint([resource.getrlimit(getattr(resource, 'RLIMIT_' + n))[0] for n in "
            "('AS', 'NPROC', 'FSIZE', 'CPU')], os.getsid(0) == os.getpid(), os.getpgrp() == os.getpid())"
        ).stdout
        nproc = 16 if os.getuid() == 0 else None  # a non-root user's cap also counts its other processes
        mb = 1024 * 1024
        limits_seen = json.loads(got.split("]")[0] + "]")
        assert limits_seen[0] == 512 * mb and limits_seen[2] == 8 * mb and limits_seen[3] == 30
        assert nproc is None or limits_seen[1] == nproc
        assert got.split("]")[1].split() == ["True", "True"]  # its own session and process group


def test_process_isolation_drops_root(tmp_path):
    if os.getuid() != 0:
        pytest.skip("the uid drop happens only when glimpse runs as root")
    from glimpse.tools.sandbox import SESSION_UID_BASE

    with PythonSession(SandboxLimits(wall_s=10), "process") as s:
        ids = s.run("import os; print(os.getuid(), os.geteuid(), os.getgid(), os.getegid(), os.getgroups())")
        assert ids.stdout.split()[:4] == [str(s.uid)] * 4 and s.uid >= SESSION_UID_BASE
        assert ids.stdout.strip().endswith("[]")
        # NumPy and Pillow import even when the interpreter lives where the uid cannot reach (/root here).
        assert s.run("import numpy, PIL.Image; print(numpy.arange(4).sum())").stdout.strip() == "6"
        private = tmp_path / "private.txt"
        private.write_text(SECRET)
        private.chmod(0o600)
        assert "Permission denied" in (s.run(f"open({str(private)!r}).read()").error or "")


def test_process_isolation_as_root_of_a_small_user_namespace_is_a_clear_error():
    """Root of a rootless container has no uid 2,000,000,000 to give a session: say so before any code runs."""
    if shutil.which("unshare") is None or os.getuid() != 0:
        pytest.skip("needs util-linux's unshare, run as root")
    code = (
        "from glimpse.errors import ConfigError\nfrom glimpse.tools.sandbox import PythonSession\n"
        "try:\n    PythonSession(isolation='process', warn=False)\nexcept ConfigError as e:\n    print(e)"
    )
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", sys.executable, "-c", code], capture_output=True, text=True
    )
    if done.stderr.startswith("unshare:"):
        pytest.skip(f"no user namespaces here: {done.stderr.strip()}")
    assert "does not map those ids" in done.stdout, done.stderr


def test_process_isolation_warns_every_time_it_is_chosen(caplog, monkeypatch):
    import glimpse.tools.sandbox as sandbox
    from glimpse.tools.python import PythonTool

    caplog.set_level(logging.WARNING, logger="glimpse.tools.sandbox")
    sandbox.resolve_isolation("process")
    sandbox.resolve_isolation("process")
    assert [r.getMessage().count("\n") for r in caplog.records] == [0, 0]  # one line each time
    assert all("--sandbox process" in r.getMessage() for r in caplog.records)
    caplog.clear()
    tool = PythonTool(SandboxLimits(wall_s=10), "process")
    sessions = [tool.session(), tool.session()]
    for session in sessions:
        session.close()
    assert len(caplog.records) == 1, "a tool warns once, when it is made, not once per trajectory"
    caplog.clear()
    monkeypatch.setattr(sandbox, "bwrap_available", lambda: False)
    assert sandbox.resolve_isolation("auto") == "process"
    assert len(caplog.records) == 1 and "bubblewrap cannot run here" in caplog.records[0].getMessage()
    caplog.clear()
    monkeypatch.setattr(sandbox, "bwrap_available", lambda: True)
    assert sandbox.resolve_isolation("auto") == "bwrap" and not caplog.records


def test_bwrap_missing_is_a_clear_error(monkeypatch):
    import glimpse.tools.sandbox as sandbox

    monkeypatch.setattr(sandbox, "bwrap_available", lambda: False)
    from glimpse.errors import ConfigError

    with pytest.raises(ConfigError, match="apt-get install bubblewrap"):
        sandbox.resolve_isolation("bwrap")
    assert sandbox.resolve_isolation("auto") == "process"
    assert shutil.which("python3") is not None


ORPHAN = """
import json, sys, threading
from glimpse.tools.sandbox import PythonSession, SandboxLimits
sessions = [PythonSession(SandboxLimits(wall_s=600), mode) for mode in sys.argv[1:]]
for s in sessions:
    s.run("import subprocess; subprocess.Popen(['sleep', '600'], start_new_session=True)")
notes = [{"folder": str(s.folder), "uid": s.uid, "pid": s._proc.pid,
          "cgroup": str(s._cgroup.path) if s._cgroup.path else None} for s in sessions]
print(json.dumps(notes), flush=True)
for s in sessions:  # the workers are busy when this process is killed
    threading.Thread(target=s.run, args=("import time; time.sleep(600)",), daemon=True).start()
threading.Event().wait()
"""


def processes_of(uid: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                status = Path(entry.path, "status").read_text()
            except OSError:
                continue
            if f"\t{uid}\t" in status.split("Uid:")[1].split("\n")[0] + "\t" and "(zombie)" not in status:
                found.append(int(entry.name))
    return found


def test_nothing_is_left_after_the_parent_dies(monkeypatch):
    """A killed glimpse leaves no processes; its folders and cgroups go when the next one starts."""
    import glimpse.tools.sandbox as sandbox

    modes = [m for m in MODES if m != "bwrap" or bwrap_available()]
    if os.getuid() != 0:
        pytest.skip("measured as root, as CI runs")
    with PythonSession(SandboxLimits(wall_s=10), "process") as live:  # a live session must survive the cleanup
        live.run("x = 1")
        orphan = subprocess.Popen([sys.executable, "-c", ORPHAN, *modes], stdout=subprocess.PIPE, text=True)
        notes = json.loads(orphan.stdout.readline())
        time.sleep(0.5)
        os.kill(orphan.pid, signal.SIGKILL)
        orphan.wait()
        process_note = notes[modes.index("process")]
        deadline = time.monotonic() + 10
        while (processes_of(process_note["uid"]) or any(Path(f"/proc/{n['pid']}").exists() for n in notes)) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.1)
        assert processes_of(process_note["uid"]) == [], "the orphaned worker's processes are still running"
        assert all(Path(n["folder"]).exists() for n in notes)  # nobody has cleaned up yet
        monkeypatch.setattr(sandbox, "_cleaned_pid", None)
        assert sandbox.clean_stale_sessions() >= len(notes)
        for note in notes:
            assert not Path(note["folder"]).exists()
            assert note["cgroup"] is None or not Path(note["cgroup"]).exists()
        assert live.folder.exists() and live.run("print(x)").stdout.strip() == "1"


def test_site_packages_under_tmp_stay_visible(tmp_path, monkeypatch):
    """A virtual environment under /tmp (a fresh clone there) must not be hidden by the sandbox's own /tmp."""
    require_bwrap()
    import glimpse.tools.sandbox as sandbox

    packages = tmp_path / "site-packages"
    packages.mkdir()
    (packages / "glimpse_probe_module.py").write_text("VALUE = 7\n")
    real = sandbox._site_packages
    monkeypatch.setattr(sandbox, "_site_packages", lambda: [*real(), str(packages)])
    with PythonSession(SandboxLimits(wall_s=10), "bwrap") as s:
        assert s.run("import glimpse_probe_module; glimpse_probe_module.VALUE").stdout.strip() == "7"
