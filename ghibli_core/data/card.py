"""The dataset card (``README.md``) of a folder made by ``python -m ghibli_core prepare``.

:func:`dataset_card` turns the folder's manifest and its job record (``.prepare.json``: the
sources seen, settings, counts of what was dropped and why) into Markdown; the CLI writes it.
"""
from __future__ import annotations

import collections
import datetime as _dt
from pathlib import Path

from .manifest import Manifest

__all__ = ["dataset_card"]

_REASONS = ("black", "blank", "fade", "duplicate", "too_small", "unreadable")


def _fmt(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _settings_line(settings: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in settings.items())


def dataset_card(manifest: Manifest, state: dict, *, title: str | None = None) -> str:
    """Markdown for ``README.md``: sources, counts, clean-up settings, tags, palette groups.

    Args:
        manifest: the folder's records.
        state: the folder's job record (``sources`` -> counts and settings, ``palette``...).
        title: heading; default the folder name.
    """
    records = list(manifest)
    folder = manifest.root
    name = title or folder.resolve().name
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# {name}",
        "",
        f"Training images prepared with `python -m ghibli_core prepare` (ghibli-studio); "
        f"**{len(records)} images** listed in [`manifest.jsonl`](manifest.jsonl), one JSON line each. "
        f"Updated {now}.",
        "",
    ]

    # -- sources --
    sources = state.get("sources", {})
    if sources:
        lines += ["## Sources", "", "| source | kind | kept | seen | dropped | notes |", "|---|---|---:|---:|---|---|"]
        for key in sorted(sources):
            s = sources[key]
            counts = s.get("counts", {})
            dropped = ", ".join(f"{r.replace('_', ' ')} {counts[r]}" for r in _REASONS if counts.get(r))
            notes = []
            if s.get("kind") == "film":
                crop, size = s.get("crop"), s.get("frame_size")
                if crop and size and crop != [0, 0, *size]:
                    notes.append(f"bars cropped: picture {crop[2]}x{crop[3]} at ({crop[0]}, {crop[1]}) "
                                 f"of {size[0]}x{size[1]}")
                if s.get("duration"):
                    notes.append(f"{s['duration']:.1f} s")
                if not s.get("complete"):
                    notes.append(f"**incomplete** (stopped at {s.get('until', 0):.1f} s; rerun to resume)")
            seen = counts.get("samples", counts.get("files", 0))
            lines.append(
                f"| `{s.get('source', key)}` | {s.get('kind', '?')} | {counts.get('kept', 0)} | {seen} "
                f"| {dropped or '-'} | {'; '.join(notes) or '-'} |"
            )
        lines.append("")
    failures = state.get("failures", [])
    if failures:
        lines += ["Inputs that failed in the last run (see the command's output):", ""]
        lines += [f"- {f}" for f in failures[:20]]
        if len(failures) > 20:
            lines.append(f"- ... and {len(failures) - 20} more")
        lines.append("")

    # -- settings --
    settings = state.get("settings", {})
    if settings:
        lines += ["## Clean-up", ""]
        for kind in sorted(settings):
            lines.append(f"- `prepare {kind}`: {_settings_line(settings[kind])}")
        lines += [
            "",
            "Dropped: *black* (the brightest 2 % darker than the black level), *blank* (luma std "
            "below the blank level: flat colour), *fade* and *duplicate* (perceptual hash within "
            "the threshold of a kept image: the rest of a static shot, a dimmed fade, a repeated "
            "shot or photo), *too small* (short side below the minimum), *unreadable*.",
            "",
        ]

    # -- tags --
    tag_counts: collections.Counter = collections.Counter()
    for r in records:
        for k, v in (r.get("tags") or {}).items():
            tag_counts[(k, v)] += 1
    if tag_counts:
        lines += ["## Tags", "", "| tag | images |", "|---|---:|"]
        lines += [f"| `{k}={v}` | {n} |" for (k, v), n in sorted(tag_counts.items())]
        lines.append("")

    # -- palette --
    palette = state.get("palette")
    grouped = [r for r in records if isinstance(r.get("group"), int)]
    if palette and grouped:
        by_group: dict[int, list[dict]] = collections.defaultdict(list)
        for r in grouped:
            by_group[r["group"]].append(r)
        lines += [
            "## Palettes and groups",
            "",
            f"Per image, K-means (k={palette['settings']['k']}) on its pixels in HSL gives a palette and "
            "warmth / brightness / saturation scores; images are grouped by KMeans on their palettes "
            f"({len(by_group)} groups, numbered from the coolest to the warmest). "
            "Each contact sheet shows a group, with every thumbnail's palette underneath.",
            "",
            "| group | images | warmth | brightness | saturation | contact sheet |",
            "|---:|---:|---:|---:|---:|---|",
        ]

        def mean(rs, key):
            vals = [r[key] for r in rs if isinstance(r.get(key), (int, float))]
            return sum(vals) / len(vals) if vals else None

        for g in sorted(by_group):
            rs = by_group[g]
            sheet = f"contact_sheets/group_{g:02d}.png"
            link = f"[{sheet}]({sheet})" if (folder / sheet).exists() else "-"
            lines.append(
                f"| {g} | {len(rs)} | {_fmt(mean(rs, 'warmth'))} | {_fmt(mean(rs, 'brightness'))} | "
                f"{_fmt(mean(rs, 'saturation'))} | {link} |"
            )
        lines.append("")
        for g in sorted(by_group):
            sheet = f"contact_sheets/group_{g:02d}.png"
            if (folder / sheet).exists():
                lines += [f"### Group {g}", "", f"![group {g}]({sheet})", ""]

    # -- use --
    lines += [
        "## Use",
        "",
        "Select images with `--where` filters on the manifest's fields and tags "
        "(`warmth>0.6`, `group=3`, `studio=ghibli`, `source!=ponyo*`; several are combined with AND):",
        "",
        "```bash",
        "python -m ghibli_core train cyclegan --domain-a PHOTOS/ "
        f"--domain-b {Path(folder).as_posix()}/manifest.jsonl \\",
        "    --where-b 'warmth>0.6' --out runs/warm",
        "```",
        "",
        "## Terms",
        "",
        "The images keep the terms of their sources; this card grants nothing beyond them. "
        "Record each source's licence here before sharing the dataset.",
        "",
    ]
    return "\n".join(lines)
