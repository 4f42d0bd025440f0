"""Start-up time of the app: import, build, launch and the first request, each in a fresh process.

A Space (or ``python app.py``) is only usable once all of these are done, so each is timed:

1. ``import app`` in a fresh interpreter, next to the floor it cannot go under: a fresh
   ``import gradio, torch`` (our own import cost is the difference; the ratio is printed).
2. ``build_app()`` with the embedded models (reads the model list and card, loads no network).
3. ``launch()`` on a loopback port until Gradio answers.
4. The first photo request through gradio_client: it loads the default model (lazily, once),
   next to a second, warm request on the same photo (the ratio is the model-loading overhead).

Run::

    OMP_NUM_THREADS=2 python benchmarks/bench_startup.py [--photo examples/meadow.jpg] [--max-side 512]

The machine may be shared: compare the ratios; say what else was running.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Step 2-4 in one child process; it prints one JSON line of timings.
_CHILD = r"""
import json, socket, sys, time
t0 = time.perf_counter()
sys.path.insert(0, {root!r})
import app
t_import = time.perf_counter() - t0
from ghibli_core import hub
from gradio_client import Client, handle_file

t = time.perf_counter()
demo = app.build_app(device="cpu")
t_build = time.perf_counter() - t
loaded_after_build = len(hub._model_cache)

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
t = time.perf_counter()
app.launch(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
t_launch = time.perf_counter() - t

client = Client(demo.local_url, verbose=False, download_files={downloads!r}, analytics_enabled=False,
                httpx_kwargs={{"timeout": 600}})
args = (handle_file({photo!r}), demo.ghibli_context.models.default_model, "", "", 1.0, {max_side})
t = time.perf_counter()
client.predict(*args, api_name="/stylize")
t_first = time.perf_counter() - t
loaded_after_first = len(hub._model_cache)
t = time.perf_counter()
client.predict(*args, api_name="/stylize")
t_warm = time.perf_counter() - t
demo.close()
print(json.dumps(dict(import_s=t_import, build_s=t_build, launch_s=t_launch, first_s=t_first, warm_s=t_warm,
                      models_after_build=loaded_after_build, models_after_first=loaded_after_first)))
"""


def timed_import(code: str, env: dict[str, str]) -> float:
    """Seconds a fresh interpreter takes to run ``code`` (interpreter start-up excluded)."""
    script = f"import time; t = time.perf_counter(); {code}; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photo", default=str(ROOT / "examples" / "meadow.jpg"), help="photo of the timed requests")
    parser.add_argument("--max-side", type=int, default=512, help="processing size of the requests (the app's slider)")
    args = parser.parse_args()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}

    # the OS file cache is warmed by one untimed import, so both imports below read from memory
    timed_import("import app", env)
    floor = timed_import("import gradio, torch", env)
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        child = _CHILD.format(root=str(ROOT), downloads=tmp, photo=args.photo, max_side=args.max_side)
        out = subprocess.run([sys.executable, "-c", child], cwd=ROOT, env={**env, "GRADIO_TEMP_DIR": tmp},
                             capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"the app's start-up failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])

    ready = r["import_s"] + r["build_s"] + r["launch_s"]
    print(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, photo {Path(args.photo).name} "
          f"at max side {args.max_side}")
    print(f"import gradio, torch (floor) {floor:6.2f} s")
    print(f"import app                   {r['import_s']:6.2f} s   ({r['import_s'] / floor:.2f}x the floor)")
    print(f"build_app                    {r['build_s']:6.2f} s   (models loaded: {r['models_after_build']})")
    print(f"launch                       {r['launch_s']:6.2f} s")
    print(f"ready to serve               {ready:6.2f} s")
    print(f"first request                {r['first_s']:6.2f} s   (loads the model: {r['models_after_first']} loaded)")
    print(f"warm request                 {r['warm_s']:6.2f} s   (first / warm {r['first_s'] / r['warm_s']:.2f}x)")
    print(f"start to first result        {ready + r['first_s']:6.2f} s")


if __name__ == "__main__":
    main()
