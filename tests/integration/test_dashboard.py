"""The dashboard at / in a real browser (Debian's chromium, driven by playwright) against three
`shoal node` processes with an admin key: the page asks for the key once, shows the nodes and a
split instance's stages, streams a chat answer, places a model, and marks a SIGKILLed node lost
within 3 s. The static files are open without a key, every data call is not (in process).

SHOAL_SCREENSHOTS=docs saves a screenshot of each view there (docs/dashboard-*.png)."""

import os
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
import pytest

from shoal.api.app import create_app
from shoal.api.auth import ApiKeys
from shoal.inference.service import ModelStatus
from shoal.types.model_card import ModelCard
from tests.helpers.nodes import NodeProcess, start_cluster_node
from tests.helpers.wait import until

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
MODEL = "smollm2-135m"
LAYERS = 30
KEY = "sk-dashboard-admin-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
SHOTS = os.environ.get("SHOAL_SCREENSHOTS")  # a folder to save each view's screenshot in
SIZE = 3
PULLED, PULLED_REPO = "qwen3-0.6b", "mlx-community/Qwen3-0.6B-4bit"  # the card's first source
T = TypeVar("T")


# --- the static files, in process: open without a key, the data behind it ----------------------


class NoModels:
    """An InferenceService with no models (the dashboard's files never reach it)."""

    def cards(self) -> list[ModelCard]:
        return []

    def status(self, card: ModelCard) -> ModelStatus:
        return ModelStatus("ready")

    def active_requests(self) -> int:
        return 0


@pytest.fixture(params=[False, True], ids=["open", "keys"])
async def app_client(request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    keys = ApiKeys.of(admin=[KEY]) if request.param else None
    transport = httpx.ASGITransport(app=create_app(NoModels(), keys=keys))  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://node") as client:
        yield client


@pytest.mark.timeout(30)
async def test_the_page_and_its_files_need_no_key(app_client: httpx.AsyncClient) -> None:
    page = await app_client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]  # no clickjacking
    for name in ("main.js", "api.js", "style.css"):
        assert name in page.text or name != "main.js"
        asset = await app_client.get(f"/dashboard/{name}")
        assert asset.status_code == 200, name
    script = await app_client.get("/dashboard/main.js")
    assert script.headers["content-type"].startswith("text/javascript")
    for missing in ("/dashboard/nope.js", "/dashboard/..%2Fauth.py", "/dashboard/__init__.py"):
        assert (await app_client.get(missing)).status_code == 404, missing


@pytest.mark.timeout(30)
async def test_data_and_writes_under_the_dashboard_paths_still_need_the_key() -> None:
    app = create_app(NoModels(), keys=ApiKeys.of(admin=[KEY]))  # type: ignore[arg-type]
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://node"
    ) as client:
        assert (await client.get("/v1/models")).status_code == 401
        assert (await client.get("/state")).status_code == 401
        assert (await client.post("/dashboard/main.js")).status_code == 401
        assert (await client.get("/v1/models", headers=AUTH)).status_code == 200


# --- the page in chromium against real nodes -----------------------------------------------------


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def browser_test(test: T) -> T:
    """A test of the page in chromium: slow, and skipped where Debian's chromium is missing."""
    reason = f"no {CHROMIUM}: `apt-get install chromium` (make test's setup does)"
    for mark in (
        pytest.mark.slow,
        pytest.mark.timeout(600),
        pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=reason),
    ):
        test = cast(T, mark(test))
    return test


def api(node: NodeProcess, path: str, method: str = "GET", **kwargs: Any) -> Any:
    r = httpx.request(method, f"{node.url}{path}", headers=AUTH, timeout=60, **kwargs)
    assert r.status_code == 200, r.text
    return r.json()


def instances(node: NodeProcess) -> dict[str, dict[str, Any]]:
    return {i["instance_id"]: i for i in api(node, "/v1/instances")["data"]}


