"""The Paddle model and ErniePredictor against transformers' Ernie4_5ForCausalLM (the reference)."""

import json

import numpy as np
import pytest
import torch

from conftest import reference_generate, reference_logits, save_tiny_pt, upto_eos
from ernie_paddle import ErniePredictor, cpu_ops
from ernie_paddle.errors import ErnieError

CONFIGS = {
    "gqa2-tied": {},
    "mha-untied-odd": dict(num_key_value_heads=4, tie_word_embeddings=False, hidden_size=40, head_dim=12,
                           intermediate_size=72, vocab_size=157),
    "gqa8-headdim": dict(num_attention_heads=8, num_key_value_heads=1, head_dim=24, hidden_size=48,
                         num_hidden_layers=3),
}
PROMPTS = [[5, 7, 9, 11, 3, 100, 150, 17, 23, 42, 8], [31, 4, 77], [120, 9, 9, 64, 18, 2 + 1]]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    reference = save_tiny_pt(directory, **CONFIGS[request.param])
    return reference, directory


def test_logits_match_transformers(pair):
    reference, directory = pair
    pred = ErniePredictor.from_pretrained(directory, device="cpu", dtype="float32")
    for ids in PROMPTS:
        got = pred.logits([ids])[0]
        assert got.shape == (len(ids), reference.config.vocab_size)
        assert np.abs(got - reference_logits(reference, ids)).max() <= 1e-4
    batch = pred.logits(PROMPTS[:2])  # right-padded: real positions equal the single-row run
    assert np.abs(batch[1, :3] - reference_logits(reference, PROMPTS[1])).max() <= 1e-4


def test_greedy_generation_matches_transformers(pair):
    reference, directory = pair
    pred = ErniePredictor.from_pretrained(directory, device="cpu")
    expected = reference_generate(reference, PROMPTS, 32)
    batch = pred.generate(PROMPTS, max_new_tokens=32)
    for prompt, want, got in zip(PROMPTS, expected, batch):
        assert got.token_ids == upto_eos(want)
        alone = pred.generate([prompt], max_new_tokens=32)[0]
        assert alone.token_ids == got.token_ids
        assert got.finish_reason == ("stop" if 2 in got.token_ids else "length")
        assert got.prompt_tokens == len(prompt) and got.generated_tokens == len(got.token_ids)


def test_paddle_layout_gives_same_tokens(tmp_path, monkeypatch):
    from converters.convert import pt2paddle

    reference = save_tiny_pt(tmp_path / "pt", tie_word_embeddings=False, seed=3)
    pt2paddle(tmp_path / "pt", tmp_path / "paddle", progress=False)
    from_pt = ErniePredictor.from_pretrained(tmp_path / "pt", device="cpu")
    from_paddle = ErniePredictor.from_pretrained(tmp_path / "paddle", device="cpu")
    with monkeypatch.context() as m:  # -Paddle [in, out] matrices transposed by numpy, not the C++ copy
        m.setattr(cpu_ops, "available", lambda: False)
        by_numpy = ErniePredictor.from_pretrained(tmp_path / "paddle", device="cpu")
    for name, param in from_paddle.model.weights().items():
        assert np.array_equal(param.numpy(), from_pt.model.weights()[name].numpy()), name
        assert np.array_equal(param.numpy(), by_numpy.model.weights()[name].numpy()), name
    want = reference_generate(reference, PROMPTS[:2], 32)
    got = from_paddle.generate(PROMPTS[:2], max_new_tokens=32)
    assert [g.token_ids for g in got] == [upto_eos(w) for w in want]
    assert np.abs(from_paddle.logits([PROMPTS[0]])[0] - reference_logits(reference, PROMPTS[0])).max() <= 1e-4


def float32_weights(pred):
    return {name: p.astype("float32").numpy() for name, p in pred.model.weights().items()}


