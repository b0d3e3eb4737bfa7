"""Shared test fixtures: tiny real ERNIE 4.5 checkpoints written by transformers itself."""

from __future__ import annotations

import os

import pytest

TINY = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
            initializer_range=0.2)  # larger than the default 0.02, so greedy decoding does not repeat one token


@pytest.fixture(autouse=True)
def paddle_flags_restored():
    """Paddle reads the FLAGS_* environment variables when it is imported, and `cli.main` run in the
    test process sets some (device.prepare_environment, for --device npu, say): each test's are put
    back, or every later test's subprocesses (servers, children) run a differently configured Paddle
    (FLAGS_use_stride_kernel=0 made slices copies)."""
    before = {name: value for name, value in os.environ.items() if name.startswith("FLAGS_")}
    yield
    for name in [name for name in os.environ if name.startswith("FLAGS_") and name not in before]:
        del os.environ[name]
    os.environ.update(before)


def save_tiny_pt(directory, seed=0, dtype="float32", max_shard_size=None, **overrides):
    """Write a randomly initialised transformers `Ernie4_5ForCausalLM` (-PT layout) to `directory`;
    returns the torch model (float32 compute, weights as saved, eval mode)."""
    import torch
    from transformers import Ernie4_5Config, Ernie4_5ForCausalLM

    torch.manual_seed(seed)
    config = Ernie4_5Config(**{**TINY, **overrides})
    model = Ernie4_5ForCausalLM(config).eval()
    with torch.no_grad():  # norms start at 1.0; make them non-trivial so a dropped norm is caught
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    if dtype == "float32":
        model.save_pretrained(directory, **kwargs)
        return model
    model.to(getattr(torch, dtype)).save_pretrained(directory, **kwargs)
    # Reload rather than cast back: `.to()` also rounds buffers such as RoPE's inv_freq.
    return Ernie4_5ForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def save_tiny_moe_pt(directory, seed=0, bias_range=(0.5, 1.5), **overrides):
    """Write a randomly initialised transformers `Ernie4_5_MoeForCausalLM` to `directory`; returns the
    torch model. The routers' correction biases are drawn from `bias_range`."""
    import torch
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    torch.manual_seed(seed)
    kwargs = {**TINY, "moe_num_experts": 4, "moe_k": 2, "moe_intermediate_size": 32,
              "moe_num_shared_experts": 1, "moe_layer_start_index": 1, **overrides}
    model = Ernie4_5_MoeForCausalLM(Ernie4_5_MoeConfig(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "e_score_correction_bias" in name:
                p.uniform_(*bias_range)
    model.save_pretrained(directory)
    return model


def reference_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def reference_generate(model, prompts, n):
    """transformers greedy generation of a left-padded batch; the generated ids of each row."""
    import torch

    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return [row[width:].tolist() for row in out]


def upto_eos(ids):
    """After eos (id 2) transformers pads a finished row; ours stops it: compare up to the first eos."""
    return ids[:ids.index(2) + 1] if 2 in ids else ids


def edited_copy(src, dst, edit):
    """A copy of the checkpoint `src` with every tensor passed through `edit(name, array)`."""
    import shutil

    from ernie_paddle.checkpoint import Checkpoint, write_safetensors

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    ckpt = Checkpoint(src)
    arrays = {name: edit(name, ckpt.read(name)) for name in ckpt.names}
    write_safetensors(dst / "model.safetensors",
                      [(name, ckpt.dtype(name), a.shape, lambda a=a: a) for name, a in arrays.items()], ckpt.metadata)
    return dst


@pytest.fixture
def tiny_pt(tmp_path):
    """A tiny -PT model directory and its transformers model."""
    directory = tmp_path / "tiny-PT"
    model = save_tiny_pt(directory)
    return directory, model


def save_tiny_tokenizer(directory, texts, vocab_size=400):
    """Train a small byte-fallback SentencePiece model on `texts` into `directory`/tokenizer.model, laid out
    like ERNIE's (<unk>=0, <s>=1, </s>=2); any text encodes, to ids below `vocab_size`."""
    import io
    from pathlib import Path

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=False, hard_vocab_limit=False, num_threads=1, minloglevel=2)
    Path(directory, "tokenizer.model").write_bytes(model.getvalue())
