"""One script for a CUDA machine: torch-vs-fla parity of the gated delta rule, then batched
sleep timings on the reference config. Prints tables; ``--json F`` writes the numbers.

    python -m benchmarks.gpu_check [--json out.json] [--quick] [--parity-only | --timing-only]

Parity: fla's ``chunk_gated_delta_rule`` (bf16, and fp32 where fla accepts it) against the
pure-torch chunked op in fp64 (the oracle), forward (o, final S) and backward (dq, dk, dv,
dg, dbeta, dh0), plus a ragged batch and a whole-model sleep; relative errors
(max |a - e| / max |e|). Timing: one batched N = 4 sleep of 1, 64 and 256 scopes x 512
tokens, fla vs SOMNA_FORCE_TORCH_OPS=1, and fla's kernel alone on one layer.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from model import HybridLM
from model.ops import chunk_gated_delta_rule, gated_delta_rule
from model.ops.utils import l2norm

GRAD_NAMES = ["q", "k", "v", "g", "beta", "h0"]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    denom = expected.detach().double().abs().max().clamp_min(1e-12)
    return float((actual.detach().double() - expected.detach().double()).abs().max() / denom)


def make_inputs(B: int, T: int, H: int, K: int, device: str, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device)

    q, k = l2norm(randn(B, T, H, K)), l2norm(randn(B, T, H, K))
    v = randn(B, T, H, K)
    g = F.logsigmoid(randn(B, T, H) + 3)
    beta = torch.sigmoid(randn(B, T, H))
    h0 = randn(B, H, K, K) * 0.1
    return [q, k, v, g, beta, h0]


def run_op(backend: str, inputs: list[torch.Tensor], dtype: torch.dtype, lengths=None):
    """Outputs and gradients of one backend; q, k, v, beta in ``dtype``, g and h0 in fp32
    (fp64 for the oracle)."""
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = [
        x.to(dtype if i in (0, 1, 2, 4) else wide).detach().requires_grad_(True)
        for i, x in enumerate(inputs)
    ]
    q, k, v, g, beta, h0 = leaves
    if backend == "oracle":
        o, s = chunk_gated_delta_rule(q, k, v, g, beta, None, h0, True, lengths)
    else:
        o, s = gated_delta_rule(q, k, v, g, beta, h0, lengths=lengths, backend=backend)
    gen = torch.Generator(device="cpu").manual_seed(1)
    do = torch.randn(o.shape, generator=gen).to(o.device, torch.float64)
    ds = torch.randn(s.shape, generator=gen).to(s.device, torch.float64)
    ((o.double() * do).sum() + (s.double() * ds).sum()).backward()
    return o, s, [x.grad for x in leaves]


def parity(device: str, quick: bool) -> list[dict[str, Any]]:
    rows = []
    B, T, H, K = (2, 300, 4, 64) if quick else (4, 500, 4, 64)
    inputs = make_inputs(B, T, H, K, device)
    lengths = torch.tensor([T - 37 * i for i in range(B)], device=device)
    for label, lens in [("dense", None), ("ragged", lengths)]:
        o_ref, s_ref, g_ref = run_op("oracle", inputs, torch.float64, lens)
        for dtype in (torch.bfloat16, torch.float32):
            for backend in ("fla", "torch"):
                row: dict[str, Any] = {
                    "case": label,
                    "backend": backend,
                    "dtype": str(dtype).removeprefix("torch."),
                }
                try:
                    o, s, grads = run_op(backend, inputs, dtype, lens)
                except (NotImplementedError, AssertionError, RuntimeError) as exc:
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:80]}"
                    rows.append(row)
                    continue
                row["o"] = rel_err(o, o_ref)
                row["S"] = rel_err(s, s_ref)
                for name, a, e in zip(GRAD_NAMES, grads, g_ref, strict=True):
                    row[f"d{name}"] = None if a is None else rel_err(a, e)
                rows.append(row)
    return rows


def model_parity(device: str) -> dict[str, Any]:
    """A bf16 reference-config model: sleep S with fla vs with the torch ops."""
    from benchmarks.sleep_throughput import REFERENCE

    torch.manual_seed(0)
    lm = HybridLM(REFERENCE).to(device=device, dtype=torch.bfloat16).eval()
    x = torch.randint(0, 256, (8, 512), device=device)
    lengths = torch.tensor([512, 500, 300, 257, 256, 100, 64, 1], device=device)
    fla = lm.sleep(x, lm.init_state(8), passes=4, lengths=lengths)
    os.environ["SOMNA_FORCE_TORCH_OPS"] = "1"
    try:
        ref = lm.sleep(x, lm.init_state(8), passes=4, lengths=lengths)
    finally:
        os.environ.pop("SOMNA_FORCE_TORCH_OPS")
    return {
        f"S[{i}]": rel_err(a, b)
        for i, (a, b) in enumerate(zip(fla.base_S, ref.base_S, strict=True))
    }


def main(argv: list[str]) -> int:
    from rich.console import Console

    quick = "--quick" in argv
    json_path = Path(argv[argv.index("--json") + 1]) if "--json" in argv else None
    console = Console()
    if not torch.cuda.is_available():
        console.print(
            "[red]no CUDA device: gpu_check needs one (the torch path is covered by "
            "tests/model on CPU)[/red]"
        )
        return 2
    device = "cuda"
    console.print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    try:
        import fla

        console.print(f"fla {getattr(fla, '__version__', '?')}")
    except Exception as exc:
        console.print(f"[yellow]fla not importable ({exc}); parity rows for fla will fail[/yellow]")

    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

    def save() -> None:  # after each part, so a later part's timeout keeps the earlier ones
        if json_path is not None:
            json_path.write_text(json.dumps(result, indent=2) + "\n")

    if "--timing-only" not in argv:
        check_parity(device, quick, console, result)
        save()
    if "--parity-only" not in argv:
        result["timings"] = {}
        timings(quick, console, result["timings"], save)
    return 0


def check_parity(device: str, quick: bool, console: Any, result: dict[str, Any]) -> None:
    from rich.table import Table

    rows = parity(device, quick)
    result["parity"] = rows
    table = Table(title="gated delta rule vs fp64 torch oracle (relative error)")
    cols = ["case", "backend", "dtype", "o", "S", *[f"d{n}" for n in GRAD_NAMES]]
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        if "error" in r:
            table.add_row(r["case"], r["backend"], r["dtype"], r["error"], *[""] * (len(cols) - 4))
            continue
        table.add_row(*(f"{r[c]:.2e}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    console.print(table)

    try:
        mp: dict[str, Any] = model_parity(device)
    except Exception as exc:  # fla missing or failing: the op rows above say which
        mp = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    result["model_parity"] = mp
    console.print("whole-model bf16 sleep (N=4, ragged), fla vs torch ops, S rel err:", mp)


def timings(quick: bool, console: Any, out: dict[str, Any], save: Callable[[], None]) -> None:
    """Batched sleep per backend into ``out``, saved after each (the compiled one is last:
    its compile can outlast a short lease)."""
    from benchmarks import sleep_throughput

    variants = [
        ("torch ops", True, False),
        ("fla", False, False),
        ("fla + torch.compile", False, True),
    ]
    for label, forced, compiled in variants:
        if forced:
            os.environ["SOMNA_FORCE_TORCH_OPS"] = "1"
        try:
            out[label] = sleep_throughput.run(quick=quick, json_path=None, compile_sleep=compiled)
        except Exception as exc:  # a compile failure must not hide the other numbers
            console.print(f"[red]{label} failed: {type(exc).__name__}: {exc}[/red]")
            out[label] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            os.environ.pop("SOMNA_FORCE_TORCH_OPS", None)
        save()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
