"""The MoE models (Ernie4_5_MoeForCausalLM: 21B-A3B, 300B-A47B) against transformers' implementation."""

import json

import numpy as np
import pytest

from conftest import edited_copy, reference_generate, reference_logits, save_tiny_moe_pt, save_tiny_tokenizer, upto_eos
from ernie_paddle import ErniePredictor, cpu_ops
from ernie_paddle.config import ErnieConfig
from ernie_paddle.errors import ErnieError

# Four tiny MoE models that differ in expert count, top-k, shared experts (0, 1, 2), the MoE layers'
# start / end / interval, and tied or untied embeddings. Correction biases small next to the scores,
# so that tokens are routed to different experts.
CONFIGS = {
    "e4-k2-shared1-tied": dict(bias_range=(0.0, 0.05)),
    "e8-k3-shared0-untied": dict(moe_num_experts=8, moe_k=3, moe_num_shared_experts=0, tie_word_embeddings=False,
                                 num_hidden_layers=3, moe_layer_start_index=0, moe_intermediate_size=24,
                                 bias_range=(0.0, 0.05)),
    "e6-k1-shared2-interval2": dict(moe_num_experts=6, moe_k=1, moe_num_shared_experts=2, num_hidden_layers=4,
                                    moe_layer_start_index=1, moe_layer_interval=2, bias_range=(0.0, 0.1)),
    "e16-k6-shared2-end1": dict(moe_num_experts=16, moe_k=6, moe_num_shared_experts=2, num_hidden_layers=3,
                                moe_layer_start_index=1, moe_layer_end_index=1, moe_intermediate_size=16,
                                tie_word_embeddings=False, bias_range=(0.0, 0.02)),
}
PROMPTS = [[5, 7, 9, 11, 3, 100, 150, 17, 23, 42, 8], [31, 4, 77], [120, 9, 9, 64, 18, 3, 44]]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """A tiny MoE -PT checkpoint, its pt2paddle conversion, and the transformers model."""
    from converters.convert import pt2paddle

    root = tmp_path_factory.mktemp(request.param)
    reference = save_tiny_moe_pt(root / "pt", seed=11, **CONFIGS[request.param])
    pt2paddle(root / "pt", root / "paddle", progress=False)
    return reference, root


def layer_kinds(pred):
    return [type(layer.mlp).__name__ for layer in pred.model.ernie.layers]


def test_layers_follow_start_end_and_interval(pair):
    reference, root = pair
    pred = ErniePredictor.from_pretrained(root / "pt", device="cpu", dtype="float32")
    want = [type(layer.mlp).__name__.replace("Ernie4_5_MoeSparseMoeBlock", "MoE").replace("Ernie4_5_MoeMLP", "MLP")
            for layer in reference.model.layers]
    assert layer_kinds(pred) == want and "MoE" in want


@pytest.mark.parametrize("layout", ["pt", "paddle"])
def test_logits_and_greedy_tokens_match_transformers(pair, layout):
    reference, root = pair
    pred = ErniePredictor.from_pretrained(root / layout, device="cpu", dtype="float32")
    for ids in PROMPTS:
        assert np.abs(pred.logits([ids])[0] - reference_logits(reference, ids)).max() <= 1e-4
    expected = reference_generate(reference, PROMPTS, 32)
    batch = pred.generate(PROMPTS, max_new_tokens=32)
    for prompt, want, got in zip(PROMPTS, expected, batch):
        assert got.token_ids == upto_eos(want)
        assert pred.generate([prompt], max_new_tokens=32)[0].token_ids == got.token_ids  # alone = in the batch
    assert sum(len(g.token_ids) for g in batch) >= 64  # not a run that stops at once


