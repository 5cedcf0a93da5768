"""The MLflow UI shows a scope's fast-weights version, its alias and its lineage tags.

Drives Debian's headless Chromium with playwright (never `playwright install`); skipped
when /usr/bin/chromium is absent (`apt-get install -y chromium`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from consolidation import fast_weights, tracking
from tests.consolidation.conftest import scope_id

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
DOCS_SHOT = Path(__file__).resolve().parents[2] / "docs" / "mlflow-registry.png"

pytestmark = [
    pytest.mark.mlflow,
    pytest.mark.browser,
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent: apt-get install -y chromium"
    ),
]


def _register(uri: str, scope: str, tmp: Path):
    c = tracking.client(uri)
    run = c.create_run(tracking.experiment_id(c, tracking.SLEEP_EXPERIMENT)).info.run_id
    f = tmp / fast_weights.FAST_WEIGHTS_FILE
    fast_weights.write_artifact(f, {"layers.0.S": torch.zeros(2, 4, 4)}, {"scope_id": scope})
    lineage = fast_weights.Lineage(scope_id=scope, job_id="job-ui-1", parent_version=None, base_model_version="7",
                               from_watermark=100, to_watermark=163, passes=4, tokens=256)  # fmt: skip
    return fast_weights.register_fast_weights(uri, run_id=run, local_file=f, lineage=lineage)


def test_registry_page_shows_version_alias_and_lineage(mlflow_uri: str, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    scope = scope_id("ui")
    pub = _register(mlflow_uri, scope, tmp_path)
    name = fast_weights.fast_weights_model_name(scope)
    shots = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{mlflow_uri}/#/models/{name}", wait_until="load")
            page.get_by_text(f"Version {pub.version}").first.wait_for(timeout=60_000)
            page.get_by_text("@ live").or_(page.get_by_text("live", exact=True)).first.wait_for(
                timeout=30_000
            )
            shots.append(tmp_path / "model.png")
            page.screenshot(path=str(shots[-1]), full_page=True)

            page.goto(f"{mlflow_uri}/#/models/{name}/versions/{pub.version}", wait_until="commit")
            for text in (
                "parent_version",
                "base_model_version",
                "watermark",
                "job_id",
                "job-ui-1",
                "sha256",
                pub.sha256[:16],
            ):
                page.get_by_text(text, exact=False).first.wait_for(timeout=30_000)
            shots.append(tmp_path / "version.png")
            page.screenshot(path=str(shots[-1]), full_page=True)
        finally:
            browser.close()
    assert all(s.stat().st_size > 10_000 for s in shots)
    if not DOCS_SHOT.exists():  # one screenshot for the docs, kept once
        DOCS_SHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shots[0], DOCS_SHOT)
