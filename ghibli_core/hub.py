"""Resolve a model spec to a checkpoint folder: ``weights/`` -> a local folder -> the Hub.

A checkpoint is a folder holding ``config.json`` + ``model.safetensors`` (+ a ``README.md`` card).
A *spec* names one, in one of three forms (checked in this order):

1. ``photo2ghibli``: the name of a folder under ``weights/`` (an embedded checkpoint);
2. ``path/to/folder``: an existing directory;
3. ``owner/name`` or ``owner/name@revision``: a Hugging Face Hub model repo, at a branch, tag
   or commit sha (default ``main``; a sha pins the exact files).

Ambiguity is settled by that order: an embedded name wins over a same-named folder in the
working directory (write ``./name`` for the folder), and ``owner/name`` is read as a local folder
only when that directory exists (write ``owner/name@main`` to mean the Hub).

Hub repos are downloaded with huggingface_hub into its normal cache (``HF_HOME`` /
``HF_HUB_CACHE``), and only ``config.json``, ``model.safetensors`` and ``README.md``: pickled
weights (``.bin``, ``.pt``, ``.pth``) are never fetched, let alone unpickled. Offline
(``HF_HUB_OFFLINE=1``, ``offline=True``, or a Hub that cannot be reached) a cached copy is used;
with none, :class:`ModelNotAvailable` says what to do. ``HF_ENDPOINT`` points everything at a
mirror.

This module does network and file I/O on purpose: it is the one place that fetches models, for
the CLI and the app. The networks themselves never download.
"""
from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    ResolvedRevision,
    constants,
    get_cached_repo_tree,
    snapshot_download,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import REGEX_COMMIT_HASH, repo_folder_name
from huggingface_hub.utils import get_token, validate_repo_id

from .models import MODELS, CheckpointError, HubModel, load_model, read_config
from .models.base import CONFIG_NAME, WEIGHTS_NAME

try:  # huggingface_hub >= 2 talks through httpx2, 1.x through httpx
    import httpx2 as _httpx
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    import httpx as _httpx

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
DEFAULT_MODEL = "photo2ghibli"
# the embedded StyleGAN2 generator for projection, neighbours and walks
DEFAULT_GAN = "ghibli-stylegan2"
# the embedded fast network for video (a StyleNet trained on Ghibli style frames; see its card)
DEFAULT_VIDEO_MODEL = "ghibli-video-fast"
CARD_NAME = "README.md"
DEFAULT_REVISION = "main"

# What a Hub download may fetch: exactly these names. Everything else in a repo stays there.
HUB_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass(frozen=True)
class RepoFiles:
    """Which files of a Hub repo a download fetches (huggingface_hub's fnmatch patterns, where
    ``*`` also matches ``/``), and what to tell a user who has no copy of them.

    ``pull_command``: the command that caches them on a machine with network, ``{spec}`` filled in.
    """

    allow: tuple[str, ...]
    ignore: tuple[str, ...] = ()
    pull_command: str = "python -m ghibli_core pull {spec}"


CHECKPOINT_FILES = RepoFiles(HUB_FILES)

ACCEPTED_FORMS = (
    "an embedded model name (a folder under weights/), a path to an existing checkpoint folder, "
    "or a Hugging Face Hub repo as 'owner/name' or 'owner/name@revision'"
)

_REVISION_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]*")


class HubError(RuntimeError):
    """A Hub operation failed for a reason the user has to fix (names the repo and revision)."""


class ModelNotFound(HubError):
    """The Hub answered, and the repo or revision does not exist (or is private / gated)."""


