"""Memory of a small RL run and a small evaluation with the built-in model, today's code against the old settings.

Each workload runs in a child process of its own (a fresh allocator), twice back to back: as the code is, and with
the changes of issue 16 undone in that child (``--old``):

* ``allocator``: Pillow's default 16 MiB blocks for image memory instead of ``glimpse.images``' 64 MiB (glibc
  raises its mmap threshold to the size of the last large block freed, up to 32 MiB, so later originals come
  from its heaps, whose freed holes stay resident), and no ``malloc_trim`` after each RL step;
* ``exif``: EXIF handling copies every decoded original (``ImageOps.exif_transpose`` without ``in_place``);
* ``caches``: RL's rollouts and update each keep their own 1 GiB cache of originals and never forget a streamed
  probe's; the evaluation keeps a 1 GiB cache even when no unit asks for an original twice.

Printed per workload and run: peak RSS (``ru_maxrss``), RSS after each RL step or every few evaluated probes, the
final RSS, the wall time, and the ratio old / new. The evaluation (greedy) must write the same trajectories both
ways: the bench checks it. RL samples at temperature 1 with requests batched as they arrive, so its trajectories
differ between any two runs; its figures compare like sizes, not like trajectories.

Usage: python bench/rl_memory.py [--model DIR] [--only rl,eval] [--steps 4] [--prompts 2] [--group 4]
       [--eval-n 40] [--concurrency 8] [--old allocator,exif,caches]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODEL = "src/glimpse/builtin/weights"
CHANGES = ("allocator", "exif", "caches")


def _rss_mb() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(x.split()[1]) // 1024 for x in f if x.startswith("VmRSS"))


def _undo(changes: set[str]) -> None:
    """Put the old behaviour back in this process, one change at a time."""
    import glimpse.eval.harness as harness
    import glimpse.images as images
    import glimpse.train.rl as rl

    if "allocator" in changes:
        images._BLOCKS_SET = True  # as if already done: Pillow keeps its default blocks
        rl.release_freed_memory = lambda: None
    if "exif" in changes:
        from PIL import ImageOps

        def copying(image: Any, in_place: bool = False) -> Any:
            copy = ImageOps.exif_transpose(image)  # the old call: a copy of the whole original
            image.im, image._size = copy.im, copy.size

        images.ImageOps = type("OldImageOps", (), {"exif_transpose": staticmethod(copying)})
    if "caches" in changes:
        harness.ImageCache = lambda max_bytes=0: images.ImageCache(images.DEFAULT_CACHE_BYTES)
        from glimpse.agent import AgentLoop

        rl.AgentLoop = lambda backend, options, image_cache=None: AgentLoop(backend, options)  # a cache of its own
        keep = rl.Prompts.done_with
        rl.Prompts.done_with = lambda self, samples, cache: keep(self, samples, images.ImageCache())


def child_rl(args: argparse.Namespace) -> dict[str, Any]:
    from glimpse.config import RLConfig
    from glimpse.train.rl import Trainer

    steps: list[int] = []
    with tempfile.TemporaryDirectory(prefix="glimpse-rl-memory-") as tmp:
        cfg = RLConfig(
            model=args.model,
            out=tmp,
            data="stream:hard+medium+easy",
            steps=args.steps,
            prompts=args.prompts,
            group=args.group,
            lr=1e-4,
            max_turns=3,
            threads=1,
            device="cpu",
            save_every=0,
            fresh=True,
        )
        trainer = Trainer(cfg)
        while trainer.step < cfg.steps:
            trainer.step += 1
            trainer.one_step()
            steps.append(_rss_mb())
    return {"marks": steps, "label": "after step"}


def child_eval(args: argparse.Namespace) -> dict[str, Any]:
    from glimpse.config import EvalConfig
    from glimpse.eval.harness import RESULTS, run_eval

    marks: list[int] = []
    every = max(1, args.eval_n // 5)
    with tempfile.TemporaryDirectory(prefix="glimpse-eval-memory-") as tmp:
        cfg = EvalConfig(
            data=f"probes:hard:{args.eval_n}",
            model=f"hf:{args.model}",
            out=tmp,
            temperature=0,
            max_turns="6",
            concurrency=args.concurrency,
            max_batch=args.concurrency,
            fresh=True,
        )
        asyncio.run(run_eval(cfg, on_progress=lambda i, n, t: marks.append(_rss_mb()) if i % every == 0 else None))
        rows = sorted((json.loads(x) for x in (Path(tmp) / RESULTS).read_text().splitlines()), key=lambda r: r["id"])
    replies = [(r["id"], [t["text"] for t in r["turns"]], r["answer"], r["image"]) for r in rows]
    digest = hashlib.sha256(json.dumps(replies).encode()).hexdigest()[:16]
    return {"marks": marks, "label": f"every {every} probes", "trajectories": digest}


def run_child(workload: str, old: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", workload, "--old", old, "--model", args.model]
    cmd += ["--steps", str(args.steps), "--prompts", str(args.prompts), "--group", str(args.group)]
    cmd += ["--eval-n", str(args.eval_n), "--concurrency", str(args.concurrency)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{workload} ({old or 'new'}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--only", default="rl,eval")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--eval-n", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--old", default=",".join(CHANGES), help="changes undone in the 'old' run")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    old = {x for x in args.old.split(",") if x}
    if old - set(CHANGES):
        raise SystemExit(f"--old takes {', '.join(CHANGES)}")
    if args.child:
        _undo(old)
        started = time.perf_counter()
        result = (child_rl if args.child == "rl" else child_eval)(args)
        result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        result["final_mb"], result["wall_s"] = _rss_mb(), round(time.perf_counter() - started, 1)
        print(json.dumps(result))
        return
    if "eval" in args.only:
        from glimpse.eval.datasets import load_dataset

        load_dataset(f"probes:hard:{args.eval_n}")  # made once, before either run is measured
    for workload in args.only.split(","):
        size = (
            f"{args.steps} steps × {args.prompts} prompts × {args.group} samples, cap 3, stream:hard+medium+easy"
            if workload == "rl"
            else f"{args.eval_n} hard probes, greedy, cap 6, concurrency {args.concurrency}"
        )
        print(f"\n{workload}: {size} ({args.model})")
        runs = {"new": run_child(workload, "", args), "old": run_child(workload, ",".join(sorted(old)), args)}
        for name, r in runs.items():
            label = "new" if name == "new" else f"old ({', '.join(sorted(old))})"
            print(
                f"  {label:<32} peak {r['peak_mb']:>5} MB  final {r['final_mb']:>5} MB  {r['wall_s']:>6.1f} s  "
                f"RSS {r['label']}: {' '.join(str(m) for m in r['marks'])}"
            )
        new, before = runs["new"], runs["old"]
        ratios = {key: before[key] / new[key] for key in ("peak_mb", "final_mb", "wall_s")}
        print("  old / new: " + ", ".join(f"{k.split('_')[0]} ×{v:.2f}" for k, v in ratios.items()))
        if workload == "eval":
            same = new["trajectories"] == before["trajectories"]
            print(f"  trajectories: {'identical' if same else 'DIFFERENT'} ({new['trajectories']})")


if __name__ == "__main__":
    main()