def profiled(nodes: list[NodeProcess]) -> bool:
    records = api(nodes[0], "/state")["nodes"].values()
    return len(records) == len(nodes) and all(r["connected"] and r["profile"] for r in records)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """SIZE nodes that want the admin key, and SmolLM2 split over the last two."""
    tmp = tmp_path_factory.mktemp("dashboard")
    env = {"SHOAL_ADMIN_KEYS": KEY}
    nodes: list[NodeProcess] = []
    try:
        nodes.append(start_cluster_node(tmp, env=env))
        nodes += [start_cluster_node(tmp, [nodes[0]], env=env) for _ in range(SIZE - 1)]
        for node in nodes:
            node.wait_ready()
        until(lambda: profiled(nodes), 60, f"{SIZE} nodes with their profiles")
        ids = [str(api(n, "/node_id")) for n in nodes]
        half = LAYERS // 2
        layers = f"{ids[-2]}:0-{half},{ids[-1]}:{half}-{LAYERS}"
        split = api(nodes[0], "/instance", "POST", json={"model": MODEL, "layers": layers})
        split_id = split["instance_id"]
        until(lambda: instances(nodes[0])[split_id]["ready"], 240, "the split instance")
        yield {"nodes": nodes, "ids": ids, "split": split_id}
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's chromium, headless; one for the module (playwright's sync API runs one loop)."""
    pytest.importorskip("playwright", reason="pip install playwright (the dev extra)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def page(browser: Any, cluster: dict[str, Any]) -> Iterator[Any]:
    """The dashboard of the first node, its key typed into the dialog once; no script errors."""
    tab = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    tab.on("pageerror", lambda e: errors.append(str(e)))
    tab.goto(cluster["nodes"][0].url)
    tab.wait_for_selector("#key-dialog[open]", timeout=10_000)
    tab.fill("#key-input", KEY)
    tab.press("#key-input", "Enter")
    tab.wait_for_selector("#link[data-state=live]", timeout=10_000)
    yield tab
    tab.close()
    assert errors == []


def shot(page: Any, selector: str | None, name: str) -> None:
    """With SHOAL_SCREENSHOTS set: one view (or, for None, the window) as dashboard-NAME.png."""
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        path = str(Path(SHOTS) / f"dashboard-{name}.png")
        (page.locator(selector) if selector else page).screenshot(path=path)


@browser_test
def test_the_page_shows_the_nodes_and_the_split_instance(
    page: Any, cluster: dict[str, Any]
) -> None:
    ids, split = cluster["ids"], cluster["split"]
    expect(page.locator('#nodes li.card[data-connected="true"]')).to_have_count(SIZE)
    assert page.locator("#nodes .badge[data-state=master]").count() == 1
    for node_id in ids:
        assert page.locator(f'#nodes li.card[data-node="{node_id}"]').count() == 1
    row = page.locator(f'#instance-list li[data-instance="{split}"]')
    row.locator('.stage[data-state="ready"]').nth(1).wait_for(timeout=10_000)
    stages = row.locator(".stage")
    assert stages.count() == 2
    assert [stages.nth(i).get_attribute("data-node") for i in range(2)] == ids[-2:]
    assert "[0, 15)" in stages.nth(0).inner_text() and "[15, 30)" in stages.nth(1).inner_text()
    # each node's round trips to the other two, as it measured them
    for node_id in ids:
        links = page.locator(f'#nodes li.card[data-node="{node_id}"] dd.links li[data-peer]')
        expect(links).to_have_count(SIZE - 1, timeout=15_000)
        assert re.fullmatch(r"\S+ \d+\.\d\d ms", links.first.inner_text())
    # this node's own load on the instance: running, waiting, live tokens a second
    load = row.locator(".load").inner_text()
    assert re.fullmatch(r"\d+ running · \d+ waiting · \d+\.\d tok/s from this node", load), load
    shot(page, "#topology", "topology")
    shot(page, "#instances", "instances")


@browser_test
def test_a_question_streams_an_answer_with_its_ttft_and_speed(page: Any) -> None:
    page.select_option("#chat-model", MODEL)
    page.fill("#chat-input", "What is the capital of France?")
    page.click("#chat-send")
    answer = page.locator('#chat-log li[data-role="assistant"]').last
    # the page's CSP has no 'unsafe-eval': wait on selectors, not wait_for_function
    page.wait_for_selector('#chat-log li[data-role="assistant"]:not([aria-busy])', timeout=120_000)
    assert "Paris" in answer.inner_text()
    stats = page.locator("#chat-stats").inner_text()
    assert "TTFT" in stats and "tok/s" in stats, stats
    assert page.locator('#chat-log li[data-role="error"]').count() == 0
    shot(page, "#chat", "chat")


@browser_test
def test_stop_ends_the_stream_at_once(page: Any) -> None:
    page.fill("#chat-max-tokens", "2000")
    page.fill("#chat-input", "Write a long story about the sea.")
    page.click("#chat-send")
    answer = page.locator('#chat-log li[data-role="assistant"]').last
    expect(answer).to_have_text(re.compile(r"\S.{20}", re.DOTALL), timeout=60_000)
    page.click("#chat-stop")
    page.wait_for_selector("#chat-send:not([disabled])", timeout=5_000)
    assert answer.get_attribute("data-stopped") == "true"
    assert "stopped" in page.locator("#chat-stats").inner_text()
    page.fill("#chat-max-tokens", "128")


@browser_test
def test_placing_a_model_from_the_page_creates_the_instance(
    page: Any, cluster: dict[str, Any]
) -> None:
    before = set(instances(cluster["nodes"][0]))
    page.click(f'button[aria-label="place {MODEL}"]')
    choice = page.locator(f'select[aria-label="placement for {MODEL}"]')
    choice.wait_for(timeout=10_000)
    assert "tok/s" in choice.locator("option").first.inner_text()
    shot(page, "#models", "models")
    page.locator(f'#model-table tr[data-model="{MODEL}"] button:text-is("Place")').click()
    until(lambda: len(set(instances(cluster["nodes"][0])) - before) == 1, 30, "a new instance")
    (placed,) = set(instances(cluster["nodes"][0])) - before
    row = f'#instance-list li[data-instance="{placed}"]'
    page.wait_for_selector(row, timeout=10_000)
    page.wait_for_selector(f'{row}[data-state="ready"]', timeout=240_000)
    page.click(f'button[aria-label="delete {placed}"]')
    until(lambda: placed not in instances(cluster["nodes"][0]), 30, "the instance deleted")
    page.wait_for_selector(row, state="detached", timeout=10_000)


@browser_test
def test_a_split_typed_into_the_place_panel_is_placed_as_typed(
    page: Any, cluster: dict[str, Any]
) -> None:
    ids, before = cluster["ids"], set(instances(cluster["nodes"][0]))
    page.click(f'button[aria-label="place {MODEL}"]')
    typed = page.locator(f'input[aria-label="manual split for {MODEL}"]')
    typed.wait_for(timeout=10_000)
    assert re.fullmatch(r"\S+:0-30(,\S+:\d+-30)?|\S+:0-\d+(,\S+:\d+-\d+)+",
                        typed.get_attribute("placeholder") or "")  # fmt: skip
    typed.fill(f"{ids[0][:14]}:0-10,{ids[1][:14]}:10-30")  # unique prefixes do
    page.locator(f'#model-table tr[data-model="{MODEL}"] button:text-is("Place")').click()
    until(lambda: len(set(instances(cluster["nodes"][0])) - before) == 1, 30, "a new instance")
    (placed,) = set(instances(cluster["nodes"][0])) - before
    stages = instances(cluster["nodes"][0])[placed]["stages"]
    assert [(s["node_id"], s["start"], s["end"]) for s in stages] == [
        (ids[0], 0, 10), (ids[1], 10, 30)]  # fmt: skip
    row = f'#instance-list li[data-instance="{placed}"]'
    page.wait_for_selector(row, timeout=10_000)
    page.click(f'button[aria-label="delete {placed}"]')
    until(lambda: placed not in instances(cluster["nodes"][0]), 30, "the instance deleted")
    # a split that names no node is the placer's one-line reason, on the page
    page.click(f'button[aria-label="place {MODEL}"]')
    typed.wait_for(timeout=10_000)
    typed.fill("nosuchnode:0-30")
    page.locator(f'#model-table tr[data-model="{MODEL}"] button:text-is("Place")').click()
    alert = page.locator(f'#model-table tr[data-model="{MODEL}"] [role=alert]')
    expect(alert).to_contain_text("nosuchnode", timeout=10_000)
    page.locator(f'#model-table tr[data-model="{MODEL}"] button:text-is("Cancel")').click()


@browser_test
def test_a_killed_node_is_shown_lost_within_3_s(page: Any, cluster: dict[str, Any]) -> None:
    master = api(cluster["nodes"][0], "/state")["master"]
    victim = next(n for n in cluster["nodes"][1:] if str(api(n, "/node_id")) != master)
    victim_id = str(api(victim, "/node_id"))
    card = f'#nodes li.card[data-node="{victim_id}"]'
    page.wait_for_selector(f'{card}[data-connected="true"]', timeout=5_000)
    victim.kill9()
    killed = time.monotonic()
    page.wait_for_selector(f'{card}[data-connected="false"]', timeout=3_000)
    took = time.monotonic() - killed
    assert took < 3.0
    page.locator("#topology").scroll_into_view_if_needed()
    shot(page, None, "lost")


@browser_test
def test_without_keys_the_page_asks_for_none(browser: Any, tmp_path: Path) -> None:
    node = start_cluster_node(tmp_path)
    try:
        node.wait_ready()
        tab = browser.new_page()
        tab.goto(node.url)
        tab.wait_for_selector("#link[data-state=live]", timeout=10_000)
        expect(tab.locator("#nodes li.card")).to_have_count(1, timeout=20_000)
        assert tab.locator("#key-dialog[open]").count() == 0
        expect(tab.locator(f'#model-table tr[data-model="{MODEL}"]')).to_have_count(1)
        tab.close()
    finally:
        node.stop()


@browser_test
def test_a_model_pulled_from_the_page_shows_its_progress_and_then_runs_here(
    browser: Any, tmp_path: Path
) -> None:
    from tests.helpers.hub_server import HubServer
    from tests.helpers.mlx_repos import make_hf_repo

    pytest.importorskip("transformers")
    repo = make_hf_repo(tmp_path / "tiny", layers=2, files=2)
    with HubServer({PULLED_REPO: repo}) as hub:
        hub.rate = 300_000  # bytes/s: slow enough to see the bar move
        node = start_cluster_node(tmp_path, env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"})
        try:
            node.wait_ready()
            tab = browser.new_page(viewport={"width": 1280, "height": 900})
            tab.goto(node.url)
            tab.wait_for_selector("#link[data-state=live]", timeout=10_000)
            row = tab.locator(f'#model-table tr[data-model="{PULLED}"]')
            status = row.locator("td").nth(2)
            expect(status).to_contain_text("runs after a download")
            row.locator(f'button[aria-label="pull {PULLED}"]').click()
            bar = row.locator('.pull[data-pull="downloading"] progress')
            bar.wait_for(timeout=10_000)
            expect(row.locator(".pull")).to_contain_text(re.compile(r"pulling \d+%"))
            shot(tab, "#models", "pull")
            hub.rate = None
            row.locator('[data-pull="done"]').wait_for(timeout=60_000)
            expect(status).to_contain_text("runs here now", timeout=10_000)
            assert row.locator(f'button[aria-label="pull {PULLED}"]').count() == 0
            tab.close()
        finally:
            node.stop()
