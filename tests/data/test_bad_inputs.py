"""Issue 18: bad `data` / `--config` / `--preset` inputs are one `error:` line, exit 2, and leave nothing behind."""

from __future__ import annotations

import pytest

from gigafactory.cli.main import main


def one_line_error(capsys, argv: list[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("argv,needle", [
    (["data", "tokenizer", "{text}", "--out", "{dir}"], "is a directory or empty; pass a file path such as"),
    (["data", "tokenizer", "{text}", "--out", ""], "is a directory or empty"),
    (["data", "tokenizer", "{text}", "--out", "{file}/tok.json"], "is not a writable directory"),
    (["data", "tokenizer", "{text}", "--vocab-size", "1000000000", "--out", "{tmp}/t.json"], "vocab size 1000000000 is too large"),
    (["data", "prepare", "{text}", "--vocab-size", "1000000000", "--cache-dir", "{tmp}/c"], "vocab size 1000000000 is too large"),
    (["data", "prepare", "{text}", "--cache-dir", "{file}"], "cannot create the dataset under cache dir"),
    (["data", "prepare", "{text}", "--cache-dir", "{file}/sub"], "cannot create the dataset under cache dir"),
    (["data", "prepare", "{text}", "--cache-dir", ""], "the cache directory is empty"),
    (["data", "prepare", "{dir}", "--cache-dir", "{tmp}/c"], "is a directory; list its .txt or .jsonl files"),
    (["train", "--data.inputs", "{dir}", "--logging.run_dir", "{tmp}/run"], "is a directory; list its .txt or .jsonl files"),
    (["train", "--config", "{dir}"], "is a directory; pass a TOML file to --config"),
    (["train", "--preset", "", "--logging.run_dir", "{tmp}/run"], "unknown model preset ''"),
])
def test_bad_inputs_are_one_line_and_leave_nothing(tmp_path, capsys, argv, needle):
    (tmp_path / "docs.jsonl").write_text("".join(f'{{"text": "document number {i} says hello"}}\n' for i in range(20)))
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir").mkdir()
    names = {"text": str(tmp_path / "docs.jsonl"), "file": str(tmp_path / "a_file"), "dir": str(tmp_path / "a_dir"), "tmp": str(tmp_path)}
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    err = one_line_error(capsys, [a.format(**names) for a in argv])
    assert needle in err, err
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.relative_to(tmp_path).parts[0] != "run")
    assert after == before  # no DIR.<pid>.tmp, no half-built dataset (train's own run dir aside)
