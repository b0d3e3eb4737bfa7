"""The SentencePiece tokenizer and the streaming detokenizer (UTF-8 never broken)."""

import json

import pytest
import sentencepiece as spm

from ernie_paddle.tokenizer import Tokenizer

SPECIALS = ["<|begin_of_sentence|>", "<|end_of_sentence|>", "<mask:1>"]
CORPUS = ["The capital of France is Paris.", "法国的首都是巴黎。", "2 + 3 = 5", "Hello world, hello ERNIE."] * 30


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=str(directory / "tokenizer"), vocab_size=304,
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=SPECIALS,
        character_coverage=1.0, minloglevel=2)
    (directory / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "eos_token": "</s>"}))
    return Tokenizer(directory)


def test_round_trip_without_bos(tokenizer):
    for text in ["The capital of France is Paris.", "法国的首都是巴黎。", "未见过的字龘"]:
        ids = tokenizer.encode(text)
        assert ids and ids[0] != tokenizer.bos_id
        assert tokenizer.decode(ids).strip() == text


def test_special_tokens_are_matched_whole(tokenizer):
    ids = tokenizer.encode("<|begin_of_sentence|>User: hi\n<mask:1>")
    assert ids[0] == tokenizer.sp.PieceToId("<|begin_of_sentence|>")
    assert tokenizer.sp.PieceToId("<mask:1>") in ids
    assert "<|begin_of_sentence|>" not in tokenizer.decode(ids)  # special tokens carry no text


def test_streaming_never_emits_broken_utf8(tokenizer):
    text = "巴黎 龘 Paris 🙂"
    ids = tokenizer.encode(text)
    assert any(tokenizer.sp.IsByte(i) for i in ids), "the test needs byte-fallback pieces"
    detok = tokenizer.detokenizer()
    pieces = [detok.add(i) for i in ids] + [detok.finish()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids)
    # a multi-byte character arrives whole: some steps emit nothing while its bytes accumulate
    assert "" in pieces[:-1]


def test_missing_tokenizer_model_is_a_clear_error(tmp_path):
    from ernie_paddle.errors import ErnieError

    with pytest.raises(ErnieError, match="tokenizer.model: not found"):
        Tokenizer(tmp_path)


def test_chat_template(tokenizer):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == "<|begin_of_sentence|>User: Hi\nAssistant: "
