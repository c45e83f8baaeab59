"""harness.preflight: what ``harness train`` refuses before any rank starts (exit 2, one line a problem)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.cli import main
from harness.errors import SpecError
from harness.preflight import (
    check_before_launch,
    checkpoint_bytes,
    data_problems,
    file_problem,
    path_problems,
)
from harness.spec import DataSection
from harness.specload import spec_from_dict


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("a.jsonl", "", "the file is empty"),
        ("a.jsonl", b"\x00\x01\x02binary", "binary data"),
        ("a.jsonl", b"\xff\xfe" + b"x" * 100, "not UTF-8"),
        ("a.jsonl", '{"body": "hi"}\n', "record 1 has no field 'text' (it has: body)"),
        ("a.jsonl", "not json\n", "line 1 is not a JSON object"),
        ("a.json", '[{"text": "a"}, {"other": 1}]', "record 2 has no field 'text'"),
        ("a.csv", "title,body\nx,y\n", "no column 'text' in the header (title, body)"),
        ("a.xlsx", "x", "unsupported file type .xlsx"),
    ],
)
def test_bad_data_files_are_named_with_the_reason(tmp_path, name, content, words):
    reason, fix = file_problem(write(tmp_path / name, content), "text")
    assert words in reason
    assert fix


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("a.jsonl", '{"text": "hello"}\n{"text": "world"}\n'),
        ("a.json", '[{"text": "a"}]'),
        ("a.csv", "id,text\n1,hello\n"),
        ("a.txt", "plain text\n"),
    ],
)
def test_good_data_files_pass(tmp_path, name, content):
    assert file_problem(write(tmp_path / name, content), "text") is None


def test_a_long_jsonl_is_sniffed_not_read_whole(tmp_path):
    line = json.dumps({"text": "x" * 1000}) + "\n"
    assert file_problem(write(tmp_path / "big.jsonl", line * 500), "text") is None


def test_missing_files_and_dataset_paths(tmp_path):
    errors = data_problems(DataSection(files=[str(tmp_path / "nope.jsonl")]))
    assert [e.field for e in errors] == ["data.files"] and "no such file" in errors[0].message
    errors = data_problems(DataSection(dataset=str(tmp_path / "missing-dir")))
    assert [e.field for e in errors] == ["data.dataset"]
    assert data_problems(DataSection(dataset="wikitext")) == []  # a hub name: not checkable offline
    assert data_problems(DataSection()) == []


def test_tokenizer_and_model_paths(tmp_path):
    assert (
        "no such path"
        in path_problems(str(tmp_path / "tok"), "data.tokenizer", ("tokenizer.json",), "a tokenizer")[
            0
        ].message
    )
    (tmp_path / "empty").mkdir()
    err = path_problems(str(tmp_path / "empty"), "model.name_or_path", ("config.json",), "an HF checkpoint")
    assert "not an HF checkpoint" in err[0].message and "config.json" in err[0].message
    write(tmp_path / "ckpt" / "config.json", "{}")
    assert path_problems(str(tmp_path / "ckpt"), "model.name_or_path", ("config.json",), "x") == []
    assert path_problems("meta-llama/Llama-2-7b-hf", "model.name_or_path", ("config.json",), "x") == []


def test_run_dir_must_be_writable_and_have_room(tmp_path):
    spec = spec_from_dict({"model": {"preset": "llama-tiny"}})
    a_file = write(tmp_path / "file.txt", "x")  # root may write anywhere; nobody creates dirs in a file
    with pytest.raises(SpecError, match="file.txt is not a writable directory"):
        check_before_launch(spec, a_file / "runs" / "x", None)
    with pytest.raises(SpecError, match=r"one checkpoint needs ~.* free"):
        check_before_launch(spec, tmp_path / "runs" / "x", 10**18)
    check_before_launch(spec, tmp_path / "runs" / "x", checkpoint_bytes(spec))


def test_checkpoint_bytes_counts_weights_master_and_moments():
    bf16 = spec_from_dict({"model": {"preset": "llama-1b"}, "precision": "bf16"})
    fp32 = spec_from_dict({"model": {"preset": "llama-1b"}, "precision": "fp32"})
    assert checkpoint_bytes(fp32) / checkpoint_bytes(bf16) == pytest.approx(16 / 14)
    assert 1.0e9 * 14 < checkpoint_bytes(bf16) < 1.2e9 * 14
    hub = spec_from_dict({"model": {"name_or_path": "org/some-model"}})
    assert checkpoint_bytes(hub) is None


def test_a_spec_file_over_1mb_is_refused_at_once(tmp_path, capsys):
    big = write(tmp_path / "big.yaml", "run: {name: x}\n# " + "a" * 1_100_000 + "\n")
    assert main(["show", str(big)]) == 2
    err = capsys.readouterr().err
    assert "1,100,018 bytes, over the 1,000,000-byte limit" in err and "Traceback" not in err
