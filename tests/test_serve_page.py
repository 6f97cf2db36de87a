"""The page of `clap serve` in a real browser: Debian's headless Chromium through Selenium, against a real
`clap serve` subprocess over a small index of synthesised files built with the tiny model.

Typing searches; a click plays from the matching window and a click on the waveform seeks; the arrow keys move
and audition, Space pauses, Enter asks for more like this and `/` goes back to the search box; "more like this",
a dropped file and a picked file give results; tags and the map render, the map lights up the results, hovering
plays a preview and a lasso lists the paths; the page's token rides on every request; a Range request gets 206.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("selenium")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from cli_runner import clap  # noqa: E402
from entry_point import clap_executable  # noqa: E402
from library import GOOD, make_library  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(
    not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
    reason=f"the page tests need Debian's chromium and chromedriver ({CHROMIUM}, {CHROMEDRIVER}): "
           "apt-get install chromium chromium-driver",
)

# A small library: short files, three with 10 s windows (30, 22 and 14 s), an AIFF the server sends as WAV
FILES = {"drums/kick_01.wav", "drums/snare_01.flac", "drums/hat/open_01.mp3", "fx/whoosh_01.wav",
         "fx/glass/shatter_01.wav", "ambience/rain_roof.flac", "ambience/forest.ogg", "ambience/city/street.wav",
         "music/pad_c.wav", "voice/shout.aiff"}
SMALL = [entry for entry in GOOD if entry[0] in FILES]
TOKEN = "page-test-token"
# the tags' label set: a few labels, embedded in a moment (a built-in set's hundreds take the first query long)
LABELS = "rain,thunder,glass breaking,kick drum,whoosh,birds singing,traffic,speech,piano,wind"
PAD = 10  # map.js: CSS px around the map's points
WAIT = 60  # seconds: the longest any step waits for the page (the first query loads the server's text model)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The environment of everything this module runs: its own CLAP_HOME and an empty, offline hub cache."""
    base = tmp_path_factory.mktemp("serve-page-env")
    values = {"CLAP_HOME": str(base / "clap-home"), "HF_HOME": str(base / "hf"),
              "HF_HUB_CACHE": str(base / "hf" / "hub"), "HF_HUB_OFFLINE": "1"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in values.items():
            mp.setenv(key, value)
        yield dict(os.environ)


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_model_dir, env):
    """(library root, index dir), indexed once with the real CLI."""
    root = tmp_path_factory.mktemp("page-library")
    make_library(root, good=SMALL)
    index_dir = tmp_path_factory.mktemp("page-index") / "idx"
    clap("index", root, "--index", index_dir, "--model", tiny_model_dir, "--workers", "1", "--json")
    return root.resolve(), index_dir