class ModelNotAvailable(HubError):
    """The Hub cannot be used (offline, unreachable, down) and no cached copy exists.

    ``spec`` is the spec as written, ``reason`` a short phrase for why the Hub was not used.
    """

    def __init__(self, message: str, *, spec: str, reason: str):
        super().__init__(message)
        self.spec = spec
        self.reason = reason


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec.

    kind: ``"embedded"`` (location = folder name under weights/), ``"local"`` (location = an
    absolute folder path) or ``"hub"`` (location = ``owner/name`` repo id, revision = branch,
    tag or commit sha, or None for the default branch).
    """

    kind: Literal["embedded", "local", "hub"]
    location: str
    revision: str | None = None

    def __str__(self) -> str:
        if self.kind == "hub" and self.revision:
            return f"{self.location}@{self.revision}"
        return self.location


# -- parsing ---------------------------------------------------------------------------------
def embedded_models(weights_dir: str | Path = WEIGHTS_DIR) -> list[str]:
    """Names of the embedded checkpoints (folders under ``weights_dir`` holding a config.json)."""
    weights_dir = Path(weights_dir)
    if not weights_dir.is_dir():
        return []
    return sorted(p.name for p in weights_dir.iterdir() if p.is_dir() and (p / CONFIG_NAME).is_file())


def _check_revision(revision: str, spec: str) -> str:
    if not _REVISION_RE.fullmatch(revision) or ".." in revision or revision.endswith(("/", ".lock")):
        raise ValueError(
            f"invalid revision {revision!r} in model spec {spec!r}: expected a branch, tag or commit sha "
            "(letters, digits, '.', '_', '-', '/')"
        )
    return revision


def parse_spec(spec: str, revision: str | None = None, *, weights_dir: str | Path = WEIGHTS_DIR) -> ModelSpec:
    """Parse a model spec (see the module docstring for the forms and their precedence).

    ``revision`` is an alternative to ``owner/name@revision``; giving both with different
    values, or a revision for a non-Hub spec, is an error. An empty revision means none.
    """
    if isinstance(spec, ModelSpec):
        if revision and spec.revision and revision != spec.revision:
            raise ValueError(f"two revisions for {spec.location}: {spec.revision!r} and {revision!r}")
        if revision and spec.kind == "hub":
            return ModelSpec("hub", spec.location, _check_revision(revision, str(spec)))
        if revision:
            raise ValueError(
                f"a revision ({revision!r}) only applies to Hub repos, not to the {spec.kind} model {spec}"
            )
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"a model spec must be a string, got {type(spec).__name__}")
    text = spec.strip()
    revision = (revision or "").strip() or None
    if not text:
        raise ValueError(f"empty model spec: expected {ACCEPTED_FORMS}")

    weights_dir = Path(weights_dir)
    # 1. embedded: a bare name (no path separator, no revision) of a folder under weights/
    if not re.search(r"[/\\@]", text) and text not in (".", "..") and (weights_dir / text).is_dir():
        if revision:
            raise ValueError(f"a revision ({revision!r}) only applies to Hub repos, not to the embedded model {text!r}")
        return ModelSpec("embedded", text)

    # 2. local: an existing directory (checked before the Hub form: see the module docstring)
    path = Path(text).expanduser()
    if path.is_dir():
        if revision:
            raise ValueError(f"a revision ({revision!r}) only applies to Hub repos, not to the local folder {text!r}")
        return ModelSpec("local", str(path.resolve()))

    # 3. Hub: owner/name[@revision]
    repo_id, at, spec_revision = text.partition("@")
    looks_like_path = text.startswith((".", "/", "~")) or "\\" in text or repo_id.count("/") != 1
    if looks_like_path:
        names = ", ".join(embedded_models(weights_dir)) or "none installed"
        if "/" in text or "\\" in text or text.startswith((".", "~")):
            problem = f"no such folder {text!r}"
        else:
            problem = f"unknown model {text!r} (embedded models: {names})"
        raise ValueError(f"{problem}: expected {ACCEPTED_FORMS}")
    try:
        validate_repo_id(repo_id)
    except ValueError as exc:
        raise ValueError(
            f"invalid Hub repo id {repo_id!r} in model spec {text!r} ({exc}): expected {ACCEPTED_FORMS}"
        ) from exc
    if at and not spec_revision:
        raise ValueError(f"empty revision after '@' in model spec {text!r}: expected 'owner/name@revision'")
    if spec_revision and revision and spec_revision != revision:
        raise ValueError(
            f"two revisions for {repo_id}: {spec_revision!r} in the spec and {revision!r} given separately"
        )
    chosen = spec_revision or revision
    return ModelSpec("hub", repo_id, _check_revision(chosen, text) if chosen else None)


# -- resolving -------------------------------------------------------------------------------
def check_checkpoint_folder(folder: str | Path, *, what: str | None = None) -> Path:
    """Check ``folder`` holds a ghibli-studio checkpoint (config.json with a known
    ``model_type`` + model.safetensors) and return it. ``what`` names it in errors."""
    folder = Path(folder)
    what = what or str(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{what} is not a folder")
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointError(f"{what} is not a ghibli-studio checkpoint: it has no {CONFIG_NAME}")
    if not (folder / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{what} has no {WEIGHTS_NAME}: a checkpoint is {CONFIG_NAME} + {WEIGHTS_NAME}")
    model_type = read_config(folder).get("model_type")
    if model_type not in MODELS:
        raise CheckpointError(
            f"{what} is not a ghibli-studio checkpoint: its {CONFIG_NAME} has model_type {model_type!r}, "
            f"known: {', '.join(sorted(MODELS))}"
        )
    return folder


def _env_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; read the environment now as well
    values = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.is_offline_mode() or any(v and v.upper() in constants.ENV_VARS_TRUE_VALUES for v in values)


def _cache_dir(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)


def _not_available(spec: ModelSpec, reason: str, cache_dir: Path, files: RepoFiles = CHECKPOINT_FILES) -> ModelNotAvailable:
    where = f"{spec.location}@{spec.revision or DEFAULT_REVISION}"
    message = (
        f"model {where} is not available: {reason}, and the Hugging Face cache ({cache_dir}) holds no copy of it. "
        f"To fix: connect to the network (and unset HF_HUB_OFFLINE) and try again; or run "
        f"`{files.pull_command.format(spec=spec)}` on a machine with network and copy its Hugging Face cache "
        f"(HF_HOME, by default ~/.cache/huggingface) to this one; or use the embedded default model "
        f"'{DEFAULT_MODEL}'."
    )
    return ModelNotAvailable(message, spec=str(spec), reason=reason)


def _unreachable_reason(exc: BaseException | None) -> str:
    cause = exc
    while cause is not None:
        if isinstance(cause, OfflineModeIsEnabled):
            return "offline mode is on (HF_HUB_OFFLINE=1)"
        if isinstance(cause, HfHubHTTPError) and cause.response is not None:
            return f"the Hub at {constants.ENDPOINT} answered HTTP {cause.response.status_code}"
        if isinstance(cause, _httpx.TransportError):
            return f"the Hub at {constants.ENDPOINT} could not be reached ({type(cause).__name__}: {cause})"
        cause = cause.__cause__ or cause.__context__
    return f"the Hub at {constants.ENDPOINT} could not be reached"


def _cached_snapshot(
    spec: ModelSpec, revision: str, cache: Path, token: str | bool | None, files: RepoFiles = CHECKPOINT_FILES
) -> Path | None:
    try:
        return _snapshot(spec, revision, cache=cache, local_only=True, token=token, files=files)
    except LocalEntryNotFoundError:
        return None


def _repo_files(repo_id: str, commit: str, cache_dir: Path) -> list[str] | None:
    try:
        return sorted(f.path for f in get_cached_repo_tree(repo_id, revision=commit, cache_dir=cache_dir))
    except Exception:  # the listing is only used to word an error; its absence is not one
        return None


def _write_ref(cache: Path, repo_id: str, revision: str, sha: str) -> None:
    # the cache's documented layout: refs/<branch or tag> holds the commit sha, which is how a
    # later offline call finds the snapshot a branch pointed to
    ref = cache / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs" / revision
    try:
        ref.parent.mkdir(parents=True, exist_ok=True)
        if not ref.is_file() or ref.read_text() != sha:
            tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
            tmp.write_text(sha)
            os.replace(tmp, ref)
    except OSError:  # a read-only cache still serves this download; only later offline use suffers
        pass


def _snapshot(
    spec: ModelSpec,
    revision: str,
    *,
    cache: Path,
    local_only: bool,
    token: str | bool | None,
    files: RepoFiles = CHECKPOINT_FILES,
) -> Path:
    return Path(
        snapshot_download(
            spec.location,
            repo_type="model",
            revision=revision,
            cache_dir=cache,
            allow_patterns=list(files.allow),
            ignore_patterns=list(files.ignore) or None,
            local_files_only=local_only,
            token=token,
            library_name="ghibli-studio",
        )
    )


def _download(
    spec: ModelSpec,
    *,
    cache_dir: str | Path | None,
    offline: bool | None,
    token: str | bool | None,
    files: RepoFiles = CHECKPOINT_FILES,
    check: Callable[[ModelSpec, Path, str, Path], Path] | None = None,
) -> Path:
    check = check or _checked_download
    revision = spec.revision or DEFAULT_REVISION
    where = f"Hub repo {spec.location} at revision {revision!r}"
    cache = _cache_dir(cache_dir)
    offline = _env_offline() if offline is None else offline

    def from_cache(reason: str, error: BaseException | None) -> Path:
        try:
            return _snapshot(spec, revision, cache=cache, local_only=True, token=token, files=files)
        except LocalEntryNotFoundError as exc:  # also a partial (incomplete) snapshot
            raise _not_available(spec, reason, cache, files) from (error or exc)

    if offline:
        reason = "offline mode is on (HF_HUB_OFFLINE=1)" if _env_offline() else "offline mode was requested"
        folder = from_cache(reason, None)
    elif REGEX_COMMIT_HASH.fullmatch(revision) and (cached := _cached_snapshot(spec, revision, cache, token, files)):
        # a full commit sha names immutable files: a cached copy is the answer, no need to ask
        folder = cached
    else:
        api = HfApi(token=token, library_name="ghibli-studio")
        try:
            # 1. where the revision points, with a timeout: huggingface_hub's own look-up has none, so a
            #    network that drops packets would hang the app instead of falling back to the cache
            sha = api.model_info(spec.location, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT).sha
        except RevisionNotFoundError as exc:
            raise ModelNotFound(f"{where}: the revision {revision!r} does not exist on {constants.ENDPOINT}") from exc
        except RepositoryNotFoundError as exc:
            raise ModelNotFound(
                f"{where}: the repo was not found on {constants.ENDPOINT}; check the name, and if it is private "
                "or gated log in (`hf auth login`) or set HF_TOKEN"
            ) from exc
        except (_httpx.TransportError, OfflineModeIsEnabled) as exc:
            folder = from_cache(_unreachable_reason(exc), exc)
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status is None or status < 500:
                raise HubError(f"{where}: the Hub at {constants.ENDPOINT} refused the download: {exc}") from exc
            folder = from_cache(_unreachable_reason(exc), exc)
        else:
            if not sha:
                raise HubError(f"{where}: the Hub at {constants.ENDPOINT} did not say which commit it is")
            # 2. download that exact commit (config, weights, card only)
            pinned = ResolvedRevision(resolved=sha, initial=revision, repo_id=spec.location, repo_type="model")
            try:
                folder = _snapshot(spec, pinned, cache=cache, local_only=False, token=token, files=files)
            except (_httpx.TransportError, LocalEntryNotFoundError) as exc:
                # the Hub went away mid-download: the copy the branch pointed to before, if any
                return check(spec, from_cache(_unreachable_reason(exc), exc), where, cache)
            except HfHubHTTPError as exc:
                raise HubError(f"{where}: downloading commit {sha} failed: {exc}") from exc
            # 3. only a complete download moves the branch -> sha ref that offline calls follow
            if sha != revision:
                _write_ref(cache, spec.location, revision, sha)
    return check(spec, folder, where, cache)


def _checked_download(spec: ModelSpec, folder: Path, where: str, cache: Path) -> Path:
    what = f"{where} (commit {folder.name})"
    if not (folder / WEIGHTS_NAME).is_file():
        files = _repo_files(spec.location, folder.name, cache)
        pickles = [f for f in files or [] if f.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise CheckpointError(
                f"{what} has no {WEIGHTS_NAME}, only pickled weights ({', '.join(pickles)}). ghibli-studio loads "
                "safetensors only and never unpickles files from the network: ask the author for a safetensors "
                "checkpoint, or convert a copy you trust with `python -m ghibli_core convert`"
            )
        listing = f" (it holds: {', '.join(files)})" if files is not None else ""
        raise CheckpointError(f"{what} is not a ghibli-studio checkpoint: it has no {WEIGHTS_NAME}{listing}")
    return check_checkpoint_folder(folder, what=what)


def download_repo(
    spec: str | ModelSpec,
    files: RepoFiles,
    check: Callable[[ModelSpec, Path, str, Path], Path],
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    offline: bool | None = None,
    token: str | bool | None = None,
) -> Path:
    """The snapshot folder of a Hub repo holding ``files``, by the rules :func:`resolve` follows
    for checkpoints (pinned commit, the cache offline or when the Hub is down, the same errors).

    ``spec`` must name a Hub repo (``owner/name[@revision]``). ``check(spec, folder, where,
    cache)`` vets what arrived and returns the folder (``where`` names repo and revision for
    messages); it runs on cached copies too.
    """
    parsed = parse_spec(spec, revision, weights_dir=Path("/nonexistent"))
    if parsed.kind != "hub":
        raise ValueError(f"{spec!r} is a local folder, not a Hub repo")
    return _download(parsed, cache_dir=cache_dir, offline=offline, token=token, files=files, check=check)


def default_video_model(weights_dir: str | Path = WEIGHTS_DIR) -> str:
    """The embedded video model when installed, else the photo default (slower, another look)."""
    return DEFAULT_VIDEO_MODEL if DEFAULT_VIDEO_MODEL in embedded_models(weights_dir) else DEFAULT_MODEL


def resolve(
    spec: str | ModelSpec,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    offline: bool | None = None,
    weights_dir: str | Path = WEIGHTS_DIR,
    token: str | bool | None = None,
) -> Path:
    """The checkpoint folder a spec names, downloading a Hub repo into the cache if needed.

    Args:
        spec: a spec string (see :func:`parse_spec`) or a :class:`ModelSpec`.
        revision: branch, tag or commit sha for a Hub spec (alternative to ``owner/name@rev``).
        cache_dir: huggingface_hub cache folder (default: its own, from HF_HOME / HF_HUB_CACHE).
        offline: None follows HF_HUB_OFFLINE; True uses the cache only; False asks the Hub (a
            cached copy is still used when the Hub cannot be reached).
        weights_dir: where embedded checkpoints live.
        token: Hub token for private repos (default: HF_TOKEN or the saved login).

    Raises:
        ValueError: a malformed spec. CheckpointError: the folder or repo is not a loadable
        checkpoint. ModelNotFound: no such repo or revision. ModelNotAvailable: the Hub cannot
        be used and nothing is cached. HubError: any other Hub refusal.
    """
    parsed = parse_spec(spec, revision, weights_dir=weights_dir)
    if parsed.kind == "embedded":
        return check_checkpoint_folder(Path(weights_dir) / parsed.location, what=f"embedded model {parsed.location!r}")
    if parsed.kind == "local":
        return check_checkpoint_folder(Path(parsed.location))
    return _download(parsed, cache_dir=cache_dir, offline=offline, token=token)


def load(
    spec: str | ModelSpec,
    *,
    revision: str | None = None,
    map_location: str | torch.device = "cpu",
    **resolve_kwargs,
) -> HubModel:
    """:func:`resolve` then :func:`~ghibli_core.models.load_model` (strict), in eval mode.

    Returns a fresh module on every call; :func:`load_with_fallback` shares them instead.
    """
    return load_model(resolve(spec, revision=revision, **resolve_kwargs), map_location=map_location)


# -- for the app: lazy, cached, with a visible fallback ---------------------------------------
MODEL_CACHE_SIZE = 4
_model_cache: OrderedDict[tuple, HubModel] = OrderedDict()
_resolved: OrderedDict[tuple, Path] = OrderedDict()  # spec + options -> folder, for load_with_fallback
_model_cache_lock = threading.Lock()


def _load_cached(folder: Path, map_location: str | torch.device) -> HubModel:
    weights = (folder / WEIGHTS_NAME).stat()
    # the file's identity is part of the key, so a re-exported local folder is loaded afresh
    key = (str(folder.resolve()), str(map_location), weights.st_size, weights.st_mtime_ns)
    with _model_cache_lock:
        if key in _model_cache:
            _model_cache.move_to_end(key)
            return _model_cache[key]
    model = load_model(folder, map_location=map_location)
    with _model_cache_lock:
        model = _model_cache.setdefault(key, model)
        _model_cache.move_to_end(key)
        while len(_model_cache) > MODEL_CACHE_SIZE:
            _model_cache.popitem(last=False)
    return model


def clear_model_cache() -> None:
    """Forget the models and resolved folders :func:`load_with_fallback` keeps."""
    with _model_cache_lock:
        _model_cache.clear()
        _resolved.clear()


def load_with_fallback(
    spec: str | ModelSpec,
    *,
    revision: str | None = None,
    map_location: str | torch.device = "cpu",
    default: str = DEFAULT_MODEL,
    **resolve_kwargs,
) -> tuple[HubModel, str | None]:
    """Load ``spec``, or the embedded ``default`` when the Hub cannot be used.

    Returns ``(model, notice)``; ``notice`` is None when ``spec`` itself was loaded, else a
    sentence for the user saying what happened and how to get the model. Only "cannot reach /
    nothing cached" falls back: a misspelt repo, a missing revision or a broken checkpoint still
    raise, since a silent substitute would hide the mistake. Models are kept in a small LRU keyed
    by resolved folder, so each is loaded once (the shared module must not be modified), and a
    spec that resolved once is not looked up on the Hub again in this process (call
    :func:`clear_model_cache` to pick up a moved branch). A fallback is not remembered.
    """
    weights_dir = resolve_kwargs.get("weights_dir", WEIGHTS_DIR)
    parsed = parse_spec(spec, revision, weights_dir=weights_dir)
    key = (str(parsed), repr(sorted((k, str(v)) for k, v in resolve_kwargs.items())))
    with _model_cache_lock:
        folder = _resolved.get(key)
    # a Hub branch is looked up once per process, then the app keeps the commit it got
    if folder is not None and folder.is_dir():
        return _load_cached(folder, map_location), None
    try:
        folder = resolve(parsed, **resolve_kwargs)
        notice = None
        with _model_cache_lock:
            _resolved[key] = folder
            _resolved.move_to_end(key)
            while len(_resolved) > 4 * MODEL_CACHE_SIZE:
                _resolved.popitem(last=False)
    except ModelNotAvailable as exc:
        # not remembered: the next call tries the Hub again, in case the network is back
        folder = resolve(default, weights_dir=weights_dir)
        notice = (
            f"Model '{exc.spec}' is not available ({exc.reason}) and is not in the local cache: "
            f"showing the embedded default '{default}' instead. With network, run "
            f"`python -m ghibli_core pull {exc.spec}` once to cache it."
        )
    return _load_cached(folder, map_location), notice


def model_card(folder: str | Path) -> str:
    """The checkpoint's README.md model card, or "" when it has none."""
    card = Path(folder) / CARD_NAME
    return card.read_text(encoding="utf-8") if card.is_file() else ""


