"""``python -m ghibli_core stylize``, run in-process on a tiny checkpoint and images made here."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ghibli_core.cli import main
from ghibli_core.cli.stylize import plan_jobs
from ghibli_core.models import ResnetGenerator


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    torch.manual_seed(0)
    ResnetGenerator(width=4, n_blocks=1).save_pretrained(folder)
    return str(folder)


def photo(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    """A random RGB image of ``size`` (W, H) written to ``path`` (format from the extension)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def stylize(*args: str | Path) -> int:
    return main(["stylize", *map(str, args)])


def test_single_file_keeps_odd_portrait_size(tmp_path, model_dir):
    src = photo(tmp_path / "in" / "portrait.png", (37, 53))
    out = tmp_path / "styled.png"
    assert stylize(src, "-o", out, "--model", model_dir) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (37, 53)
    # a single file into a folder: the folder is made and the name kept, as PNG
    assert stylize(src, "-o", tmp_path / "folder", "--model", model_dir) == 0
    with Image.open(tmp_path / "folder" / "portrait.png") as im:
        assert im.size == (37, 53)


def test_output_format_follows_the_extension(tmp_path, model_dir):
    src = photo(tmp_path / "a.png", (40, 24))
    assert stylize(src, "-o", tmp_path / "a_out.jpg", "--model", model_dir) == 0
    with Image.open(tmp_path / "a_out.jpg") as im:
        assert im.format == "JPEG" and im.size == (40, 24)


@pytest.mark.parametrize("name", ["out.d", "results", "a_out.txt", "existing.png"])
def test_one_input_into_a_folder_named_without_an_image_extension(tmp_path, model_dir, capsys, name):
    # a name without an image extension, or an existing folder (whatever its name), is a folder
    src = photo(tmp_path / "a.png", (40, 24))
    out = tmp_path / name
    if name == "existing.png":
        out.mkdir()
    assert stylize(src, "-o", out, "--model", model_dir) == 0
    assert out.is_dir() and Image.open(out / "a.png").size == (40, 24)
    assert f"stylized 1 image(s) -> {out / 'a.png'}" in capsys.readouterr().out


def test_an_existing_file_where_a_folder_is_needed_is_refused(tmp_path, model_dir, capsys):
    src = photo(tmp_path / "a.png", (40, 24))
    (tmp_path / "notes.txt").write_text("mine")
    assert stylize(src, "-o", tmp_path / "notes.txt", "--model", model_dir) == 2
    assert "notes.txt is an existing file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert stylize(src, tmp_path, "-o", tmp_path / "notes.txt", "--model", model_dir) == 2


def test_images_below_the_minimum_side_are_refused_naming_the_size(tmp_path, model_dir, capsys):
    dot = photo(tmp_path / "dot.png", (1, 1))
    assert stylize(dot, "-o", tmp_path / "dot_out.png", "--model", model_dir) == 1
    captured = capsys.readouterr()
    assert "dot.png is 1x1 pixels, too small" in captured.err and "at least 16 pixels" in captured.err
    assert not (tmp_path / "dot_out.png").exists()
    # the summary names no output when none was written
    assert "stylized 0 image(s); 1 failed" in captured.out and "dot_out.png" not in captured.out


def test_folder_recursion_keeps_relative_paths(tmp_path, model_dir, capsys):
    root = tmp_path / "photos"
    sizes = {"top.png": (33, 21), "sub/deeper/b.jpg": (20, 45), "sub/c.webp": (64, 64)}
    for i, (rel, size) in enumerate(sizes.items()):
        photo(root / rel, size, seed=i)
    (root / "notes.txt").write_text("not an image, not an image extension: ignored")
    extra = photo(tmp_path / "loose.png", (17, 19), seed=9)
    out = tmp_path / "out"

    assert stylize(root, extra, "-o", out, "--model", model_dir) == 0
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == ["loose.png", "sub/c.png", "sub/deeper/b.png", "top.png"]
    for rel, size in sizes.items():
        with Image.open(out / Path(rel).with_suffix(".png")) as im:
            assert im.size == size
    assert "stylized 4 image(s)" in capsys.readouterr().out


