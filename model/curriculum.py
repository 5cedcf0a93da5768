"""The facts curriculum of the shipped checkpoints, for several variants at once in a budget.

    python -m model.curriculum --budget-s 420 --out /tmp/curriculum n4:100 n1:100 full:100

A variant is ``kind:seed`` (kinds in ``KINDS``). Each runs its stages one after another as
``python -m model.cli train ...`` (the same command as ``somna train``, so every stage's
COMMAND.txt replays it), and all variants run side by side, one process each: a small
model's training step is mostly kernel-launch overhead, so one GPU (or many cores) serves
several processes at once. Every stage gets its share of the time left when it starts and
ends on time (``--max-minutes``: the LR schedule follows the clock), so ``--steps`` is only
a ceiling. The final stage's directory is ``OUT/facts-<kind>-s<seed>``; its ``train.log``
holds the step lines of every stage, and ``OUT/summary.json`` the steps, seconds per step
and held-out accuracy of each stage. ``--resume-from DIR`` runs only the final stage once
more, from ``DIR/facts-<kind>-s<seed>`` (a second lease continuing the first's models).

Stages (the order of the CPU-trained checkpoints in model/checkpoints, compressed):
chains of one fact from a slow-decay init, then two-fact chains, then two-fact chains at
random offsets in their chunk. The full-attention baseline skips the one-fact stage.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COMMON = [
    "--task", "facts", "--fact-chunks", "2", "--question-chunks", "1", "--lm-weight", "0.3",
    "--eval-every", "0", "--threads", "1",
]  # fmt: skip
SLEEP_STAGES = [
    (0.25, ["--chain", "1", "--slow-decay-init"]),
    (0.45, ["--chain", "2"]),
    (0.30, ["--chain", "2", "--fact-offset", "random"]),
]
KINDS: dict[str, tuple[list[str], list[tuple[float, list[str]]]]] = {
    "n1": (["--passes", "1"], SLEEP_STAGES),
    "n2": (["--passes", "2"], SLEEP_STAGES),
    "n4": (["--passes", "4"], SLEEP_STAGES),
    "full": (
        ["--passes", "1", "--memory", "full"],
        [(0.65, ["--chain", "2"]), (0.35, ["--chain", "2", "--fact-offset", "random"])],
    ),
}
STAGE_OVERHEAD_S = 12.0  # start-up, final evaluation and save of one stage process
STEP_LINE = re.compile(r"step \d+ loss [0-9.]+")


@dataclass
class Variant:
    kind: str
    seed: int

    @property
    def name(self) -> str:
        return f"facts-{self.kind}-s{self.seed}"


def parse_variant(text: str) -> Variant:
    kind, _, seed = text.partition(":")
    if kind not in KINDS or not seed.isdigit():
        raise argparse.ArgumentTypeError(f"want KIND:SEED with KIND in {sorted(KINDS)}: {text!r}")
    return Variant(kind, int(seed))


def run_variant(
    v: Variant,
    out: Path,
    deadline: float,
    batch_size: int,
    steps: int,
    record: dict[str, Any],
    resume_from: Path | None = None,
    seed_offset: int = 0,
) -> None:
    """Run ``v``'s stages in order; stop early (and say so) when a stage fails."""
    extra, stages = KINDS[v.kind]
    logs = out / "logs"
    prev: Path | None = None
    if resume_from is not None:
        stages, prev = stages[-1:], resume_from / v.name
    lines: list[str] = []
    record["stages"] = []
    for i, (share, args) in enumerate(stages):
        left = deadline - time.time()
        shares_left = sum(s for s, _ in stages[i:])
        budget_s = left * share / shares_left - STAGE_OVERHEAD_S
        if budget_s < 10:
            record["error"] = f"no time left for stage {i + 1}"
            return
        last = i == len(stages) - 1
        stage_out = out / v.name if last else out / f"{v.name}-stage{i + 1}"
        cmd = [
            sys.executable, "-m", "model.cli", "train", *COMMON, *extra, *args,
            "--seed", str(v.seed + 10 * i + seed_offset + (1000 if resume_from else 0)), "--batch-size", str(batch_size),
            "--steps", str(steps), "--max-minutes", f"{budget_s / 60:.3f}",
            "--eval-examples", "64" if last else "16", "--out", str(stage_out),
        ]  # fmt: skip
        if prev is not None:
            cmd += ["--init-from", str(prev)]
        log = logs / f"{v.name}-stage{i + 1}.log"
        started = time.time()
        with log.open("w") as fh:
            rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT)
        text = log.read_text(errors="replace").replace("\r", "\n")
        lines += [m.group(0) for m in STEP_LINE.finditer(text)]
        stage: dict[str, Any] = {"args": args, "rc": rc, "wall_s": round(time.time() - started, 1)}
        metrics_path = stage_out / "metrics.json"
        if rc != 0 or not metrics_path.is_file():
            stage["tail"] = text[-1500:]
            record["stages"].append(stage)
            record["error"] = f"stage {i + 1} exited {rc}"
            return
        m = json.loads(metrics_path.read_text())
        stage.update(
            steps=m["steps"],
            train_s=m["train_seconds"],
            s_per_step=round(m["train_seconds"] / max(1, m["steps"]), 4),
            final_loss=m["final_loss"],
            device=m["device"],
            accuracy={k: round(a["mean"], 3) for k, a in m["eval"]["accuracy"].items()},
        )
        record["stages"].append(stage)
        prev = stage_out
    (out / v.name / "train.log").write_text("\n".join(lines) + "\n")
    record["checkpoint"] = str(out / v.name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="+", type=parse_variant, help="KIND:SEED, e.g. n4:100")
    ap.add_argument("--budget-s", type=float, required=True, help="wall-clock for all stages")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=100_000, help="ceiling per stage")
    ap.add_argument("--resume-from", type=Path, help="run the last stage again, from DIR/NAME")
    ap.add_argument("--seed-offset", type=int, default=0, help="added to every stage's data seed")
    a = ap.parse_args(argv)
    (a.out / "logs").mkdir(parents=True, exist_ok=True)
    deadline = time.time() + a.budget_s
    records: dict[str, dict[str, Any]] = {
        v.name: {"kind": v.kind, "seed": v.seed} for v in a.variants
    }
    # One torch thread per process: the processes, not the threads, share the cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    threads = [
        threading.Thread(
            target=run_variant,
            args=(
                v,
                a.out,
                deadline,
                a.batch_size,
                a.steps,
                records[v.name],
                a.resume_from,
                a.seed_offset,
            ),
            name=v.name,
        )
        for v in a.variants
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    summary = {"budget_s": a.budget_s, "batch_size": a.batch_size, "variants": records}
    (a.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    return 0 if all("error" not in r for r in records.values()) else 1


def print_summary(summary: dict[str, Any]) -> None:
    print(
        f"{'variant':22} {'steps':>14} {'s/step':>16} {'loss':>6} {'all':>6} {'1-hop':>6} {'2-hop':>6}"
    )
    for name, r in summary["variants"].items():
        stages = r.get("stages", [])
        steps = "+".join(str(s.get("steps", "-")) for s in stages)
        sps = "/".join(f"{s['s_per_step']:.3f}" for s in stages if "s_per_step" in s)
        acc = stages[-1].get("accuracy", {}) if stages else {}
        loss = stages[-1].get("final_loss") if stages else None
        cells = [f"{acc[k]:.3f}" if k in acc else "-" for k in ("all", "hops=1", "hops=2")]
        loss_s = f"{loss:.3f}" if isinstance(loss, float) else "-"
        print(f"{name:22} {steps:>14} {sps:>16} {loss_s:>6} {' '.join(f'{c:>6}' for c in cells)}")
        if "error" in r:
            print(f"  error: {r['error']}")


if __name__ == "__main__":
    sys.exit(main())
