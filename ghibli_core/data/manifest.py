"""``manifest.jsonl``: one JSON line per prepared image, and ``--where`` filters over it.

A manifest lives in a dataset folder and describes the images of that folder (or of another
folder it points into with relative paths). Each line is one record::

    {"file": "ponyo/ponyo_t000123.500.jpg", "source": "ponyo.mp4", "timestamp": 123.5,
     "width": 256, "height": 256, "tags": {"studio": "ghibli", "medium": "2d"},
     "phash": "c3a1...", "palette": [...], "warmth": 0.71, "brightness": 0.52,
     "saturation": 0.18, "group": 3}

``file`` is the key: a POSIX path relative to the manifest's folder. Every ``prepare`` command
adds or updates records; the training commands select images from it with ``--where``
expressions (:func:`parse_where`), e.g. ``warmth>0.6``, ``group=3``, ``studio=ghibli``,
``file!=ponyo/*``.

Writes never leave a half-written manifest: :meth:`Manifest.save` writes a temporary file and
renames it over the old one; :meth:`Manifest.append` adds one whole line per call (for long
streaming jobs), and :meth:`Manifest.load` ignores a truncated last line (an interrupted
append) and lets a later line for the same file override an earlier one.
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

__all__ = [
    "MANIFEST_NAME",
    "Condition",
    "Manifest",
    "atomic_write_bytes",
    "atomic_write_text",
    "find_manifest",
    "matches",
    "parse_tags",
    "parse_where",
    "select_paths",
]

MANIFEST_NAME = "manifest.jsonl"


# -- atomic files ---------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    Readers see the old file or the new one, never a mix; a failed write removes its hidden
    ``.name.*.tmp`` file. ``durable`` also flushes the data to disk before the rename (worth it
    for a manifest, too slow for thousands of frames, which a rerun can redo).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; datasets are shared like any file
        with os.fdopen(fd, "wb") as fp:
            fp.write(data)
            if durable:
                fp.flush()
                os.fsync(fp.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _suppress_os_error():
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, *, durable: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


class _suppress_os_error:
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        return exc_type is not None and issubclass(exc_type, OSError)


# -- the manifest ---------------------------------------------------------------------------
class Manifest:
    """The records of one ``manifest.jsonl``, keyed by ``file``.

    Args:
        path: the manifest file (``DIR/manifest.jsonl``); it need not exist yet.
        records: initial records (each must have a ``file`` key).

    Records are plain JSON-able dicts. Iteration is in ``file`` order, so saved manifests and
    selections are reproducible.
    """

    def __init__(self, path: str | os.PathLike, records: Iterable[dict] = ()):
        self.path = Path(path)
        self._records: dict[str, dict] = {}
        for record in records:
            self.add(record)

    # -- reading --
    @classmethod
    def load(cls, path: str | os.PathLike) -> "Manifest":
        """Read ``path`` (a manifest file, or a folder holding ``manifest.jsonl``).

        A missing file gives an empty manifest. A line that is not JSON is an error naming the
        file and line, except a truncated last line (an append cut short by an interruption),
        which is dropped.
        """
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        manifest = cls(path)
        if not path.exists():
            return manifest
        raw = path.read_bytes()
        lines = raw.decode("utf-8").split("\n")
        complete_last = raw.endswith(b"\n")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                if number == len(lines) and not complete_last:
                    break  # an interrupted append: the record it was writing is redone on resume
                raise ValueError(f"{path}:{number}: not a JSON line ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("file"), str):
                raise ValueError(f"{path}:{number}: a manifest record needs a 'file' string, got {line[:80]!r}")
            if record.get("_removed"):
                manifest._records.pop(record["file"], None)
            else:
                manifest._records[record["file"]] = record  # later lines win
        return manifest

    @property
    def root(self) -> Path:
        """The folder that ``file`` paths are relative to."""
        return self.path.parent

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[dict]:
        return iter([self._records[k] for k in sorted(self._records)])

    def __contains__(self, file: str) -> bool:
        return file in self._records

    def get(self, file: str) -> dict | None:
        return self._records.get(file)

    def files(self) -> list[str]:
        return sorted(self._records)

    def resolve(self, record_or_file: dict | str) -> Path:
        """The path of a record's image (``root / file``)."""
        file = record_or_file["file"] if isinstance(record_or_file, dict) else record_or_file
        return self.root / file

    def relative(self, path: str | os.PathLike) -> str:
        """``path`` as a ``file`` key: POSIX, relative to :attr:`root` (``..`` allowed)."""
        return Path(os.path.relpath(Path(path).absolute(), self.root.absolute())).as_posix()

    def select(self, where: Sequence[str | "Condition"] = ()) -> list[dict]:
        """Records matching every ``where`` expression (see :func:`parse_where`)."""
        conditions = [c if isinstance(c, Condition) else parse_where(c) for c in where]
        return [r for r in self if matches(r, conditions)]

    # -- changing --
    def add(self, record: dict) -> None:
        """Add or replace the record of ``record['file']``."""
        file = record.get("file")
        if not isinstance(file, str) or not file:
            raise ValueError(f"a manifest record needs a non-empty 'file' string, got {file!r}")
        self._records[file] = record

    def update(self, file: str, **fields: Any) -> dict:
        """Set ``fields`` on the record of ``file`` (which must exist); returns the record."""
        if file not in self._records:
            raise KeyError(f"{file} is not in {self.path}")
        self._records[file].update(fields)
        return self._records[file]

    def remove(self, file: str) -> dict | None:
        return self._records.pop(file, None)

    def append(self, record: dict) -> None:
        """Add ``record`` and append it to the file as one line (streaming jobs).

        One ``write`` of a whole line in append mode: an interruption leaves at most a
        truncated last line, which :meth:`load` drops. Call :meth:`save` at the end to compact.
        """
        self.add(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(record, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
        if self.path.exists() and not _ends_with_newline(self.path):
            _drop_partial_line(self.path)  # an append cut short: its record is being redone
        with open(self.path, "ab") as fp:
            fp.write(line)

    def save(self) -> None:
        """Write all records (sorted by ``file``) atomically."""
        text = "".join(json.dumps(r, sort_keys=True, allow_nan=False) + "\n" for r in self)
        atomic_write_text(self.path, text)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as fp:
        if fp.seek(0, os.SEEK_END) == 0:
            return True
        fp.seek(-1, os.SEEK_END)
        return fp.read(1) == b"\n"


def _drop_partial_line(path: Path) -> None:
    """Cut a file back to its last newline (the unfinished last line goes)."""
    with open(path, "r+b") as fp:
        end = fp.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            start = max(0, pos - 65536)
            fp.seek(start)
            chunk = fp.read(pos - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                fp.truncate(start + nl + 1)
                return
            pos = start
        fp.truncate(0)


def find_manifest(path: str | os.PathLike) -> Path | None:
    """The manifest a path stands for: a ``.jsonl`` file itself, or ``DIR/manifest.jsonl``."""
    path = Path(path)
    if path.is_file() and path.suffix == ".jsonl":
        return path
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        return path / MANIFEST_NAME
    return None


# -- tags ---------------------------------------------------------------------------------------
_KEY = r"[A-Za-z_][A-Za-z0-9_.\-]*"
_RESERVED = frozenset({"file", "source", "film", "kind", "timestamp", "width", "height", "tags", "phash",
                       "palette", "warmth", "brightness", "saturation", "group", "crop"})


def parse_tags(items: Iterable[str]) -> dict[str, str]:
    """``["studio=ghibli", "medium=2d"]`` -> ``{"studio": "ghibli", "medium": "2d"}``."""
    tags: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not re.fullmatch(_KEY, key) or not value:
            raise ValueError(f"a tag is KEY=VALUE with a KEY of letters, digits, '_', '-', '.', got {item!r}")
        if key in _RESERVED:
            raise ValueError(f"tag {key!r} would shadow the manifest field of that name; choose another key")
        tags[key] = value
    return tags


# -- --where ------------------------------------------------------------------------------------
_WHERE = re.compile(rf"^\s*({_KEY})\s*(==|!=|>=|<=|=|>|<)\s*(.*?)\s*$")
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Condition:
    """One ``KEY OP VALUE`` test on a record.

    ``KEY`` is a record field (``warmth``, ``group``, ``file``, ``source``, ``width``...), or
    else a tag (``studio``; ``tags.studio`` also works). ``OP`` is one of ``= == != > >= < <=``.
    Numbers compare as numbers; strings compare with ``=``/``!=`` as glob patterns when the value
    holds ``* ? [`` (``file=ponyo/*``), otherwise exactly. A record without the key fails every
    test except ``!=``.
    """

    key: str
    op: str
    value: str
    text: str

    def __call__(self, record: dict) -> bool:
        found, actual = _lookup(record, self.key)
        if not found or actual is None:
            return self.op == "!="
        if isinstance(actual, (list, dict)):
            raise ValueError(
                f"--where {self.text!r}: field {self.key!r} holds a {type(actual).__name__}, which cannot be compared")
        if self.op in ("=", "=="):
            return _equal(actual, self.value, self.text)
        if self.op == "!=":
            return not _equal(actual, self.value, self.text)
        a, b = _ordered(actual, self.value, self.text)
        return {">": a > b, ">=": a >= b, "<": a < b, "<=": a <= b}[self.op]

    def __str__(self) -> str:
        return self.text


def parse_where(expr: str) -> Condition:
    """``"warmth>0.6"`` -> a :class:`Condition`; raises ``ValueError`` on malformed input."""
    if not isinstance(expr, str):
        raise ValueError(f"a --where expression is a string like 'warmth>0.6', got {expr!r}")
    m = _WHERE.match(expr)
    if not m or m.group(3) == "":
        raise ValueError(
            f"cannot parse --where {expr!r}: expected KEY OP VALUE with OP one of = == != > >= < <= "
            "(e.g. 'warmth>0.6', 'group=3', 'studio=ghibli', 'file!=ponyo/*')"
        )
    key, op, value = m.groups()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    if op in (">", ">=", "<", "<=") and any(c in value for c in _GLOB_CHARS):
        raise ValueError(f"--where {expr!r}: glob patterns only work with = and !=")
    return Condition(key, op, value, expr.strip())


def matches(record: dict, conditions: Sequence[Condition]) -> bool:
    """True when ``record`` passes every condition (an empty list passes everything)."""
    return all(c(record) for c in conditions)


def _lookup(record: dict, key: str) -> tuple[bool, Any]:
    if key in record:
        return True, record[key]
    tags = record.get("tags") or {}
    name = key[5:] if key.startswith("tags.") else key
    if name in tags:
        return True, tags[name]
    return False, None


def _number(value: str) -> float | None:
    try:
        x = float(value)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _equal(actual: Any, value: str, text: str) -> bool:
    if isinstance(actual, bool):
        return actual == (value.lower() in ("1", "true", "yes"))
    if isinstance(actual, (int, float)):
        x = _number(value)
        if x is None:
            raise ValueError(f"--where {text!r}: {value!r} is not a number, but the field holds numbers")
        return float(actual) == x
    actual = str(actual)
    if any(c in value for c in _GLOB_CHARS):
        return fnmatch.fnmatchcase(actual, value)
    return actual == value


def _ordered(actual: Any, value: str, text: str) -> tuple[Any, Any]:
    x = _number(value)
    if isinstance(actual, (int, float)) and not isinstance(actual, bool):
        if x is None:
            raise ValueError(f"--where {text!r}: {value!r} is not a number, but the field holds numbers")
        return float(actual), x
    a = _number(str(actual))
    if a is not None and x is not None:  # numeric tags (year=1988) stored as strings
        return a, x
    return str(actual), value


# -- selection ----------------------------------------------------------------------------------
def select_paths(
    source: str | os.PathLike,
    *,
    where: Sequence[str | Condition] = (),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> list[Path]:
    """Image paths of a manifest (a ``.jsonl`` file or a folder holding ``manifest.jsonl``).

    ``where`` filters records (:func:`parse_where`); ``include``/``exclude`` are glob patterns
    matched against each record's ``file`` (or a tail of it from a folder on) and ``source``:
    ``ponyo/*`` holds out a film in a folder of frames made by ``prepare frames``, and in a
    manifest that lists a folder elsewhere (``../frames/ponyo/1.jpg``). Returns paths in
    ``file`` order.

    Raises:
        FileNotFoundError: no manifest there, or records whose image file is missing.
        ValueError: a malformed expression.
    """
    path = find_manifest(source)
    if path is None:
        raise FileNotFoundError(f"{source}: no {MANIFEST_NAME} there (run `python -m ghibli_core prepare ...` first)")
    manifest = Manifest.load(path)
    kept = []
    for record in manifest.select(where):
        file = record["file"]
        # the file path, each tail of it from a folder on (a manifest elsewhere reaches the images
        # through ../x/ponyo/1.jpg, which `ponyo/*` should still match), and the source
        names = [file] + [file[i + 1 :] for i, c in enumerate(file) if c == "/"]
        if isinstance(record.get("source"), str):
            names.append(record["source"])
        if include and not any(fnmatch.fnmatch(n, p) for n in names for p in include):
            continue
        if any(fnmatch.fnmatch(n, p) for n in names for p in exclude):
            continue
        kept.append(manifest.resolve(record))
    missing = [p for p in kept if not p.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(
            f"{path} lists {len(missing)} image(s) that do not exist: {shown}; "
            "rerun the prepare command that made them (or `prepare palette` to drop stale records)"
        )
    return kept
