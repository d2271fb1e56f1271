"""Issue 18 §3: data at real sizes — streamed reading and tokenization, a validation split by tokens, bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gigafactory.data.corpus import SHIPPED_CORPUS, read_chunks, read_documents
from gigafactory.data.shards import open_split, prepare_dataset
from gigafactory.data.tokenizer import EOS_ID, train_tokenizer


@pytest.fixture(scope="module")
def kjv_text():
    return "\n\n".join(d for _, d in zip(range(150), read_documents([SHIPPED_CORPUS])))


def test_pieces_are_cut_where_the_tokens_do_not_change(tmp_path, kjv_text):
    text = kjv_text + "\n    indented\n\n" + " longword" * 3000 + "\n" + "y" * 5000 + "\ttab end"
    (tmp_path / "one.txt").write_text(text)
    tok = train_tokenizer(kjv_text.split("\n\n"), 800, tmp_path / "tok.json")
    whole = tok.encode(text).ids
    for max_chars in (64, 1000, 50_000):
        pieces = list(read_chunks([tmp_path / "one.txt"], max_chars))
        assert "".join(p for p, _ in pieces) == text
        assert [end for _, end in pieces] == [False] * (len(pieces) - 1) + [True]
        assert max(len(p) for p, _ in pieces) <= 2 * max_chars + 5010  # a 5000-char "word" cannot be cut
        assert [i for p, _ in pieces for i in tok.encode(p).ids] == whole, max_chars


def test_one_txt_prepares_and_validation_is_a_fraction_of_tokens(tmp_path, kjv_text):
    (tmp_path / "book.txt").write_text(kjv_text)  # one document: refused before ("only 1 document(s)")
    (tmp_path / "small.txt").write_text(kjv_text[: len(kjv_text) // 20])
    for inputs in (["book.txt"], ["book.txt", "small.txt"]):  # two files: half of the tokens were held out before
        out = prepare_dataset([str(tmp_path / n) for n in inputs], 512, str(tmp_path / "cache"), 0.1, 7)
        meta = json.loads((out / "meta.json").read_text())
        total = meta["tokens"]["train"] + meta["tokens"]["val"]
        assert meta["documents"] == len(inputs) and meta["split"] == "tokens"
        assert abs(meta["tokens"]["val"] / total - 0.1) < 0.02, meta
        train, val = open_split(out, "train"), open_split(out, "val")
        assert len(train) + len(val) == total and (train == EOS_ID).sum() + (val == EOS_ID).sum() == len(inputs)
    again = prepare_dataset([str(tmp_path / "book.txt")], 512, str(tmp_path / "cache2"), 0.1, 7)
    assert (open_split(again, "val") == open_split(prepare_dataset([str(tmp_path / "book.txt")], 512, str(tmp_path / "cache"), 0.1, 7), "val")).all()


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    from gigafactory.data.shards import prepare_dataset
    def hwm():
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) * 1024
    before = hwm()
    out = prepare_dataset([sys.argv[1]], 2048, sys.argv[2], 0.02, 1)
    print(json.dumps({"growth": hwm() - before, "tokens": json.loads((out / "meta.json").read_text())["tokens"]}))
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_prepare_memory_is_bounded_whatever_the_file_size(tmp_path, kjv_text):
    """A 6 MB .txt (one document): tokenizer training and encoding stream ~64 KB pieces; measured growth ~60 MB
    (before: the whole text as one string, ~100 bytes of tokenizer state per character: ~600 MB, and 4.9 GB for 50 MB)."""
    big = tmp_path / "big.txt"
    with open(big, "w") as f:
        for i in range((6 << 20) // len(kjv_text) + 1):
            f.write(kjv_text.replace("LORD", f"LORD{i % 97}"))
    run = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(big), str(tmp_path / "cache")], capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"peak RSS growth {result['growth'] / 2**20:.0f} MB for {big.stat().st_size / 2**20:.0f} MB of text, {result['tokens']}")
    assert result["growth"] < 200 * 2**20, result
