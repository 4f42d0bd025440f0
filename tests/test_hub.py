"""ghibli_core.hub: spec parsing, local folders, and the real huggingface_hub download/upload
paths against a fake Hub on loopback (tests/hub_server.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ghibli_core import hub
from ghibli_core.cli import main as cli_main
from ghibli_core.hub import (
    CheckpointError,
    HubError,
    ModelNotAvailable,
    ModelNotFound,
    ModelSpec,
    load,
    load_with_fallback,
    model_card,
    parse_spec,
    push,
    resolve,
)
from ghibli_core.models import ResnetGenerator, UnetGenerator

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import FakeHub  # noqa: E402

REPO = "tester/tiny-ghibli"
ROOT = Path(__file__).resolve().parent.parent


def tiny_generator(seed: int) -> ResnetGenerator:
    g = torch.Generator().manual_seed(seed)
    model = ResnetGenerator(width=4, n_blocks=1).eval()
    with torch.no_grad():
        for p in model.parameters():  # weights that depend on the seed only
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def save_checkpoint(model, folder: Path, card: str = "# tiny\nA test checkpoint.\n") -> Path:
    model.save_pretrained(folder)
    (folder / "README.md").write_text(card)
    return folder


def sample_input() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(1, 3, 16, 16, generator=g) * 2 - 1  # (1, 3, 16, 16) in [-1, 1]


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    server = FakeHub().start()
    server.cache = server.patch_huggingface_hub(monkeypatch, tmp_path / "hf")
    monkeypatch.setenv("HF_TOKEN", server.token)
    hub.clear_model_cache()
    yield server
    server.down()
    hub.clear_model_cache()


@pytest.fixture
def published(fake_hub, tmp_path):
    """Two versions pushed with our push(): returns (old model, old sha, new model, new sha)."""
    old, new = tiny_generator(1), tiny_generator(2)
    old_sha = push(save_checkpoint(old, tmp_path / "v1", "# tiny v1\n"), REPO, commit_message="v1")
    new_sha = push(save_checkpoint(new, tmp_path / "v2", "# tiny v2\n"), REPO, commit_message="v2")
    fake_hub.clear_requests()
    return old, old_sha, new, new_sha


# -- parsing ---------------------------------------------------------------------------------
def test_parse_spec_forms(tmp_path, monkeypatch):
    weights = tmp_path / "weights"
    (weights / "photo2ghibli").mkdir(parents=True)
    local = tmp_path / "ckpt"
    local.mkdir()
    assert parse_spec("photo2ghibli", weights_dir=weights) == ModelSpec("embedded", "photo2ghibli")
    assert parse_spec(str(local), weights_dir=weights) == ModelSpec("local", str(local.resolve()))
    assert parse_spec("owner/name", weights_dir=weights) == ModelSpec("hub", "owner/name", None)
    assert parse_spec("owner/name@v2", weights_dir=weights) == ModelSpec("hub", "owner/name", "v2")
    assert parse_spec("owner/name", "refs/pr/1", weights_dir=weights).revision == "refs/pr/1"
    assert parse_spec("owner/name@v2", "v2", weights_dir=weights).revision == "v2"
    assert parse_spec(" owner/name ", "", weights_dir=weights) == ModelSpec("hub", "owner/name", None)
    assert str(parse_spec("owner/name@abc", weights_dir=weights)) == "owner/name@abc"


def test_parse_spec_ambiguity_existing_directory_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "weights"
    (weights / "photo2ghibli").mkdir(parents=True)
    (tmp_path / "owner" / "name").mkdir(parents=True)
    (tmp_path / "photo2ghibli").mkdir()
    assert parse_spec("owner/name", weights_dir=weights).kind == "local"
    assert parse_spec("owner/name@main", weights_dir=weights) == ModelSpec("hub", "owner/name", "main")
    # an embedded name beats a same-named folder in the working directory; ./name means the folder
    assert parse_spec("photo2ghibli", weights_dir=weights).kind == "embedded"
    assert parse_spec("./photo2ghibli", weights_dir=weights).kind == "local"


@pytest.mark.parametrize(
    "spec, revision, match",
    [
        ("", None, "empty model spec"),
        ("nosuchmodel", None, "unknown model 'nosuchmodel'"),
        ("a/b/c", None, "no such folder"),
        ("./missing", None, "no such folder"),
        ("owner/na me", None, "invalid Hub repo id"),
        ("owner/name--x", None, "invalid Hub repo id"),
        ("owner/name@", None, "empty revision"),
        ("owner/name@v1", "v2", "two revisions"),
        ("owner/name@bad rev", None, "invalid revision"),
        ("owner/name", "../x", "invalid revision"),
        ("photo2ghibli", "main", "only applies to Hub repos"),
    ],
)
def test_parse_spec_errors_say_what_is_accepted(tmp_path, spec, revision, match):
    weights = tmp_path / "weights"
    (weights / "photo2ghibli").mkdir(parents=True)
    with pytest.raises(ValueError, match=match) as info:
        parse_spec(spec, revision, weights_dir=weights)
    if "revision" not in match and "two" not in match and "Hub repos" not in match:
        assert "owner/name@revision" in str(info.value)


# -- embedded and local folders --------------------------------------------------------------
def test_embedded_and_local_folders_resolve_and_load(tmp_path):
    weights = tmp_path / "weights"
    model = tiny_generator(3)
    save_checkpoint(model, weights / "tiny")
    local = save_checkpoint(model, tmp_path / "somewhere" / "ckpt")
    assert resolve("tiny", weights_dir=weights) == weights / "tiny"
    assert resolve(str(local), weights_dir=weights) == local.resolve()
    x = sample_input()
    with torch.no_grad():
        assert torch.equal(load("tiny", weights_dir=weights)(x), model(x))
        assert torch.equal(load(str(local), weights_dir=weights)(x), model(x))
    assert model_card(local).startswith("# tiny")
    assert model_card(tmp_path) == ""
    assert hub.embedded_models(weights) == ["tiny"]


def test_default_video_model_falls_back_to_the_photo_default(tmp_path):
    weights = tmp_path / "weights"
    save_checkpoint(tiny_generator(0), weights / hub.DEFAULT_MODEL)
    assert hub.default_video_model(weights) == hub.DEFAULT_MODEL
    save_checkpoint(tiny_generator(1), weights / hub.DEFAULT_VIDEO_MODEL)
    assert hub.default_video_model(weights) == hub.DEFAULT_VIDEO_MODEL


def test_local_folder_that_is_not_a_checkpoint(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        resolve(str(empty))
    save_checkpoint(tiny_generator(0), tmp_path / "ok")
    (tmp_path / "ok" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        resolve(str(tmp_path / "ok"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "bert"}')
    (other / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a ghibli-studio checkpoint.*'bert'"):
        resolve(str(other))


# -- the Hub ---------------------------------------------------------------------------------
def test_push_then_download_gives_the_same_network(fake_hub, published, tmp_path):
    old, old_sha, new, new_sha = published
    folder = resolve(REPO)
    assert folder.parent.name == "snapshots" and folder.name == new_sha
    assert Path(fake_hub.cache) in folder.parents  # huggingface_hub's normal cache
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    x = sample_input()
    with torch.no_grad():
        assert torch.equal(load(REPO)(x), new(x))
    assert model_card(folder) == "# tiny v2\n"
    # exactly what push() sent is on the fake Hub
    files = fake_hub.files(REPO)
    assert set(files) == {".gitattributes", "config.json", "model.safetensors", "README.md"}
    assert files["model.safetensors"] == (tmp_path / "v2" / "model.safetensors").read_bytes()


def test_pinned_revision_gets_the_old_weights(fake_hub, published):
    old, old_sha, new, new_sha = published
    assert old_sha != new_sha
    pinned = load(f"{REPO}@{old_sha}")
    assert same_weights(pinned, old) and not same_weights(pinned, new)
    assert same_weights(load(REPO, revision=old_sha), old)
    assert same_weights(load(REPO), new)
    assert resolve(f"{REPO}@{old_sha}").name == old_sha


def test_second_load_uses_the_cache(fake_hub, published):
    load(REPO)
    assert fake_hub.downloads("model.safetensors")
    fake_hub.clear_requests()
    load(REPO)
    assert fake_hub.downloads("model.safetensors") == []
    assert fake_hub.downloads("config.json") == []
    # a branch still costs one look-up of where it points; a pinned sha costs nothing
    assert [r.path for r in fake_hub.requests] == [f"/api/models/{REPO}/revision/main"]
    sha = fake_hub.head(REPO)
    fake_hub.clear_requests()
    load(f"{REPO}@{sha}")
    assert fake_hub.requests == []


def test_new_commit_on_main_is_picked_up(fake_hub, published, tmp_path):
    load(REPO)
    newer = tiny_generator(9)
    push(save_checkpoint(newer, tmp_path / "v3"), REPO)
    assert same_weights(load(REPO), newer)


def test_server_down_uses_the_cached_copy(fake_hub, published):
    old, old_sha, new, new_sha = published
    x = sample_input()
    load(REPO)
    load(f"{REPO}@{old_sha}")
    fake_hub.down()
    with torch.no_grad():
        assert torch.equal(load(REPO)(x), new(x))
        assert torch.equal(load(f"{REPO}@{old_sha}")(x), old(x))


def test_server_down_and_no_cache_is_actionable(fake_hub, published):
    fake_hub.down()
    with pytest.raises(ModelNotAvailable) as info:
        resolve(REPO)
    message = str(info.value)
    assert REPO in message and "main" in message
    assert "could not be reached" in message
    assert f"python -m ghibli_core pull {REPO}" in message
    assert "connect" in message and hub.DEFAULT_MODEL in message
    assert isinstance(info.value, RuntimeError)


def test_hub_that_never_answers_times_out_to_the_cache(fake_hub, published, monkeypatch):
    from huggingface_hub import constants

    load(REPO)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
    fake_hub.clear_requests()
    fake_hub.stall()
    assert same_weights(load(REPO), published[2])  # after a 1 s timeout, from the cache
    with pytest.raises(ModelNotAvailable, match="ReadTimeout"):
        resolve("tester/never-cached")
    assert [r.path for r in fake_hub.requests] == [
        f"/api/models/{REPO}/revision/main",
        "/api/models/tester/never-cached/revision/main",
    ]


def test_offline_env_uses_only_the_cache(fake_hub, published, monkeypatch):
    old, old_sha, new, new_sha = published
    load(REPO)
    fake_hub.clear_requests()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert same_weights(load(REPO), new)
    with pytest.raises(ModelNotAvailable, match="HF_HUB_OFFLINE") as info:
        resolve(f"{REPO}@{old_sha}")  # never downloaded
    assert f"python -m ghibli_core pull {REPO}@{old_sha}" in str(info.value)
    assert fake_hub.requests == []  # the Hub is up, but offline means not asking it


def test_offline_argument_uses_only_the_cache(fake_hub, published):
    with pytest.raises(ModelNotAvailable, match="offline mode was requested"):
        resolve(REPO, offline=True)
    assert fake_hub.requests == []


def test_repo_with_only_pickled_weights_is_refused_unread(fake_hub, tmp_path):
    poison = b"cos\nsystem\n(S'echo pwned'\ntR."  # a pickle that would run a command if loaded
    fake_hub.add_commit(
        "someone/pickled",
        {"config.json": b'{"model_type": "cyclegan-resnet"}', "pytorch_model.bin": poison, "README.md": b"# old\n"},
    )
    with pytest.raises(CheckpointError, match="pytorch_model.bin") as info:
        resolve("someone/pickled")
    assert "never unpickles" in str(info.value) and "someone/pickled" in str(info.value)
    assert fake_hub.downloads("pytorch_model.bin") == []
    assert not any(p.name == "pytorch_model.bin" for p in Path(fake_hub.cache).rglob("*"))


def test_not_a_ghibli_checkpoint(fake_hub):
    fake_hub.add_commit("someone/bert", {"config.json": b'{"model_type": "bert"}', "model.safetensors": b"\0" * 8})
    with pytest.raises(CheckpointError, match="someone/bert.*not a ghibli-studio checkpoint"):
        resolve("someone/bert")
    fake_hub.add_commit("someone/nothing", {"notes.txt": b"hi"})
    with pytest.raises(CheckpointError, match="someone/nothing.*no model.safetensors.*notes.txt"):
        resolve("someone/nothing")


def test_missing_repo_and_revision_name_them(fake_hub, published):
    with pytest.raises(ModelNotFound, match="tester/nope.*not found"):
        resolve("tester/nope")
    with pytest.raises(ModelNotFound, match=f"{REPO}.*'v9' does not exist"):
        resolve(f"{REPO}@v9")


def test_push_validates_the_folder_first(fake_hub, tmp_path):
    broken = save_checkpoint(tiny_generator(0), tmp_path / "broken")
    (broken / "config.json").write_text('{"model_type": "cyclegan-resnet", "width": 8, "n_blocks": 1}')
    with pytest.raises(CheckpointError):
        push(broken, REPO)
    with pytest.raises(ValueError, match="owner/name"):
        push(save_checkpoint(tiny_generator(0), tmp_path / "ok"), "just-a-name")
    assert fake_hub.requests == []


def test_push_to_a_branch_with_samples_and_a_bad_token(fake_hub, tmp_path, monkeypatch):
    folder = save_checkpoint(UnetGenerator(width=2, n_downs=5), tmp_path / "unet")
    (folder / "samples").mkdir()
    (folder / "samples" / "step_100.png").write_bytes(b"\x89PNG fake")
    (folder / "optimizer.pt").write_bytes(b"not for the Hub")
    sha = push(folder, REPO, revision="dev", private=True)
    assert fake_hub.repos[REPO].private
    assert fake_hub.head(REPO, "dev") == sha and fake_hub.head(REPO, "main") != sha
    pushed = {".gitattributes", "config.json", "model.safetensors", "README.md", "samples/step_100.png"}
    assert set(fake_hub.files(REPO, "dev")) == pushed
    assert isinstance(load(REPO, revision="dev"), UnetGenerator)
    monkeypatch.setenv("HF_TOKEN", "wrong")
    with pytest.raises(HubError, match="refused the token"):
        push(folder, "tester/other")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="HF_TOKEN"):
        push(folder, "tester/other")


def test_load_with_fallback(fake_hub, published, tmp_path):
    weights = tmp_path / "weights"
    default = tiny_generator(5)
    save_checkpoint(default, weights / "tiny_default")
    model, notice = load_with_fallback(REPO, default="tiny_default", weights_dir=weights)
    assert notice is None and same_weights(model, published[2])
    fake_hub.clear_requests()
    again, _ = load_with_fallback(REPO, default="tiny_default", weights_dir=weights)
    assert again is model  # loaded once, then shared
    assert fake_hub.requests == []  # and not looked up again

    fake_hub.down()
    model, notice = load_with_fallback("tester/never-cached", default="tiny_default", weights_dir=weights)
    assert same_weights(model, default)
    assert "tester/never-cached" in notice and "tiny_default" in notice and "pull" in notice
    fake_hub.up()
    # a misspelt repo is an error to show, not something to paper over
    with pytest.raises(ModelNotFound):
        load_with_fallback("tester/never-existed", default="tiny_default", weights_dir=weights)


# -- the CLI ---------------------------------------------------------------------------------
def test_cli_push_and_pull(fake_hub, tmp_path, capsys):
    folder = save_checkpoint(tiny_generator(4), tmp_path / "ckpt")
    assert cli_main(["push", str(folder), "--repo", REPO, "--message", "first"]) == 0
    out = capsys.readouterr().out
    sha = fake_hub.head(REPO)
    assert f"{REPO}@{sha}" in out
    assert fake_hub.repos[REPO].commits[sha].message == "first"
    assert cli_main(["pull", REPO]) == 0
    assert capsys.readouterr().out.strip() == str(resolve(REPO))
    fake_hub.down()
    assert cli_main(["pull", "tester/other"]) == 2
    assert "python -m ghibli_core pull tester/other" in capsys.readouterr().err


def test_hf_endpoint_environment_in_a_fresh_process(fake_hub, published, tmp_path):
    """The way users point at a mirror: HF_ENDPOINT set before huggingface_hub is imported."""
    home = tmp_path / "fresh_home"
    env = fake_hub.environment(home, base=os.environ)
    run = subprocess.run(
        [sys.executable, "-m", "ghibli_core", "pull", REPO],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    folder = Path(run.stdout.strip().splitlines()[-1])
    assert home in folder.parents and folder.name == published[3]
    assert (folder / "model.safetensors").read_bytes() == fake_hub.files(REPO)["model.safetensors"]


# -- model cards: held-out figures ----------------------------------------------------------------
def write_card(folder: Path, front_matter: str, body: str = "# A model\n") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text(f"---\n{front_matter}---\n\n{body}")
    return folder


def test_card_metrics_reads_the_front_matter(tmp_path):
    folder = write_card(
        tmp_path / "m",
        "license: apache-2.0\n# a comment\nkid_x1000: 106\nkid_films: [ponyo, howls_moving_castle]\n"
        "kid_baseline: the photos unchanged\nkid_baseline_x1000: 93.97\nother_key: kept out\n",
        body="kid_x1000: 1 (the body is not read)\n",
    )
    assert hub.card_metrics(folder) == {
        "kid_x1000": 106.0, "kid_films": ["ponyo", "howls_moving_castle"],
        "kid_baseline": "the photos unchanged", "kid_baseline_x1000": 93.97,
    }
    assert isinstance(hub.card_metrics(folder)["kid_x1000"], float)


def test_card_metrics_without_figures_and_with_wrong_ones(tmp_path):
    assert hub.card_metrics(tmp_path / "no_folder") == {}
    assert hub.card_metrics(write_card(tmp_path / "plain", "license: mit\n")) == {}
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "README.md").write_text("# no front matter\nkid_x1000: 5\n")
    assert hub.card_metrics(tmp_path / "bare") == {}
    with pytest.raises(ValueError, match=r"README.md: kid_x1000 must be a number, got 'good'"):
        hub.card_metrics(write_card(tmp_path / "text", "kid_x1000: good\n"))
    with pytest.raises(ValueError, match="kid_x1000 must be a number"):
        hub.card_metrics(write_card(tmp_path / "bool", "kid_x1000: true\n"))
    with pytest.raises(ValueError, match="kid_films must be a list of names"):
        hub.card_metrics(write_card(tmp_path / "films", "kid_films: ponyo\n"))
    with pytest.raises(ValueError, match="not a YAML mapping"):
        hub.card_metrics(write_card(tmp_path / "yaml", "kid_x1000: [1,\n"))
