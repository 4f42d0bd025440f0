"""The app in a real browser: headless Chromium driven by Playwright against the app on loopback.

What a person does, click by click: upload a photo / a clip / a painting, press the button, see the
result appear; the checks read what the browser itself got (an image's natural size, a video
element's decoded metadata, the file behind the download button). Tiny networks keep each run to
seconds. Screenshots of every step go to ``$GHIBLI_TEST_ARTIFACTS`` (default
``test-artifacts/browser/`` at the repository root, git-ignored).

Needs the ``playwright`` package and a Chromium: ``$GHIBLI_CHROMIUM``, else Debian's ``chromium``
on the PATH, else a browser fetched by ``playwright install chromium``; without them the module
is skipped with the reason. ``.ci/run`` installs both.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="browser tests need Playwright: pip install -r requirements-dev.txt"
)

import app  # noqa: E402
from ghibli_core.models import ResnetGenerator, StyleGAN2Generator  # noqa: E402
from ghibli_core.video import VideoLimits, probe  # noqa: E402

from test_app import launch_on_loopback, photo  # noqa: E402
from test_video import make_clip  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")

REPO = Path(__file__).resolve().parents[1]
GAN = dict(z_dim=16, w_dim=16, resolution=16, channel_base=256, channel_max=16, mapping_layers=2)
JOB_TIMEOUT_MS = 180_000  # one job on tiny networks takes seconds; a CI machine may be loaded


def chromium_executable() -> str | None:
    """A Chromium to drive: ``$GHIBLI_CHROMIUM``, else one on the PATH (Debian's package), else
    None (Playwright then uses its own download, if there is one)."""
    named = os.environ.get("GHIBLI_CHROMIUM")
    if named:
        return named
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def artifacts() -> Path:
    folder = Path(os.environ.get("GHIBLI_TEST_ARTIFACTS") or REPO / "test-artifacts" / "browser")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser():
    executable = chromium_executable()
    with sync_api.sync_playwright() as pw:
        if executable is None and not Path(pw.chromium.executable_path).exists():
            pytest.skip("browser tests need Chromium: apt-get install chromium (or set $GHIBLI_CHROMIUM)")
        chromium = pw.chromium.launch(executable_path=executable, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, tmp folder): the app with a tiny photo model and a tiny StyleGAN2, on loopback."""
    root = tmp_path_factory.mktemp("browser_app")
    torch.manual_seed(0)
    ResnetGenerator(width=4, n_blocks=1).save_pretrained(root / "weights" / "tiny")
    (root / "weights" / "tiny" / "README.md").write_text("# Tiny browser-test model\n")
    StyleGAN2Generator(**GAN).save_pretrained(root / "weights" / "gan")
    demo = app.build_app(
        weights_dir=root / "weights", default_model="tiny", default_gan="gan", device="cpu", max_pixels=100_000,
        video_limits=VideoLimits(max_seconds=3.0, max_pixels=100_000, max_frames=60),
    )
    launch_on_loopback(demo)
    try:
        yield demo.local_url, root
    finally:
        demo.close()


@pytest.fixture()
def page(browser, served, artifacts, request):
    """A fresh browser context (a new Gradio session) on the app; uncaught script errors fail the test."""
    url, _ = served
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    tab = context.new_page()
    tab.set_default_timeout(60_000)  # page loads and clicks; jobs get JOB_TIMEOUT_MS
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.goto(url)
    tab.get_by_role("tab", name="Photo → Ghibli").wait_for()
    try:
        yield tab
    finally:
        # the page as the test left it (on a failure, what went wrong); never masks the failure
        with contextlib.suppress(sync_api.Error):
            tab.screenshot(path=str(artifacts / f"{request.node.name}-end.png"), full_page=True)
        context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


# -- helpers: find a component by its visible label, as a person would --------------------------
def block(page, label: str):
    """The visible component whose label reads exactly ``label`` (innermost match)."""
    title = page.locator("[data-testid=block-label], [data-testid=block-info]").filter(
        has_text=re.compile(rf"^\s*{re.escape(label)}\s*$")
    )
    return page.locator(".block:visible").filter(has=title).last  # a <div>, or a <fieldset> (radios)


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def set_number(page, label: str, value: float) -> None:
    """Type a value into a slider's (or number's) box, then leave it, so Gradio takes it."""
    box = block(page, label).locator("input[type=number]")
    box.fill(str(value))
    box.press("Tab")


def image_in(page, label: str):
    """The <img> shown by the image component ``label`` once it holds a loaded image."""
    img = block(page, label).locator("img")
    img.first.wait_for(timeout=JOB_TIMEOUT_MS)
    page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=img.first.element_handle(),
                           timeout=JOB_TIMEOUT_MS)
    return img.first