@pytest.mark.skipif(not cpu_ops.available(), reason="bfloat16 weights under float32 need the CPU kernels")
def test_bf16_checkpoint_loads_exactly(tmp_path):
    """float32 copies (--weight-dtype float32) and bfloat16 as stored (the CPU default): the same values."""
    reference = save_tiny_pt(tmp_path, dtype="bfloat16")
    rounded = {n: p.detach().to(torch.bfloat16).float().numpy() for n, p in reference.named_parameters()}
    q = rounded["model.layers.0.self_attn.q_proj.weight"]
    for weight_dtype, matrices in (("float32", "float32"), ("auto", "bfloat16")):
        pred = ErniePredictor.from_pretrained(tmp_path, device="cpu", dtype="float32", weight_dtype=weight_dtype)
        weights = pred.model.weights()
        assert str(weights["ernie.layers.0.mlp.down_proj.weight"].dtype) == f"paddle.{matrices}"
        assert str(weights["ernie.layers.0.input_layernorm.weight"].dtype) == "paddle.float32"
        values = float32_weights(pred)
        assert np.array_equal(values["ernie.embed_tokens.weight"], rounded["model.embed_tokens.weight"])
        assert np.array_equal(values["ernie.layers.0.self_attn.qkv_proj.weight"][:q.shape[0]], q)  # held [out, in]


@pytest.mark.skipif(not cpu_ops.available(), reason="bfloat16 weights under float32 need the CPU kernels")
@pytest.mark.parametrize("name", ["gqa2-tied", "mha-untied-odd"])
def test_bf16_weights_compute_exactly_what_float32_copies_do(tmp_path, name):
    """Held as bfloat16 and widened where read, the weights give bit for bit the float32 results: in
    decoding (the CPU kernel), a prompt of more than 32 rows (widened for MKL), and all-position logits."""
    reference = save_tiny_pt(tmp_path, dtype="bfloat16", **CONFIGS[name])
    held = ErniePredictor.from_pretrained(tmp_path, device="cpu", dtype="float32")
    copies = ErniePredictor.from_pretrained(tmp_path, device="cpu", dtype="float32", weight_dtype="float32")
    assert held.model.weight_dtype == "bfloat16" and copies.model.weight_dtype == "float32"
    long_prompt = list(range(3, 48))
    batch = [long_prompt, PROMPTS[0], PROMPTS[1]]
    assert np.array_equal(held.logits(batch), copies.logits(batch))  # 135 rows: widened for MKL
    for rows in ([PROMPTS[0]], [[7]]):  # 11 rows and 1: the decoding kernel
        assert np.array_equal(held.logits(rows), copies.logits(rows))
    got, want = held.generate(batch, max_new_tokens=12), copies.generate(batch, max_new_tokens=12)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert upto_eos(reference_generate(reference, [long_prompt], 12)[0]) == got[0].token_ids
    assert np.abs(held.logits([long_prompt])[0] - reference_logits(reference, long_prompt)).max() <= 1e-4


@pytest.mark.skipif(not cpu_ops.available(), reason="bfloat16 weights under float32 need the CPU kernels")
def test_weight_dtype_choices(tmp_path):
    save_tiny_pt(tmp_path)  # a float32 checkpoint stays float32 under auto
    assert ErniePredictor.from_pretrained(tmp_path, device="cpu").model.weight_dtype == "float32"
    held = ErniePredictor.from_pretrained(tmp_path, device="cpu", weight_dtype="bfloat16")  # rounds: asked for
    assert held.model.weight_dtype == "bfloat16"
    with pytest.raises(ErnieError, match="--weight-dtype float16: choose auto or float32"):
        ErniePredictor.from_pretrained(tmp_path, device="cpu", weight_dtype="float16")


def test_sampling_is_reproducible_and_respects_top_k(tmp_path):
    save_tiny_pt(tmp_path)
    pred = ErniePredictor.from_pretrained(tmp_path, device="cpu")
    kwargs = dict(max_new_tokens=16, temperature=1.0, top_k=5, top_p=0.9, seed=7)
    a = pred.generate([PROMPTS[0]], **kwargs)[0].token_ids
    assert a == pred.generate([PROMPTS[0]], **kwargs)[0].token_ids
    assert a != pred.generate([PROMPTS[0]], **{**kwargs, "seed": 8})[0].token_ids
    # top_k=1 is greedy whatever the temperature
    greedy = pred.generate([PROMPTS[0]], max_new_tokens=16)[0].token_ids
    assert pred.generate([PROMPTS[0]], max_new_tokens=16, temperature=1.5, top_k=1, seed=1)[0].token_ids == greedy
    # a tiny top_p keeps only the most likely token: greedy again
    assert pred.generate([PROMPTS[0]], max_new_tokens=16, temperature=1.0, top_p=1e-6, seed=1)[0].token_ids == greedy


