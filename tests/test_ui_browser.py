"""The Dagster UI in a real browser: headless Chromium (Debian's package) driven by Playwright.

A real ``dagster-webserver`` and ``dagster-daemon`` on 127.0.0.1 (temp DAGSTER_HOME with the
project's ``dagster.yaml``: queued runs, so the daemon launches what the UI submits), the
project's ``workspace.yaml``. The browser finds the eight stage groups in the lineage graph,
materializes ``raw_airlines`` with the asset page's button and waits until the run page says
*Success*; the instance and GraphQL must agree.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import httpx
import pytest

from mlops_assets.cli import _stop, _wait_http
from mlops_assets.serve.ray_runtime import free_port

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ["ingest", "validate", "explore", "features", "train", "evaluate", "serve", "monitor"]
ASSET = "raw_airlines"  # reads the package's reference database: needs no landed month
WAIT = 120_000  # ms: a page or a click on a busy 2-core machine
pytestmark = pytest.mark.timeout(540)


@pytest.fixture
def chromium() -> str:
    """Debian's Chromium (``.ci/browser.sh`` installs it and exports MLOPS_CHROMIUM)."""
    path = os.environ.get("MLOPS_CHROMIUM") or shutil.which("chromium")
    if path and Path(path).exists():
        return path
    reason = "headless Chromium is not installed (apt-get install chromium, or .ci/browser.sh)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason}; CI must install it")
    pytest.skip(reason)


@dataclass
class DagsterUI:
    url: str
    dagster_home: Path
    logs: Path

    def tail(self) -> str:
        return "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}"
            for log in sorted(self.logs.glob("*.log"))
        )


@pytest.fixture
def dagster_ui(chromium: str, tmp_path: Path) -> Iterator[DagsterUI]:
    """Webserver and daemon on a free loopback port (started only when a browser is there)."""
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    shutil.copyfile(ROOT / "dagster.yaml", dagster_home / "dagster.yaml")
    # Create the SQLite storages once, here: a webserver, a daemon and their code servers all
    # creating a fresh instance at the same moment race on the schema stamp.
    dg.DagsterInstance.from_config(str(dagster_home)).dispose()
    port = free_port()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(dagster_home),
        "MLOPS_HOME": str(tmp_path / "mlops"),
    }
    for name in ("MLOPS_REFERENCE_DB_URL", "MLOPS_WEATHER_API_URL", "RAY_ADDRESS"):
        env.pop(name, None)
    bin_dir = Path(sys.executable).parent
    workspace = str(ROOT / "workspace.yaml")
    commands = {
        "webserver": [str(bin_dir / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port),
                      "-w", workspace],
        "daemon": [str(bin_dir / "dagster-daemon"), "run", "-w", workspace],
    }  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name, cmd in commands.items():
            with open(tmp_path / f"{name}.log", "wb") as log:
                # Own session, default signal handling: stopped exactly, by PID, below.
                procs.append(
                    subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
                )  # fmt: skip
        ui = DagsterUI(f"http://127.0.0.1:{port}", dagster_home, tmp_path)
        assert _wait_http(f"{ui.url}/server_info", 180, procs), ui.tail()
        yield ui
    finally:
        _stop(procs)


def test_ui_shows_every_stage_and_materializes_an_asset_from_the_browser(
    chromium: str, dagster_ui: DagsterUI
) -> None:
    from playwright.sync_api import expect, sync_playwright

    started = time.monotonic()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(WAIT)
            # The first-visit community dialog opens whenever the UI gets to it (once it covered
            # the Materialize button): dismiss it before any action it would block.
            skip = page.get_by_role("button", name="Skip")
            page.add_locator_handler(skip, lambda: skip.click())

            # The lineage graph: one node per asset group, each stage of the pipeline.
            page.goto(f"{dagster_ui.url}/asset-groups")
            graph = page.locator("svg foreignObject")
            for group in GROUPS:
                expect(graph.get_by_text(group, exact=True)).to_have_count(1, timeout=WAIT)

            # Materialize from the asset's page, follow the toast to the run.
            page.goto(f"{dagster_ui.url}/assets/{ASSET}")
            expect(page.get_by_text("Never materialized")).to_be_visible(timeout=WAIT)
            page.get_by_role("button", name="Materialize").click()
            toast = page.get_by_text(re.compile(r"^Launched run [0-9a-f]{8}$"))
            expect(toast).to_be_visible(timeout=WAIT)
            page.get_by_role("link", name="View", exact=True).click()
            page.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}"))
            run_id = page.url.rsplit("/runs/", 1)[1].split("?")[0]
            assert toast.inner_text().endswith(run_id[:8])

            # The run page follows the run live (queued → started → success).
            expect(page.get_by_text("Success", exact=True).first).to_be_visible(timeout=300_000)
            expect(page.get_by_text("Failure", exact=True)).to_have_count(0)
            page.screenshot(path=str(dagster_ui.logs / "run.png"))
        except Exception as exc:
            raise AssertionError(f"{exc}\n{dagster_ui.tail()}") from exc
        finally:
            browser.close()
    elapsed = time.monotonic() - started

    # The instance and the GraphQL API agree with what the page showed.
    with dg.DagsterInstance.from_config(str(dagster_ui.dagster_home)) as instance:
        run = instance.get_run_by_id(run_id)
        assert run is not None
        assert run.status == dg.DagsterRunStatus.SUCCESS
        assert run.tags.get("dagster/from_ui") == "true"
        assert run.asset_selection == {dg.AssetKey(ASSET)}
        event = instance.get_latest_materialization_event(dg.AssetKey(ASSET))
        assert event is not None and event.run_id == run_id
    query = (
        "query Run($runId: ID!) { runOrError(runId: $runId) "
        "{ __typename ... on Run { status assetSelection { path } } } }"
    )
    answer = httpx.post(
        f"{dagster_ui.url}/graphql",
        json={"query": query, "variables": {"runId": run_id}},
        timeout=30,
    ).json()
    assert answer["data"]["runOrError"] == {
        "__typename": "Run",
        "status": "SUCCESS",
        "assetSelection": [{"path": [ASSET]}],
    }
    print(f"browser session: {elapsed:.0f} s")