def test_both_layouts_load_the_same_weights(pair):
    _, root = pair
    from_pt = ErniePredictor.from_pretrained(root / "pt", device="cpu", dtype="float32").model.weights()
    from_paddle = ErniePredictor.from_pretrained(root / "paddle", device="cpu", dtype="float32").model.weights()
    assert from_pt.keys() == from_paddle.keys()
    assert any(".experts.3." in name for name in from_pt)
    for name, value in from_pt.items():
        assert np.array_equal(value.numpy(), from_paddle[name].numpy()), name


def routed(pred, layer: int, hidden: np.ndarray):
    """The experts each row of `hidden` is routed to in MoE layer `layer`, and the layer's output."""
    import paddle

    moe = pred.model.ernie.layers[layer].mlp
    x = paddle.to_tensor(hidden)
    with paddle.no_grad():
        return moe.route(x)[0].numpy(), moe(x.unsqueeze(0))[0].numpy()


@pytest.mark.parametrize("kernels", [True, False], ids=["cpu-kernels", "paddle-ops"])
def test_a_row_gives_the_same_result_alone_and_in_a_batch(tmp_path, monkeypatch, kernels):
    """Rows routed to experts the other rows do not use: the grouped kernel over a batch gives each row
    the bits it gives alone (the experts a row did not choose do not touch it); Paddle's ops (MKL,
    whose sums depend on the row count) the same within float32 rounding."""
    if kernels and not cpu_ops.available():
        pytest.skip("the CPU kernels are unavailable here")
    if not kernels:
        monkeypatch.setattr(cpu_ops, "available", lambda: False)
    save_tiny_moe_pt(tmp_path, seed=4, moe_num_experts=8, moe_k=2, moe_num_shared_experts=1, bias_range=(0, 0.02))
    pred = ErniePredictor.from_pretrained(tmp_path, device="cpu", dtype="float32")
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(24, 64)).astype(np.float32)
    chosen, together = routed(pred, 1, hidden)
    assert len(np.unique(chosen)) >= 6  # the rows really spread over the experts
    assert any(not set(chosen[i]) & set(chosen[0]) for i in range(1, len(chosen)))
    for i in range(len(hidden)):
        _, alone = routed(pred, 1, hidden[i:i + 1])
        if kernels:
            assert np.array_equal(alone[0], together[i]), i
        else:
            np.testing.assert_allclose(alone[0], together[i], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not cpu_ops.available(), reason="the CPU kernels are unavailable here")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_grouped_kernel_equals_one_matmul_per_expert(dtype):
    """ernie_cpu_grouped_matmul against numpy, with unused experts, odd sizes and more than 32 rows."""
    import paddle

    rng = np.random.default_rng(1)
    experts, n, k = 5, 19, 37
    w = rng.normal(size=(experts, n, k)).astype(np.float32)
    counts = [3, 0, 40, 1, 0]
    x = rng.normal(size=(sum(counts), k)).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    held = paddle.to_tensor(w).astype(dtype)
    got = cpu_ops.grouped_matmul(paddle.to_tensor(x), held, paddle.to_tensor(offsets)).numpy()
    w = held.astype("float32").numpy()
    for e in range(experts):
        a, b = offsets[e], offsets[e + 1]
        np.testing.assert_allclose(got[a:b], x[a:b] @ w[e].T, rtol=1e-5, atol=1e-5)


# the router's two sorts (phi's CPU top_k: a partial sort when 64 k < E, else nth_element), top-1 and
# top-k, with and without shared experts, a dense layer among the MoE ones
LAYER_CONFIGS = {"e8-k3-shared2": dict(moe_num_experts=8, moe_k=3, moe_num_shared_experts=2),
                 "e130-k2-shared0": dict(moe_num_experts=130, moe_k=2, moe_num_shared_experts=0,
                                         moe_intermediate_size=8),
                 "e6-k1-shared1": dict(moe_num_experts=6, moe_k=1)}


