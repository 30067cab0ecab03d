"""Directory manifests (tasks.core.util): every dir tasks.core.util.atomic_dir completes carries the sha256 and
size of its files; a truncated, rewritten, missing or extra-unlisted file is named, never loaded."""
from __future__ import annotations

import pytest

from qlora_ops.tasks.core.util import MANIFEST, DamagedArtifact, atomic_dir, check_manifest, verify_manifest


def _write(d, files):
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)


def test_atomic_dir_writes_a_manifest_that_verifies(tmp_path):
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        _write(tmp, {"model.safetensors": b"w" * 1000, "sub/config.json": b"{}"})
    assert (final / MANIFEST).is_file() and verify_manifest(final) is None
    assert check_manifest(final) == final


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damage_is_named_with_the_file(tmp_path, damage):
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        _write(tmp, {"model.safetensors": b"w" * 1000, "config.json": b"{}"})
    f = final / "model.safetensors"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:500])
    elif damage == "flip":
        f.write_bytes(b"x" + f.read_bytes()[1:])  # same size, other bytes: only the hash sees it
    else:
        f.unlink()
    bad = verify_manifest(final)
    assert bad is not None and str(f) in bad
    with pytest.raises(DamagedArtifact, match="model.safetensors"):
        check_manifest(final)


def test_no_manifest_is_incomplete_for_verify_but_a_user_dir_for_check(tmp_path):
    d = tmp_path / "user-model"
    _write(d, {"config.json": b"{}"})
    assert "missing" in verify_manifest(d)  # our own dirs always have one: its absence means incomplete
    assert check_manifest(d) == d  # a model dir the user gave us has none and loads


def test_a_failed_block_leaves_no_dir_and_no_manifest(tmp_path):
    final = tmp_path / "model"
    with pytest.raises(OSError):
        with atomic_dir(final) as tmp:
            _write(tmp, {"a.bin": b"half"})
            raise OSError(28, "No space left on device")
    assert not final.exists() and not list(tmp_path.iterdir())


def test_check_is_hashed_once_until_a_file_changes(tmp_path):
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        _write(tmp, {"model.safetensors": b"w" * 1000})
    check_manifest(final)
    check_manifest(final)  # the second call trusts the first while sizes and mtimes are unchanged
    (final / "model.safetensors").write_bytes(b"w" * 999)
    with pytest.raises(DamagedArtifact, match="999 bytes"):
        check_manifest(final)