def start_server(index_dir: Path, env: dict, *extra: str) -> subprocess.Popen:
    """`clap serve` on a free loopback port (read its URL with `served_url`)."""
    return subprocess.Popen([clap_executable(), "serve", "--index", str(index_dir), "--port", "0",
                             "--labels", LABELS, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def served_url(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline()  # "serving … at http://127.0.0.1:PORT/  (Ctrl-C stops)"
    found = re.search(r"http://\S+", line)
    if not found:
        proc.kill()
        pytest.fail(f"clap serve did not start: {line}{proc.stderr.read()}")
    return found.group(0).split("?")[0]  # the token server prints its URL with the token


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def servers(library, env):
    """(URL of a server without a token, URL of one with TOKEN): both start at once, to save a start-up."""
    procs = [start_server(library[1], env), start_server(library[1], env, "--token", TOKEN)]
    try:
        yield [served_url(proc) for proc in procs]
    finally:
        for proc in procs:
            stop_server(proc)


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def api(server):
    with httpx.Client(base_url=server, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--autoplay-policy=no-user-gesture-required", "--window-size=1400,1000",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    try:
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    except WebDriverException as exc:
        pytest.skip(f"headless chromium does not start here: {str(exc).splitlines()[0]}")
    driver.set_script_timeout(WAIT)
    yield driver
    driver.quit()


def wait(driver, condition, message: str = ""):
    return WebDriverWait(driver, WAIT, poll_frequency=0.05,
                         ignored_exceptions=(StaleElementReferenceException,)).until(condition, message)


def open_page(driver, url: str) -> None:
    driver.get(url)
    wait(driver, lambda d: d.execute_script("return document.readyState") == "complete")


def search(driver, text: str) -> list[int]:
    """Type a query into the box; returns the ids of the rows shown, in order."""
    box = driver.find_element(By.ID, "q")
    box.clear()
    box.send_keys(text)
    wait(driver, lambda d: text in d.find_element(By.ID, "results-title").text, f"no results for {text!r}")
    return row_ids(driver)


def row_ids(driver) -> list[int]:
    return [int(row.get_attribute("data-id")) for row in driver.find_elements(By.CSS_SELECTOR, "#results li.hit")]


def audio(driver) -> dict:
    return driver.execute_script(
        "const a = document.getElementById('player');"
        "return {src: a.src, t: a.currentTime, paused: a.paused};")


def playing(driver, file_id: int, after: float = 0.0):
    """Wait until file `file_id` plays past `after` seconds; returns the audio state."""
    def check(d):
        state = audio(d)
        ok = re.search(rf"/api/audio/{file_id}(\?|$)", state["src"]) and not state["paused"] and state["t"] > after
        return state if ok else False
    return wait(driver, check, f"file {file_id} does not play past {after} s: {audio(driver)}")


def inked(driver, canvas, rgb=None, tolerance=30) -> int:
    """How many pixels of a canvas are drawn (not transparent), or near the colour `rgb`."""
    return driver.execute_script(
        "const [c, rgb, tol] = arguments; const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 0; i < d.length; i += 4) {"
        "  if (!d[i + 3]) continue;"
        "  if (!rgb || (Math.abs(d[i] - rgb[0]) < tol && Math.abs(d[i + 1] - rgb[1]) < tol"
        "      && Math.abs(d[i + 2] - rgb[2]) < tol)) n++; }"
        "return n;", canvas, rgb, tolerance)


def api_hits(api, path: str, **params) -> list[dict]:
    response = api.get(path, params=params)
    assert response.status_code == 200, response.text
    return response.json()["hits"]


def test_typing_shows_the_api_results_with_waveforms_tags_and_status(browser, server, api):
    open_page(browser, server)
    status = api.get("/api/status").json()
    wait(browser, lambda d: f"{status['files']} files" in d.find_element(By.ID, "status").text)
    ids = search(browser, "rain on a roof")
    assert ids == [h["id"] for h in api_hits(api, "/api/search", q="rain on a roof", k=50)]
    first = browser.find_element(By.CSS_SELECTOR, "#results li.hit")
    hit = api_hits(api, "/api/search", q="rain on a roof", k=1)[0]
    assert hit["name"] in first.text and f"{hit['score']:.3f}" in first.text and hit["format"].upper() in first.text
    wait(browser, lambda d: all(inked(d, c) for c in d.find_elements(By.CSS_SELECTOR, "#results canvas.wave")),
         "a waveform stays blank")
    tags = first.find_elements(By.CSS_SELECTOR, "button.tag")
    assert [t.text for t in tags] == [t["label"] for t in hit["tags"]] and tags
    tags[0].click()  # clicking a tag searches for it
    wait(browser, lambda d: d.find_element(By.ID, "q").get_attribute("value") == hit["tags"][0]["label"])
    wait(browser, lambda d: row_ids(d) == [h["id"] for h in api_hits(api, "/api/search", q=hit["tags"][0]["label"])])


def test_a_click_plays_from_the_window_and_the_waveform_seeks(browser, server, api):
    open_page(browser, server)
    # a query whose best window in some long file does not start at 0 (the model is random: look for one)
    for text in ("rain on a roof", "birds in a forest", "city street", "wind", "engine", "thunder", "crowd"):
        windowed = [h for h in api_hits(api, "/api/search", q=text) if h["start"]]
        if windowed:
            break
    assert windowed, "no query found whose best window starts after 0 s"
    hit = windowed[0]
    search(browser, text)
    row = browser.find_element(By.CSS_SELECTOR, f'#results li.hit[data-id="{hit["id"]}"]')
    row.find_element(By.CSS_SELECTOR, ".name").click()
    first = playing(browser, hit["id"])
    assert first["t"] >= hit["start"] - 0.05, (first, hit)
    later = playing(browser, hit["id"], after=first["t"])
    assert later["t"] > first["t"]

    long_hit = max(api_hits(api, "/api/search", q=text), key=lambda h: h["duration"])
    canvas = browser.find_element(By.CSS_SELECTOR, f'#results li.hit[data-id="{long_hit["id"]}"] canvas.wave')
    width = canvas.size["width"]
    ActionChains(browser).move_to_element_with_offset(canvas, int(width * 0.3), 0).click().perform()  # at 80 %
    seeked = playing(browser, long_hit["id"], after=0.7 * long_hit["duration"])
    assert seeked["t"] < 0.9 * long_hit["duration"]


def test_keys_move_audition_pause_ask_for_more_and_focus_the_search(browser, server, api):
    open_page(browser, server)
    ids = search(browser, "glass")
    box = browser.find_element(By.ID, "q")
    box.send_keys(Keys.ARROW_DOWN)  # from the box into the results, auditioning the first
    playing(browser, ids[0])
    keys = ActionChains(browser)
    keys.send_keys(Keys.ARROW_DOWN).perform()
    playing(browser, ids[1])
    focused = browser.switch_to.active_element
    assert focused.get_attribute("data-id") == str(ids[1]) and "current" in focused.get_attribute("class")
    assert focused.get_attribute("tabindex") == "0" and focused.get_attribute("aria-label").startswith("2. ")
    keys.send_keys(Keys.ARROW_UP).perform()
    playing(browser, ids[0])
    keys.send_keys(Keys.SPACE).perform()
    wait(browser, lambda d: audio(d)["paused"], "Space does not pause")
    keys.send_keys(Keys.SPACE).perform()
    playing(browser, ids[0])
    name = browser.find_element(By.CSS_SELECTOR, f'li.hit[data-id="{ids[0]}"] .name').text
    keys.send_keys(Keys.ENTER).perform()  # more like this
    similar = [h["id"] for h in api_hits(api, "/api/similar", id=ids[0])]
    wait(browser, lambda d: f"More like {name}" in d.find_element(By.ID, "results-title").text)
    assert row_ids(browser) == similar and ids[0] not in similar
    keys.send_keys(Keys.ARROW_DOWN).perform()  # the keys go on in the new results
    playing(browser, similar[1])
    keys.send_keys("/").perform()
    assert browser.switch_to.active_element.get_attribute("id") == "q"


def test_more_like_this_a_dropped_file_and_a_picked_file_give_results(browser, server, api, library):
    root, _ = library
    open_page(browser, server)
    ids = search(browser, "impact")
    browser.find_element(By.CSS_SELECTOR, f'li.hit[data-id="{ids[2]}"] button.more').click()
    wait(browser, lambda d: row_ids(d) == [h["id"] for h in api_hits(api, "/api/similar", id=ids[2])])

    # a file dropped on the page: the bytes of an indexed WAV, so that file comes first
    whoosh = next(h for h in api_hits(api, "/api/search", q="impact") if h["name"] == "whoosh_01.wav")
    browser.execute_async_script(
        "const [url, done] = arguments;"
        "fetch(url).then((r) => r.blob()).then((blob) => {"
        "  const data = new DataTransfer(); data.items.add(new File([blob], 'dropped.wav', {type: 'audio/wav'}));"
        "  const zone = document.getElementById('drop');"
        "  for (const type of ['dragenter', 'dragover', 'drop'])"
        "    zone.dispatchEvent(new DragEvent(type, {dataTransfer: data, bubbles: true, cancelable: true}));"
        "  done(true); });", f"api/audio/{whoosh['id']}")
    wait(browser, lambda d: "Sounds like dropped.wav" in d.find_element(By.ID, "results-title").text)
    assert row_ids(browser)[0] == whoosh["id"]

    # a file picked with the file input
    snare = root / "drums" / "snare_01.flac"
    browser.find_element(By.ID, "file").send_keys(str(snare))
    wait(browser, lambda d: "Sounds like snare_01.flac" in d.find_element(By.ID, "results-title").text)
    top = browser.find_element(By.CSS_SELECTOR, "#results li.hit")
    assert top.find_element(By.CSS_SELECTOR, ".name").text == "snare_01.flac"


def test_the_map_renders_lights_up_results_previews_and_lassoes_paths(browser, server, api, library):
    root, _ = library
    open_page(browser, server)
    canvas = browser.find_element(By.ID, "map")
    wait(browser, lambda d: inked(d, canvas) > 0, "the map stays blank")
    accent = (47, 111, 219)  # --accent in the light theme: the results' rings
    assert inked(browser, canvas, accent) == 0
    search(browser, "rain on a roof")
    wait(browser, lambda d: inked(d, canvas, accent) > 20, "the results do not light up on the map")

    tag_map = api.get("/api/map", params={"color": "tag"}).json()
    browser.find_element(By.CSS_SELECTOR, 'label[for="color-tag"]').click()
    wait(browser, lambda d: d.execute_script(
        "return [...document.querySelectorAll('#legend li')].map((li) => li.textContent)") == tag_map["legend"])

    # hovering a point plays a short preview of that file
    width, height = canvas.size["width"], canvas.size["height"]
    x = PAD + tag_map["x"][0] * (width - 2 * PAD)
    y = PAD + (1 - tag_map["y"][0]) * (height - 2 * PAD)
    ActionChains(browser).move_to_element_with_offset(canvas, int(x - width / 2), int(y - height / 2)).perform()
    previewed = wait(browser, lambda d: re.search(r"/api/audio/(\d+)", audio(d)["src"]) and not audio(d)["paused"])
    near = [i for i in range(len(tag_map["ids"]))
            if abs(PAD + tag_map["x"][i] * (width - 2 * PAD) - x) < 9
            and abs(PAD + (1 - tag_map["y"][i]) * (height - 2 * PAD) - y) < 9]
    assert int(re.search(r"/api/audio/(\d+)", audio(browser)["src"]).group(1)) in {tag_map["ids"][i] for i in near}
    assert previewed

    # a lasso around the whole map selects every file and lists its path
    lasso = ActionChains(browser).move_to_element_with_offset(canvas, -width // 2 + 2, -height // 2 + 2)
    lasso.click_and_hold()
    for dx, dy in ((width - 4, 0), (0, height - 4), (-(width - 4), 0), (0, -(height - 8))):
        for _ in range(4):
            lasso.move_by_offset(dx // 4, dy // 4)
    lasso.release().perform()
    paths = wait(browser, lambda d: d.find_element(By.ID, "selection-paths").get_attribute("value"))
    expected = {str(root / rel) for rel, *_ in SMALL}
    assert set(paths.splitlines()) == expected
    assert browser.find_element(By.ID, "selection-count").text == f"{len(expected)} files selected"
    assert browser.find_element(By.ID, "selection-download").get_attribute("href").startswith("blob:")


def test_dark_theme_follows_the_system(browser, server):
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia",
                            {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    try:
        open_page(browser, server)
        assert browser.execute_script("return getComputedStyle(document.body).backgroundColor") == "rgb(19, 19, 22)"
    finally:
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})


def test_a_range_request_for_audio_gets_206(api):
    rows = api_hits(api, "/api/search", q="rain")
    wav = next(h for h in rows if h["format"] == "wav")
    whole = api.get(f"/api/audio/{wav['id']}")
    part = api.get(f"/api/audio/{wav['id']}", headers={"Range": "bytes=100-1099"})
    assert whole.status_code == 200 and part.status_code == 206
    assert part.content == whole.content[100:1100]
    assert part.headers["content-range"] == f"bytes 100-1099/{len(whole.content)}"


def test_the_pages_token_rides_on_every_request(browser, servers):
    url = servers[1]
    assert httpx.get(f"{url}api/status").status_code == 403  # the server wants it
    assert httpx.get(f"{url}static/app.js").status_code == 200  # but the page's modules cannot carry it
    open_page(browser, f"{url}?token={TOKEN}")
    ids = search(browser, "rain")
    wait(browser, lambda d: "files" in d.find_element(By.ID, "status").text)
    browser.find_element(By.CSS_SELECTOR, "#results li.hit .name").click()
    state = playing(browser, ids[0])
    assert f"token={TOKEN}" in state["src"]
    canvas = browser.find_element(By.ID, "map")
    wait(browser, lambda d: inked(d, canvas) > 0, "the map stays blank with a token")
    wait(browser, lambda d: all(inked(d, c) for c in d.find_elements(By.CSS_SELECTOR, "#results canvas.wave")),
         "a waveform stays blank with a token")


def test_a_row_drags_out_as_a_file_and_copies_its_path(browser, server, api, library):
    root, _ = library
    browser.execute_cdp_cmd("Browser.grantPermissions",
                            {"permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    open_page(browser, server)
    search(browser, "voice")
    hits = {h["name"]: h for h in api_hits(api, "/api/search", q="voice")}
    dragged = browser.execute_script(
        "const out = {}; for (const row of document.querySelectorAll('#results li.hit')) {"
        "  const data = new DataTransfer();"
        "  row.dispatchEvent(new DragEvent('dragstart', {dataTransfer: data, bubbles: true}));"
        "  out[row.querySelector('.name').textContent] = [data.getData('DownloadURL'), data.getData('text/uri-list'),"
        "                                                 row.draggable];"
        "} return out;")
    kick, shout = hits["kick_01.wav"], hits["shout.aiff"]
    assert dragged["kick_01.wav"] == [f"audio/wav:kick_01.wav:{server}api/audio/{kick['id']}",
                                      (root / "drums" / "kick_01.wav").as_uri(), True]
    # an AIFF comes as the WAV the server makes of it, named so
    assert dragged["shout.aiff"][0] == f"audio/wav:shout.wav:{server}api/audio/{shout['id']}"
    assert dragged["snare_01.flac"][0].startswith("audio/flac:snare_01.flac:")

    browser.find_element(By.CSS_SELECTOR, f'li.hit[data-id="{kick["id"]}"] button.copy').click()
    wait(browser, lambda d: "Copied" in d.find_element(By.ID, "toast").text)
    assert browser.execute_async_script(
        "navigator.clipboard.readText().then(arguments[0], (e) => arguments[0](String(e)))") == kick["path"]


def test_the_map_stays_quick_at_100000_points(browser, server):
    """The map module itself on 100,000 made-up points: drawn, every hover finds its point through the grid, a
    lasso selects exactly the points inside; the times (ms) are generous bounds against a quadratic slip."""
    open_page(browser, server)
    result = browser.execute_async_script("""
        const done = arguments[0];
        import(new URL("static/map.js", document.baseURI).href).then(({ LibraryMap }) => {
          const canvas = document.createElement("canvas");
          canvas.style.cssText = "width: 800px; height: 800px; display: block";
          document.body.prepend(canvas);
          const player = { play: () => Promise.resolve(), stopPreview() {} };
          const map = new LibraryMap(canvas, document.createElement("div"), player,
                                     { onSelection: (chosen) => { map.selectedCount = chosen.length; }, onPick() {} });
          const n = 100000;
          let seed = 1;
          const random = () => ((seed = (seed * 16807) % 2147483647) / 2147483647);
          const ids = [], x = [], y = [], names = [], folders = [], paths = [], groups = [];
          for (let i = 0; i < n; i++) {
            ids.push(i + 1); x.push(random()); y.push(random()); names.push(`f${i}.wav`); folders.push("a");
            paths.push(`/lib/a/f${i}.wav`); groups.push(i % 12);
          }
          const legend = [...Array(12).keys()].map((g) => `group ${g}`);
          let t = performance.now();
          map.setData({ method: "pca", ids, x, y, names, folders, paths, groups, legend });
          const layout = performance.now() - t;
          t = performance.now();
          let found = 0;
          for (let k = 0; k < 2000; k++) {
            const i = Math.floor(random() * n);
            const j = map.nearest(map.px[i], map.py[i]);
            if (j >= 0 && map.px[j] === map.px[i] && map.py[j] === map.py[i]) found++;
          }
          const hover = (performance.now() - t) / 2000;
          t = performance.now();
          map.selectInside([[0, 0], [400, 0], [400, 400], [0, 400]], false);
          const lasso = performance.now() - t;
          let inside = 0;
          for (let i = 0; i < n; i++) if (map.px[i] <= 400 && map.py[i] <= 400) inside++;
          const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
          let inked = 0;
          for (let i = 3; i < pixels.length; i += 4) if (pixels[i]) inked++;
          canvas.remove();
          done({ layout, hover, lasso, found, chosen: map.selectedCount, inside, inked });
        }, (err) => done({ error: String(err) }));
    """)
    assert "error" not in result, result
    assert result["found"] == 2000 and result["chosen"] == result["inside"] > 0
    assert result["inked"] > 200_000  # most of the 800×800 square is covered
    assert result["layout"] < 3000 and result["hover"] < 5 and result["lasso"] < 3000, result
    print(f"100,000 points: layout and draw {result['layout']:.0f} ms, a hover {result['hover']:.3f} ms, "
          f"a lasso {result['lasso']:.0f} ms")


def test_the_status_line_notes_an_index_run_that_is_writing(browser, server, library):
    from clapcli.index.lock import WriterLock

    open_page(browser, server)
    note = browser.find_element(By.ID, "writing")
    wait(browser, lambda d: "files" in d.find_element(By.ID, "status").text)
    assert not note.is_displayed()
    with WriterLock(library[1]):  # what `clap index` holds while it writes
        wait(browser, lambda d: note.is_displayed(), "no note while the index is being written")
    wait(browser, lambda d: not note.is_displayed(), "the note stays after the run")


def test_a_file_gone_from_disk_is_flagged_and_not_played(browser, server, library):
    root, _ = library
    pad = root / "music" / "pad_c.wav"
    hidden = pad.with_name("pad_c.wav.away")
    pad.rename(hidden)
    try:
        open_page(browser, server)
        search(browser, "a soft pad")
        row = browser.find_element(
            By.XPATH, '//li[contains(@class, "hit")][.//span[@class="name" and text()="pad_c.wav"]]')
        assert "missing" in row.get_attribute("class") and "missing from disk" in row.get_attribute("aria-label")
        assert row.find_element(By.CSS_SELECTOR, ".badge").text == "missing"
        row.find_element(By.CSS_SELECTOR, ".name").click()
        wait(browser, lambda d: "pad_c.wav is missing" in d.find_element(By.ID, "toast").text)
        assert audio(browser)["paused"]
    finally:
        hidden.rename(pad)
