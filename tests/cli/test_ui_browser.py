"""`bench ui` in a real browser: after `bench compare --recipe tiny`, headless Chromium (Selenium with Debian's
chromium and chromium-driver, which `.ci/run` installs) opens the MLflow UI that `bench ui` serves and must find
every run and the eval/ metrics, on the experiment's runs page and in the compare-runs view.

The MLflow UI is a React app that renders only what is on screen: nested runs are collapsed under their parent,
metric columns are off until chosen in "Columns", and the compare view's metric table is virtualised. So the test
does what a user would (expand the parent, choose columns, scroll the metric table) before reading the page.
It also opens a run's logged figure, which the server reads from the artifacts beside the store. Screenshots of
the three pages go to pytest's tmp path and to `.cache/ui-screenshots/` (ignored by git); their paths are printed
(`pytest -s`).
"""

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from mlflow import MlflowClient
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from bench.cli import main
from bench.runs import recipes
from bench.runs.tracking import tracking_uri

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / ".cache" / "ui-screenshots"
# Shown as runs-table columns; every eval/ metric is looked for in the compare view.
COLUMNS = ["eval/win_rate_vs_chosen", "eval/win_rate_vs_ref", "eval/judge_score", "eval/kl"]
TIMEOUT_S = 90


def browser_binaries() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver") or next(
        (p for p in ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"] if os.path.exists(p)), None)
    if not chromium or not chromedriver:
        pytest.fail("this test needs Chromium and its driver: apt-get install chromium chromium-driver "
                    f"(.ci/run installs them); found chromium={chromium}, chromedriver={chromedriver}")
    return chromium, chromedriver


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_ui_shows_every_compare_run_and_its_eval_metrics(tmp_path, monkeypatch, hh_path):
    binaries = browser_binaries()  # before the minute of training
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default store: ./mlflow.db
    main(["compare", "--recipe", "tiny", "--data-path", hh_path])
    assert (tmp_path / "mlflow.db").exists()
    check_ui(tmp_path, binaries, tmp_path)


def check_ui(workdir: Path, binaries: tuple[str, str], shots: Path) -> None:
    client = MlflowClient(tracking_uri())
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    stages = [r for r in runs if "compare_stage" in r.data.tags]
    evaluated = [r for r in stages if "eval/win_rate_vs_chosen" in r.data.metrics]
    eval_metrics = sorted({key for r in runs for key in r.data.metrics if key.startswith("eval/")})
    aligned = [s for s in recipes.load("tiny")[1]["compare"]["stages"] if s != "rm"]
    # The parent, the proxy and the judge, and one run per aligned algorithm, each evaluated.
    assert len(runs) == 3 + len(aligned) and len(stages) == 2 + len(aligned) and len(evaluated) == len(aligned), \
        [r.info.run_name for r in runs]
    assert set(COLUMNS) <= set(eval_metrics)

    with ui_server(workdir) as (url, latest), chrome(*binaries) as driver:
        # The runs page: every run by name, and the eval/ columns with each run's values.
        driver.get(f"{url}/#/experiments/{experiment.experiment_id}/runs")
        parent = next(r for r in runs if r.data.tags.get("compare_role") == "parent")
        wait_for(driver, lambda: parent.info.run_name in grid_names(driver).values(),
                 "the compare parent run in the runs table", shots)
        close_assistant(driver)
        driver.find_element(By.CSS_SELECTOR, "button[data-component-id*='runnamecellrenderer']").click()  # expand
        wait_for(driver, lambda: len(grid_names(driver)) == len(runs), "the parent's child runs, once expanded", shots)
        toggle_columns(driver, ["Dataset", "Models", *COLUMNS])  # two empty attribute columns off, the metrics on
        wait_for(driver, lambda: set(COLUMNS) <= set(header_names(driver)), f"the metric columns {COLUMNS}", shots)
        widen_columns(driver, ["attributes.`Run Name`", "attributes.`Source`", *(f"metrics.`{m}`" for m in COLUMNS)])
        names = grid_names(driver)
        assert names == {r.info.run_id: r.info.run_name for r in runs}
        for run in evaluated:
            for metric in COLUMNS:
                shown = cell_text(driver, run.info.run_id, f"metrics.`{metric}`")
                assert float(shown) == pytest.approx(run.data.metrics[metric], rel=1e-9), (run.info.run_name, metric)
        assert shows(driver, [*(r.info.run_name for r in runs), *COLUMNS])
        save_screenshot(driver, shots, "mlflow-ui-runs.png")

        # The compare view of the seven stage runs (the parent has no artifacts, which MLflow 3.17's compare
        # view fails to render next to runs that have some).
        # Seven of them at most: the compare view renders only the run columns that fit the window.
        compared = sorted(stages, key=lambda r: r.data.tags["compare_stage"] != "dpo")[:7]
        query = urllib.parse.urlencode({"runs": json.dumps([r.info.run_id for r in compared]),
                                        "experiments": json.dumps([experiment.experiment_id])})
        driver.get(f"{url}/#/compare-runs?{query}")
        wait_for(driver, lambda: shows(driver, [*(r.info.run_name for r in compared), "Metrics"]),
                 "the stage runs' names and the Metrics section in the compare view", shots)
        assert "Something went wrong" not in page_text(driver)  # a section that failed to render
        listed, row = compare_metric_table(driver, COLUMNS[0])
        missing = [m for m in eval_metrics if m not in listed]
        assert not missing, f"the compare view does not list {missing}; it lists {sorted(listed)}"
        assert len(row) == len(compared), row  # one value per run, in the order of the URL
        for run, shown in zip(compared, row):
            expected = run.data.metrics.get(COLUMNS[0])
            ok = shown == "NaN" if expected is None else float(shown) == pytest.approx(expected, rel=1e-2, abs=1e-3)
            assert ok, (run.info.run_name, shown, expected)
        # The algorithms' key params sort first, so the parallel-coordinates plot picks them (issue 27).
        wait_for(driver, lambda: shows(driver, ["algo.beta", "algo.budget", "algo.lr"]), "the key params", shots)
        collapse_sections(driver, ["Parameters", "Artifacts"])  # long, and the artifacts pane is a screen high
        save_screenshot(driver, shots, "mlflow-ui-compare.png", full_page=True)

        # An artifact: the DPO run's win-rate figure, which the server reads from mlartifacts/ beside the store.
        dpo = next(r for r in stages if r.data.tags["compare_stage"] == "dpo")
        figure = Path(dpo.info.artifact_uri) / "eval" / "win_rates.png"
        width, height = struct.unpack(">II", figure.read_bytes()[16:24])  # the PNG's IHDR
        driver.get(f"{url}/#/experiments/{experiment.experiment_id}/runs/{dpo.info.run_id}/artifacts/"
                   "eval/win_rates.png")
        drawn = "return [...document.images].some(i => i.naturalWidth == arguments[0] && i.naturalHeight == arguments[1])"
        wait_for(driver, lambda: driver.execute_script(drawn, width, height) and shows(driver, ["\nwin_rates.png\n"]),
                 f"the figure {figure} ({width}x{height}), and its name in the artifact tree", shots)
        save_screenshot(driver, shots, "mlflow-ui-artifact.png")

        # The latest comparison, as `bench ui` names it: its parent run, and on it the table with each row's test.
        assert latest == f"{url}/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}"
        driver.get(f"{latest}/artifacts/comparison/table.json")
        table = json.loads((Path(parent.info.artifact_uri) / "comparison" / "table.json").read_text())
        cells = [str(value) for row in table["data"] for value in row[:2]]  # each row's algorithm and seeds
        wait_for(driver, lambda: shows(driver, [parent.info.run_name, "table.json", "p_holm", *aligned, *cells[:4]]),
                 "the comparison's table on its parent run", shots)
        save_screenshot(driver, shots, "mlflow-ui-comparison.png")


# --- the server -----------------------------------------------------------------------------------------------

@contextmanager
def ui_server(workdir: Path):
    """`bench ui` on a free port, as a user starts it; stopped with SIGINT (Ctrl-C), which must stop the server."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    log_path = workdir / "bench-ui.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "bench.cli", "ui", "--port", str(port)], cwd=workdir, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline and process.poll() is None:
            url = next((line.removeprefix("MLflow UI: ").strip() for line in log_path.read_text().splitlines()
                        if line.startswith("MLflow UI: ")), None)
            time.sleep(0.5)
        assert url == f"http://127.0.0.1:{port}", f"bench ui printed no URL; its log:\n{log_path.read_text()[-3000:]}"
        latest = next((line.removeprefix("latest comparison: ").strip() for line in log_path.read_text().splitlines()
                       if line.startswith("latest comparison: ")), None)
        yield url, latest
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(60)
    assert code == 0, f"bench ui exited with {code}; its log:\n{log_path.read_text()[-3000:]}"
    with pytest.raises(urllib.error.URLError):  # nothing left listening
        urllib.request.urlopen(url, timeout=5)


# --- the browser ----------------------------------------------------------------------------------------------

@contextmanager
def chrome(chromium: str, chromedriver: str):
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1920,1200", "--lang=en-US"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=chromedriver), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def page_text(driver) -> str:
    return driver.find_element(By.TAG_NAME, "body").text


def shows(driver, texts: list[str]) -> bool:
    text = page_text(driver)
    return all(t in text for t in texts)


def wait_for(driver, condition, what: str, shots: Path) -> None:
    try:
        WebDriverWait(driver, TIMEOUT_S, 0.5, ignored_exceptions=(Exception,)).until(lambda _: condition())
    except TimeoutException:
        path = save_screenshot(driver, shots, "mlflow-ui-failure.png")
        pytest.fail(f"after {TIMEOUT_S} s the page does not show {what} (screenshot {path}); its text:\n"
                    f"{page_text(driver)[:3000]}")


def grid_names(driver) -> dict[str, str]:
    """Run id -> the name shown in the runs table (AG Grid rows carry the run id as row-id)."""
    return driver.execute_script("""
        const names = {};
        for (const cell of document.querySelectorAll('.ag-row [col-id="attributes.`Run Name`"]')) {
            const link = cell.querySelector('a[href*="/runs/"]');
            if (link) names[cell.closest('.ag-row').getAttribute('row-id')] = link.innerText.trim();
        }
        return names;""")


def header_names(driver) -> list[str]:
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".ag-header-cell[col-id^='metrics.']")]


def cell_text(driver, run_id: str, column: str) -> str:
    return driver.execute_script("""
        const cell = document.querySelector(`.ag-row[row-id="${arguments[0]}"] .ag-cell[col-id="${arguments[1]}"]`);
        return cell ? cell.innerText.trim() : null;""", run_id, column)


def close_assistant(driver) -> None:
    """The MLflow Assistant side panel opens on first visit and takes a third of the width."""
    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        if button.is_displayed():
            button.click()


def toggle_columns(driver, titles: list[str]) -> None:
    """Tick or untick columns in the runs table's "Columns" menu."""
    driver.find_element(By.XPATH, "//button[normalize-space(.)='Columns']").click()
    search = WebDriverWait(driver, TIMEOUT_S).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "input[placeholder='Search columns']"))
    for title in titles:
        search.send_keys(Keys.CONTROL, "a")
        search.send_keys(title)
        node = (f"//span[contains(@class,'-tree-title')][normalize-space(.)='{title}']"
                "/ancestor::div[contains(@class,'-tree-treenode')][1]//span[contains(@class,'-tree-checkbox')]")
        WebDriverWait(driver, TIMEOUT_S).until(lambda d: d.find_element(By.XPATH, node)).click()
    search.send_keys(Keys.ESCAPE)