def shown(page, label: str) -> bool:
    """Whether a component labelled exactly ``label`` is on screen (hidden ones may be absent)."""
    title = page.locator("[data-testid=block-label], [data-testid=block-info], label, span").filter(
        has_text=re.compile(rf"^\s*{re.escape(label)}\s*$")
    )
    return any(title.nth(i).is_visible() for i in range(title.count()))


def displayed_size(img) -> tuple[float, float]:
    """The size an <img>'s picture is drawn at on the page (its box, less object-fit's margins)."""
    return tuple(img.evaluate(
        """el => {
            const r = el.getBoundingClientRect(), fit = getComputedStyle(el).objectFit;
            if (fit === 'fill') return [r.width, r.height];
            let s = Math.min(r.width / el.naturalWidth, r.height / el.naturalHeight);
            if (fit === 'cover') s = Math.max(r.width / el.naturalWidth, r.height / el.naturalHeight);
            if (fit === 'none' || (fit === 'scale-down' && s > 1)) s = 1;
            return [el.naturalWidth * s, el.naturalHeight * s];
        }"""
    ))


def fetch_image(page, img) -> Image.Image:
    """The file behind an <img>, fetched with the page's own session, decoded."""
    src = img.evaluate("el => el.currentSrc || el.src")
    reply = page.request.get(src)
    assert reply.ok, f"{src}: HTTP {reply.status}"
    return Image.open(io.BytesIO(reply.body()))


def shoot(page, artifacts: Path, name: str) -> None:
    # animations finished first: a toast caught mid fade-in would not show
    page.screenshot(path=str(artifacts / f"{name}.png"), full_page=True, animations="disabled")


# -- the tabs ----------------------------------------------------------------------------------
def test_photo_upload_run_and_download(page, served, artifacts):
    _, root = served
    src = photo(root / "street scene.png", (60, 44), seed=3)
    block(page, "Photo").locator("input[type=file]").set_input_files(str(src))
    block(page, "Photo").locator("img").wait_for()  # the upload shows as the input's preview
    shoot(page, artifacts, "photo-1-uploaded")
    page.get_by_role("button", name="Run", exact=True).click()

    result = image_in(page, "Ghibli style")
    shoot(page, artifacts, "photo-2-result")
    assert result.evaluate("el => [el.naturalWidth, el.naturalHeight]") == [60, 44]
    shown = fetch_image(page, result)
    assert shown.format == "PNG" and shown.size == (60, 44)
    before = np.asarray(Image.open(src).convert("RGB"), np.int16)
    assert np.abs(np.asarray(shown.convert("RGB"), np.int16) - before).mean() > 1  # stylized, not echoed

    # the download button hands over the same picture under the photo's own name
    with page.expect_download() as info:
        page.get_by_role("button", name="Download PNG").click()
    download = info.value
    assert download.suggested_filename == "street_scene_ghibli.png"
    with Image.open(download.path()) as saved:
        assert saved.size == (60, 44)
        assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(shown.convert("RGB")))

    # the card of the model in use is one click away
    page.get_by_text("Model card", exact=True).click()
    page.get_by_text("Tiny browser-test model").wait_for()


