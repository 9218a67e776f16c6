"""The page at GET / in a real headless browser (Debian's chromium + chromedriver via selenium).

The server runs on loopback with the fake engine of test_server.py and a segment task whose mask
is known, so the test can check what the browser drew: the streamed answer, the object list and
mask pixels tinted on the canvas (the page decodes the RLE itself); and with several images
picked, the image_url parts it sends (in order) and the images side by side on the canvas.
"""

import os
import shutil
import tempfile

import numpy as np
from PIL import Image
import pytest

from paligemma_jax.serving import server
from paligemma_jax.tasks import segment
from paligemma_jax.tasks import segmentation_format
from test_server import FakeEngine, serving

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver "
    "(apt-get install -y chromium chromium-driver; .ci/run installs them)")


@pytest.fixture
def served(monkeypatch):
  width, height = 120, 80
  mask = np.zeros((height, width), bool)
  mask[20:60, 30:90] = True  # The "cat": 60 x 40 pixels.

  def parse(self, text, w, h):
    assert (w, h) == (width, height)
    return segmentation_format.Segmentations(boxes=np.array([[30., 20., 90., 60.]]), labels=["cat"],
                                      skipped=0, masks=[mask])
  monkeypatch.setattr(segment.Segment, "parse", parse)
  engine = FakeEngine({"segment cat": "<loc0256><loc0256>|<loc0768><loc0768>| cat"})
  image = os.path.join(tempfile.mkdtemp(), "grey.png")
  Image.new("RGB", (width, height), (128, 128, 128)).save(image)
  with serving(server.create_app(engine, model_name="tiny-pg", vae_params={})) as url:
    yield url + "/", image, engine


@pytest.fixture
def driver(tmp_path):
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
              "--window-size=1100,800"):
    options.add_argument(arg)
  driver = webdriver.Chrome(service=Service(DRIVER), options=options)
  try:
    yield driver
  finally:
    driver.quit()


def test_page_streams_the_answer_and_draws_the_mask(served, driver, tmp_path):
  from selenium.webdriver.support.ui import Select, WebDriverWait
  url, image, engine = served
  driver.get(url)
  wait = WebDriverWait(driver, 20)
  wait.until(lambda d: d.find_element("id", "model").text == "tiny-pg")
  driver.find_element("id", "image").send_keys(image)
  wait.until(lambda d: "120x80" in d.find_element("id", "status").text)
  Select(driver.find_element("id", "task")).select_by_value("segment")
  text = driver.find_element("id", "text")
  assert text.get_attribute("value") == "cat"  # The task's hint.
  driver.find_element("id", "run").click()
  wait.until(lambda d: d.find_element("id", "status").text.startswith(("Done", "4", "5")))
  assert driver.find_element("id", "status").text.startswith("Done (stop)"), (
      driver.find_element("id", "status").text)
  assert driver.find_element("id", "answer").text == "<loc0256><loc0256><loc0768><loc0768> cat"
  assert engine.requests[0].prompt == "segment cat"
  assert "cat [30, 20, 90, 60]" in driver.find_element("id", "objects").text
  pixel = "return Array.from(document.getElementById('canvas').getContext('2d')" \
          ".getImageData(arguments[0], arguments[1], 1, 1).data)"
  inside, outside = driver.execute_script(pixel, 60, 40), driver.execute_script(pixel, 5, 5)
  assert outside == [128, 128, 128, 255]  # The image as it was.
  assert inside[:3] != [128, 128, 128]  # Tinted by the mask.
  driver.save_screenshot(str(tmp_path / "page.png"))
  if os.environ.get("PALIGEMMA_PAGE_SCREENSHOT"):
    driver.save_screenshot(os.environ["PALIGEMMA_PAGE_SCREENSHOT"])


def test_page_sends_several_images_in_order_and_shows_them_side_by_side(served, driver, tmp_path):
  """Two files picked at once, then a third picked after them: three image_url parts in that
  order, the images drawn side by side (8 px apart); Clear empties the list."""
  from selenium.webdriver.support.ui import Select, WebDriverWait
  url, grey, engine = served
  paths = [grey, str(tmp_path / "red.png"), str(tmp_path / "tall.png")]
  Image.new("RGB", (50, 40), (255, 0, 0)).save(paths[1])
  Image.new("RGB", (30, 100), (0, 0, 255)).save(paths[2])
  driver.get(url)
  wait = WebDriverWait(driver, 20)
  wait.until(lambda d: d.find_element("id", "model").text == "tiny-pg")
  driver.find_element("id", "image").send_keys("\n".join(paths[:2]))
  wait.until(lambda d: "2 images: 120x80, 50x40" in d.find_element("id", "status").text)
  driver.find_element("id", "image").send_keys(paths[2])
  wait.until(lambda d: "3 images: 120x80, 50x40, 30x100" in d.find_element("id", "status").text)
  canvas = "const c = document.getElementById('canvas'); return [c.width, c.height];"
  assert driver.execute_script(canvas) == [120 + 8 + 50 + 8 + 30, 100]
  pixel = "return Array.from(document.getElementById('canvas').getContext('2d')" \
          ".getImageData(arguments[0], arguments[1], 1, 1).data)"
  assert [driver.execute_script(pixel, x, 10)[:3] for x in (60, 150, 200)] == [
      [128, 128, 128], [255, 0, 0], [0, 0, 255]]  # In order, side by side.
  Select(driver.find_element("id", "task")).select_by_value("free")
  text = driver.find_element("id", "text")
  text.clear()
  text.send_keys("answer en which is red")
  driver.find_element("id", "run").click()
  wait.until(lambda d: d.find_element("id", "status").text.startswith(("Done", "4", "5")))
  assert driver.find_element("id", "status").text.startswith("Done (stop)")
  assert driver.find_element("id", "answer").text == "echo answer en which is red "  # The fake.
  request = engine.requests[-1]
  assert request.prompt == "answer en which is red"
  assert request.sources() == [open(p, "rb").read() for p in paths]
  driver.find_element("id", "clear").click()
  assert driver.find_element("id", "status").text == ""
  assert driver.execute_script(pixel, 60, 10) == [0, 0, 0, 0]  # Cleared.
