"""`somna bench memory`: does sleep remember? Exact match after eviction, by hop and distance.

For each variant with a trained checkpoint under ``model/checkpoints/`` (variants without
one are reported as "not trained", never faked):

    window-only          attention within the chunk, no fast weights (pattern "A")
    hybrid N=1, 2, 4     trained end to end through N sleep passes per chunk
    full attention       one pass over the whole dialogue, keeps its whole KV cache
    N=1, deeper stack    compute-matched to N=4: consolidation FLOPs of the same order

it reports held-out-name exact-match accuracy by hop count and by distance (chunks since
the facts were evicted) as mean ± std over 3 evaluation seeds, the memory a scope holds
(measured from a real MemoryState at the end of a dialogue) and the FLOPs spent per
consolidated token (counted by torch's FlopCounterMode over one sleep). Evaluation is
teacher-forced, which equals greedy decoding of the answer (see model/train.py).
A table (rich), JSON and a PNG plot.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import machine

CHECKPOINTS = Path(__file__).resolve().parents[1] / "model" / "checkpoints"
EVAL_SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Variant:
    label: str
    checkpoint: str  # directory name under model/checkpoints/
    passes: int | None = None  # sleep passes at evaluation (None: as trained)
    group: str | None = None  # runs of one recipe from different training seeds


CPU_N1, CPU_N4 = "N=1, CPU recipe", "N=4, CPU recipe"
VARIANTS = [
    Variant("window only", "facts-window"),
    Variant("hybrid N=1", "facts-n1", group=CPU_N1),
    Variant("hybrid N=2", "facts-n2"),
    Variant("hybrid N=4", "facts-n4", group=CPU_N4),
    Variant("full attention", "facts-full"),
    Variant("N=1 deep (~N=4 FLOPs)", "facts-n1-deep"),
]
# Ablations: the N=4 model slept with fewer passes than it was trained with; its 4th
# training stage on the benchmark layout instead of random fact offsets (is the gain
# the layout or the steps?); N=1 and N=4 from a second training seed (a recipe's spread).
ABLATIONS = [
    Variant("N=4 model slept N=1", "facts-n4", 1),
    Variant("N=4 model slept N=2", "facts-n4", 2),
    Variant("N=4, 4th stage at chunk start", "facts-n4-control"),
    Variant("hybrid N=1, training seed 1", "facts-n1-seed1", group=CPU_N1),
    Variant("hybrid N=4, training seed 1", "facts-n4-seed1", group=CPU_N4),
    Variant("full attention + 3000 steps on long dialogues", "facts-full-long"),
]
# Training seeds of one recipe, trained side by side on a lent H100 (model/curriculum.py,
# batch 64, about 10 minutes of wall-clock in all; model/checkpoints/gpu-h100/README.md).
GPU_SEEDS = [
    *(Variant(f"N=4, H100, seed {s}", f"gpu-h100/facts-n4-s{s}", group="N=4, H100 recipe")
      for s in (100, 101, 102, 103)),
    *(Variant(f"N=1, H100, seed {s}", f"gpu-h100/facts-n1-s{s}", group="N=1, H100 recipe")
      for s in (100, 101, 102)),
    *(Variant(f"full attn, H100, seed {s}", f"gpu-h100/facts-full-s{s}",
              group="full attention, H100 recipe")
      for s in (100, 101)),
    # Two seeds that had not broken through, continued on this CPU (same last stage):
    # do more steps get them there?
    *(Variant(f"N=4, H100, seed {s} + 1,790 CPU steps", f"gpu-h100/facts-n4-s{s}-more")
      for s in (100, 103)),
]  # fmt: skip

# The paper's k-hop graph task (model/tasks/khop.py): 10 edges of a chain listed over two
# chunks, then "node+k?" asked after they left the window. 1-hop: fine-tuned on this CPU
# from the facts checkpoint of the same N. 1-2 hops: those continued on a lent H100 (full
# attention from its facts checkpoint). Commands: model/checkpoints/khop*/COMMAND.txt.
KHOP = [
    Variant("k-hop 1-hop: hybrid N=1", "khop-n1"),
    Variant("k-hop 1-hop: hybrid N=4", "khop-n4"),
    Variant("k-hop 1-2 hops: hybrid N=1, H100", "khop2-n1"),
    Variant("k-hop 1-2 hops: hybrid N=4, H100", "khop2-n4"),
    Variant("k-hop 1-2 hops: full attention, H100", "khop2-full"),
]

# The memory target is N=4 within 10 points of full attention at <= 1/8 of its memory per
# scope. Full attention's cache grows with the dialogue, so the ratio depends on length:
# these variants are also asked after LONG_GAP_CHUNKS chunks of chatter (704 tokens in
# all, 11x the attention window). Only facts-full-long trained on such lengths (0-8
# chatter chunks, ``--train-gap-chunks``); the others never saw a dialogue past 192 tokens.
LONG_GAP_CHUNKS = 8
LONG = [
    Variant("hybrid N=4", "facts-n4"),
    Variant("hybrid N=1", "facts-n1"),
    Variant("full attention", "facts-full"),
    Variant("full attention + long dialogues", "facts-full-long"),
    Variant("N=4, H100, seed 102", "gpu-h100/facts-n4-s102"),
    Variant("full attn, H100, seed 101", "gpu-h100/facts-full-s101"),
]


def run(quick: bool, json_path: Path | None) -> dict:
    import torch

    torch.set_num_threads(1)
    n = 16 if quick else 128
    started = time.time()
    rows = [evaluate_variant(v, n) for v in VARIANTS + ABLATIONS + GPU_SEEDS + KHOP]
    result = {
        "benchmark": "memory",
        "quick": quick,
        "examples_per_seed": 2 * n,  # the training layout plus a far layout (chatter gap)
        "eval_seeds": list(EVAL_SEEDS),
        "names": "held-out pool (disjoint from training names)",
        "machine": f"{machine.describe()}, torch threads 1",
        "variants": rows,
        "seed_spread": seed_spread(rows),
        "long": {"gap_chunks": LONG_GAP_CHUNKS, "variants": [long_row(v, n) for v in LONG]},
    }
    result["seconds"] = round(time.time() - started, 1)  # all of it, the long layout too
    _print_table(result)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    plot = (
        json_path.with_suffix(".png")
        if json_path is not None
        else Path(tempfile.gettempdir()) / "somna-bench-memory.png"
    )
    result["plot"] = str(plot_results(result, plot))
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"plot: {plot}")
    return result


def load_variant(v: Variant) -> tuple[Any, Any] | None:
    """(model, train config) of ``v``'s checkpoint, set up for evaluation; None if it has
    not been trained."""
    from model import HybridLM
    from model.train import load_train_config

    path = CHECKPOINTS / v.checkpoint
    if not (path / "config.json").is_file() or not (path / "train.json").is_file():
        return None
    lm = HybridLM.load(path)
    cfg = load_train_config(path)
    if v.passes is not None:
        cfg.passes = v.passes
    cfg.fact_offset = "start"  # one layout for every variant, whatever it was trained on
    return lm, cfg


def evaluate_variant(v: Variant, n: int) -> dict[str, Any]:
    from model.train import evaluate

    row: dict[str, Any] = {"variant": v.label, "checkpoint": v.checkpoint, "group": v.group}
    loaded = load_variant(v)
    if loaded is None:
        row["status"] = "not trained"
        return row
    lm, cfg = loaded
    trained = json.loads((CHECKPOINTS / v.checkpoint / "metrics.json").read_text())
    ev = evaluate(lm, cfg, seeds=EVAL_SEEDS, n=n)
    row.update(
        status="ok",
        memory_mode=cfg.memory,
        passes=cfg.passes,
        pattern=lm.config.layer_kinds,
        params=lm.num_params(),
        train_steps=trained.get("total_steps", trained.get("steps")),
        train_seconds=trained.get("total_train_seconds", trained.get("train_seconds")),
        accuracy=ev["accuracy"],
        name_chars=ev["name_chars"],
        memory_bytes=memory_bytes(lm, cfg),
        flops_per_consolidated_token=sleep_flops_per_token(lm, cfg),
    )
    return row


def long_row(v: Variant, n: int) -> dict[str, Any]:
    """Accuracy on facts asked after ``LONG_GAP_CHUNKS`` chunks of chatter, and the memory
    a scope holds at that length."""
    from model.train import evaluate

    row: dict[str, Any] = {"variant": v.label, "checkpoint": v.checkpoint}
    loaded = load_variant(v)
    if loaded is None:
        row["status"] = "not trained"
        return row
    lm, cfg = loaded
    cfg.far_gap_chunks = LONG_GAP_CHUNKS
    ev = evaluate(lm, cfg, seeds=EVAL_SEEDS, n=n, near=False)
    # Questions of the long layout only; its nearest ones may still sit at distance < 8.
    far = {k: a for k, a in ev["accuracy"].items() if k.startswith("distance=")
           and int(k.split("=")[1]) >= LONG_GAP_CHUNKS}  # fmt: skip
    total = sum(a["n"] for a in far.values())
    row.update(
        status="ok",
        accuracy_far=sum(a["mean"] * a["n"] for a in far.values()) / max(1, total),
        questions_far=total,
        by_distance={k: round(a["mean"], 3) for k, a in far.items()},
        memory_bytes=memory_bytes(lm, cfg),
    )
    return row


def seed_spread(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per recipe: mean, std, min and max over its training seeds of each run's mean
    accuracy (all questions, 1-hop, 2-hop), and the steps the runs trained."""
    import statistics

    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("group") and r["status"] == "ok":
            groups.setdefault(r["group"], []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for name, runs in groups.items():
        entry: dict[str, Any] = {
            "seeds": len(runs),
            "train_steps": [r["train_steps"] for r in runs],
        }
        for key in ("all", "hops=1", "hops=2"):
            vals = [r["accuracy"][key]["mean"] for r in runs if key in r["accuracy"]]
            entry[key] = {
                "mean": statistics.fmean(vals),
                "std": statistics.pstdev(vals),
                "min": min(vals),
                "max": max(vals),
                "runs": vals,
            }
        out[name] = entry
    return out


def memory_bytes(lm: Any, cfg: Any) -> dict[str, int]:
    """What one scope holds at the end of a far-layout dialogue, from a real MemoryState."""
    ex = cfg.make_example(random.Random("memory-bytes"), "heldout", cfg.far_gap_chunks)
    L = cfg.chunk
    if cfg.memory == "full":
        _, state = lm.wake(ex.ids, lm.init_state())  # the window covers all: nothing evicted
    else:
        state = lm.init_state()
        for c in range(ex.n_chunks - 1):
            state = lm.sleep(ex.ids[c * L : (c + 1) * L], state, passes=cfg.passes)
        _, state = lm.wake(ex.ids[-L:], state)  # the live chunk sits in the KV window
    parts = state.nbytes()
    parts.pop("pending_tokens", None)
    parts["total"] = sum(parts.values())
    parts["history_tokens"] = len(ex.ids)
    return parts


def sleep_flops_per_token(lm: Any, cfg: Any) -> float:
    """FLOPs of consolidating one chunk (N passes), per token; 0 for models that do not
    consolidate (window-only drops evicted tokens, full attention never evicts)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    if cfg.memory == "full" or not lm.config.gdn_layers:
        return 0.0
    ids = cfg.make_example(random.Random("flops"), "heldout").ids[: cfg.chunk]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        lm.sleep(ids, lm.init_state(), passes=cfg.passes)
    return counter.get_total_flops() / len(ids)


def _print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = [r for r in result["variants"]]
    hops = sorted(
        {k for r in rows if r["status"] == "ok" for k in r["accuracy"] if k.startswith("hops=")}
    )
    dists = sorted(
        {
            k
            for r in rows
            if r["status"] == "ok"
            for k in r["accuracy"]
            if k.startswith("distance=")
        },
        key=lambda k: int(k.split("=")[1]),
    )
    t = Table(
        title="memory: held-out exact match after eviction (mean±std over 3 eval seeds); "
        "chars = fraction of the answer name's letters right"
    )
    cols = [
        "variant",
        "all",
        *hops,
        "chars 1-hop",
        "chars 2-hop",
        "memory/scope",
        "FLOPs/slept token",
        "train steps",
    ]
    for col in cols:
        t.add_column(col, justify="left" if col == "variant" else "right")
    d = Table(title="accuracy by distance (chunks since the facts were evicted)")
    for col in ["variant", *dists]:
        d.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        if r["status"] != "ok":
            t.add_row(r["variant"], r["status"], *[""] * (len(cols) - 2))
            continue
        acc = r["accuracy"]
        t.add_row(
            r["variant"],
            _fmt(acc.get("all")),
            *[_fmt(acc.get(h)) for h in hops],
            _fmt(r["name_chars"].get("hops=1")),
            _fmt(r["name_chars"].get("hops=2")),
            f"{r['memory_bytes']['total'] / 1024:.1f} KiB",
            f"{r['flops_per_consolidated_token'] / 1e6:.2f} M",
            str(r["train_steps"]),
        )
        d.add_row(r["variant"], *[_fmt(acc.get(k)) for k in dists])
    s = Table(
        title="training-seed spread: each run's mean accuracy, then mean±std (min..max) over seeds"
    )
    for col in ["recipe", "seeds", "all", "1-hop", "2-hop", "train steps"]:
        s.add_column(col, justify="left" if col == "recipe" else "right")
    for name, g in result.get("seed_spread", {}).items():
        s.add_row(
            name,
            str(g["seeds"]),
            *[_fmt_spread(g[k]) for k in ("all", "hops=1", "hops=2")],
            ", ".join(str(x) for x in g["train_steps"]),
        )
    long = result.get("long", {})
    ok = [r for r in long.get("variants", []) if r["status"] == "ok"]
    full = next((r for r in ok if r["checkpoint"] == "facts-full"), None)
    g = Table(
        title=f"after {long.get('gap_chunks')} chunks of chatter: exact match (mean of 3 eval "
        "seeds) and memory per scope at that length"
    )
    for col in ["variant", "exact match", "questions", "memory/scope", "vs full attention"]:
        g.add_column(col, justify="left" if col == "variant" else "right")
    for r in ok:
        mem = r["memory_bytes"]["total"]
        ratio = f"1/{full['memory_bytes']['total'] / mem:.1f}" if full else ""
        g.add_row(
            r["variant"], f"{r['accuracy_far']:.3f}", str(r["questions_far"]),
            f"{mem / 1024:.1f} KiB ({r['memory_bytes']['history_tokens']} tokens)", ratio,
        )  # fmt: skip
    console = Console(width=160)
    console.print(t)
    console.print(d)
    console.print(s)
    console.print(g)


def _fmt(v: dict[str, float] | None) -> str:
    return "" if v is None else f"{v['mean']:.3f}±{v['std']:.3f}"


def _fmt_spread(v: dict[str, Any]) -> str:
    return f"{v['mean']:.3f}±{v['std']:.3f} ({v['min']:.2f}..{v['max']:.2f})"


def plot_results(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_d, ax_h) = plt.subplots(1, 2, figsize=(11, 4))
    for r in result["variants"]:
        if r["status"] != "ok":
            continue
        acc = r["accuracy"]
        for ax, prefix in ((ax_d, "distance="), (ax_h, "hops=")):
            keys = sorted(
                (k for k in acc if k.startswith(prefix)), key=lambda k: int(k.split("=")[1])
            )
            xs = [int(k.split("=")[1]) for k in keys]
            ax.errorbar(
                xs,
                [acc[k]["mean"] for k in keys],
                yerr=[acc[k]["std"] for k in keys],
                marker="o",
                capsize=3,
                label=r["variant"],
            )
    ax_d.set_xlabel("distance (chunks since the facts were evicted)")
    ax_h.set_xlabel("hops")
    for ax in (ax_d, ax_h):
        ax.set_ylabel("exact match, held-out names")
        ax.set_ylim(0, 1)
    ax_h.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
