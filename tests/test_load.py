"""Load: the app on loopback, 8 clients at once through gradio_client (photo tab, tiny model).

Every job finishes or gets a clear "queue is full" answer, results never cross between clients,
and the server's memory returns near its level before the burst. The burst is marked slow (about
20 s; CI runs it), the full-queue test is not.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import torch
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

import app  # noqa: E402
from ghibli_core.models import ResnetGenerator, load_model  # noqa: E402
from ghibli_core.stylize import Stylizer  # noqa: E402

from test_app import free_port  # noqa: E402
from test_app_abuse import launch  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")

CLIENTS = 8
STRENGTH = 0.5  # half photo, half network: each client's colour shows through its result
SIZE = (384, 256)  # big enough that a leak of per-job images or tensors would show in the RSS
# 8 colours far apart: a result that crossed to another client would be far from its own
COLOURS = [(230, 40, 40), (40, 200, 60), (50, 60, 220), (240, 220, 30), (200, 50, 210), (30, 210, 220), (250, 250, 250), (20, 20, 20)]


def photo(path: Path, colour) -> Path:
    # a colour with a soft gradient, so the network sees more than a flat field
    yy, xx = np.mgrid[0 : SIZE[1], 0 : SIZE[0]]
    shade = ((xx + yy) % 64 - 32)[..., None]
    pixels = np.clip(np.asarray(colour)[None, None] + shade, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    torch.manual_seed(0)
    ResnetGenerator(width=4, n_blocks=1).save_pretrained(root / "weights" / "tiny")
    return root


def expected(root: Path, src: Path) -> np.ndarray:
    """What the app must return for ``src``: the same model run here."""
    engine = Stylizer(load_model(root / "weights" / "tiny"), device="cpu")
    image = Image.open(src).convert("RGB")
    return np.asarray(app.stylize_at_photo_size(engine, image, strength=STRENGTH, max_side=1024), np.int16)


def new_client(url: str, root: Path, i: int) -> Client:
    return Client(url, verbose=False, download_files=str(root / f"downloads{i}"), analytics_enabled=False,
                  httpx_kwargs={"timeout": 300})


@pytest.fixture(scope="module")
def server_process(weights):
    """``python app.py`` in its own process (so its memory can be measured), on a free loopback port."""
    root = weights
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_TEMP_DIR": str(root / "gradio-cache")}
    cmd = [sys.executable, str(app.ROOT / "app.py"), "--host", "127.0.0.1", "--port", str(port),
           "--weights-dir", str(root / "weights"), "--model", "tiny", "--device", "cpu", "--queue-size", "16"]
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {proc.returncode}: {(root / 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/gradio_api/info", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("app.py did not answer within 180 s")
            time.sleep(0.5)
        yield proc, url, root
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def settled_rss(pid: int) -> float:
    """RSS once it stops moving (the event loop may still be freeing the last job)."""
    last = rss_mb(pid)
    for _ in range(20):
        time.sleep(0.25)
        now = rss_mb(pid)
        if abs(now - last) < 1:
            return now
        last = now
    return last


@pytest.mark.slow  # about 35 s: a server process and 97 jobs
def test_eight_clients_at_once_get_their_own_results_and_memory_returns(server_process):
    proc, url, root = server_process
    sources = [photo(root / f"client{i}.png", c) for i, c in enumerate(COLOURS)]
    wanted = [expected(root, s) for s in sources]
    clients = [new_client(url, root, i) for i in range(CLIENTS)]

    def job(i: int) -> np.ndarray:
        result, download, notice, _ = clients[i].predict(handle_file(str(sources[i])), "tiny", "", "", STRENGTH, 1024,
                                                         api_name="/stylize")
        assert notice == "" and Path(download).name == f"client{i}_ghibli.png"
        return np.asarray(Image.open(result).convert("RGB"), np.int16)

    job(0)  # warm-up: the model loads on the first request
    before = settled_rss(proc.pid)
    peak, levels = before, []
    rounds = int(os.environ.get("LOAD_ROUNDS", "12"))
    with ThreadPoolExecutor(CLIENTS) as pool:
        for _ in range(rounds):
            futures = [pool.submit(job, i) for i in range(CLIENTS)]
            while not all(f.done() for f in futures):
                peak = max(peak, rss_mb(proc.pid))
                time.sleep(0.05)
            results = [f.result() for f in futures]  # every job finished (the queue holds 16)
            for i, got in enumerate(results):
                assert got.shape == wanted[i].shape
                own = np.abs(got - wanted[i]).max()
                others = min(np.abs(got - wanted[j]).mean() for j in range(CLIENTS) if j != i)
                assert own <= 2, f"client {i}: off by {own} from its own expected result"
                assert others > 20  # the check can tell the clients apart
            levels.append(settled_rss(proc.pid))
    print(f"server RSS: {before:.0f} MB after warm-up, peak {peak:.0f} MB, after each round of {CLIENTS}: "
          + ", ".join(f"{x:.0f}" for x in levels) + " MB")
    # The first bursts set the high-water marks of the allocator and Gradio's thread pools, and the
    # level climbs to a plateau over several rounds: here 40 rounds (LOAD_ROUNDS=40) stayed within
    # 454-483 MB, one CI run rose 35 MB over its first 3 rounds, another 71 MB over 8 rounds
    # (481, 510, 531, 531, 542, 552, 552, 552, 553 MB) and then stood still. So the leak check
    # compares the second half of the rounds with the middle one: over 6 rounds (48 jobs) a leak of
    # each job's image and tensors (about 3 MB here) adds about 140 MB. Checked by mutation: keeping
    # three float32 copies of each photo in app.py's stylize_at_photo_size read +138 MB and failed;
    # one copy (~1 MB a job) read +17 MB, inside the allocator's wander, and passed, so this check
    # catches leaks of a job's working set, not of a small part of it. The smaller of the last two
    # levels steps over a last-moment jump of the allocator.
    assert len(levels) >= 6, "LOAD_ROUNDS must be at least 6 for the memory check"
    middle = levels[len(levels) // 2 - 1]
    grown = min(levels[-2:]) - middle
    assert grown < 50, f"RSS still climbing in the second half of the rounds: {[round(x) for x in levels]} MB"
    assert min(levels[-2:]) - before < 150, f"RSS {before:.0f} MB -> {levels[-1]:.0f} MB after {rounds * CLIENTS} jobs"


def test_a_full_queue_is_a_clear_answer_and_the_rest_finish(tmp_path, weights, monkeypatch):
    """The first job is held inside the model call, so the queue fills deterministically: with
    room for 2 waiting jobs, 1 runs, 2 wait and the rest are told the queue is full."""
    root = weights
    gate = threading.Event()
    real = app.stylize_at_photo_size

    def held(*args, **kwargs):
        gate.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(app, "stylize_at_photo_size", held)  # the server runs in this process
    demo = app.build_app(weights_dir=root / "weights", default_model="tiny", device="cpu", queue_size=2)
    launch(demo)
    try:
        sources = [photo(tmp_path / f"client{i}.png", c) for i, c in enumerate(COLOURS)]
        clients = [new_client(demo.local_url, tmp_path, i) for i in range(CLIENTS)]
        jobs = [c.submit(handle_file(str(s)), "tiny", "", "", STRENGTH, 1024, api_name="/stylize")
                for c, s in zip(clients, sources)]
        deadline = time.monotonic() + 60
        refused: list[int] = []
        while time.monotonic() < deadline and len(refused) < CLIENTS - 3:
            refused = [i for i, j in enumerate(jobs) if j.done() and j.exception() is not None]
            time.sleep(0.1)
        gate.set()
        outcomes = {}
        for i, j in enumerate(jobs):
            try:
                outcomes[i] = j.result(timeout=120)
            except Exception as exc:  # noqa: BLE001 - the refusal is what is checked
                outcomes[i] = exc
        errors = {i: o for i, o in outcomes.items() if isinstance(o, Exception)}
        done = {i: o for i, o in outcomes.items() if not isinstance(o, Exception)}
        assert errors and done and len(errors) + len(done) == CLIENTS
        for i, exc in errors.items():
            assert "queue is full" in str(exc).lower(), f"client {i}: {exc!r}"
        assert len(done) == 3  # 1 running + 2 waiting
        for i, (result, download, _, _) in done.items():
            got = np.asarray(Image.open(result).convert("RGB"), np.int16)
            assert np.abs(got - expected(root, sources[i])).max() <= 2
        # and the server takes new work once the queue has drained
        result, *_ = clients[next(iter(errors))].predict(  # a client that was turned away
            handle_file(str(sources[0])), "tiny", "", "", STRENGTH, 1024, api_name="/stylize"
        )
        assert Image.open(result).size == SIZE
    finally:
        gate.set()
        demo.close()
