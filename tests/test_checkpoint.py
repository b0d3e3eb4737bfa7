"""Loading checks a checkpoint against config.json before it reads a weight: the tensors the model is made
of (mapping.paddle_names, the same list `convert` checks), and a tied lm_head copy equal to the embedding."""

from __future__ import annotations

import re

import numpy as np
import pytest

from conftest import TINY, reference_logits, save_tiny_moe_pt, save_tiny_pt
from converters.convert import pt2paddle
from converters.mapping import paddle_names
from ernie_paddle.checkpoint import Checkpoint
from ernie_paddle.cli import main
from ernie_paddle.config import ErnieConfig
from ernie_paddle.errors import ErnieError
from ernie_paddle.model import ErnieForCausalLM
from ernie_paddle.predictor import ErniePredictor
from test_convert import one_bit_flipped, rewritten

MOE = {**TINY, "architectures": ["Ernie4_5_MoeForCausalLM"], "moe_num_experts": 4, "moe_k": 2,
       "moe_intermediate_size": 32, "moe_num_shared_experts": 1, "moe_layer_start_index": 1}
CONFIGS = {
    "dense": {**TINY, "architectures": ["Ernie4_5ForCausalLM"]},
    "dense-untied": {**TINY, "architectures": ["Ernie4_5ForCausalLM"], "tie_word_embeddings": False},
    "moe": MOE,
    "moe-every-other-layer-unshared": {**MOE, "num_hidden_layers": 4, "moe_layer_start_index": 0,
                                       "moe_layer_interval": 2, "moe_num_shared_experts": 0},
}


@pytest.mark.parametrize("name", CONFIGS)
def test_the_expected_tensors_are_what_the_model_loads(name):
    config = ErnieConfig.from_dict(CONFIGS[name])
    assert sorted(paddle_names(config)) == sorted(ErnieForCausalLM(config).load_targets())


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    directory = tmp_path_factory.mktemp("untied")
    return directory, save_tiny_pt(directory, seed=4, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tied")
    return directory, save_tiny_pt(directory, seed=5)


def load(directory):
    return ErniePredictor.from_pretrained(directory, device="cpu", dtype="float32", progress=False)


def test_load_refuses_a_distinct_head_under_a_tied_config(untied, tied, capsys, tmp_path):
    pt = rewritten(untied[0], tmp_path / "tied-PT", config={"tie_word_embeddings": True})
    with pytest.raises(ErnieError, match=rf"^{re.escape(str(pt / 'model.safetensors'))}: tensor 'lm_head.weight' differs from the "
                                         r"embedding 'model.embed_tokens.weight'.*\"tie_word_embeddings\": false"):
        load(pt)
    code = main(["generate", "--model", str(pt), "--prompt", "1", "--device", "cpu"])
    assert code == 2 and "'lm_head.weight' differs" in capsys.readouterr().err
    pt2paddle(tied[0], tmp_path / "P", progress=False)
    embedding = Checkpoint(tmp_path / "P").read("ernie.embed_tokens.weight")
    paddle = rewritten(tmp_path / "P", tmp_path / "tied-Paddle",
                       add={"lm_head.weight": ("float32", one_bit_flipped(embedding))})
    with pytest.raises(ErnieError, match="'lm_head.weight' differs from the embedding 'ernie.embed_tokens.weight'"):
        load(paddle)


def test_load_skips_a_tied_copy_equal_to_the_embedding(tied, tmp_path):
    directory, reference = tied
    embedding = Checkpoint(directory).read("model.embed_tokens.weight")
    pt = rewritten(directory, tmp_path / "copy-PT", add={"lm_head.weight": ("float32", embedding)})
    ids = [1, 5, 17, 42, 99, 3]
    assert np.abs(load(pt).logits([ids])[0] - reference_logits(reference, ids)).max() <= 1e-4


def test_load_names_the_directory_of_a_partly_missing_fused_tensor(tied, tmp_path):
    src = rewritten(tied[0], tmp_path / "partial", drop=["model.layers.1.mlp.up_proj.weight"])
    with pytest.raises(ErnieError, match=rf"^{re.escape(str(src))}: tensor 'model.layers.1.mlp.up_proj.weight' is missing \(needed "
                                         "with 'model.layers.1.mlp.gate_proj.weight'"):
        load(src)


def test_load_refuses_an_incomplete_moe_checkpoint_naming_its_tensors(tmp_path):
    directory = tmp_path / "moe"
    save_tiny_moe_pt(directory)
    src = rewritten(directory, tmp_path / "no-expert", drop=[f"model.layers.1.mlp.experts.0.{p}_proj.weight"
                                                             for p in ("gate", "up", "down")])
    with pytest.raises(ErnieError, match=rf"^{re.escape(str(src))}: tensor 'model.layers.1.mlp.experts.0.gate_proj.weight' "
                                         r"\(and 2 more\) is missing, but the moe ERNIE 4.5 model"):
        load(src)


def test_same_values_compares_block_by_block(tied, tmp_path, monkeypatch):
    from ernie_paddle import checkpoint

    embedding = Checkpoint(tied[0]).read("model.embed_tokens.weight")
    last_row = embedding.copy()
    last_row.view(np.uint32)[-1, -1] ^= 1
    src = rewritten(tied[0], tmp_path / "copies", add={"same": ("float32", embedding), "last": ("float32", last_row)})
    monkeypatch.setattr(checkpoint, "COMPARE_BLOCK_BYTES", 3 * embedding[0].nbytes)  # 3 rows a block
    ckpt = Checkpoint(src)
    assert ckpt.read("same", (207, 210)).tobytes() == embedding[207:210].tobytes()
    assert ckpt.read("same", (210, 213)).shape == (1, embedding.shape[1])  # the last block is short
    assert checkpoint.same_values(ckpt, "same", "model.embed_tokens.weight")
    assert not checkpoint.same_values(ckpt, "last", "model.embed_tokens.weight")