@pytest.mark.skipif(not cpu_ops.available(), reason="the CPU kernels are unavailable here")
@pytest.mark.parametrize("weights", ["float32", "bfloat16", "wint8", "wint4"])
@pytest.mark.parametrize("layers", sorted(LAYER_CONFIGS))
def test_a_moe_layer_in_one_operator_gives_the_bits_of_its_operators_one_by_one(tmp_path, monkeypatch, weights,
                                                                                layers):
    """Decoding runs a MoE layer, attention, router, routed and shared experts, as one operator
    (cpu_ops.decoder); its operators one by one (the router operator, Paddle's sort, gather and
    scatter around the grouped matmuls, its multiply and sum over the slots) give the same logits and
    KV cache, bit for bit: batch 1 and 3 rows, decoding after a prompt short enough to go through the
    operator and after one too long."""
    import torch
    from test_cpu_ops import assert_the_decoder_operator_gives_the_bits_of_its_operators

    reference = save_tiny_moe_pt(tmp_path / "f32", seed=5, num_hidden_layers=3, moe_layer_start_index=0,
                                 moe_layer_end_index=1, bias_range=(0, 0.02), **LAYER_CONFIGS[layers])
    directory = tmp_path / "f32"
    if weights == "bfloat16":
        reference.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
        directory = tmp_path / "bf16"
    quantization = weights if weights.startswith("wint") else None
    pred = ErniePredictor.from_pretrained(directory, device="cpu", dtype="float32", quantization=quantization,
                                          progress=False)
    assert layer_kinds(pred) == ["MoE", "MoE", "MLP"]
    assert_the_decoder_operator_gives_the_bits_of_its_operators(
        pred.model, monkeypatch, ([[5, 6, 7, 8, 9, 10]], [[5, 6, 7, 8, 9, 10, 11, 12], [11, 12], [13, 14, 15]],
                             [[5, 6, 7, 8, 9] * 8, [11, 12]]), steps=6)


@pytest.mark.skipif(not cpu_ops.available(), reason="the CPU kernels are unavailable here")
@pytest.mark.parametrize("experts,k", [(64, 6), (130, 2), (6, 6)])
def test_the_router_breaks_ties_as_paddle_topk_does(experts, k):
    """The router operator chooses among equal scores (here every softmax score is 1 / E, and the
    correction biases take three values) the experts paddle.topk chooses, in its order, with the same
    weights."""
    import paddle

    rng = np.random.default_rng(experts)
    bias = rng.choice(np.float32([0.0, 0.25, 0.5]), size=(1, experts)).astype(np.float32)
    rows = 5
    h = paddle.zeros([rows, 16])
    gate = paddle.to_tensor(rng.normal(size=(experts, 16)).astype(np.float32))
    chosen, weights = cpu_ops.route(h, gate, paddle.to_tensor(bias), k, 1e-12)
    scores = paddle.nn.functional.softmax(paddle.zeros([rows, experts]), axis=-1)
    _, want = paddle.topk(scores + paddle.to_tensor(bias), k)
    want_weights = paddle.take_along_axis(scores, want, axis=-1)
    want_weights = want_weights / paddle.clip(want_weights.sum(-1, keepdim=True), min=1e-12)
    assert np.array_equal(chosen.numpy(), want.numpy())
    assert len(np.unique(bias[0, chosen.numpy()[0]])) < k  # ties among the chosen
    np.testing.assert_array_equal(weights.numpy(), want_weights.numpy())


def test_bf16_moe_checkpoint_keeps_the_router_in_float32(tmp_path):
    """A bf16 checkpoint's experts stay bf16 under float32 compute; the router is float32 everywhere."""
    import torch
    from converters.convert import pt2paddle

    save_tiny_moe_pt(tmp_path / "f32", seed=2, bias_range=(0, 0.05))
    pt2paddle(tmp_path / "f32", tmp_path / "bf16", dtype="bfloat16", progress=False)
    pred = ErniePredictor.from_pretrained(tmp_path / "bf16", device="cpu", dtype="float32")
    weights = pred.model.weights()
    assert str(weights["ernie.layers.1.mlp.gate.weight"].dtype) == "paddle.float32"
    expected_experts = "paddle.bfloat16" if cpu_ops.available() else "paddle.float32"
    assert str(weights["ernie.layers.1.mlp.experts.0.up_gate_proj.weight"].dtype) == expected_experts
    from transformers import Ernie4_5_MoeForCausalLM
    from converters.convert import paddle2pt
    paddle2pt(tmp_path / "bf16", tmp_path / "bf16-pt", progress=False)
    reference = Ernie4_5_MoeForCausalLM.from_pretrained(tmp_path / "bf16-pt", dtype=torch.float32).eval()
    for ids in PROMPTS:
        assert np.abs(pred.logits([ids])[0] - reference_logits(reference, ids)).max() <= 1e-4


