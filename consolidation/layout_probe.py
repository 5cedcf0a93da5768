"""Measure what registering a fast-weights version costs under two registry layouts.

``python -m consolidation.layout_probe --uri http://127.0.0.1:5000 [--scopes 20 --versions 5]``

- per-scope: one registered model per scope, alias ``live`` (what ``registry`` does);
- shared: one registered model for all scopes, the scope in a tag, alias ``live-<scope>``.

Per version it times what the sleep worker does: look the job id up (idempotence), create
the version, move the alias, and then what the agent does: resolve the live version.
Artifacts are not uploaded (same cost in both layouts). Prints ms per version for each.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

from consolidation.tracking import client, ensure_registered_model, experiment_id


def _probe(uri: str, scopes: int, versions: int, shared: bool) -> dict[str, float]:
    c = client(uri)
    tag = uuid.uuid4().hex[:6]
    shared_name = f"probe-shared-{tag}"
    if shared:
        ensure_registered_model(c, shared_name, {})
    run = c.create_run(experiment_id(c, "somna-layout-probe")).info
    register_ms, lookup_ms = [], []
    for v in range(versions):
        for s in range(scopes):
            scope = f"s{s}"
            name = shared_name if shared else f"probe-{tag}-{scope}"
            alias = f"live-{scope}" if shared else "live"
            job = f"job-{v}-{s}"
            t0 = time.perf_counter()
            if not shared and v == 0:
                ensure_registered_model(c, name, {"scope_id": scope})
            flt = f"name = '{name}' and tags.job_id = '{job}'"
            if shared:
                flt += f" and tags.scope_id = '{scope}'"
            assert not c.search_model_versions(flt)
            mv = c.create_model_version(
                name,
                source=f"{run.artifact_uri}/{job}",
                run_id=run.run_id,
                tags={"scope_id": scope, "job_id": job},
            )
            c.set_registered_model_alias(name, alias, mv.version)
            t1 = time.perf_counter()
            c.get_model_version_by_alias(name, alias)
            t2 = time.perf_counter()
            register_ms.append((t1 - t0) * 1e3)
            lookup_ms.append((t2 - t1) * 1e3)
    return {
        "register_ms_p50": statistics.median(register_ms),
        "register_ms_mean": statistics.fmean(register_ms),
        "register_ms_last_round": statistics.fmean(register_ms[-scopes:]),
        "live_lookup_ms_p50": statistics.median(lookup_ms),
        "total_versions": float(scopes * versions),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uri", required=True)
    ap.add_argument("--scopes", type=int, default=20)
    ap.add_argument("--versions", type=int, default=5)
    args = ap.parse_args()
    for shared in (False, True):
        r = _probe(args.uri, args.scopes, args.versions, shared)
        label = "shared model + scope tag" if shared else "one model per scope"
        print(f"{label:28s} " + "  ".join(f"{k}={v:.1f}" for k, v in r.items()))


if __name__ == "__main__":
    main()
