"""Directories are published whole (artifacts, prepared models, replicas, exports): written under a staging
name and renamed into place, so a reader or a crash never meets half a directory."""

from __future__ import annotations

import os
import stat

import pytest

from lora_exp.core.layout import published


def test_a_published_directory_replaces_the_old_one_whole_and_readable(tmp_path):
    dest = tmp_path / "final"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with published(dest) as staging:
        assert staging != dest and staging.parent == dest.parent
        assert (dest / "old.txt").is_file()  # readers still see the old one while the new one is written
        (staging / "model.safetensors").write_text("new")
        os.chmod(staging / "model.safetensors", 0o600)  # as safetensors' temporary file leaves it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert [p.name for p in dest.iterdir()] == ["model.safetensors"]
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((dest / "model.safetensors").stat().st_mode) == 0o666 & ~mask


def test_a_failed_write_leaves_the_old_directory(tmp_path):
    dest = tmp_path / "final"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), published(dest) as staging:
        (staging / "half.txt").write_text("half")
        raise RuntimeError("killed mid-write")
    assert [p.name for p in dest.iterdir()] == ["old.txt"]
    with published(dest) as staging:  # the next attempt starts from an empty staging directory
        assert list(staging.iterdir()) == []
