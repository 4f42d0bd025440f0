"""Session-wide test set-up."""
from __future__ import annotations

import tempfile

import pytest


@pytest.fixture(scope="session", autouse=True)
def _private_tempdir(tmp_path_factory):
    """Point ``tempfile`` at a folder of this session's pytest tree.

    gradio_client downloads every result into a fresh ``<tempdir>/<40 hex>/`` folder and leaves
    the folder behind after moving the file out; hundreds of tests would litter /tmp with
    them. Inside pytest's tree they go with the rest of the session's files (pytest keeps
    only its last few sessions).
    """
    saved = tempfile.tempdir
    tempfile.tempdir = str(tmp_path_factory.mktemp("tempdir"))
    try:
        yield
    finally:
        tempfile.tempdir = saved
