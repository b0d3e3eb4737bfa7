"""tools/bench_vs_llamacpp.py --kl without llama.cpp: its reading of llama-perplexity's base file and the
positions it scores, against a base file written here in llama.cpp's format from the demo model's
float32 predictions computed one prefix at a time."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from ernie_paddle import ErniePredictor, cpu_ops
from ernie_paddle.demo import DEMO_MODEL

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("bench_vs_llamacpp", ROOT / "tools" / "bench_vs_llamacpp.py")
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)

CONTEXT, CHUNKS = 8, 3


def write_base(path: Path, tokens: np.ndarray, log_probs: list[np.ndarray], vocab: int):
    """llama-perplexity --kl-divergence-base's file: header, tokens, then per scored position a float32
    scale and offset and the log-probabilities in 16-bit steps over the 16 nats below the top."""
    row = 2 * ((vocab + 1) // 2) + 4
    with open(path, "wb") as f:
        f.write(b"_logits_")
        np.array([CONTEXT, vocab, len(tokens)], np.int32).tofile(f)
        tokens.astype(np.int32).tofile(f)
        for lp in log_probs:
            low = max(lp.min(), lp.max() - 16)
            scale = (lp.max() - low) / 65535
            stored = np.zeros(row, np.uint16)
            stored[:4] = np.array([scale, low, 0, 0], np.float32).view(np.uint16)[:4]
            stored[4:4 + vocab] = np.where(lp > low, np.rint((lp - low) / scale), 0)
            stored.tofile(f)


def test_kl_reads_llama_perplexity_positions(tmp_path):
    from ernie_paddle.check import log_softmax

    reference = ErniePredictor.from_pretrained(DEMO_MODEL, device="cpu", dtype="float32", weight_dtype="float32",
                                               progress=False)
    vocab = reference.config.vocab_size
    tokens = np.random.default_rng(0).integers(3, vocab, size=(CHUNKS, CONTEXT))
    # the distribution of each token of a chunk's second half but the first, from its chunk's prefix alone
    expected = [log_softmax(reference.logits([chunk[:end].tolist()])[0][-1])
                for chunk in tokens for end in range(CONTEXT // 2 + 1, CONTEXT)]
    write_base(tmp_path / "base.bin", tokens, expected, vocab)

    read_tokens, log_probs = tool.read_kl_base(tmp_path / "base.bin")
    assert (read_tokens == tokens).all() and log_probs.shape == (CHUNKS * (CONTEXT - 1 - CONTEXT // 2), vocab)
    assert (log_probs == tool.CUT_OFF).any()  # tokens more than 16 nats below the top: probability 0, not NaN
    same = tool.distance(log_probs, tool.scored_logits(reference, read_tokens, None))
    assert same["mean_kl"] < 1e-4 and same["top1"] == 1.0  # the mass left out below the cut-off: ~5e-6
    # one position off, or a BOS where llama.cpp puts none, is far
    assert tool.distance(log_probs[1:], tool.scored_logits(reference, read_tokens, None)[:-1])["mean_kl"] > 0.1
    assert tool.distance(log_probs, tool.scored_logits(reference, read_tokens, 1))["mean_kl"] > 1e-3

    if cpu_ops.available():
        wint4 = ErniePredictor.from_pretrained(DEMO_MODEL, device="cpu", dtype="float32", quantization="wint4",
                                               progress=False)
        error = tool.distance(tool.scored_logits(reference, tokens, None), tool.scored_logits(wint4, tokens, None))
        assert 0 < error["mean_kl"] < 1.0

