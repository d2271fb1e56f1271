"""Data: corpus reading errors, tokenizer, shards, and the deterministic resumable loader."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from gigafactory.data.corpus import input_paths, read_documents
from gigafactory.data.loader import PackedSequenceLoader
from gigafactory.data.shards import open_split, prepare_dataset
from gigafactory.data.tokenizer import EOS_ID, load_tokenizer
from gigafactory.errors import UserError


def test_shipped_corpus_prepares_into_shards_that_round_trip(data_cache):
    out = prepare_dataset([], 512, data_cache, 0.02, 1234)
    tokenizer = load_tokenizer(out / "tokenizer.json")
    train = open_split(out, "train")
    assert train.dtype == np.uint16 and len(train) > 500_000
    first_doc = np.asarray(train[: int(np.argmax(np.asarray(train[:5000]) == EOS_ID))])
    text = tokenizer.decode(first_doc.tolist())
    assert text.startswith(("Genesis 1", "Genesis 2")) and "God" in text
    assert tokenizer.encode("In the beginning God created").ids and tokenizer.decode(tokenizer.encode("In the beginning").ids) == "In the beginning"


def test_user_files_txt_jsonl_gz(tmp_path):
    (tmp_path / "a.txt").write_text("Hello world. " * 50)
    (tmp_path / "b.jsonl").write_text('{"text": "first doc"}\n\n{"text": "second doc"}\n')
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write('{"text": "zipped"}\n')
    docs = list(read_documents(input_paths([str(tmp_path / n) for n in ("a.txt", "b.jsonl", "c.jsonl.gz")])))
    assert docs[1:] == ["first doc", "second doc", "zipped"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", b"", "contains no text"),
        ("latin1.txt", "caf\xe9 ol\xe9".encode("latin-1"), "not valid UTF-8"),
        ("bad.jsonl", b'{"text": "ok"}\nnot json\n', "bad.jsonl:2 is not valid JSON"),
        ("notext.jsonl", b'{"body": "x"}\n', "no string field 'text'"),
        ("data.csv", b"a,b\n", "must end in .txt or .jsonl"),
    ],
)
def test_bad_data_files_are_clear_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        list(read_documents(input_paths([str(path)])))


def test_missing_file_and_corrupt_tokenizer(tmp_path):
    with pytest.raises(UserError, match="not found"):
        input_paths([str(tmp_path / "nope.txt")])
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": [')
    with pytest.raises(UserError, match="corrupt"):
        load_tokenizer(bad)


def test_loader_order_is_seeded_and_resumes_at_another_world_size():
    tokens = np.arange(10_000, dtype=np.uint16)
    single = PackedSequenceLoader(tokens, 16, 4, seed=7)
    batches = [single.next_batch()[0] for _ in range(40)]
    again = PackedSequenceLoader(tokens, 16, 4, seed=7)
    assert all((again.next_batch()[0] == b).all() for b in batches[:5])
    assert not (PackedSequenceLoader(tokens, 16, 4, seed=8).next_batch()[0] == batches[0]).all()

    # 2 ranks x batch 2 consume the same global stream as 1 rank x batch 4, and resume from its state.
    state = PackedSequenceLoader(tokens, 16, 4, seed=7)
    for _ in range(10):
        state.next_batch()
    ranks = [PackedSequenceLoader(tokens, 16, 2, seed=7, dp_rank=r, dp_size=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state.state_dict())
    for i in range(10, 20):
        combined = np.concatenate([r.next_batch()[0].numpy() for r in ranks])
        assert (combined == batches[i].numpy()).all()


def test_loader_covers_every_window_once_per_epoch():
    tokens = np.arange(16 * 12 + 1, dtype=np.uint16)
    loader = PackedSequenceLoader(tokens, 16, 3, seed=1)
    batches = [loader.next_batch()[0] for _ in range(4)]
    starts = sorted(int(b[i, 0]) for b in batches for i in range(3))
    assert starts == [16 * i for i in range(12)]
    x, y = loader.next_batch()
    assert (x[:, 1:] == y[:, :-1]).all()