def widen_columns(driver, columns: list[str], by: int = 90) -> None:
    """Drag each column's resize handle, so that run and metric names are not cut in the screenshot."""
    for column in columns:
        handle = driver.find_element(By.CSS_SELECTOR, f'.ag-header-cell[col-id="{column}"] .ag-header-cell-resize')
        driver.execute_script("arguments[0].scrollIntoView({block: 'nearest', inline: 'nearest'})", handle)
        ActionChains(driver).click_and_hold(handle).move_by_offset(by, 0).release().perform()
    title = driver.find_element(By.XPATH, "//*[normalize-space(text())='Training runs']")
    ActionChains(driver).move_to_element(title).perform()  # away from the cells' tooltips


def compare_metric_table(driver, row: str) -> tuple[set[str], list[str]]:
    """The metric names the compare view's table lists, and the values it shows in the row `row`, one per run.
    The table is virtualised, so this scrolls through it, and leaves it scrolled to that row. Its names column
    follows the values' scroll one event late (MLflow 3.17), so both are scrolled, as a user's wheel would."""
    driver.set_script_timeout(TIMEOUT_S)
    names, values = driver.execute_async_script("""
        const [target, done] = arguments;
        const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));
        const section = [...document.querySelectorAll('[class*="-collapse-item"]')]
            .find(item => item.querySelector('[class*="-collapse-header"]')?.innerText.trim() === 'Metrics');
        const [nameGrid, valueGrid] = section ? section.querySelectorAll('.ReactVirtualized__Grid') : [];
        if (!valueGrid) return done([[], []]);
        const cells = grid => [...grid.querySelectorAll('.ReactVirtualized__Grid__innerScrollContainer > div')];
        (async () => {
            const names = new Set();
            let top = null;
            for (let y = 0; y < nameGrid.scrollHeight; y += nameGrid.clientHeight / 2) {
                nameGrid.scrollTop = y;
                await sleep(200);
                for (const cell of cells(nameGrid)) {
                    names.add(cell.innerText.trim());
                    if (cell.innerText.trim() === target) top = cell.style.top;
                }
            }
            if (top === null) return done([[...names], []]);
            valueGrid.scrollTop = parseFloat(top);
            await sleep(300);
            nameGrid.scrollTop = valueGrid.scrollTop;
            await sleep(300);
            const row = cells(valueGrid).filter(cell => cell.style.top === top)
                .sort((a, b) => parseFloat(a.style.left) - parseFloat(b.style.left));
            done([[...names], row.map(cell => cell.innerText.trim())]);
        })();""", row)
    return set(names), values


def collapse_sections(driver, titles: list[str]) -> None:
    for header in driver.find_elements(By.CSS_SELECTOR, "[class*='-collapse-header']"):
        if header.text.strip() in titles:
            header.click()
    time.sleep(0.5)


def save_screenshot(driver, shots: Path, name: str, full_page: bool = False) -> Path:
    """The UI scrolls inside <main>, not the document: for the whole page, the window grows to its height."""
    size = driver.get_window_size()
    if full_page:
        extra = driver.execute_script(
            "const m = document.querySelector('main'); return m ? m.scrollHeight - m.clientHeight : 0;")
        if extra > 0:
            driver.set_window_size(size["width"], min(size["height"] + extra, 12000))
            time.sleep(1)
    path = shots / name
    driver.save_screenshot(str(path))
    driver.set_window_size(size["width"], size["height"])
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    stable = SCREENSHOTS / name
    shutil.copyfile(path, stable)
    print(f"screenshot: {path}\nscreenshot: {stable}")
    return path
