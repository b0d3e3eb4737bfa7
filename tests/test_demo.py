"""The embedded demo model: it knows its facts, in both layouts, and `ernie-paddle demo` runs."""

import re

import pytest

from ernie_paddle import ErniePredictor
from ernie_paddle.cli import main
from ernie_paddle.demo import DEMO_MODEL, demo_facts


@pytest.fixture(scope="module")
def demo():
    return ErniePredictor.from_pretrained(DEMO_MODEL, device="cpu")


def test_demo_model_continues_its_facts(demo):
    facts = demo_facts()
    results = demo.generate([f["prompt"] for f in facts], max_new_tokens=12)
    for fact, result in zip(facts, results):
        assert result.text == fact["expected"], fact["prompt"]
        assert result.finish_reason == "stop"  # the model ends each fact with eos


def test_demo_stream_reassembles_chinese_text(demo):
    chunks = list(demo.stream("香蕉的颜色是", max_new_tokens=12))
    assert "".join(c.text for c in chunks) == "黄色。"
    assert all("\ufffd" not in c.text for c in chunks)
    assert chunks[-1].finish_reason == "stop"


def test_stop_strings_end_generation(demo):
    result = demo.generate(["The capital of France is"], max_new_tokens=12, stop=["ris"])[0]
    assert result.text == " Pa" and result.finish_reason == "stop"
    result = demo.generate(["The capital of France is"], max_new_tokens=1)[0]
    assert result.finish_reason == "length" and len(result.token_ids) == 1


def test_demo_command(capsys):
    assert main(["demo", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "The capital of France is[ Paris.]" in out
    assert "法国的首都是[巴黎。]" in out
    assert "next-token top-1 agrees 8/8" in out


def test_generate_stream_command_ends_each_prompt_with_a_newline(capsys):
    argv = ["generate", "--model", str(DEMO_MODEL), "--device", "cpu", "--stream",
            "--prompt", "The capital of France is", "--prompt", "法国的首都是"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == "The capital of France is Paris.\n法国的首都是巴黎。\n"
    assert main([a for a in argv if a != "--stream"]) == 0  # without --stream: the same summary line on stderr
    summaries = [re.sub(r"[\d.]+ tok/s", "R tok/s", line) for line in
                 captured.err.splitlines() + capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert len(summaries) == 4 and summaries[:2] == summaries[2:]
    assert summaries[0] == "[stop; 5 prompt tokens at R tok/s, 4 generated at R tok/s]"


def test_tokenizer_agrees_with_transformers(demo):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(DEMO_MODEL)
    texts = [f["prompt"] + f["expected"] for f in demo_facts()] + ["<|begin_of_sentence|>User: 龘 🙂\nAssistant: "]
    for text in texts:
        ids = demo.tokenizer.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False), text
        assert demo.tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True), text
