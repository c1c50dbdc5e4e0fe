"""The caption page, served by the real agent, in headless Chromium driven over the DevTools
protocol (CDP, with the `websockets` client): it shows the events of a scene.

``SALMONN_UPDATE_SCREENSHOT=1`` also writes the phone-sized screenshot to
``docs/img/caption-page.png``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.clients.conftest import (
    ROOT,
    TIMING,
    AgentProcess,
    finals,
    run_client,
    stream_file,
)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOT = ROOT / "docs" / "img" / "caption-page.png"


class Page:
    """One Chromium tab over CDP (flat sessions on the browser's WebSocket)."""

    def __init__(self, ws: ClientConnection, session: str) -> None:
        self.ws = ws
        self.session = session
        self._ids = itertools.count(100)

    @staticmethod
    async def call(
        ws: ClientConnection, method: str, session: str | None = None, **params: Any
    ) -> dict[str, Any]:
        """Send one command and return its result (events in between are skipped)."""
        call_id = next(_CALL_IDS)
        message: dict[str, Any] = {"id": call_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        await ws.send(json.dumps(message))
        while True:
            reply = json.loads(await ws.recv())
            if "method" in reply:
                _EVENTS.append(reply["method"])
            if reply.get("id") == call_id:
                if "error" in reply:
                    raise AssertionError(f"CDP {method}: {reply['error']}")
                return reply.get("result", {})  # type: ignore[no-any-return]

    async def eval(self, expression: str, timeout_s: float = 30.0) -> Any:
        """Evaluate JavaScript in the page (awaiting a promise) and return its value."""
        async with asyncio.timeout(timeout_s * TIMING):
            result = await self.call(
                self.ws,
                "Runtime.evaluate",
                self.session,
                expression=expression,
                awaitPromise=True,
                returnByValue=True,
            )
        if "exceptionDetails" in result:
            raise AssertionError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def until(self, condition: str, timeout_s: float = 30.0) -> None:
        """Wait (a MutationObserver in the page, no polling here) until ``condition`` holds."""
        await self.eval(
            f"""new Promise((resolve) => {{
                const ok = () => {{
                    try {{ return Boolean({condition}); }} catch {{ return false; }}
                }};
                if (ok()) return resolve(true);
                const observer = new MutationObserver(() => {{
                    if (ok()) {{ observer.disconnect(); resolve(true); }}
                }});
                observer.observe(document.body, {{subtree: true, childList: true,
                    attributes: true, characterData: true}});
            }})""",
            timeout_s,
        )


_CALL_IDS = itertools.count(1)
_EVENTS: list[str] = []  # CDP event names seen while waiting for replies


async def wait_event(ws: ClientConnection, method: str) -> None:
    """Wait for a CDP event (it may have arrived already, while waiting for a reply)."""
    while method not in _EVENTS:
        message = json.loads(await ws.recv())
        if "method" in message:
            _EVENTS.append(message["method"])
    _EVENTS.remove(method)


@contextlib.asynccontextmanager
async def chromium(tmp_path: Path, url: str) -> AsyncIterator[Page]:
    """Headless Chromium with one tab on ``url``, phone-sized."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip("chromium is not installed (make apt installs it)")
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium'}",
        "--remote-debugging-port=0",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(30 * TIMING):
            while True:
                line = (await proc.stderr.readline()).decode()
                assert line, "chromium exited before opening its DevTools port"
                found = re.search(r"DevTools listening on (ws://\S+)", line)
                if found:
                    break
        async with connect(found.group(1), max_size=None) as ws:
            target = await Page.call(ws, "Target.createTarget", url="about:blank")
            attached = await Page.call(
                ws, "Target.attachToTarget", targetId=target["targetId"], flatten=True
            )
            page = Page(ws, attached["sessionId"])
            await Page.call(
                ws,
                "Emulation.setDeviceMetricsOverride",
                page.session,
                width=390,
                height=760,
                deviceScaleFactor=1,
                mobile=True,
            )
            await Page.call(ws, "Page.enable", page.session)
            _EVENTS.clear()
            await Page.call(ws, "Page.navigate", page.session, url=url)
            async with asyncio.timeout(30 * TIMING):
                await wait_event(ws, "Page.loadEventFired")
            yield page
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def test_unreachable_agent_is_retried_then_given_up_without_traceback() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = s.getsockname()[1]
        done = run_client("web", "--agent", f"http://127.0.0.1:{port}", "--attempts", "3")
    lines = done.stderr.splitlines()
    assert done.returncode == 1 and done.stdout == "", (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert len(lines) == 3, lines
    assert all(f"127.0.0.1:{port}/ unreachable" in line for line in lines), lines
    assert all("retrying in" in line for line in lines[:2]), lines
    assert lines[2].endswith("giving up"), lines


def test_the_agent_serves_the_page_without_token_and_nothing_else(agent: AgentProcess) -> None:
    for path, kind in [("/", "text/html"), ("/app.js", "javascript"), ("/style.css", "text/css")]:
        with urllib.request.urlopen(agent.http_url + path, timeout=10) as response:
            assert response.status == 200 and kind in response.headers["Content-Type"]
            assert len(response.read()) == int(response.headers["Content-Length"])
    for path in ["/nothing.js", "/%2e%2e/pyproject.toml", "/static/../../agent/ws.py"]:
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(agent.http_url + path, timeout=10)
        assert info.value.code == 404


async def test_page_shows_the_scene_live(agent: AgentProcess, clip: Path, tmp_path: Path) -> None:
    async with chromium(tmp_path, f"{agent.http_url}/?stream=web") as page:
        await page.until("document.getElementById('conn').dataset.state === 'open'")
        # Record every state of the listening indicator from now on, and every partial row
        # shown: the observer runs after each /events message, so none is missed.
        await page.eval(
            """window.seen = new Set();
            new MutationObserver(() => seen.add(
                document.getElementById('listening').dataset.on)).observe(
                document.getElementById('listening'), {attributes: true});
            window.partials = [];
            new MutationObserver(() => {
                for (const li of document.querySelectorAll('#events li[data-partial=true]')) {
                    partials.push({id: li.dataset.id, hidden: li.hidden,
                        text: li.querySelector('.text').textContent});
                }
            }).observe(document.getElementById('events'), {subtree: true, childList: true,
                attributes: true, characterData: true});
            true"""
        )
        await asyncio.to_thread(stream_file, agent, "web", clip)
        await asyncio.to_thread(
            agent.wait_for, lambda e: e.get("status") == "stream_closed" and e["stream"] == "web"
        )
        expected = {e["id"]: e for e in finals(agent.of_stream("web"))}
        assert len(expected) >= 4
        done = "document.querySelectorAll('#events li[data-partial=false]').length"
        await page.until(f"{done} === {len(expected)}")
        rows = await page.eval(
            """[...document.querySelectorAll('#events li')].map((li) => ({
                id: li.dataset.id, kind: li.dataset.kind, stream: li.dataset.stream,
                partial: li.dataset.partial, hidden: li.hidden,
                text: li.querySelector('.text').textContent,
                span: li.querySelector('.span').textContent}))"""
        )
        # One row per answer: partials were replaced in place by their final.
        assert sorted(r["id"] for r in rows) == sorted(expected)
        for row in rows:
            event = expected[row["id"]]
            assert row["kind"] == event["kind"] and row["stream"] == "web"
            assert not row["hidden"]
            if event["kind"] != "command":
                assert row["text"] == event["text"]
            start, end = (float(x) for x in row["span"].removesuffix(" s").split("–"))
            assert abs(start - event["start"]) <= 0.05 and abs(end - event["end"]) <= 0.05
        assert await page.eval("[...seen].sort().join()") == "false,true"
        # Partial text was shown, in the row its final later replaced.
        sent = {(e["id"], e["text"]) for e in agent.of_stream("web") if e.get("partial")}
        assert sent, "the agent sent no partial events: nothing to check"
        shown = await page.eval("partials")
        assert {r["id"] for r in shown} == {event_id for event_id, _ in sent}
        assert all((r["id"], r["text"]) in sent and not r["hidden"] for r in shown), shown
        level = await page.eval("document.getElementById('level').dataset.dbfs")
        assert -90.0 < float(level) < 0.0
        assert await page.eval("document.getElementById('stream-filter').value") == "web"
        # The filter hides other streams' rows.
        hidden = await page.eval(
            """const f = document.getElementById('stream-filter');
            const o = document.createElement('option'); o.value = 'elsewhere'; f.append(o);
            f.value = 'elsewhere'; f.dispatchEvent(new Event('change'));
            [...document.querySelectorAll('#events li')].every((li) => li.hidden)"""
        )
        assert hidden
        await page.eval(
            """const g = document.getElementById('stream-filter');
            g.value = 'web'; g.dispatchEvent(new Event('change')); true"""
        )
        shot = await Page.call(page.ws, "Page.captureScreenshot", page.session, format="png")
    png = base64.b64decode(shot["data"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "caption-page.png").write_bytes(png)
    if os.environ.get("SALMONN_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        SCREENSHOT.write_bytes(png)
