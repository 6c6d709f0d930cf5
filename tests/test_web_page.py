"""The web chat page in a real headless Chromium against a real ``quantchat serve`` (tiny model).

Skipped when Debian's chromium / chromedriver are not installed. The screenshot of a conversation is
saved in the test's tmp folder and copied to /tmp/quantchat_web_screenshot.png.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tiny_models import make_tiny_chat_model

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WEB_DIR = Path(__file__).resolve().parents[1] / "quantchat" / "serving" / "web"
SCREENSHOT_COPY = Path("/tmp/quantchat_web_screenshot.png")
API_KEY = "sk-test-web-page"
MODEL = "tiny-chat"
# the one http URL allowed in the assets: the SVG namespace (an identifier, never fetched)
SVG_NS = "http://www.w3.org/2000/svg"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir: Path, log: Path, extra: list[str]) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {k: v for k, v in os.environ.items() if k != "QUANTCHAT_API_KEY"}
        env["QUANTCHAT_HOME"] = str(log.parent / "qc_home")
        cmd = [sys.executable, "-m", "quantchat", "serve", "--model", str(model_dir), "--quant", "none",
               "--max-seq-len", "256", "--device", "cpu", "--threads", "1", "--max-batch", "2",
               "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(self.port), *extra]
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"quantchat serve exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        pytest.fail(f"quantchat serve not healthy after {timeout:.0f} s:\n{self.log.read_text()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log_file.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two servers started together: an open one and one that needs API_KEY."""
    root = tmp_path_factory.mktemp("web")
    model_dir = root / "model"
    model_dir.mkdir()
    make_tiny_chat_model(model_dir)
    started: list[Server] = []
    try:
        started.append(Server(model_dir, root / "open.log", []))
        started.append(Server(model_dir, root / "keyed.log", ["--api-key", API_KEY]))
        for s in started:
            s.wait_ready()
        yield {"open": started[0], "keyed": started[1]}
    finally:
        for s in started:
            s.close()


