"""The code tool's sandbox against attacks, and the scripted trajectories of the code tool.

Every attack runs in its own bubblewrap session. After each one the test checks that the model got a clear
message, that nothing reached the host (files, network, environment, processes), that this test process is
alive, and that a new session still works. ``ATTACKS`` lists them; without bubblewrap they are skipped unless
``GLIMPSE_REQUIRE_SANDBOX=1`` (set by CI) makes that a failure.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import textwrap
import threading
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from glimpse.agent import AgentLoop
from glimpse.models.scripted import ScriptedBackend
from glimpse.tools.sandbox import PythonSession, SandboxLimits, bwrap_available
from glimpse.trajectory import Sample, render_image

pytestmark = pytest.mark.slow

SECRET = "sk-glimpse-test-secret-7c1f"


def require_bwrap() -> None:
    if bwrap_available():
        return
    if os.environ.get("GLIMPSE_REQUIRE_SANDBOX") == "1":
        pytest.fail("GLIMPSE_REQUIRE_SANDBOX=1 but bubblewrap cannot run (apt-get install bubblewrap)")
    pytest.skip("bubblewrap is not available (apt-get install bubblewrap); CI runs these tests")


@pytest.fixture
def host(tmp_path, monkeypatch):
    """Things on the host an attack must not reach: a secret file, an API key, a listening TCP port."""
    require_bwrap()
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
    yield {"dir": tmp_path, "secret_file": secret_file, "port": server.getsockname()[1], "accepted": accepted}
    server.close()


def attack(code: str, limits: SandboxLimits | None = None) -> tuple[str, object]:
    """Run one attack in a fresh session; return the text the model would read, and the raw result."""
    from glimpse.tools.python import describe

    with PythonSession(limits or SandboxLimits(wall_s=10, cpu_s=20, memory_mb=1024, processes=32), "bwrap") as s:
        result = s.run(textwrap.dedent(code))
        text = describe(result, [])
    return text, result


def fresh_session_works() -> bool:
    with PythonSession(SandboxLimits(wall_s=10), "bwrap") as s:
        return s.run("print(6 * 7)").stdout.strip() == "42"


ATTACKS = {
    # network
    "connect to the host": (
        "import socket; socket.create_connection(('127.0.0.1', {port}), timeout=3)",
        "Connection refused",
    ),  # the sandbox's own loopback: nothing listens there
    "connect outside": ("import socket; socket.create_connection(('1.1.1.1', 80), timeout=3)", "unreachable"),
    "resolve a name": ("import socket; socket.getaddrinfo('example.com', 80)", "Error"),
    "fetch a URL": ("import urllib.request; urllib.request.urlopen('http://example.com', timeout=3)", "Error"),
    "raw socket": ("import socket; socket.socket(socket.AF_PACKET, socket.SOCK_RAW)", "Error"),
    # files
    "read a host file": ("print(open({secret_file!r}).read())", "No such file"),
    "list the host folder": ("import os; print(os.listdir({dir!r}))", "No such file"),
    "read the home folder": ("import os; print(os.listdir(os.path.expanduser('~root')))", "Error"),
    "read /etc/shadow": ("print(open('/etc/shadow').read())", "No such file"),
    "write to a host folder": ("open({dir!r} + '/pwned', 'w').write('x')", "Error"),
    "write into the system": ("open('/usr/lib/pwned', 'w').write('x')", "Read-only file system"),
    "delete the images": ("import os; os.remove('/images/original_image.png')", "Read-only file system"),
    "symlink out": ("import os; os.symlink('/etc/hostname', 'h'); print(open('h').read())", "No such file"),
    "escape through /proc": ("print(open('/proc/1/root' + {secret_file!r}).read())", "No such file"),
    "fill the disk": ("f = open('/scratch/big', 'wb')\nfor _ in range(2000): f.write(b'x' * 1024 * 1024)", "Error"),
    "read a device": ("print(open('/dev/mem', 'rb').read(16))", "No such file"),
    # environment and credentials
    "read the environment": ("import os; print(dict(os.environ))", None),
    "read the parent's environment": ("print(open('/proc/1/environ').read())", None),
    "search /proc for the key": (
        "import os, glob\nfor p in glob.glob('/proc/*/environ'):\n    try: print(open(p).read())\n"
        "    except OSError: pass",
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
    "kill the parent": ("import os; os.kill(os.getppid(), 9); print('still here')", "still here"),
    "kill every process": ("import os; os.kill(-1, 9)", "No such process"),
    "signal a host process": ("import os; os.kill({pid}, 9)", "Error"),
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
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_is_contained(name, host):
    code, expected = ATTACKS[name]
    code = code.format(port=host["port"], secret_file=str(host["secret_file"]), dir=str(host["dir"]), pid=os.getpid())
    text, result = attack(code)
    assert SECRET not in text, f"{name}: the secret reached the model"
    if expected is not None:
        assert expected in text, f"{name}: unexpected answer {text[:500]!r}"
    assert host["accepted"] == [], f"{name}: a connection reached the host"
    assert not (host["dir"] / "pwned").exists()
    assert not Path("/usr/lib/pwned").exists()
    assert host["secret_file"].read_text() == SECRET
    if name == "forge the tool's answer":
        assert result.stdout.rstrip().endswith("real output")  # the answer came from the worker, not the forgery
    assert fresh_session_works(), f"{name}: a new session no longer works"


def test_cpu_time_limit():
    require_bwrap()
    text, result = attack("while True: pass", SandboxLimits(wall_s=30, cpu_s=2))
    assert result.killed and "CPU time" in text


def test_sessions_do_not_see_each_other():
    require_bwrap()
    with PythonSession(SandboxLimits(), "bwrap") as a, PythonSession(SandboxLimits(), "bwrap") as b:
        a.run("open('/scratch/mine.txt', 'w').write('A'); secret = 'only in a'")
        assert "No such file" in (b.run("print(open('/scratch/mine.txt').read())").error or "")
        assert "NameError" in (b.run("secret").error or "")
        assert a.run("secret").stdout.strip() == "'only in a'"


def test_processes_are_gone_after_close():
    require_bwrap()
    with PythonSession(SandboxLimits(wall_s=5), "bwrap") as s:
        s.run("import subprocess; p = subprocess.Popen(['sleep', '300'])")
        pid = s._proc.pid
    assert s._proc is None
    assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/status").read_text().find("zombie") >= 0


def test_attack_count():
    """The suite's size, for the record: every attack above is a separate test."""
    assert len(ATTACKS) == 41


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
    with PythonSession(SandboxLimits(wall_s=3, memory_mb=512), "process") as s:
        assert "MemoryError" in (s.run("x = bytearray(4 * 1024**3)").error or "")
        assert s.run("while True: pass").killed
        assert "OPENAI" not in s.run("import os; print(sorted(os.environ))").stdout


def test_bwrap_missing_is_a_clear_error(monkeypatch):
    import glimpse.tools.sandbox as sandbox

    monkeypatch.setattr(sandbox, "bwrap_available", lambda: False)
    from glimpse.errors import ConfigError

    with pytest.raises(ConfigError, match="apt-get install bubblewrap"):
        sandbox.resolve_isolation("bwrap")
    assert sandbox.resolve_isolation("auto") == "process"
    assert shutil.which("python3") is not None


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