def test_repetition_penalty_matches_transformers(tmp_path):
    reference = save_tiny_pt(tmp_path)
    pred = ErniePredictor.from_pretrained(tmp_path, device="cpu")
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        want = reference.generate(ids, max_new_tokens=24, do_sample=False, repetition_penalty=1.3,
                                  pad_token_id=0)[0, len(PROMPTS[0]):].tolist()
    got = pred.generate([PROMPTS[0]], max_new_tokens=24, repetition_penalty=1.3)[0].token_ids
    assert got == upto_eos(want)


def test_paddle_file_with_u16_bf16_and_fp16_checkpoint(tmp_path):
    """Paddle writers store bf16 as U16 raw bits with format "np"; fp16 -PT files also occur."""
    from converters import mapping
    from ernie_paddle.checkpoint import Checkpoint, write_safetensors

    save_tiny_pt(tmp_path / "bf16", dtype="bfloat16")
    source = Checkpoint(tmp_path / "bf16")
    groups, _ = mapping.plan(source.names, "pt", tied=True)
    entries = []
    for g in groups:
        array = mapping.to_paddle(g, [source.get(n) for n in g.pt])
        entries.append((g.paddle, "uint16", array.shape, lambda a=array: a))
    (tmp_path / "paddle").mkdir()
    write_safetensors(tmp_path / "paddle" / "model.safetensors", entries, {"format": "np"})
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    (tmp_path / "paddle" / "config.json").write_text(json.dumps(config))
    from_u16 = ErniePredictor.from_pretrained(tmp_path / "paddle", device="cpu")
    from_bf16 = ErniePredictor.from_pretrained(tmp_path / "bf16", device="cpu")
    ids = [PROMPTS[0]]
    assert np.array_equal(from_u16.logits(ids), from_bf16.logits(ids))

    rounded_to_fp16 = save_tiny_pt(tmp_path / "fp16", dtype="float16")
    from_fp16 = ErniePredictor.from_pretrained(tmp_path / "fp16", device="cpu")
    want = reference_logits(rounded_to_fp16, PROMPTS[0])
    assert np.abs(from_fp16.logits(ids)[0] - want).max() <= 1e-4


def test_untied_paddle_head_under_a_tied_config_is_an_error(tmp_path):
    """Paddle-side code defaults to untied embeddings: a -Paddle config that leaves the key out must
    not load an [H, V] head as if the model were tied."""
    from converters.convert import pt2paddle
    from ernie_paddle import ErnieError

    save_tiny_pt(tmp_path / "pt", tie_word_embeddings=False)
    pt2paddle(tmp_path / "pt", tmp_path / "paddle", progress=False)
    config = json.loads((tmp_path / "paddle" / "config.json").read_text())
    del config["tie_word_embeddings"]
    (tmp_path / "paddle" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ErnieError, match="untied head .* add \"tie_word_embeddings\": false"):
        ErniePredictor.from_pretrained(tmp_path / "paddle", device="cpu")


def test_numpy_ids_and_empty_batches(tmp_path):
    from ernie_paddle import ErnieError

    save_tiny_pt(tmp_path)
    pred = ErniePredictor.from_pretrained(tmp_path, device="cpu")
    ids = np.array(PROMPTS[1])
    assert pred.generate(list(ids), max_new_tokens=4)[0].token_ids == pred.generate([PROMPTS[1]], max_new_tokens=4)[0].token_ids
    with pytest.raises(ErnieError, match="no prompts"):
        pred.generate([])
    with pytest.raises(ErnieError, match="repetition_penalty 0"):
        pred.generate([PROMPTS[1]], repetition_penalty=0)
