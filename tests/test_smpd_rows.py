"""The Ray-side SMPD reader finds each row of a file by its byte span: every row read back from
its span equals what the whole-file reader (:func:`smpd.load_json_file`, :func:`smpd.load_lines`)
gives, for both JSON forms and text files, with multi-byte UTF-8 text, escapes, a BOM, a row too
deep to parse, and a column-dict file whose columns disagree on their rows. No Ray: the scan is a
plain function, run here in the test process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from smpp_ray.data import smpd
from smpp_ray.data.smpd_rows import scan_file

TEXT_ROWS = [
    {"Uid": "27882@N8", "Pid": 194355, "Title": "Caf\u00e9 \U0001F600 \u65e5\u672c", "Alltags": "a b"},
    {"Uid": "59@N75", "Pid": "205379", "Title": "plain", "Alltags": "uploaded:by=flickstagram"},
    {"Uid": "1@N1", "Pid": 3, "Title": "line\nbreak \"quoted\" \\ back", "Alltags": ""},
]


def _rows_from_spans(location: Path, meta: dict, spans) -> list:
    data = Path(meta["read_from"]).read_bytes()
    return [smpd.load_row(data[start:end]) for start, end in spans.tolist()]


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_record_rows_read_from_their_spans_equal_the_whole_file_read(tmp_path: Path, bom: bytes) -> None:
    body = json.dumps(TEXT_ROWS, ensure_ascii=False, indent=1)
    # A row nested too deeply for the parser: a reject of that row, found without recursion.
    body = body[:-1].rstrip() + ', {"Uid": "2@N2", "Pid": 4, "Title": ' + "[" * 100_000 + "]" * 100_000 + "}\n]\n"
    location = tmp_path / "train_text.json"
    location.write_bytes(bom + body.encode())
    meta, spans = scan_file(str(location), "text", str(tmp_path / "scratch"))
    assert meta["error"] is None and meta["form"] == "records" and meta["rows"] == 4
    expected, form = smpd.load_json_file(str(location))
    got = _rows_from_spans(location, meta, spans)
    assert form == "records" and got[:3] == expected[:3] == TEXT_ROWS
    assert isinstance(got[3], smpd.Unparsable) and isinstance(expected[3], smpd.Unparsable)


def test_column_dict_rows_are_copied_as_lines_equal_to_the_whole_file_read(tmp_path: Path) -> None:
    columns = {
        "Uid": {"0": "27882@N8", "1": "59@N75", "2": "7@N3", "10": "8@N4"},
        "Pid": {"0": 194355, "1": 205379, "2": 3, "10": 12345678901234567890123},   # over-long: stays text
        "photo_count": {"0": 1813.0, "1": None, "2": 0.1, "10": 1e300},
        "user_description": {"0": "<p>Caf\u00e9 \U0001F600</p> https://x.org", "1": None, "2": "\\u00e9 \"q\""},
    }   # row "10" has no user_description: null there; rows in label order 0, 1, 2, 10
    location = tmp_path / "train_user_data.json"
    location.write_text(json.dumps(columns, ensure_ascii=False), encoding="utf-8")
    meta, spans = scan_file(str(location), "user", str(tmp_path / "scratch"))
    assert meta["error"] is None and meta["form"] == "columns" and meta["rows"] == 4
    assert meta["read_from"] == str(tmp_path / "scratch" / "train_user_data.json.jsonl")
    expected, form = smpd.load_json_file(str(location))
    assert form == "columns" and _rows_from_spans(location, meta, spans) == expected
    assert expected[3]["user_description"] is None and expected[3]["Pid"] == "12345678901234567890123"


def test_line_rows_keep_their_bytes_and_trailing_blank_lines_are_not_rows(tmp_path: Path) -> None:
    location = tmp_path / "train_img_filepath.txt"
    location.write_bytes("train/1@N1/1.jpg\r\ntrain/\u00e9t\u00e9/2.jpg\n\n  \n".encode())
    meta, spans = scan_file(str(location), "img_filepath", str(tmp_path))
    data = location.read_bytes()
    assert [data[s:e].decode() for s, e in spans.tolist()] == ["train/1@N1/1.jpg\r", "train/\u00e9t\u00e9/2.jpg"]
    assert meta["probes"] == ["train/1@N1/1.jpg\r", "train/\u00e9t\u00e9/2.jpg"]
    assert len(smpd.load_lines(str(location))) == meta["rows"] == 2


@pytest.mark.parametrize(("content", "message"), [
    (b"[{\"Pid\": 1}, {\"Pid\": 2}", "not valid JSON"),
    (b"[{\"Pid\": 1}] trailing", "extra data"),
    (b"[1, 2]", "rows are ints"),
    (b"{\"Uid\": [1, 2]}", "whose 'Uid' is a list"),
    (b"{}", "with no column"),
    (b"\"text\"", "got str"),
    (b"[{\"Title\": \"\xff\"}]", "is not UTF-8 text"),
])
def test_a_broken_file_is_an_error_naming_it(tmp_path: Path, content: bytes, message: str) -> None:
    location = tmp_path / "train_text.json"
    location.write_bytes(content)
    meta, spans = scan_file(str(location), "text", str(tmp_path / "scratch"))
    assert message in meta["error"] and str(location) in meta["error"] and len(spans) == 0
