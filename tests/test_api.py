"""The public API: every exported name resolves, and importing the package stays cheap."""
from __future__ import annotations

import subprocess
import sys

import ghibli_core


def test_every_public_name_resolves():
    for name in ghibli_core.__all__:
        assert getattr(ghibli_core, name) is not None, name
    assert set(ghibli_core.__all__) <= set(dir(ghibli_core))


def test_unknown_name_is_an_attribute_error():
    try:
        ghibli_core.no_such_thing  # noqa: B018
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_import_does_not_load_torch_or_heavy_modules():
    code = "import sys, ghibli_core; print(sorted(m for m in ('torch', 'gradio', 'ghibli_core.metrics', 'ghibli_core.stylize') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