# -- model cards: held-out figures ----------------------------------------------------------------
# What a card's YAML front matter may declare for card_metrics (one convention for every card: the
# README's "Models and checkpoints" describes it), with the type each must have.
CARD_METRICS: dict[str, type] = {
    "kid_x1000": float,  # KID x 1000 of the outputs against frames of films held out of training
    "kid_films": list,  # those held-out films (folder names under ghibli_frames/)
    "kid_baseline": str,  # what the card compares with, e.g. "the photos unchanged"
    "kid_baseline_x1000": float,  # that comparison's KID x 1000, measured the same way
}
# The project's bar for a default model: KID x 1000 at most this on the held-out films (other
# Ghibli films score about 13 against them).
KID_BAR_X1000 = 30.0


def card_metrics(folder: str | Path) -> dict[str, float | str | list[str]]:
    """The held-out figures a checkpoint's card declares in its YAML front matter.

    Returns the keys of :data:`CARD_METRICS` the card has (numbers as floats); ``{}`` when there is
    no card, no front matter, or none of those keys.

    Raises:
        ValueError: the front matter is not YAML, or a key holds the wrong type (names the card).
    """
    from huggingface_hub.repocard import metadata_load

    card = Path(folder) / CARD_NAME
    if not card.is_file():
        return {}
    try:
        meta = metadata_load(card) or {}
    except Exception as exc:  # noqa: BLE001 - yaml's errors, or a front matter that is not a mapping
        raise ValueError(f"{card}: the front matter is not a YAML mapping: {exc}") from None
    found: dict[str, float | str | list[str]] = {}
    for key, kind in CARD_METRICS.items():
        if key not in meta:
            continue
        value = meta[key]
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            found[key] = float(value)
        elif kind is str and isinstance(value, str):
            found[key] = value
        elif kind is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
            found[key] = list(value)
        else:
            want = {float: "a number", str: "text", list: "a list of names"}[kind]
            raise ValueError(f"{card}: {key} must be {want}, got {value!r}")
    return found


