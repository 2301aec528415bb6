"""The shared reader of format/version-checked JSON headers refuses each kind of bad file by name."""

import json

import pytest

from worldsim.codec.checkpoint import CheckpointError
from worldsim.utils.format_json import read_format_json


def _read(file):
    return read_format_json(file, "worldsim-test", 1, what="a test checkpoint", version_label="checkpoint",
                            error=CheckpointError)


def test_good_header_is_returned_whole(tmp_path):
    file = tmp_path / "h.json"
    file.write_text(json.dumps({"format": "worldsim-test", "version": 1, "config": {"a": 2}}))
    assert _read(file) == {"format": "worldsim-test", "version": 1, "config": {"a": 2}}


@pytest.mark.parametrize("body, message", [
    ("{", r"h\.json: corrupt JSON"),
    (json.dumps({"format": "other", "version": 1}), r"h\.json: not a test checkpoint \(format 'other', expected 'worldsim-test'\)"),
    (json.dumps({"format": "worldsim-test", "version": 2}), r"h\.json: checkpoint format version 2; this code reads version 1"),
])
def test_bad_headers_name_the_file_and_the_problem(tmp_path, body, message):
    file = tmp_path / "h.json"
    file.write_text(body)
    with pytest.raises(CheckpointError, match=message):
        _read(file)


@pytest.mark.parametrize("body, message", [
    (b"[1, 2]", r"h\.json: corrupt header \(a JSON list, expected an object\)"),
    (b"42", r"h\.json: corrupt header \(a JSON int"),
    (b"\xff\xfe{\x00", r"h\.json: not UTF-8 text"),
    (b"\x80\x03}q\x00.", r"h\.json: not UTF-8 text"),  # a pickle given a .json name
])
def test_headers_that_are_not_a_json_object_are_refused_by_name(tmp_path, body, message):
    file = tmp_path / "h.json"
    file.write_bytes(body)
    with pytest.raises(CheckpointError, match=message):
        _read(file)
    with pytest.raises(CheckpointError, match=r"missing\.json: missing"):
        _read(tmp_path / "missing.json")