def moe_config(**changes) -> dict:
    base = {"architectures": ["Ernie4_5_MoeForCausalLM"], "vocab_size": 103424, "hidden_size": 2560,
            "intermediate_size": 12288, "num_hidden_layers": 28, "num_attention_heads": 20, "num_key_value_heads": 4,
            "moe_num_experts": 64, "moe_k": 6, "moe_intermediate_size": 1536, "moe_num_shared_experts": 2,
            "moe_layer_start_index": 1, "moe_layer_interval": 1, "moe_capacity": [64, 64, 64], "moe_gate": "topk",
            "moe_use_aux_free": True, "num_nextn_predict_layers": 1, "multi_token_pred_lambda": 0.3,
            "torch_dtype": "bfloat16"}
    return {k: v for k, v in {**base, **changes}.items() if v is not ...}


def test_published_21b_config_reads_as_transformers_defaults():
    from transformers import Ernie4_5_MoeConfig

    moe = ErnieConfig.from_dict(moe_config()).moe
    ref = Ernie4_5_MoeConfig()
    assert (moe.num_experts, moe.top_k, moe.intermediate_size, moe.num_shared_experts) == \
        (ref.moe_num_experts, ref.moe_k, ref.moe_intermediate_size, ref.moe_num_shared_experts)
    assert (moe.layer_start, moe.layer_end, moe.layer_interval, moe.norm_min) == \
        (ref.moe_layer_start_index, ref.moe_layer_end_index, ref.moe_layer_interval, ref.moe_norm_min)
    assert [moe.is_moe_layer(i) for i in range(3)] == [False, True, True]


@pytest.mark.parametrize("key, value, message", [
    ("moe_gate", "top2", 'moe_gate = "top2" is not supported'),
    ("moe_use_aux_free", False, "moe_use_aux_free = false is not supported"),
    ("moe_norm_gate_logits", False, "moe_norm_gate_logits = false is not supported"),
    ("use_bias", True, "use_bias"),
    ("moe_num_experts", [64, 64], "moe_num_experts is a list .* multimodal \\(VL\\)"),
    ("moe_layer_start_index", [1, 1], "moe_layer_start_index is a list .* multimodal \\(VL\\)"),
    ("moe_k", 65, "moe_k 65 must be between 1 and moe_num_experts 64"),
    ("moe_k", 2.7, "bad value \\(moe_k 2.7 is not an integer\\)"),
    ("moe_k", "2", "bad value \\(moe_k '2' is not an integer\\)"),
    ("moe_num_shared_experts", None, "bad value \\(moe_num_shared_experts None is not an integer\\)"),
    ("use_rmsnorm", False, "use_rmsnorm = false is not supported"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, 'rope_scaling asks for RoPE type "yarn"'),
])
def test_unsupported_moe_config_values_are_refused(tmp_path, key, value, message):
    (tmp_path / "config.json").write_text(json.dumps(moe_config(**{key: value})))
    with pytest.raises(ErnieError, match=f"config.json: {message}"):
        ErnieConfig.from_dir(tmp_path)