# -- publishing ------------------------------------------------------------------------------
def _files_to_push(folder: Path) -> list[Path]:
    files = [folder / CONFIG_NAME, folder / WEIGHTS_NAME]
    if (folder / CARD_NAME).is_file():
        files.append(folder / CARD_NAME)
    # sample grids next to the checkpoint, if any; never optimiser state or other files
    files += sorted(folder.glob("*.png")) + sorted((folder / "samples").glob("*.png"))
    return files


def push(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    revision: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    create: bool = True,
) -> str:
    """Publish a checkpoint folder to a Hub model repo; returns the new commit's sha.

    The folder must load (strictly) first. Uploaded: config.json, model.safetensors, README.md
    and sample PNGs (``*.png`` and ``samples/*.png``), nothing else. ``create`` makes the repo
    (``private`` applies only then); a ``revision`` other than ``main`` is pushed to that branch,
    created from ``main`` if needed. ``token`` defaults to HF_TOKEN or the saved login. Pin the
    result as ``f"{repo_id}@{sha}"``.
    """
    folder = Path(folder)
    check_checkpoint_folder(folder)
    model = load_model(folder)  # a folder that would not load is never published
    if repo_id.count("/") != 1:
        raise ValueError(f"repo id must be 'owner/name', got {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except ValueError as exc:
        raise ValueError(f"invalid Hub repo id {repo_id!r}: {exc}") from exc
    branch = _check_revision(revision, repo_id) if revision else DEFAULT_REVISION
    if token is None and get_token() is None:
        raise HubError("pushing needs a Hub token with write access: set HF_TOKEN or run `hf auth login`")

    n_params = sum(p.numel() for p in model.parameters())
    message = commit_message or f"Upload {model.model_type} checkpoint ({n_params:,} parameters) with ghibli-studio"
    operations = [
        CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
        for p in _files_to_push(folder)
    ]
    api = HfApi(token=token, library_name="ghibli-studio")
    where = f"{repo_id}@{branch}"
    try:
        if create:
            api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if branch != DEFAULT_REVISION:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        info = api.create_commit(repo_id, operations, commit_message=message, revision=branch, repo_type="model")
    except RevisionNotFoundError as exc:
        raise ModelNotFound(f"cannot push to {where}: the branch does not exist") from exc
    except RepositoryNotFoundError as exc:
        hint = "" if create else " (pass create=True / create it on the Hub first)"
        raise ModelNotFound(
            f"cannot push to {where}: the repo does not exist or your token cannot see it{hint}"
        ) from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise HubError(
                f"cannot push to {where}: the Hub refused the token (HTTP {status}); use a token with write "
                "access to that namespace (HF_TOKEN or `hf auth login`)"
            ) from exc
        raise HubError(f"push to {where} failed: {exc}") from exc
    except (_httpx.TransportError, OfflineModeIsEnabled) as exc:
        raise HubError(f"push to {where} failed: {_unreachable_reason(exc)}") from exc
    return info.oid
