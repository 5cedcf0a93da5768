"""Pre-waking: the sleep worker wakes the events a fresh version leaves pending.

A hot swap re-derives the agent's running state: S' plus every event after the new
watermark, woken again (``HybridLM.swap_in_batch``). Those are the events said while the
job waited and ran: with a consolidation lag of 30-50 s, ~400 tokens a scope, and a
question that came right after a burst of publishes waited for all of its scopes' re-wakes
(the bulk of the hot-swap latency in `somna bench swap`).

So just before publishing, the sleep worker reads those events from the topic (one pass
per partition), wakes them over each new S' in one batch (``HybridLM.rebuild_states``:
the state the swap would build) and writes that state beside the artifact's local copy
(``consolidation/blobs.py``), with the events it holds. The agent resumes from it only
when the events it holds after the watermark, up to the last offset pre-woken, are
exactly those (offsets and tokens); it then wakes only what came after. Anything else (no
file, another host, a retraction in between, an event it has not seen yet) swaps as
before. The file is trusted as the local copy beside it is: written by a worker of this
data dir; its S' must equal the verified artifact's (``streams/memory.py`` checks).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from consolidation import blobs
from consolidation.turns import TopicReader
from streams.records import FastWeightsPublished

if TYPE_CHECKING:
    from model.hybrid import HybridLM
    from model.state import MemoryState

log = logging.getLogger(__name__)

# A scope with more tokens pending than this is left to the agent's own swap: a backlog
# that long (a worker that was down) would hold the whole batch's publish.
MAX_TOKENS = 4096


@dataclass
class Prewoken:
    """A scope's state right after waking its events up to ``woken_to`` over a version."""

    state: MemoryState  # B = 1; base S = the version's fast weights; pending = the events
    woken_to: int  # the last offset of the scope's partition that was read


def path_for(blob_root: Path, sha256: str) -> Path:
    """Beside the artifact's copy (and pruned with it: ``blobs.prune``)."""
    return blobs.path_for(blob_root, sha256).with_suffix(".woken.safetensors")


def write(blob_root: Path, sha256: str, pre: Prewoken) -> None:
    """Write atomically (a reader never sees half a state)."""
    import torch
    from safetensors.torch import save_file

    state = pre.state
    tensors: dict[str, torch.Tensor] = {}
    for j, (base, s, conv) in enumerate(zip(state.base_S, state.S, state.conv, strict=True)):
        tensors[f"base_S.{j}"] = base.detach().cpu().contiguous()
        tensors[f"S.{j}"] = s.detach().cpu().contiguous()
        if conv is not None:
            tensors[f"conv.{j}"] = conv.detach().cpu().contiguous()
    for j, kv in enumerate(state.kv):
        if kv is not None:
            tensors[f"kv.{j}.k"] = kv[0].detach().cpu().contiguous()
            tensors[f"kv.{j}.v"] = kv[1].detach().cpu().contiguous()
    events = state.pending_events
    tensors["events.offsets"] = torch.tensor([e.offset for e in events], dtype=torch.int64)
    tensors["events.lengths"] = torch.tensor([len(e.tokens) for e in events], dtype=torch.int64)
    tensors["events.tokens"] = torch.tensor(
        [t for e in events for t in e.tokens], dtype=torch.int64
    )
    meta = {
        "config_hash": state.config_hash,
        "gdn_layers": json.dumps(state.gdn_layers),
        "n_gdn": str(len(state.S)),
        "n_attn": str(len(state.kv)),
        "pos": str(state.pos),
        "watermark": str(state.watermark),
        "woken_to": str(pre.woken_to),
    }
    dest = path_for(blob_root, sha256)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, dest)


def read(blob_root: Path, sha256: str) -> Prewoken | None:
    """The pre-woken state of the artifact ``sha256``, or None (none, or unreadable)."""
    from safetensors import safe_open

    from model.state import MemoryState, PendingEvent

    try:
        path = path_for(blob_root, sha256)
    except ValueError:
        return None
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        n_gdn, n_attn = int(meta["n_gdn"]), int(meta["n_attn"])
        offsets, lengths = t["events.offsets"].tolist(), t["events.lengths"].tolist()
        tokens, events, at = t["events.tokens"].tolist(), [], 0
        for offset, n in zip(offsets, lengths, strict=True):
            events.append(PendingEvent(offset, tuple(tokens[at : at + n])))
            at += n
        state = MemoryState(
            config_hash=meta["config_hash"],
            gdn_layers=json.loads(meta["gdn_layers"]),
            base_S=[t[f"base_S.{j}"] for j in range(n_gdn)],
            S=[t[f"S.{j}"] for j in range(n_gdn)],
            conv=[t.get(f"conv.{j}") for j in range(n_gdn)],
            kv=[
                (t[f"kv.{j}.k"], t[f"kv.{j}.v"]) if f"kv.{j}.k" in t else None
                for j in range(n_attn)
            ],
            pos=int(meta["pos"]),
            watermarks=[int(meta["watermark"])],
            pending=[events],
        )
        return Prewoken(state, int(meta["woken_to"]))
    except Exception as e:  # noqa: BLE001 (damaged, pruned meanwhile: the agent re-wakes)
        log.warning("pre-woken state %s unreadable: %s", path.name, e)
        return None


def wake_tails(
    lm: HybridLM,
    versions: list[tuple[FastWeightsPublished, dict, list[tuple[int, list[int]]]]],
) -> list[MemoryState]:
    """For each (version, its fast weights, the events after its watermark): the state a
    swap would build, all in one batched wake."""
    return lm.rebuild_states([(fw, p.watermark, events) for p, fw, events in versions])


async def prewake(
    lm: HybridLM,
    tracking_uri: str,
    reader: TopicReader,
    blob_root: Path,
    published: list[FastWeightsPublished],
    partitions: dict[str, int],
    retracted: dict[str, set[str]],
) -> int:
    """Pre-wake the versions of ``published`` that have a local copy; returns how many
    were written. Best effort: a failure costs the agent its own re-wake, nothing else."""
    from consolidation.fast_weights_load import load_fast_weights

    todo: dict[int, list[FastWeightsPublished]] = defaultdict(list)
    for p in published:
        if p.scope_id in partitions and blobs.find(blob_root, p.sha256) is not None:
            todo[partitions[p.scope_id]].append(p)
    versions, woken_to = [], {}
    for partition, pubs in todo.items():
        lo = min(p.watermark for p in pubs) + 1
        by_scope, last = await reader.read_tail({p.scope_id for p in pubs}, partition, lo)
        for p in pubs:
            dropped = retracted.get(p.scope_id, set())
            events = [
                (t.offset, t.tokens())
                for t in by_scope.get(p.scope_id, [])
                if t.offset > p.watermark and t.event_id not in dropped
            ]
            if not events or sum(len(ids) for _, ids in events) > MAX_TOKENS:
                continue
            # Verified, and cached since run_batch registered it: no request, no read.
            weights = await asyncio.to_thread(
                load_fast_weights, tracking_uri, p, p.scope_id, blob_root=blob_root
            )
            versions.append((p, weights.tensors, events))
            woken_to[p.sha256] = last
    if not versions:
        return 0
    states = await asyncio.to_thread(wake_tails, lm, versions)
    for (p, _, _), state in zip(versions, states, strict=True):
        await asyncio.to_thread(write, blob_root, p.sha256, Prewoken(state, woken_to[p.sha256]))
    return len(versions)
