"""The code tool's attack table: every attack of ``tests/test_sandbox.py`` against each isolation, measured.

Runs the suite's ``test_attack`` cases with pytest and prints the table the README publishes (attack ×
{bwrap, process} → contained or not). A cell is what the suite declares (``NOT_CONTAINED``) only when its test
passed here, which means the outcome was observed; a failed case prints ``differs from the suite``, a skipped
one ``not measured here`` (no bubblewrap, not root, or an escape that needs a network this host lacks).
Run it as root, as CI does, so that process isolation is measured with its own uid.

    python bench/sandbox_attacks.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_sandbox import ATTACKS, MODES, NOT_CONTAINED, attack_table  # noqa: E402


def outcomes() -> dict[tuple[str, str], str]:
    """``(attack, mode)`` → ``passed``, ``failed`` or ``skipped``, from one pytest run of the attack cases."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        cmd = [sys.executable, "-m", "pytest", "tests/test_sandbox.py::test_attack", "-q"]
        cmd += ["-p", "no:cacheprovider", f"--junitxml={report}"]
        done = subprocess.run(cmd, cwd=ROOT, check=False, capture_output=True, text=True)
        print(done.stdout.strip().splitlines()[-1], file=sys.stderr)
        found = {}
        for case in ET.parse(report).iter("testcase"):
            name = case.get("name", "")
            if not name.startswith("test_attack["):
                continue
            attack, _, mode = name[len("test_attack[") : -1].rpartition("-")
            failed = case.find("failure") is not None or case.find("error") is not None
            found[attack, mode] = "failed" if failed else "skipped" if case.find("skipped") is not None else "passed"
    return found


def main() -> None:
    seen = outcomes()
    declared = attack_table()
    rows = declared[:2]
    for name, row in zip(ATTACKS, declared[2:], strict=True):
        cells = row.strip("|").split("|")[1:]
        for i, mode in enumerate(MODES):
            state = seen.get((name, mode), "skipped")
            if state == "failed":
                cells[i] = " differs from the suite "
            elif state == "skipped":
                cells[i] = " not measured here "
        rows.append(f"| {name} |{'|'.join(cells)}|")
    contained = {m: sum(name not in NOT_CONTAINED[m] for name in ATTACKS) for m in MODES}
    print("\n".join(rows))
    print()
    print(", ".join(f"{m}: {contained[m]} of {len(ATTACKS)} contained" for m in MODES))
    if rows != declared:
        sys.exit("some cells were not measured as the suite declares them: see above and the pytest output")


if __name__ == "__main__":
    main()
