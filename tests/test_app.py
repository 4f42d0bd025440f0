"""The Gradio app end to end: launched on loopback with a tiny checkpoint, called with gradio_client."""
from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

import app  # noqa: E402
from ghibli_core.models import ResnetGenerator  # noqa: E402
from ghibli_core.video import VideoLimits, probe  # noqa: E402

# gradio's queue calls a pandas API that pandas 3 deprecates: not ours to fix, and noise here
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")

CARD = "---\nlicense: apache-2.0\n---\n# Tiny test model\nTrained for zero steps.\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_on_loopback(demo) -> None:
    """Launch for a test. Gradio checks the new server with one 3 s request, which a heavily
    loaded machine can miss ("localhost is not accessible"): try again on a fresh port."""
    for attempt in range(3):
        try:
            app.launch(demo, host="127.0.0.1", port=free_port(), prevent_thread_lock=True, quiet=True)
            return
        except ValueError as exc:
            if "localhost is not accessible" not in str(exc) or attempt == 2:
                raise
            demo.close()


def photo(path, size, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(client, tmp folder): the app on a free loopback port, closed after the module."""
    root = tmp_path_factory.mktemp("app")
    torch.manual_seed(0)
    ResnetGenerator(width=4, n_blocks=1).save_pretrained(root / "weights" / "tiny")
    (root / "weights" / "tiny" / "README.md").write_text(CARD)
    torch.manual_seed(1)
    ResnetGenerator(width=4, n_blocks=1).save_pretrained(root / "weights" / "other")
    (root / "weights" / "other" / "README.md").unlink()  # the mixin writes a generic card
    demo = app.build_app(
        weights_dir=root / "weights", default_model="tiny", device="cpu", max_pixels=100_000,
        video_limits=VideoLimits(max_seconds=3.0, max_pixels=100_000, max_frames=60),
    )
    launch_on_loopback(demo)
    try:
        client = Client(demo.local_url, verbose=False, download_files=str(root / "downloads"), analytics_enabled=False,
                    httpx_kwargs={"timeout": 300})
        yield client, root
    finally:
        demo.close()


def test_stylize_keeps_the_photo_size(server):
    client, root = server
    src = photo(root / "portrait.png", (37, 53))
    result, download, notice, card = client.predict(handle_file(str(src)), api_name="/stylize")
    assert Image.open(result).size == (37, 53)
    with Image.open(download) as im:
        assert im.format == "PNG" and im.size == (37, 53)
    assert download.endswith("portrait_ghibli.png")
    assert notice == ""
    assert "Tiny test model" in card and "license:" not in card  # front matter stripped


def test_max_side_is_a_processing_size_and_strength_zero_is_the_photo(server):
    client, root = server
    src = photo(root / "wide.png", (300, 200), seed=1)
    result, *_ = client.predict(handle_file(str(src)), "other", "", "", 1.0, 256, api_name="/stylize")
    assert Image.open(result).size == (300, 200)
    result, *_ = client.predict(handle_file(str(src)), "tiny", "", "", 0.0, 256, api_name="/stylize")
    diff = np.abs(np.asarray(Image.open(result), np.int16) - np.asarray(Image.open(src), np.int16))
    assert diff.max() <= 1


def test_non_image_upload_is_a_clean_error(server):
    client, root = server
    bad = root / "holiday.png"
    bad.write_text("this is a text file, not a photo")
    with pytest.raises(AppError) as info:
        client.predict(handle_file(str(bad)), api_name="/stylize")
    message = str(info.value)
    assert "holiday.png" in message and "image" in message
    assert "Traceback" not in message and str(root) not in message


def test_too_many_pixels_is_a_clean_error(server):
    client, root = server
    big = photo(root / "big.png", (400, 300))  # 120,000 pixels, above the app's limit of 100,000
    with pytest.raises(AppError, match="more than the limit") as info:
        client.predict(handle_file(str(big)), api_name="/stylize")
    assert "big.png" in str(info.value)


def test_bad_model_choices_are_clean_errors(server):
    client, root = server
    src = photo(root / "p.png", (16, 16))
    with pytest.raises(AppError, match="owner/name"):
        client.predict(handle_file(str(src)), "tiny", "../../etc", "", 1.0, 1024, api_name="/stylize")
    with pytest.raises(AppError, match="unknown model"):
        client.predict(handle_file(str(src)), str(root / "weights" / "tiny"), "", "", 1.0, 1024, api_name="/stylize")
    with pytest.raises(AppError, match="revision only applies"):
        client.predict(handle_file(str(src)), "tiny", "", "v1", 1.0, 1024, api_name="/stylize")
    with pytest.raises(AppError, match="strength"):
        client.predict(handle_file(str(src)), "tiny", "", "", 3.0, 1024, api_name="/stylize")


def test_unreachable_hub_falls_back_with_a_notice(server, monkeypatch):
    client, root = server
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the server runs in this process: it sees the variable
    src = photo(root / "q.png", (20, 28))
    result, _, notice, card = client.predict(
        handle_file(str(src)), "other", "ghibli-studio-tests/not-cached", "", 1.0, 1024, api_name="/stylize"
    )
    assert Image.open(result).size == (20, 28)
    assert "not-cached" in notice and "tiny" in notice
    assert "Tiny test model" in card  # the card of the model actually served


def test_model_card_endpoint(server):
    client, _ = server
    assert "Tiny test model" in client.predict("tiny", api_name="/model_card")
    assert "no model card" in client.predict("other", api_name="/model_card")


def test_pickers_and_the_page_show_each_models_held_out_kid(tmp_path):
    weights = tmp_path / "weights"
    for name, kid in (("early", 106.85), ("good", 21.5), ("plain", None)):
        torch.manual_seed(0)
        ResnetGenerator(width=4, n_blocks=1).save_pretrained(weights / name)
        figures = "" if kid is None else f"kid_x1000: {kid}\nkid_baseline: the photos unchanged\nkid_baseline_x1000: 93.97\n"
        (weights / name / "README.md").write_text(f"---\nlicense: mit\n{figures}---\n# {name}\n")
    models = app.Models(weights_dir=weights, default_model="early")
    assert models.choices() == [
        ("early · KID 106.85 (the photos unchanged: 93.97)", "early"),
        ("good · KID 21.50 (the photos unchanged: 93.97)", "good"),
        ("plain", "plain"),  # a card without figures: the name alone
    ]
    notice = models.quality_notice()
    assert "below the project's quality bar" in notice and "`early` 106.85" in notice
    assert "good" not in notice and "plain" not in notice  # within the bar, or no figure to judge

    demo = app.build_app(weights_dir=weights, default_model="early", device="cpu")
    shown = [c["props"] for c in demo.config["components"] if c["props"].get("elem_id") == "quality-notice"]
    assert len(shown) == 1 and "`early` 106.85" in shown[0]["value"]
    pickers = [c["props"] for c in demo.config["components"] if c["props"].get("label") == "Model"]
    assert pickers and all(("early · KID 106.85 (the photos unchanged: 93.97)", "early") in p["choices"] for p in pickers)

    # all models within the bar: no notice on the page
    (weights / "early" / "README.md").write_text("---\nkid_x1000: 25\n---\n# early\n")
    assert app.Models(weights_dir=weights).quality_notice() == ""
    demo = app.build_app(weights_dir=weights, default_model="early", device="cpu")
    assert not [c for c in demo.config["components"] if c["props"].get("elem_id") == "quality-notice"]


def test_binding_follows_flags_then_environment():
    assert app.resolve_binding(None, None, env={}) == ("127.0.0.1", 7860)
    assert app.resolve_binding(None, None, env={"SYSTEM": "spaces"}) == ("0.0.0.0", 7860)
    env = {"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "8080"}
    assert app.resolve_binding(None, None, env=env) == ("0.0.0.0", 8080)
    assert app.resolve_binding("127.0.0.1", 9000, env=env) == ("127.0.0.1", 9000)
    with pytest.raises(ValueError, match="GRADIO_SERVER_PORT"):
        app.resolve_binding(None, None, env={"GRADIO_SERVER_PORT": "http"})



def test_server_files_cannot_be_named_instead_of_uploaded(server):
    # The event skips Gradio's preprocessing; its check that a file was uploaded must still hold.
    # Raw HTTP here: gradio_client would upload a local path itself.
    import httpx

    client, root = server
    secret = photo(root / "server_side.png", (16, 16))  # exists on the server, never uploaded
    url = client.src.rstrip("/")
    for payload in ({"path": str(secret), "meta": {"_type": "gradio.FileData"}}, str(secret)):
        call = httpx.post(f"{url}/gradio_api/call/stylize", json={"data": [payload, "tiny", "", "", 1.0, 1024]})
        call.raise_for_status()
        events = httpx.get(f"{url}/gradio_api/call/stylize/{call.json()['event_id']}", timeout=60).text
        assert "event: error" in events and "server_side_ghibli" not in events


# -- Video stylize ------------------------------------------------------------------------------
def clip(path, **kwargs):
    from test_video import make_clip

    return make_clip(path, **kwargs)


def video_input(path):
    return handle_file(str(path))


def test_video_stylize_keeps_sound_rate_and_duration(server):
    client, root = server
    src = clip(root / "holiday clip.mp4", size=(64, 48), rate=10, seconds=1.5, audio=True)
    result, download, notice, details = client.predict(
        # "" is what the page's empty "End (s)" box sends: to the end
        video_input(src), "tiny", "", "", "original", 0.5, 0, "", False, api_name="/video_stylize"
    )
    video = result["video"] if isinstance(result, dict) else result
    info = probe(video)
    assert info.has_audio and info.fps == 10 and info.frame_count == 15 and (info.width, info.height) == (64, 48)
    assert info.video_codec == "h264"
    assert download.endswith("holiday_clip_ghibli.mp4") and probe(download).frame_count == 15
    assert notice == "" and "15 frames" in details and "original audio" in details


def test_video_stylize_trim_resolution_and_side_by_side(server):
    client, root = server
    src = clip(root / "wide.mp4", size=(96, 64), rate=10, seconds=2)
    result, download, _, details = client.predict(
        video_input(src), "other", "", "", "360p", 0.0, 0.5, 1.5, True, api_name="/video_stylize"
    )
    info = probe(download)
    assert info.frame_count == 10 and (info.width, info.height) == (192, 64)  # never upscaled; doubled width
    assert not info.has_audio and "no audio track" in details


def test_video_stylize_bad_inputs_are_clean_errors(server):
    client, root = server
    text = root / "notes.mp4"
    text.write_text("not a video at all")
    with pytest.raises(AppError, match="notes.mp4 could not be opened as a video") as info:
        client.predict(video_input(text), "tiny", "", "", "360p", 0.5, 0, None, False, api_name="/video_stylize")
    assert "Traceback" not in str(info.value) and str(root) not in str(info.value)
    song = root / "song.m4a"
    from test_video import ffmpeg

    ffmpeg("-f", "lavfi", "-i", "sine=duration=1", str(song))
    with pytest.raises(AppError, match="song.m4a has no video stream"):
        client.predict(video_input(song), "tiny", "", "", "360p", 0.5, 0, None, False, api_name="/video_stylize")
    long = clip(root / "long.mp4", seconds=4)
    with pytest.raises(AppError, match="limit of 3 s"):
        client.predict(video_input(long), "tiny", "", "", "360p", 0.5, 0, None, False, api_name="/video_stylize")
    # trimmed under the cap, it runs
    _, download, _, _ = client.predict(video_input(long), "tiny", "", "", "360p", 0.5, 1, 3, False, api_name="/video_stylize")
    assert probe(download).frame_count == 20
    with pytest.raises(AppError, match="stability"):
        client.predict(video_input(long), "tiny", "", "", "360p", 3.0, 0, None, False, api_name="/video_stylize")
    with pytest.raises(AppError, match="resolution"):
        client.predict(video_input(long), "tiny", "", "", "4k", 0.5, 0, None, False, api_name="/video_stylize")
    with pytest.raises(AppError, match="past the end"):
        client.predict(video_input(long), "tiny", "", "", "360p", 0.5, 9, None, False, api_name="/video_stylize")


def test_video_server_files_cannot_be_named_instead_of_uploaded(server):
    import httpx

    client, root = server
    secret = clip(root / "server_side.mp4", seconds=1)  # exists on the server, never uploaded
    url = client.src.rstrip("/")
    for payload in ({"path": str(secret), "meta": {"_type": "gradio.FileData"}}, str(secret)):
        data = [payload, "tiny", "", "", "360p", 0.5, 0, None, False]
        call = httpx.post(f"{url}/gradio_api/call/video_stylize", json={"data": data})
        call.raise_for_status()
        events = httpx.get(f"{url}/gradio_api/call/video_stylize/{call.json()['event_id']}", timeout=60).text
        assert "event: error" in events and "server_side_ghibli" not in events