def test_multi_token_prediction_tensors_are_skipped_with_a_note(tmp_path, capsys):
    """Published -Paddle MoE files carry mtp_* tensors; the model loads without them and says so."""
    from converters.convert import pt2paddle
    from ernie_paddle.checkpoint import Checkpoint, write_safetensors

    reference = save_tiny_moe_pt(tmp_path / "pt", seed=3, bias_range=(0, 0.05))
    pt2paddle(tmp_path / "pt", tmp_path / "paddle", progress=False)
    source = Checkpoint(tmp_path / "paddle")
    entries = [(n, str(source.get(n).dtype), source.tensors[n].shape, lambda n=n: source.get(n)) for n in source.names]
    entries.append(("ernie.mtp_block.0.mlp.up_gate_proj.weight", "float32", (64, 64), lambda: np.ones((64, 64), np.float32)))
    (tmp_path / "mtp").mkdir()
    write_safetensors(tmp_path / "mtp" / "model.safetensors", entries, {"format": "np"})
    source.close()
    (tmp_path / "mtp" / "config.json").write_text((tmp_path / "paddle" / "config.json").read_text())
    pred = ErniePredictor.from_pretrained(tmp_path / "mtp", device="cpu", dtype="float32")
    assert "1 multi-token-prediction tensor" in capsys.readouterr().err
    assert np.abs(pred.logits([PROMPTS[0]])[0] - reference_logits(reference, PROMPTS[0])).max() <= 1e-4


def test_check_passes_a_conversion_and_flags_one_altered_expert(tmp_path, capsys):
    """`ernie-paddle check --reference-model` on a MoE conversion against transformers; a copy with one
    expert's weights altered fails (exit 1)."""
    from converters.convert import pt2paddle
    from ernie_paddle import check
    from ernie_paddle.cli import main

    save_tiny_moe_pt(tmp_path / "pt", seed=6, vocab_size=448, eos_token_id=447, bias_range=(0, 0.05))
    save_tiny_tokenizer(tmp_path / "pt", check.DEFAULT_PROMPTS)
    pt2paddle(tmp_path / "pt", tmp_path / "paddle", progress=False)
    code = main(["check", "--device", "cpu", "--model", str(tmp_path / "paddle"), "--reference", "transformers",
                 "--reference-model", str(tmp_path / "pt")])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "PASS" in out and "Ernie4_5_MoeForCausalLM" in out

    rng = np.random.default_rng(0)
    altered = edited_copy(tmp_path / "paddle", tmp_path / "altered", lambda name, a: (
        rng.standard_normal(a.shape).astype(a.dtype) * a.std() if ".layers.1.mlp.experts.0." in name else a))
    code = main(["check", "--device", "cpu", "--model", str(altered), "--reference", "cpu",
                 "--reference-model", str(tmp_path / "pt"), "--greedy-tokens", "8"])
    out, err = capsys.readouterr()
    assert code == 1
    assert err.startswith("ernie-paddle check: FAIL prompt ")


def test_the_command_line_and_stream_take_a_moe_model(tmp_path, capsys):
    """`ernie-paddle generate` and `bench` on a MoE model; `stream` yields what `generate` returns."""
    from ernie_paddle import check
    from ernie_paddle.cli import main

    save_tiny_moe_pt(tmp_path, seed=6, vocab_size=448, eos_token_id=447, bias_range=(0, 0.05))
    save_tiny_tokenizer(tmp_path, check.DEFAULT_PROMPTS)
    pred = ErniePredictor.from_pretrained(tmp_path, device="cpu", dtype="float32")
    prompt = check.DEFAULT_PROMPTS[0]
    want = pred.generate(prompt, max_new_tokens=12)[0]
    assert "".join(chunk.text for chunk in pred.stream(prompt, max_new_tokens=12)) == want.text
    assert main(["generate", "--model", str(tmp_path), "--device", "cpu", "--prompt", prompt,
                 "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == prompt + want.text + "\n"
    assert main(["bench", "--model", str(tmp_path), "--device", "cpu", "--input-lens", "3",
                 "--output-lens", "4"]) == 0
    assert "routed experts only" in capsys.readouterr().out
