import os

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


def test_a_kill_between_the_two_renames_leaves_the_old_folder_to_come_back(tmp_path):
    from bigmodel.io import aside_of, recover

    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "step.txt").write_text("5")
    os.replace(out, aside_of(out))  # what atomic_path does first when replacing a folder
    assert not out.exists()
    assert recover(out) == "restored ckpt from an interrupted replacement"
    assert (out / "step.txt").read_text() == "5" and not aside_of(out).exists()


def test_a_kill_after_the_new_folder_is_in_deletes_the_old_one_only(tmp_path):
    from bigmodel.io import aside_of, recover

    out, aside = tmp_path / "ckpt", aside_of(tmp_path / "ckpt")
    for folder, step in ((aside, "5"), (out, "10")):
        folder.mkdir()
        (folder / "step.txt").write_text(step)
    assert recover(out) == "removed the replaced copy of ckpt"
    assert (out / "step.txt").read_text() == "10" and not aside.exists()


def test_recover_deletes_unfinished_writes_and_nothing_else(tmp_path):
    from bigmodel.io import recover

    out = tmp_path / "model.safetensors"
    out.write_text("whole")
    unfinished = tmp_path / ".model.safetensors.ab3_x9yz"
    unfinished.mkdir()
    (unfinished / "model.safetensors").write_text("half")
    mine = [tmp_path / ".model.safetensors.notes", tmp_path / ".model.safetensors.keep_me_please"]
    for path in mine:
        path.mkdir()
    assert recover(out) == ""
    assert not unfinished.exists() and all(p.is_dir() for p in mine)
    assert out.read_text() == "whole"


def test_atomic_path_recovers_an_interrupted_replacement_before_writing(tmp_path):
    from bigmodel.io import aside_of

    out = tmp_path / "ckpt"
    aside_of(out).mkdir()
    (aside_of(out) / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(out) as tmp:
            tmp.mkdir()
            raise RuntimeError("a failed write must not lose the old folder either")
    assert (out / "old.txt").read_text() == "old"
