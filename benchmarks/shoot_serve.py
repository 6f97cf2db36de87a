"""Screenshots of the `clap serve` page for the docs: the results of a query and the map of the library.

    python -m benchmarks.shoot_serve                      # -> docs/images/serve-results.png, serve-map.png
    python -m benchmarks.shoot_serve --out /tmp/shots --dark

Builds what it shows under $TMPDIR/clap-shoot/ (so the paths in the pictures name no one's home): a tiny random
model (tests.tiny_models), a library of synthesised sounds in folders (tests.audio_synth), its index (`clap
index`), then runs `clap serve` on a free loopback port and drives Debian's headless Chromium (/usr/bin/chromium,
/usr/bin/chromedriver) through Selenium. The model is random, so which sounds come first means nothing; the
page's look is what is shown.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ._common import ROOT

SHOOT = Path(tempfile.gettempdir()) / "clap-shoot"
FOLDERS = {  # folder → (files, shortest, longest seconds)
    "drums/kicks": (14, 0.2, 0.8), "drums/snares": (12, 0.3, 1.0), "drums/loops": (6, 4.0, 16.0),
    "fx/whooshes": (10, 1.0, 3.0), "fx/impacts": (10, 0.8, 4.0), "ambience/rain": (5, 20.0, 45.0),
    "ambience/city": (5, 15.0, 40.0), "music/pads": (8, 5.0, 12.0), "voice/takes": (8, 1.0, 25.0),
}
LABELS = "rain,thunder,glass breaking,kick drum,snare drum,whoosh,birds singing,traffic,speech,piano,wind,crowd"


def build(work: Path) -> tuple[Path, Path]:
    """(index dir, library root), made once and reused."""
    import numpy as np

    from tests.audio_synth import tone_noise, write_audio
    from tests.tiny_models import save_hf_clap

    model, library, index = work / "model", work / "Samples", work / "index"
    if not (model / "config.json").exists():
        save_hf_clap(model, fused=True, seed=1)
    if not library.exists():
        rng = np.random.default_rng(7)
        seed = 0
        for folder, (count, shortest, longest) in FOLDERS.items():
            (library / folder).mkdir(parents=True, exist_ok=True)
            stem = folder.split("/")[-1].rstrip("s")
            for k in range(count):
                seconds = float(rng.uniform(shortest, longest))
                suffix = ("wav", "flac", "ogg")[k % 3]
                write_audio(library / folder / f"{stem}_{k + 1:02d}.{suffix}", tone_noise(seconds, 44_100, seed=seed),
                            44_100, format="OGG" if suffix == "ogg" else None)
                seed += 1
    if not (index / "index.sqlite").exists():
        subprocess.run([sys.executable, "-m", "clapcli", "index", str(library), "--index", str(index), "--model",
                        str(model), "--workers", "1"], check=True)
    return index, library


def serve(index: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "clapcli", "serve", "--index", str(index), "--port", "0",
                             "--labels", LABELS], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    found = re.search(r"http://\S+", line)
    if not found:
        proc.kill()
        sys.exit(f"clap serve did not start: {line}")
    return proc, found.group(0)


def browser(profile: Path, dark: bool):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                "--autoplay-policy=no-user-gesture-required", "--window-size=1440,960", "--hide-scrollbars",
                f"--user-data-dir={profile}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    if dark:
        driver.execute_cdp_cmd("Emulation.setEmulatedMedia",
                               {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    return driver


def shoot(url: str, out: Path, dark: bool) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    profile = SHOOT / "chromium-profile"
    shutil.rmtree(profile, ignore_errors=True)
    driver = browser(profile, dark)
    wait = WebDriverWait(driver, 60, poll_frequency=0.1)
    suffix = "-dark" if dark else ""
    try:
        driver.get(url)
        wait.until(lambda d: "files" in d.find_element(By.ID, "status").text)
        box = driver.find_element(By.ID, "q")
        box.send_keys("rain on a tin roof - thunder")
        wait.until(lambda d: "results" in d.find_element(By.ID, "results-title").text)
        wait.until(lambda d: d.execute_script("return document.getElementById('map').width > 1"))
        rows = driver.find_elements(By.CSS_SELECTOR, "#results li.hit")
        windowed = next((r for r in rows if "ambience" in r.text), rows[0])
        windowed.find_element(By.CSS_SELECTOR, ".name").click()  # plays from its best window: the playhead shows
        time.sleep(1.5)
        driver.execute_script("document.getElementById('player').pause()")
        driver.save_screenshot(str(out / f"serve-results{suffix}.png"))

        canvas = driver.find_element(By.ID, "map")
        width, height = canvas.size["width"], canvas.size["height"]
        # a lasso around the upper left of the map (where PCA puts most of this library)
        lasso = ActionChains(driver).move_to_element_with_offset(canvas, -width // 2 + 4, -height // 2 + 4)
        lasso.click_and_hold()
        across, down = int(width * 0.35), int(height * 0.45)
        for dx, dy in ((across, 0), (0, down), (-across, 0), (0, 4 - down)):
            for _ in range(6):
                lasso.move_by_offset(dx // 6, dy // 6)
        lasso.release().perform()
        wait.until(lambda d: d.find_element(By.ID, "selection-paths").get_attribute("value"))
        driver.find_element(By.CSS_SELECTOR, ".map-panel").screenshot(str(out / f"serve-map{suffix}.png"))
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images", help="where the PNGs go")
    parser.add_argument("--dark", action="store_true", help="the dark theme (files named …-dark.png)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    index, _ = build(SHOOT)
    proc, url = serve(index)
    try:
        shoot(url, args.out, args.dark)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(15)
    print(f"wrote serve-results and serve-map PNGs to {args.out}")


if __name__ == "__main__":
    main()
