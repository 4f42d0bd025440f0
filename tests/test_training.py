"""CycleGAN training on tiny networks: exact resume, two synchronised CPU processes, bookkeeping."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ghibli_core.models import load_model
from ghibli_core.training.common import EMA, ImagePool, linear_decay
from ghibli_core.training.cyclegan import CycleGANConfig, train_cyclegan

REPO = Path(__file__).resolve().parents[1]


def _make_domain(folder: Path, n: int, *, warm: bool, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        base = np.array([200, 120, 60] if warm else [60, 120, 200], dtype=np.float64)
        yy, xx = np.mgrid[0:40, 0:48]
        img = base + 40 * np.sin(xx[..., None] / (3 + i) + rng.uniform(0, 6)) + rng.normal(0, 8, (40, 48, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


@pytest.fixture()
def domains(tmp_path):
    a = _make_domain(tmp_path / "photos", 5, warm=False, seed=1)
    b = _make_domain(tmp_path / "frames" / "film1", 4, warm=True, seed=2)
    _make_domain(tmp_path / "frames" / "film2", 3, warm=True, seed=3)
    return a, b.parent


def _cfg(domains, out, **kw) -> CycleGANConfig:
    a, b = domains
    base = dict(
        domain_a=[str(a)], domain_b=[str(b)], out=str(out), exclude_b=["film2/*"],
        width=4, n_blocks=1, disc_width=4, disc_layers=2, load_size=36, crop_size=32,
        steps=6, decay_steps=3, pool_size=3, ema_decay=0.5, log_every=2, sample_every=3, save_every=3,
        num_samples=2, seed=7,
    )
    base.update(kw)
    return CycleGANConfig(**base)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_resume_is_exact(domains, tmp_path):
    straight = train_cyclegan(_cfg(domains, tmp_path / "straight"), progress=False)
    first = train_cyclegan(_cfg(domains, tmp_path / "split"), progress=False, stop_after=3)
    halfway = _weights(first)
    resumed = train_cyclegan(_cfg(domains, tmp_path / "split"), progress=False, resume=True)
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the halfway export really is an earlier state, so the comparison above is not vacuous
    assert any(not torch.equal(halfway[k], a[k]) for k in a)


def test_resume_at_a_new_learning_rate(domains, tmp_path, capsys):
    from ghibli_core.cli import main as cli_main

    out = tmp_path / "run"
    train_cyclegan(_cfg(domains, out), progress=False, stop_after=3)
    capsys.readouterr()
    train_cyclegan(_cfg(domains, out, lr=1e-6), progress=False, resume=True)
    assert "learning rates G 0.0002 -> 1e-06, D 0.0002 -> 1e-06" in capsys.readouterr().out
    records = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "lr" in r]
    before, after = [r for r in records if r["step"] <= 3], [r for r in records if r["step"] > 3]
    assert before and all(r["lr"] == pytest.approx(2e-4) for r in before)
    assert [r["step"] for r in after] == [4, 6] and 0 < after[0]["lr"] <= 1e-6  # the new rate, decaying
    # the command line: a resumed run keeps its own rate unless --lr is given
    a, b = domains
    args = ["train", "cyclegan", "--domain-a", str(a), "--domain-b", str(b), "--out", str(tmp_path / "cli"),
            "--width", "4", "--n-blocks", "1", "--disc-width", "4", "--disc-layers", "2", "--load-size", "36",
            "--crop-size", "32", "--steps", "4", "--save-every", "2", "--log-every", "2", "--sample-every", "4", "--cpu"]
    assert cli_main([*args, "--lr", "0.001", "--stop-after", "2"]) == 0
    assert cli_main([*args, "--resume"]) == 0
    assert json.loads((tmp_path / "cli" / "train_config.json").read_text())["lr"] == 0.001


def test_run_outputs(domains, tmp_path):
    out = tmp_path / "run"
    gen = train_cyclegan(_cfg(domains, out, keep_checkpoints=1), progress=False)
    # the exported generator loads strictly and translates
    G = load_model(gen)
    y = G(torch.zeros(1, 3, 32, 32))
    assert y.shape == (1, 3, 32, 32) and y.abs().max() <= 1
    # rotation keeps only the newest complete checkpoint
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000006"]
    grid = Image.open(out / "samples" / "step-0000006.png")
    assert grid.size == (3 * 32, 2 * 32)  # input | translated | reconstructed, two photos
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r for r in records if "G_gan" in r]
    assert [r["step"] for r in losses] == [2, 4, 6]
    assert losses[-1]["lr"] == 0.0  # linear decay reaches zero at the last step
    assert json.loads((out / "train_config.json").read_text())["exclude_b"] == ["film2/*"]


def test_evaluation_at_checkpoints_keeps_the_best_generator(domains, tmp_path):
    out = tmp_path / "run"
    kids = iter([5.0, 2.0, 4.0])  # steps 2, 4, 6: the best is step 4
    seen = []

    def evaluator(G):
        seen.append(G(torch.zeros(1, 3, 32, 32)).shape)  # it is handed a working generator
        return {"fid": 1.0, "kid_x1000": next(kids)}

    train_cyclegan(_cfg(domains, out, eval_every=2), progress=False, evaluator=evaluator)
    assert len(seen) == 3
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["kid_x1000"]) for r in records if "kid_x1000" in r] == [(2, 5.0), (4, 2.0), (6, 4.0)]
    best = json.loads((out / "generator-best" / "scores.json").read_text())
    assert best["step"] == 4 and best["kid_x1000"] == 2.0
    assert load_model(out / "generator-best")(torch.zeros(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    # the best (step 4) differs from the final export (step 6)
    assert any(not torch.equal(v, _weights(out / "generator")[k]) for k, v in _weights(out / "generator-best").items())


def test_refuses_to_clobber_or_change_architecture(domains, tmp_path):
    out = tmp_path / "run"
    train_cyclegan(_cfg(domains, out, steps=3, decay_steps=0), progress=False)
    with pytest.raises(ValueError, match="--resume"):
        train_cyclegan(_cfg(domains, out, steps=3, decay_steps=0), progress=False)
    with pytest.raises(ValueError, match="width"):
        train_cyclegan(_cfg(domains, out, steps=6, width=8), progress=False, resume=True)


def test_init_a_starts_from_a_trained_generator(domains, tmp_path):
    first = train_cyclegan(_cfg(domains, tmp_path / "first", steps=3, decay_steps=0), progress=False)
    # lr 0: G_A never moves, so the export is exactly where --init-a started it
    cont = train_cyclegan(_cfg(domains, tmp_path / "cont", steps=2, decay_steps=0, lr=0.0, init_a=str(first)), progress=False)
    fresh = train_cyclegan(_cfg(domains, tmp_path / "fresh", steps=2, decay_steps=0, lr=0.0), progress=False)
    a, b, c = _weights(first), _weights(cont), _weights(fresh)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    assert any(not torch.allclose(c[k], a[k]) for k in a)  # without it, the start differs
    # a generator of another shape is refused with the reason
    with pytest.raises(ValueError, match="--init-a .* does not fit"):
        train_cyclegan(_cfg(domains, tmp_path / "bad", steps=2, decay_steps=0, width=8, init_a=str(first)), progress=False)
    assert not (tmp_path / "bad").exists()


def test_filters_that_leave_nothing_are_an_error(domains, tmp_path):
    with pytest.raises(ValueError, match="no images left"):
        train_cyclegan(_cfg(domains, tmp_path / "run", exclude_b=["*"]), progress=False)


def test_image_pool_and_schedule():
    pool = ImagePool(2, seed=0)
    imgs = [torch.full((1, 3, 2, 2), float(i)) for i in range(20)]
    outs = [pool.query(x) for x in imgs[:10]]
    assert torch.equal(outs[0], imgs[0]) and torch.equal(outs[1], imgs[1])  # filling up returns the input
    returned = {float(o[0, 0, 0, 0]) for o in outs[2:]}
    assert returned - {float(i) for i in range(2, 10)}, "a full pool must sometimes return an older image"
    state = pool.state_dict()
    clone = ImagePool(2, seed=123)
    clone.load_state_dict(state)
    for x in imgs[10:]:
        assert torch.equal(pool.query(x), clone.query(x))
    f = linear_decay(steps=10, decay_steps=4)
    assert [f(s) for s in (0, 5, 6, 8, 10)] == [1.0, 1.0, 1.0, 0.5, 0.0]
    with pytest.raises(ValueError):
        linear_decay(steps=3, decay_steps=5)


def test_two_cpu_processes_stay_in_sync(domains, tmp_path):
    a, b = domains
    out = tmp_path / "ddp"
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    cmd = [
        # accelerate launches several CPU processes (gloo) with --multi_gpu when there is no GPU;
        # its --cpu flag would start a single process
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "ghibli_core", "train", "cyclegan",
        "--domain-a", str(a), "--domain-b", str(b), "--out", str(out),
        "--width", "4", "--n-blocks", "1", "--disc-width", "4", "--disc-layers", "2",
        "--load-size", "36", "--crop-size", "32", "--steps", "4", "--save-every", "2",
        "--log-every", "2", "--sample-every", "4", "--cpu",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    syncs = [r for r in records if "in_sync" in r]
    assert [(r["step"], r["in_sync"], r["processes"]) for r in syncs] == [(2, True, 2), (4, True, 2)]
    assert (out / "generator" / "model.safetensors").is_file()


def test_ema_warms_up_then_averages():
    net = torch.nn.Linear(2, 2, bias=False)
    torch.nn.init.zeros_(net.weight)
    ema = EMA(net, decay=0.999)
    assert ema.decay_at(0) == 0.1 and ema.decay_at(None) == 0.999 and ema.decay_at(10**6) == 0.999
    with torch.no_grad():
        net.weight.fill_(1.0)
    for step in range(100):
        ema.update(net, step=step)
    # after 100 warmed-up steps the average has (almost) forgotten the initial zeros;
    # a plain 0.999 average would still be at 1 - 0.999**100 = 0.095
    assert float(ema.model.weight.mean()) > 0.85
    plain = EMA(torch.nn.Linear(2, 2, bias=False).requires_grad_(False), decay=0.999)
    torch.nn.init.zeros_(plain.model.weight)
    for _ in range(100):
        plain.update(net)
    assert abs(float(plain.model.weight.mean()) - (1 - 0.999**100)) < 1e-4


def test_loss_means_count_what_was_added_and_catch_divergence():
    from ghibli_core.training.common import LossMeans

    means = LossMeans(digits=3)
    means.add({"a": torch.tensor(1.0), "b": 4.0})
    means.add({"a": 2.0})  # "b" missing this step: its mean is over its own count
    assert means.pop(step=2) == {"a": 1.5, "b": 4.0}
    assert means.pop(step=3) == {}  # cleared
    means.add({"a": float("nan")})
    with pytest.raises(RuntimeError, match="diverged at step 4"):
        means.pop(step=4)
