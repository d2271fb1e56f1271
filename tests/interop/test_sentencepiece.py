"""Issue 18 §4: Grok-1's SentencePiece tokenizer.model converts to a tokenizer.json that encodes as SentencePiece does.

The model is trained here with the release's options (BPE, byte fallback, split digits, identity normalizer, dummy
prefix, whitespace kept, [PAD] [BOS] [EOS] [UNK] at 0-3, user-defined newline/space/tab runs, digits and <|...|>).
"""

from __future__ import annotations

import pytest

from gigafactory.data.corpus import SHIPPED_CORPUS, read_documents
from gigafactory.errors import UserError
from gigafactory.inference.generate import load_for_inference
from gigafactory.interop import import_grok1
from gigafactory.interop.sentencepiece import convert_spm
from tests.interop.test_grok1_import import DIMS, released, tiny_grok1_cfg  # noqa: F401 - `released` is a fixture

spm = pytest.importorskip("sentencepiece")  # a test dependency (pyproject [test]); present wherever the suite runs

USER_DEFINED = ["\n", "\n\n", "  ", "   ", "\t", "\t\t", "<|separator|>", "<|control1|>", *map(str, range(10))]
SAMPLES = ["Hello world", "In the beginning God created 1234 heavens.\n\nAnd   the earth\twas", "ünïcödé ☃ emoji 🚀 中文",
           "a<|separator|>b<|control1|>", "trailing  ", "x\n\n\ny", "", "numbers 3.14159 and 2026-11-30",
           "And   the", "x    y", "z\t\tz"]


def train_spm(root, docs: list[str], vocab_size: int):
    (root / "corpus.txt").write_text("\n".join(docs))
    spm.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"), model_prefix=str(root / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, allow_whitespace_only_pieces=True, character_coverage=1.0, user_defined_symbols=USER_DEFINED,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]", bos_piece="[BOS]", eos_piece="[EOS]", unk_piece="[UNK]",
        minloglevel=2, num_threads=1)
    return root / "tokenizer.model"


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    docs = [d for _, d in zip(range(120), read_documents([SHIPPED_CORPUS]))]
    return train_spm(tmp_path_factory.mktemp("spm"), docs, 800), docs


def test_converted_tokenizer_encodes_and_decodes_as_sentencepiece(spm_model):
    path, docs = spm_model
    sp = spm.SentencePieceProcessor(model_file=str(path))
    tok = convert_spm(path)
    assert tok.get_vocab_size() == sp.get_piece_size()
    assert [tok.token_to_id(t) for t in ("[PAD]", "[BOS]", "[EOS]", "[UNK]")] == [0, 1, 2, 3]
    for text in SAMPLES + docs[:40]:
        ids = tok.encode(text).ids
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == sp.decode(ids), text
    # SentencePiece never reads control pieces from text; tokenizers does unless told not to (as serve and generate
    # do for user text)
    tok.encode_special_tokens = True
    assert tok.encode("say [EOS] to stop").ids == sp.encode("say [EOS] to stop")
    tok.encode_special_tokens = False
    # the one known difference (tokenizers' Metaspace, docstring of interop/sentencepiece.py): a text that starts with
    # a space or a user-defined piece lacks SentencePiece's leading "▁"
    for text in (" lead", "12 apples", "\n\nAnd"):
        assert sp.id_to_piece(sp.encode(text)[0]) == "▁" and tok.encode(text).ids == sp.encode(text)[1:], text


def test_import_grok1_converts_the_releases_tokenizer_model(released, tmp_path):  # noqa: F811
    (tmp_path / "spm").mkdir()  # few characters, so that the vocabulary fits the fixture model's 320 embeddings
    path = train_spm(tmp_path / "spm", ["hello grok world, the 12 heavens and the earth"] * 50, DIMS["V"])
    root, _ = released
    src = tmp_path / "grok-1"
    (src / "ckpt-0").mkdir(parents=True)
    for f in (root / "ckpt-0").iterdir():
        (src / "ckpt-0" / f.name).symlink_to(f)
    (src / "tokenizer.model").write_bytes(path.read_bytes())  # as in the release: beside ckpt-0/, no tokenizer.json
    import_grok1(src / "ckpt-0", tmp_path / "out", tiny_grok1_cfg())
    loaded = load_for_inference(tmp_path / "out")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert loaded.tokenizer.encode("hello grok 2026\n\nthe earth").ids == sp.encode("hello grok 2026\n\nthe earth")
    (tmp_path / "junk.model").write_bytes(b"\xff" * 64)
    with pytest.raises(UserError, match="is not a SentencePiece model"):
        import_grok1(src / "ckpt-0", tmp_path / "out2", tiny_grok1_cfg(), tokenizer_json=tmp_path / "junk.model")
    assert not (tmp_path / "out2").exists()
