"""The logit checker: its metrics, and `ernie-paddle check` on correct, broken and bf16 checkpoints."""

import json
import sys

import numpy as np
import pytest

from conftest import edited_copy, save_tiny_moe_pt, save_tiny_pt, save_tiny_tokenizer
from converters.convert import pt2paddle
from ernie_paddle import check
from ernie_paddle.demo import DEMO_MODEL
from ernie_paddle.cli import main
from ernie_paddle.config import ErnieConfig
from ernie_paddle.errors import ErnieError

DEMO = DEMO_MODEL


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The original tiny -PT model (float32, with a tokenizer) and its -Paddle conversion."""
    root = tmp_path_factory.mktemp("check")
    # eos is an id the tokenizer never makes, so greedy generation runs its full length.
    save_tiny_pt(root / "PT", vocab_size=448, eos_token_id=447)
    save_tiny_tokenizer(root / "PT", check.DEFAULT_PROMPTS)
    pt2paddle(root / "PT", root / "Paddle", progress=False)
    return root / "PT", root / "Paddle"


def gate_up_swapped(config):
    def edit(name, a):
        i = config.intermediate_size
        return np.concatenate([a[:, i:], a[:, :i]], axis=1) if "up_gate_proj" in name else a
    return edit


def qk_rotate_half(config):
    """What a llama-style port does: each q and k head's output channels from interleaved pairs
    (0, 1), (2, 3), ... to half-split order (0, 2, 4, ..., 1, 3, 5, ...)."""
    d = config.head_dim
    heads = config.num_attention_heads + config.num_key_value_heads  # q heads, then k heads; v is untouched
    order = np.arange(d).reshape(-1, 2).T.reshape(-1)
    columns = np.concatenate([h * d + order for h in range(heads)])

    def edit(name, a):
        if "qkv_proj" not in name:
            return a
        a = a.copy()
        a[:, :len(columns)] = a[:, columns]
        return a
    return edit


def one_layer_perturbed(config):
    """1% relative noise on every weight of layer 1: too small to change most top-1 tokens."""
    rng = np.random.default_rng(0)

    def edit(name, a):
        return a + (0.01 * a.std() * rng.standard_normal(a.shape)).astype(a.dtype) if ".layers.1." in name else a
    return edit


def run(capsys, *argv):
    code = main(["check", "--device", "cpu", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_agreement_metrics():
    same = check.agreement(np.array([[0.0, 1.0, 2.0]]), np.array([[0.0, 1.0, 2.0]]))
    assert (same.max_abs_dp, same.kl, same.top1, same.top5_overlap) == (0.0, 0.0, 1, 1.0)
    assert same.cosine == pytest.approx(1.0)
    # p = [1/2, 1/2] against q = [1/4, 3/4]
    a = check.agreement(np.array([[0.0, 0.0]]), np.array([[0.0, np.log(3.0)]]))
    assert a.mean_abs_dp == pytest.approx(0.25) and a.max_abs_dp == pytest.approx(0.25)
    assert a.cosine == pytest.approx(0.5 / np.sqrt(0.5 * 0.625))
    assert a.kl == pytest.approx(0.5 * np.log(4 / 3))
    assert a.top1 == 0 and a.top5_overlap == 1.0
    assert check.until_eos([5, 2, 7], {2}) == [5, 2] and check.common_prefix([1, 2, 3], [1, 2, 4]) == 2


def test_compare_names_greedy_divergence_alone():
    """The library on plain functions: equal logits, but the candidate generates differently from token 3."""
    logits = np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32)
    reference = check.Side("ref", lambda ids: logits, lambda ids, n: [3, 4, 5, 6][:n])
    candidate = check.Side("cand", lambda ids: logits, lambda ids, n: [3, 4, 9, 6][:n])
    report = check.compare(reference, candidate, [[1, 2, 3, 4]], ["p"], greedy_tokens=4)
    assert not report.passed
    assert report.failures() == ["prompt 1 (p): greedy agreement 2/4 tokens < 100%"]
    assert check.compare(reference, reference, [[1, 2, 3, 4]], greedy_tokens=4).passed


def test_load_prompts(tmp_path):
    assert check.load_prompts(None) == check.DEFAULT_PROMPTS and len(check.DEFAULT_PROMPTS) == 8
    lines = tmp_path / "prompts.txt"
    lines.write_text("First prompt\n\n上海是\n", encoding="utf-8")
    assert check.load_prompts(lines) == ["First prompt", "上海是"]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "a b"}\n{"prompt": "c", "id": 2}\n', encoding="utf-8")
    assert check.load_prompts(jsonl) == ["a b", "c"]
    jsonl.write_text('{"prompt": "a"}\n{"text": "c"}\n', encoding="utf-8")
    with pytest.raises(ErnieError, match="line 2"):
        check.load_prompts(jsonl)


def test_correct_conversion_passes_against_transformers(models, tmp_path, capsys):
    pt, paddle = models
    code, out, _ = run(capsys, "--model", paddle, "--reference", "transformers", "--reference-model", pt,
                       "--json", tmp_path / "check.json")
    assert code == 0, out
    assert "PASS" in out and "note:" not in out and "strict" in out
    data = json.loads((tmp_path / "check.json").read_text(encoding="utf-8"))
    summary = data["summary"]
    assert summary["next_token"]["top1"] == 8
    assert summary["all_positions"]["cosine_min"] >= 0.99999
    assert summary["greedy"] == {"tokens": 32, "prompts_identical": 8, "agreeing": 256, "compared": 256}
    assert data["device"] == "cpu" and data["dtype"] == "float32" and data["passed"]
    assert {"paddle", "torch", "transformers"} <= set(data["versions"])
    assert data["prompts"][2]["prompt"] == check.DEFAULT_PROMPTS[2]


@pytest.mark.parametrize("broken, failing", [
    (gate_up_swapped, ["cosine", "top-1 of the next token differs", "greedy agreement"]),
    (qk_rotate_half, ["cosine", "top-1 of the next token differs", "greedy agreement"]),
    (one_layer_perturbed, ["cosine", "max |Δp|", "KL"]),
])
def test_negative_controls_fail(models, tmp_path, capsys, broken, failing):
    pt, paddle = models
    candidate = edited_copy(paddle, tmp_path / broken.__name__, broken(ErnieConfig.from_dir(paddle)))
    code, out, err = run(capsys, "--model", candidate, "--reference", "cpu", "--reference-model", pt,
                         "--greedy-tokens", 8)
    assert code == 1
    assert err.startswith("ernie-paddle check: FAIL prompt 1 (The capital of China is): cosine ")
    for metric in failing:
        assert metric in out
    if broken is one_layer_perturbed:  # a checker looking at top-1 tokens alone would pass this one
        assert "prompts identical" in out and "8/8 prompts identical" in out
        code, out, _ = run(capsys, "--model", candidate, "--reference", "cpu", "--reference-model", pt,
                           "--greedy-tokens", 8, "--min-cosine", 0.99, "--max-abs-dp", 0.05, "--max-kl", 0.01,
                           "--min-top1", 0.5)
        assert code == 0, out


def test_bf16_candidate_within_loose_thresholds(models, tmp_path, capsys):
    """bf16 simulated on CPU: the weights rounded to bf16 by the converter, computed in float32."""
    pt, _ = models
    pt2paddle(pt, tmp_path / "bf16", dtype="bfloat16", progress=False)
    code, out, _ = run(capsys, "--model", tmp_path / "bf16", "--reference", "transformers", "--reference-model", pt,
                       "--greedy-tokens", 8, "--json", tmp_path / "check.json")
    assert code == 0, out
    assert "bfloat16 candidate against a float32 reference: loose" in out
    data = json.loads((tmp_path / "check.json").read_text(encoding="utf-8"))
    assert data["thresholds"] == vars(check.LOOSE)
    assert data["summary"]["all_positions"]["max_abs_dp"] > check.STRICT.max_abs_dp  # a real bf16 difference


def test_same_weights_say_so_and_take_a_prompts_file(models, tmp_path, capsys):
    """A -Paddle model against transformers: the reference side converts it to -PT first."""
    _, paddle = models
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "The capital of China is"}\n{"prompt": "上海是"}\n', encoding="utf-8")
    code, out, _ = run(capsys, "--model", paddle, "--reference", "transformers", "--prompts", prompts,
                       "--greedy-tokens", 4)
    assert code == 0, out
    assert "note: both sides load the weights of --model" in out and "reference: transformers" in out
    assert "| 2 | 上海是 |" in out and "| 3 |" not in out


def test_missing_torch_says_how_to_install(models, tmp_path, capsys, monkeypatch):
    pt, _ = models
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    code, _, err = run(capsys, "--model", pt, "--reference", "transformers")
    assert code == 2
    assert err.count("\n") == 1 and "pip install 'ernie-paddle[check]'" in err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of China is\n", encoding="utf-8")
    code, out, _ = run(capsys, "--model", pt, "--prompts", prompts, "--greedy-tokens", 2)
    assert code == 0 and "reference: ernie-paddle ErniePredictor, float32 on cpu" in out


def test_bad_input_is_one_line(tmp_path, capsys):
    save_tiny_pt(tmp_path / "no-tokenizer")
    capsys.readouterr()
    for argv, message in [(["--model", tmp_path / "no-tokenizer", "--reference", "cpu"], "no tokenizer.model"),
                          (["--model", tmp_path / "no-tokenizer", "--greedy-tokens", -1], "--greedy-tokens -1"),
                          (["--model", tmp_path / "no-tokenizer", "--prompts", tmp_path / "none.txt"], "none.txt")]:
        code, _, err = run(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and message in err, err


def test_demo_model_out_of_the_box(capsys):
    code, out, _ = run(capsys, "--model", DEMO)
    assert code == 0, out
    assert "PASS" in out and "note: both sides load" in out


@pytest.mark.parametrize("greedy_tokens", [0, 8])
def test_a_prompt_beyond_the_models_positions_is_refused_before_loading(tmp_path, capsys, greedy_tokens):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of China is\n" + "Paris " * 3000 + "\n", encoding="utf-8")
    code, _, err = run(capsys, "--model", DEMO, "--reference", "cpu", "--prompts", prompts,
                       "--greedy-tokens", greedy_tokens)
    assert code == 2 and err.count("\n") == 1, err
    assert "prompt 2 has" in err and f"with --greedy-tokens {greedy_tokens} exceed the model's" in err


def test_a_reference_with_other_settings_is_named_in_a_note(models, tmp_path, capsys):
    pt, _ = models
    save_tiny_pt(tmp_path / "other", seed=5, vocab_size=448, eos_token_id=447, rope_theta=10000.0)
    code, out, _ = run(capsys, "--model", pt, "--reference", "cpu", "--reference-model", tmp_path / "other",
                       "--greedy-tokens", 2)
    assert code == 1
    assert "note: the two config.json differ (rope_theta 500000.0 against 10000.0): these are different models" in out


@pytest.mark.parametrize("reference", ["cpu", "transformers"])
@pytest.mark.parametrize("other, message", [
    (dict(vocab_size=512, eos_token_id=511), "its vocab_size 512 is not that of --model"),
    (dict(vocab_size=448, eos_token_id=447, num_hidden_layers=3), "its num_hidden_layers 3 is not that of --model"),
    ("moe", "its kind 'moe' is not that of --model"),
])
def test_a_reference_of_another_shape_is_refused_before_loading(models, tmp_path, capsys, monkeypatch, reference,
                                                                other, message):
    from ernie_paddle.predictor import ErniePredictor
    pt, _ = models
    if other == "moe":
        save_tiny_moe_pt(tmp_path / "other", vocab_size=448, eos_token_id=447)
    else:
        save_tiny_pt(tmp_path / "other", **other)
    capsys.readouterr()  # transformers' progress bar
    monkeypatch.setattr(ErniePredictor, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
    code, _, err = run(capsys, "--model", pt, "--reference", reference, "--reference-model", tmp_path / "other")
    assert code == 2 and err.count("\n") == 1, err
    assert message in err and "cannot be compared" in err and str(pt) in err and str(tmp_path / "other") in err


def test_a_paddle_reference_that_would_not_fit_the_temporary_folder_is_refused_before_loading(
        models, capsys, monkeypatch):
    import shutil

    from ernie_paddle.predictor import ErniePredictor

    _, paddle = models
    monkeypatch.setattr(check.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**6, 10**6 - 1024, 1024))

    def loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the check")
    monkeypatch.setattr(ErniePredictor, "from_pretrained", loading)
    code, _, err = run(capsys, "--model", paddle, "--reference", "transformers")
    assert code == 2 and err.count("\n") == 1, err
    assert "so check converts this -Paddle model into" in err and "0.00 GiB are free; set TMPDIR" in err