def test_bad_image_is_reported_and_skipped(tmp_path, model_dir, capsys):
    root = tmp_path / "photos"
    photo(root / "good1.png", (30, 20))
    photo(root / "good2.png", (21, 30), seed=1)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    out = tmp_path / "out"

    assert stylize(root, "-o", out, "--model", model_dir) == 1
    assert sorted(p.name for p in out.iterdir()) == ["good1.png", "good2.png"]  # no temp files left
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.err and "Traceback" not in captured.err
    assert f"stylized 2 image(s) -> {out}; 1 failed" in captured.out


def test_a_single_failed_file_names_no_output(tmp_path, model_dir, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    assert stylize(bad, "-o", tmp_path / "broken_out.png", "--model", model_dir) == 1
    out = capsys.readouterr().out
    assert "stylized 0 image(s); 1 failed" in out and "broken_out.png" not in out
    assert not (tmp_path / "broken_out.png").exists()


def test_strength_zero_returns_the_photo(tmp_path, model_dir):
    src = photo(tmp_path / "p.png", (45, 31))
    out = tmp_path / "p_out.png"
    assert stylize(src, "-o", out, "--model", model_dir, "--strength", "0") == 0
    a = np.asarray(Image.open(src), dtype=np.int16)
    b = np.asarray(Image.open(out), dtype=np.int16)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1
    # and full strength does change it (the check above is not vacuous)
    assert stylize(src, "-o", tmp_path / "p_full.png", "--model", model_dir) == 0
    assert np.abs(a - np.asarray(Image.open(tmp_path / "p_full.png"), dtype=np.int16)).mean() > 5


def test_max_side_caps_the_output(tmp_path, model_dir):
    landscape = photo(tmp_path / "in" / "wide.png", (120, 80))
    portrait = photo(tmp_path / "in" / "tall.png", (30, 90), seed=1)
    small = photo(tmp_path / "in" / "small.png", (40, 20), seed=2)
    out = tmp_path / "out"
    assert stylize(tmp_path / "in", "-o", out, "--model", model_dir, "--max-side", "50") == 0
    assert Image.open(out / landscape.name).size == (50, 33)
    assert Image.open(out / portrait.name).size == (17, 50)
    assert Image.open(out / small.name).size == (40, 20)  # never upscaled


def test_existing_outputs_need_overwrite(tmp_path, model_dir, capsys):
    src = photo(tmp_path / "p.png", (24, 24))
    out = tmp_path / "p_out.png"
    out.write_bytes(b"keep me")
    assert stylize(src, "-o", out, "--model", model_dir) == 0
    assert out.read_bytes() == b"keep me"
    assert "--overwrite" in capsys.readouterr().err
    assert stylize(src, "-o", out, "--model", model_dir, "--overwrite") == 0
    assert Image.open(out).size == (24, 24)


def test_colliding_outputs_and_bad_arguments_fail_early(tmp_path, model_dir, capsys):
    photo(tmp_path / "a" / "same.png", (16, 16))
    photo(tmp_path / "b" / "same.jpg", (16, 16))
    assert stylize(tmp_path / "a", tmp_path / "b", "-o", tmp_path / "out", "--model", model_dir) == 2
    assert "same.png" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert stylize(tmp_path / "missing.png", "-o", tmp_path / "out", "--model", model_dir) == 2
    with pytest.raises(SystemExit):
        stylize(tmp_path / "a", "-o", tmp_path / "out", "--strength", "1.5")
    with pytest.raises(SystemExit):
        stylize(tmp_path / "a", "-o", tmp_path / "out", "--max-side", "0")


def test_output_folder_inside_the_input_is_not_read_back(tmp_path):
    photo(tmp_path / "photos" / "a.png", (16, 16))
    photo(tmp_path / "photos" / "styled" / "a.png", (16, 16))  # an earlier run's output
    jobs = plan_jobs([tmp_path / "photos"], tmp_path / "photos" / "styled")
    assert [job.source.name for job in jobs] == ["a.png"] and jobs[0].source.parent == tmp_path / "photos"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, model_dir, capsys):
    src = photo(tmp_path / "p.png", (16, 16))
    assert stylize(src, "-o", tmp_path / "o.png", "--model", model_dir, "--device", "cuda") == 2
    assert "CUDA is not available" in capsys.readouterr().err
