import pytest

from bigmodel.io import atomic_path, read_json, write_json


def test_atomic_path_leaves_the_old_output_when_the_block_fails(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(out) as tmp:
            tmp.mkdir()
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("crash mid-write")
    assert (out / "keep.txt").read_text() == "old"
    assert not (out / "half.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp debris


def test_atomic_path_replaces_a_directory_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("stale")
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]


def test_write_json_roundtrip(tmp_path):
    write_json(tmp_path / "a" / "m.json", {"b": 1.5, "a": [1, 2]})
    assert read_json(tmp_path / "a" / "m.json") == {"a": [1, 2], "b": 1.5}