@pytest.fixture(scope="module")
def browser(servers):
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        pytest.skip(f"needs Chromium and chromedriver at {CHROMIUM} and {CHROMEDRIVER} (apt install chromium "
                    "chromium-driver)")
    pytest.importorskip("selenium", reason="needs selenium (pip install selenium)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,860", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    try:
        driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    except Exception as e:  # a broken browser install is an environment problem, not a page bug
        pytest.skip(f"cannot start headless Chromium: {e}")
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


# -- helpers ------------------------------------------------------------------------------------
def wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as e:  # stale elements while the page re-renders
            last = e
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def open_page(driver, base: str, api_key: str | None = None) -> None:
    driver.get(base + "/")
    js(driver, "localStorage.clear()")
    if api_key:
        js(driver, "localStorage.setItem('quantchat.apiKey', arguments[0])", api_key)
    driver.get(base + "/")
    # record the bodies the page sends to the chat endpoint
    js(driver, """
        window.__sent = [];
        const orig = window.fetch;
        window.fetch = (input, init) => {
            const u = String(input && input.url || input);
            if (u.endsWith('/v1/chat/completions') && init && init.body) window.__sent.push(JSON.parse(init.body));
            return orig(input, init);
        };""")


def set_slider(driver, elem_id: str, value) -> None:
    js(driver, """const e = document.getElementById(arguments[0]); e.value = arguments[1];
                  e.dispatchEvent(new Event('input', {bubbles: true}));""", elem_id, str(value))


def assistants(driver) -> list[dict]:
    return js(driver, """return [...document.querySelectorAll('#messages .msg.assistant')].map(m => ({
        done: m.dataset.done, error: m.classList.contains('error'),
        text: m.querySelector('.content').textContent, stats: m.querySelector('.stats').textContent}));""")


def count(driver, selector: str) -> int:
    return js(driver, "return document.querySelectorAll(arguments[0]).length", selector)


def type_and_send(driver, text: str, with_enter: bool = True) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(text)
    if with_enter:
        box.send_keys(Keys.ENTER)
    else:
        wait_for(lambda: driver.find_element(By.ID, "send").is_enabled(), what="Send enabled")
        driver.find_element(By.ID, "send").click()


def wait_answer(driver, n: int, timeout: float = 30.0) -> dict:
    """Wait for the n-th assistant message (1-based) to be complete; returns it."""
    def ready():
        a = assistants(driver)
        return len(a) == n and a[-1]["done"] == "1" and not js(driver, "return !document.getElementById('stop').hidden") \
            and a[-1]
    return wait_for(ready, timeout, f"answer #{n}")


def wait_models(driver) -> None:
    wait_for(lambda: js(driver, "return document.getElementById('model').value") == MODEL, 20, "model picker")


# -- tests --------------------------------------------------------------------------------------
def test_assets_are_local_and_served(servers):
    """No external URL anywhere in the page's files; every asset comes from quantchat with its type."""
    files = sorted(p for p in WEB_DIR.iterdir() if p.is_file())
    assert {"index.html", "app.js", "style.css"} <= {p.name for p in files}
    for p in files:
        text = p.read_text(encoding="utf-8")
        urls = [u for u in re.findall(r"(?i)https?://[^\s\"'<>)]*", text) if u != SVG_NS]
        assert not urls, f"{p.name} has external URLs: {urls}"
        assert not re.search(r"""(?i)(src|href|action)\s*=\s*["']?//""", text), f"{p.name}: protocol-relative URL"
        assert not re.search(r"(?i)@import|url\(\s*['\"]?(?!data:)[a-z]+:", text), f"{p.name}: remote CSS import"
    base = servers["open"].base
    types = {"/": "text/html", "/static/app.js": "text/javascript", "/static/style.css": "text/css",
             "/static/favicon.svg": "image/svg+xml"}
    for path, ctype in types.items():
        with urllib.request.urlopen(base + path, timeout=5) as r:
            assert r.status == 200 and r.headers["content-type"].startswith(ctype), path
    html = (WEB_DIR / "index.html").read_text(encoding="utf-8")
    for ref in re.findall(r"""(?:src|href)="([^"]+)\"""", html):
        assert ref.startswith("static/"), ref
    # the page's assets need no key even when the API does
    keyed = servers["keyed"].base
    for path in types:
        with urllib.request.urlopen(keyed + path, timeout=5) as r:
            assert r.status == 200, path
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(keyed + "/v1/models", timeout=5)
    assert e.value.code == 401


def test_chat_page_conversation(servers, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d = browser
    base = servers["open"].base
    browser.get_log("performance")  # drop what earlier tests left
    open_page(d, base)
    wait_models(d)
    assert js(d, "return document.getElementById('status').dataset.state") == "ready"
    set_slider(d, "temperature", 0)
    set_slider(d, "max-tokens", 24)
    assert d.find_element(By.ID, "temperature-value").text == "0.00"
    assert d.find_element(By.ID, "max-tokens-value").text == "24"
    assert d.find_element(By.ID, "top-p-value").text == "0.95"

    # Shift+Enter is a new line, not a send
    box = d.find_element(By.ID, "prompt")
    box.send_keys("line one", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "line two")
    assert box.get_attribute("value") == "line one\nline two"
    assert count(d, "#messages .msg") == 0

    # turn 1: Enter sends; the answer streams in and ends with stats
    type_and_send(d, "Hello there!")
    first = wait_answer(d, 1)
    assert re.fullmatch(r"[a-z ]+", first["text"]) and first["text"].strip(), first
    assert "24 tokens" in first["stats"] and "tok/s" in first["stats"] and "first token" in first["stats"], first
    assert float(re.search(r"([\d.]+) tok/s", first["stats"]).group(1)) > 0
    sent = js(d, "return window.__sent")
    assert sent[-1]["stream"] is True and sent[-1]["max_tokens"] == 24 and sent[-1]["temperature"] == 0
    assert sent[-1]["messages"] == [{"role": "user", "content": "Hello there!"}]
    assert d.find_element(By.ID, "prompt").get_attribute("value") == ""

    # turn 2: the whole history goes with it (Send button this time)
    type_and_send(d, "Tell me more <b>bold</b> & <script>x</script>", with_enter=False)
    second = wait_answer(d, 2)
    assert second["text"].strip()
    expected = [{"role": "user", "content": "Hello there!"}, {"role": "assistant", "content": first["text"]},
                {"role": "user", "content": "Tell me more <b>bold</b> & <script>x</script>"}]
    assert js(d, "return window.__sent")[-1]["messages"] == expected
    # user text is shown as text, never parsed as HTML
    assert count(d, "#messages b, #messages script") == 0
    user_texts = js(d, "return [...document.querySelectorAll('#messages .msg.user .content')].map(e => e.textContent)")
    assert user_texts == ["Hello there!", "Tell me more <b>bold</b> & <script>x</script>"]

    # Regenerate: the last answer is replaced, the same history is sent again
    n_sent = len(js(d, "return window.__sent"))
    d.find_element(By.ID, "regenerate").click()
    wait_for(lambda: len(js(d, "return window.__sent")) == n_sent + 1, 10, "regenerate request")
    again = wait_answer(d, 2)
    assert again["text"] == second["text"]  # temperature 0: same text
    assert js(d, "return window.__sent")[-1]["messages"] == expected
    assert count(d, "#messages .msg") == 4

    # a system prompt goes first
    d.find_element(By.ID, "system").send_keys("Be brief.")
    d.find_element(By.ID, "regenerate").click()
    wait_for(lambda: len(js(d, "return window.__sent")) == n_sent + 2, 10, "regenerate request")
    wait_answer(d, 2)
    assert js(d, "return window.__sent")[-1]["messages"] == [{"role": "system", "content": "Be brief."}] + expected
    assert count(d, "#messages .msg") == 4

    shot = tmp_path / "quantchat_web.png"
    d.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    shutil.copyfile(shot, SCREENSHOT_COPY)

    # Stop during a long answer (max tokens above the context room: capped by the page)
    set_slider(d, "max-tokens", 2048)
    type_and_send(d, "a long one please")
    wait_for(lambda: js(d, "return !document.getElementById('stop').hidden"), 10, "Stop button")
    js(d, "document.getElementById('stop').click()")  # it may just have finished: no click race
    third = wait_answer(d, 3)
    body = js(d, "return window.__sent")[-1]
    assert body["max_tokens"] < 256  # capped to what the context has room for
    assert "stopped" in third["stats"] or "context" in third["stats"], third

    # Clear: everything goes; the next request has no history
    d.find_element(By.ID, "clear").click()
    assert count(d, "#messages .msg") == 0
    assert d.find_element(By.ID, "empty").is_displayed()
    set_slider(d, "max-tokens", 8)
    d.find_element(By.ID, "system").clear()
    type_and_send(d, "fresh start")
    wait_answer(d, 1)
    assert js(d, "return window.__sent")[-1]["messages"] == [{"role": "user", "content": "fresh start"}]

    # settings survive a reload (local storage)
    d.refresh()
    wait_models(d)
    assert d.find_element(By.ID, "max-tokens-value").text == "8"
    assert d.find_element(By.ID, "temperature-value").text == "0.00"

    # every request the browser made went to this server
    hosts = set()
    for entry in d.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent":
            u = urlsplit(msg["params"]["request"]["url"])
            if u.scheme not in ("data", "blob", "about", "chrome"):
                hosts.add((u.scheme, u.netloc))
    assert hosts == {("http", f"127.0.0.1:{servers['open'].port}")}, hosts
    severe = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


def test_chat_page_errors_shown(servers, browser):

    d = browser
    open_page(d, servers["open"].base)
    wait_models(d)
    set_slider(d, "temperature", 0)
    set_slider(d, "max-tokens", 4)
    # a prompt longer than the 256-token context: the page says so instead of sending it
    type_and_send(d, "x" * 300)
    err = wait_answer(d, 1)
    assert err["error"] and "context" in err["text"], err
    assert js(d, "return window.__sent").__len__() == 0
    # a server error (400 from the API) is shown in the page
    js(d, """const orig = window.fetch; window.fetch = (input, init) => {
        if (String(input).endsWith('/v1/chat/completions')) {
            const b = JSON.parse(init.body); b.top_p = 0; init = {...init, body: JSON.stringify(b)};
        }
        return orig(input, init); };""")
    type_and_send(d, "hi")
    err = wait_answer(d, 1)  # the failed turn was replaced
    assert err["error"] and "top_p" in err["text"] and "HTTP 400" in err["text"], err
    assert count(d, "#messages .msg.user") == 1


def test_chat_page_api_key(servers, browser):
    from selenium.webdriver.common.by import By

    d = browser
    base = servers["keyed"].base
    open_page(d, base)
    notice = d.find_element(By.ID, "notice")
    wait_for(lambda: notice.is_displayed() and "API key" in notice.text, 10, "401 notice")
    assert js(d, "return document.getElementById('status').dataset.state") == "key"

    # a wrong key: refused, said so
    key = d.find_element(By.ID, "api-key")
    key.send_keys("wrong-key")
    d.find_element(By.ID, "prompt").click()  # 'change' fires on blur
    wait_for(lambda: "refused" in notice.text, 10, "refused-key notice")

    # the right key: models load, chat works, the key is remembered
    key.clear()
    key.send_keys(API_KEY)
    d.find_element(By.ID, "prompt").click()
    wait_models(d)
    assert not notice.is_displayed()
    assert js(d, "return localStorage.getItem('quantchat.apiKey')") == API_KEY
    set_slider(d, "temperature", 0)
    set_slider(d, "max-tokens", 6)
    type_and_send(d, "hello with a key")
    answer = wait_answer(d, 1)
    assert answer["text"].strip() and not answer["error"] and "tok/s" in answer["stats"], answer

    # a key that stops working mid-conversation: the answer bubble shows the 401 message
    js(d, "document.getElementById('api-key').value = 'revoked'")
    type_and_send(d, "again")
    err = wait_answer(d, 2)
    assert err["error"] and "API key" in err["text"], err
    # fixed key + Regenerate retries the failed turn
    js(d, "document.getElementById('api-key').value = arguments[0]", API_KEY)
    d.find_element(By.ID, "regenerate").click()
    ok = wait_for(lambda: (a := assistants(d)) and len(a) == 2 and a[-1]["done"] == "1" and not a[-1]["error"]
                  and a[-1], 30, "retried answer")
    assert ok["text"].strip()


def test_chat_page_json_mode(servers, browser):
    """The JSON-mode toggle asks for response_format json_object; the answer is JSON, not the tiny
    model's letters."""
    d = browser
    open_page(d, servers["open"].base)
    wait_models(d)
    set_slider(d, "temperature", 0)
    set_slider(d, "max-tokens", 8)
    js(d, "const e = document.getElementById('json-mode'); e.checked = true; e.dispatchEvent(new Event('change'))")
    type_and_send(d, "json please")
    answer = wait_answer(d, 1)
    assert js(d, "return window.__sent")[-1]["response_format"] == {"type": "json_object"}
    assert answer["text"].startswith("{"), answer
    d.refresh()
    wait_models(d)
    assert js(d, "return document.getElementById('json-mode').checked") is True