def test_photo_mistake_shows_a_message_not_a_traceback(page, served, artifacts):
    _, root = served
    big = photo(root / "huge.png", (400, 300))  # 120,000 pixels, over this app's 100,000
    block(page, "Photo").locator("input[type=file]").set_input_files(str(big))
    block(page, "Photo").locator("img").wait_for()
    page.get_by_role("button", name="Run", exact=True).click()
    toast = page.locator("[data-testid=toast-body]").filter(has_text="huge.png")
    toast.first.wait_for(timeout=JOB_TIMEOUT_MS)
    shoot(page, artifacts, "photo-error")
    text = toast.first.inner_text()
    assert "more than the limit" in text and "Traceback" not in text and str(root) not in text


def test_video_upload_run_and_play(page, served, artifacts):
    _, root = served
    src = make_clip(root / "beach clip.mp4", size=(64, 48), rate=10, seconds=1.5, audio=True)
    open_tab(page, "Video stylize")
    # "End (s)" starts empty (to the end), not at 0
    end_box = block(page, "End (s)").locator("input, textarea").first
    assert end_box.input_value() == "" and end_box.get_attribute("placeholder") == "to the end"
    block(page, "Clip").locator("input[type=file]").set_input_files(str(src))
    block(page, "Clip").locator("video").wait_for()
    shoot(page, artifacts, "video-1-uploaded")
    page.get_by_role("button", name="Run", exact=True).click()

    video = block(page, "Ghibli style").locator("video")
    video.wait_for(timeout=JOB_TIMEOUT_MS)
    page.wait_for_function("el => !!(el.currentSrc || el.src)", arg=video.element_handle(), timeout=JOB_TIMEOUT_MS)
    shoot(page, artifacts, "video-2-result")

    # what the page's video element points at: the whole stylized clip, with its sound
    reply = page.request.get(video.evaluate("el => el.currentSrc || el.src"))
    assert reply.ok, f"the result video: HTTP {reply.status}"
    served_file = root / "served.mp4"
    served_file.write_bytes(reply.body())
    info = probe(served_file)
    assert info.frame_count == 15 and info.has_audio and info.video_codec == "h264"
    with page.expect_download() as download:
        page.get_by_role("button", name="Download MP4").click()
    assert download.value.suggested_filename == "beach_clip_ghibli.mp4"
    assert probe(download.value.path()).frame_count == 15

    # playable: the browser decodes the header and the first frames, and time moves on when played
    if not video.evaluate("el => el.canPlayType('video/mp4; codecs=\"avc1.42E01E\"')"):
        pytest.skip("this Chromium has no H.264 decoder (Playwright's own build); Debian's chromium has one")
    page.wait_for_function("el => el.readyState >= 2 || el.error", arg=video.element_handle(), timeout=JOB_TIMEOUT_MS)
    width, height, duration, error = video.evaluate(
        "el => [el.videoWidth, el.videoHeight, el.duration, el.error && el.error.code]"
    )
    assert error is None, f"the browser could not play the result (MediaError code {error})"
    assert (width, height) == (64, 48) and abs(duration - 1.5) < 0.15
    video.evaluate("el => { el.muted = true; return el.play(); }")
    page.wait_for_function("el => el.currentTime > 0.2", arg=video.element_handle(), timeout=30_000)
    shoot(page, artifacts, "video-3-playing")


def test_projection_then_neighbours(page, served, artifacts):
    _, root = served
    yy, xx = np.mgrid[0:40, 0:50]
    painting = root / "painting.png"
    Image.fromarray(np.stack([xx * 5, yy * 6, np.full_like(xx, 90)], -1).astype(np.uint8)).save(painting)
    open_tab(page, "Painting projection")
    block(page, "Painting").locator("input[type=file]").set_input_files(str(painting))
    block(page, "Painting").locator("img").wait_for()
    set_number(page, "Steps", 10)
    shoot(page, artifacts, "projection-1-uploaded")
    page.get_by_role("button", name="Project", exact=True).click()

    page.get_by_text("projected in 10 steps").wait_for(timeout=JOB_TIMEOUT_MS)
    preview = image_in(page, "Projection")
    target = image_in(page, "Target")
    shoot(page, artifacts, "projection-2-projected")
    assert preview.evaluate("el => [el.naturalWidth, el.naturalHeight]") == [16, 16]
    assert fetch_image(page, preview).size == (16, 16)
    assert fetch_image(page, target).size == (16, 16)  # the centre square the projection fitted
    # both drawn at a readable size (the 16 px pictures scaled up), the projection beside the target
    for img in (preview, target):
        width, height = displayed_size(img)
        assert width >= 200 and height >= 200, f"drawn at {width:.0f}x{height:.0f} px"
    t, p = target.bounding_box(), preview.bounding_box()
    assert abs(t["y"] - p["y"]) < 5 and t["x"] + t["width"] <= p["x"], (t, p)

    set_number(page, "Images", 6)
    page.get_by_role("button", name="Show neighbours", exact=True).click()
    page.wait_for_function(
        "el => { const imgs = [...el.querySelectorAll('img')];"
        " return imgs.length === 6 && imgs.every(i => i.complete && i.naturalWidth > 0); }",
        arg=block(page, "Gallery").element_handle(), timeout=JOB_TIMEOUT_MS,
    )
    shoot(page, artifacts, "projection-3-neighbours")
    thumbs = block(page, "Gallery").locator("img")
    pictures = [np.asarray(fetch_image(page, thumbs.nth(i)).convert("RGB"), np.int16) for i in range(6)]
    assert all(p.shape == (16, 16, 3) for p in pictures)
    assert any(np.abs(p - pictures[0]).max() > 0 for p in pictures[1:])  # neighbours at sigma 0.5, not copies


def test_walk_tab_shows_the_chosen_modes_controls_only(page, artifacts):
    open_tab(page, "Latent walk")
    block(page, "Mode").wait_for()
    walk_only, loop_only = ["Frames per transition", "Loop back to the first keyframe"], ["Noise-loop stops",
                                                                                           "Frames between stops",
                                                                                           "Noise-loop sigma"]

    def expect(visible: list[str], hidden: list[str]) -> None:
        for label in visible:
            assert shown(page, label), f"{label} should show"
        for label in hidden:
            assert not shown(page, label), f"{label} should be hidden"

    expect(walk_only + ["FPS", "Easing", "Walk"], loop_only + ["Walk (GIF)"])
    shoot(page, artifacts, "walk-1-walk-mode")
    block(page, "Mode").get_by_label("noise loop").check()
    block(page, "Noise-loop stops").wait_for()
    expect(loop_only + ["FPS", "Easing"], walk_only)
    block(page, "Format").get_by_label("gif").check()
    block(page, "Walk (GIF)").wait_for()
    expect(["Walk (GIF)"], ["Walk"])
    shoot(page, artifacts, "walk-2-noise-loop-gif")
    block(page, "Mode").get_by_label("walk", exact=True).check()
    block(page, "Frames per transition").wait_for()
    expect(walk_only, loop_only)


def test_photo_tab_on_a_phone(browser, served, artifacts):
    """A phone-sized screen: nothing wider than the screen, and the photo job runs end to end."""
    url, root = served
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                                  device_scale_factor=2)
    try:
        phone = context.new_page()
        phone.goto(url)
        phone.get_by_role("tab", name="Photo → Ghibli").wait_for()
        overflow = phone.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the page is {overflow} px wider than a 390 px screen"
        src = photo(root / "phone.png", (48, 64), seed=5)
        block(phone, "Photo").locator("input[type=file]").set_input_files(str(src))
        block(phone, "Photo").locator("img").wait_for()
        phone.get_by_role("button", name="Run", exact=True).tap()
        result = image_in(phone, "Ghibli style")
        assert result.evaluate("el => [el.naturalWidth, el.naturalHeight]") == [48, 64]
        result.scroll_into_view_if_needed()
        box = result.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390  # the result is on screen, not off to a side
        shoot(phone, artifacts, "phone-photo-result")
    finally:
        context.close()
