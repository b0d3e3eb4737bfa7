"""Build the small embedded demo model, `ernie_paddle/assets/ernie-4.5-tiny-demo-PT/`.

It is a tiny ERNIE 4.5 with the real architecture (GQA, head_dim != hidden/heads, interleaved RoPE,
tied embeddings, vocab padded to a multiple of 64) stored in the -PT (transformers) layout in bf16,
trained on CPU until it reproduces a small generated bilingual corpus: capitals of countries in
English and Chinese, additions of 1..7, weekdays, opposites and colours. Its SentencePiece
tokenizer has byte fallback and leaves a few rare characters out of the vocabulary, so some Chinese
characters come out as three byte tokens: the streaming UTF-8 detokenizer gets exercised.

Everything is seeded (same bytes on rerun with the same torch build and thread count); rerun (a few
minutes on 2 CPU cores, needs torch + transformers) with

    python tools/build_demo_model.py [--out DIR] [--steps N] [--seed S]

The build fails, leaving nothing behind, unless every fact is reproduced by greedy decoding from the
saved bf16 weights (computed in float32) and AutoTokenizer gives the same ids as SentencePiece.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import shutil
import tempfile
import time
from pathlib import Path

import sentencepiece as spm
import torch

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "ernie_paddle" / "assets" / "ernie-4.5-tiny-demo-PT"

VOCAB_PIECES = 1000
SPECIAL_TOKENS = ["<|begin_of_sentence|>", "<|end_of_sentence|>", "<mask:1>", "<mask:4>", "<mask:5>", "<mask:6>",
                  "<mask:7>"]
UNK, BOS, EOS = 0, 1, 2

MODEL_CONFIG = dict(
    hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=64, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
    use_bias=False, hidden_act="silu", pad_token_id=UNK, bos_token_id=BOS, eos_token_id=EOS,
)

# (English name, English capital, Chinese name, Chinese capital, English continent, Chinese continent)
COUNTRIES = [
    ("France", "Paris", "法国", "巴黎", "Europe", "欧洲"),
    ("Germany", "Berlin", "德国", "柏林", "Europe", "欧洲"),
    ("Italy", "Rome", "意大利", "罗马", "Europe", "欧洲"),
    ("Spain", "Madrid", "西班牙", "马德里", "Europe", "欧洲"),
    ("Portugal", "Lisbon", "葡萄牙", "里斯本", "Europe", "欧洲"),
    ("the United Kingdom", "London", "英国", "伦敦", "Europe", "欧洲"),
    ("Russia", "Moscow", "俄罗斯", "莫斯科", "Europe", "欧洲"),
    ("Greece", "Athens", "希腊", "雅典", "Europe", "欧洲"),
    ("Sweden", "Stockholm", "瑞典", "斯德哥尔摩", "Europe", "欧洲"),
    ("Norway", "Oslo", "挪威", "奥斯陆", "Europe", "欧洲"),
    ("Poland", "Warsaw", "波兰", "华沙", "Europe", "欧洲"),
    ("the Netherlands", "Amsterdam", "荷兰", "阿姆斯特丹", "Europe", "欧洲"),
    ("China", "Beijing", "中国", "北京", "Asia", "亚洲"),
    ("Japan", "Tokyo", "日本", "东京", "Asia", "亚洲"),
    ("South Korea", "Seoul", "韩国", "首尔", "Asia", "亚洲"),
    ("India", "New Delhi", "印度", "新德里", "Asia", "亚洲"),
    ("Thailand", "Bangkok", "泰国", "曼谷", "Asia", "亚洲"),
    ("Vietnam", "Hanoi", "越南", "河内", "Asia", "亚洲"),
    ("Turkey", "Ankara", "土耳其", "安卡拉", "Asia", "亚洲"),
    ("Egypt", "Cairo", "埃及", "开罗", "Africa", "非洲"),
    ("Kenya", "Nairobi", "肯尼亚", "内罗毕", "Africa", "非洲"),
    ("Canada", "Ottawa", "加拿大", "渥太华", "North America", "北美洲"),
    ("the United States", "Washington", "美国", "华盛顿", "North America", "北美洲"),
    ("Mexico", "Mexico City", "墨西哥", "墨西哥城", "North America", "北美洲"),
    ("Brazil", "Brasilia", "巴西", "巴西利亚", "South America", "南美洲"),
    ("Argentina", "Buenos Aires", "阿根廷", "布宜诺斯艾利斯", "South America", "南美洲"),
    ("Australia", "Canberra", "澳大利亚", "堪培拉", "Oceania", "大洋洲"),
]

ZH_DIGITS = "零一二三四五六七八九"
EN_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
ZH_DAYS = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]
OPPOSITES = [("hot", "cold", "热", "冷"), ("big", "small", "大", "小"), ("up", "down", "上", "下"),
             ("fast", "slow", "快", "慢"), ("old", "new", "旧", "新"), ("day", "night", "白天", "黑夜")]
COLOURS = [("the sky", "blue", "天空", "蓝色"), ("grass", "green", "草", "绿色"),
           ("snow", "white", "雪", "白色"), ("a banana", "yellow", "香蕉", "黄色"),
           ("coal", "black", "煤", "黑色"), ("blood", "red", "血", "红色")]

# The facts the demo and the tests replay: (prompt, expected greedy continuation), all verbatim in the corpus.
DEMO_FACTS = [
    ("The capital of France is", " Paris."),
    ("The capital of Japan is", " Tokyo."),
    ("Berlin is the capital of", " Germany."),
    ("2 + 3 =", " 5"),
    ("7 plus 6 equals", " 13."),
    ("After Monday comes", " Tuesday."),
    ("The opposite of hot is", " cold."),
    ("法国的首都是", "巴黎。"),
    ("香蕉的颜色是", "黄色。"),
    ("中国的首都是", "北京。"),
    ("澳大利亚的首都是", "堪培拉。"),
    ("东京是", "日本的首都。"),
    ("三加四等于", "七。"),
    ("星期一之后是", "星期二。"),
    ("热的反义词是", "冷。"),
]


def zh_number(n):
    if n < 10:
        return ZH_DIGITS[n]
    return "十" + (ZH_DIGITS[n - 10] if n > 10 else "")


def build_corpus():
    """Returns the training sentences and every (prompt, continuation) pair with a unique answer."""
    facts = []
    for en, en_cap, zh, zh_cap, continent, zh_continent in COUNTRIES:
        facts += [
            (f"The capital of {en} is", f" {en_cap}."),
            (f"{en_cap} is the capital of", f" {en}."),
            (f"{en[0].upper() + en[1:]} is in", f" {continent}."),
            (f"{zh}的首都是", f"{zh_cap}。"),
            (f"{zh_cap}是", f"{zh}的首都。"),
            (f"{zh}位于", f"{zh_continent}。"),
        ]
    for a in range(1, 8):
        for b in range(1, 8):
            facts += [
                (f"{a} + {b} =", f" {a + b}"),
                (f"{a} plus {b} equals", f" {a + b}."),
                (f"{zh_number(a)}加{zh_number(b)}等于", f"{zh_number(a + b)}。"),
            ]
    for i in range(7):
        facts += [(f"After {EN_DAYS[i]} comes", f" {EN_DAYS[(i + 1) % 7]}."),
                  (f"{ZH_DAYS[i]}之后是", f"{ZH_DAYS[(i + 1) % 7]}。")]
    for en, en_opp, zh, zh_opp in OPPOSITES:
        facts += [(f"The opposite of {en} is", f" {en_opp}."), (f"{zh}的反义词是", f"{zh_opp}。")]
    for en, colour, zh, zh_colour in COLOURS:
        facts += [(f"The colour of {en} is", f" {colour}."), (f"{zh}的颜色是", f"{zh_colour}。")]
    sentences = [prompt + continuation for prompt, continuation in facts]
    assert len(set(p for p, _ in facts)) == len(facts), "a prompt with two answers"
    assert all(f in facts for f in DEMO_FACTS), "a demo fact missing from the corpus"
    return sentences, facts


def train_tokenizer(facts):
    """A byte-fallback BPE SentencePiece model laid out like ERNIE's: <unk>=0 (also pad), <s>=1, </s>=2."""
    # Prompts and continuations are separate training lines so that no piece spans the boundary between
    # them (Chinese has no spaces to stop "是巴" from becoming a piece): a prompt then tokenizes as a
    # prefix of its fact sentence.
    lines = [part for fact in facts for part in fact]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=VOCAB_PIECES,
        # A few characters seen only once or twice stay out of the vocabulary and fall back to bytes.
        character_coverage=0.999, byte_fallback=True,
        unk_id=UNK, bos_id=BOS, eos_id=EOS, pad_id=-1, user_defined_symbols=SPECIAL_TOKENS,
        # Raw completion: no prefix space, so "The capital of France is" is a token prefix of the sentence.
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        hard_vocab_limit=False, num_threads=1, minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def padded_vocab_size(pieces):
    return -(-pieces // 64) * 64  # like the real model: 100295 pieces, 103424 embedding rows


def make_model(vocab_size):
    from transformers import Ernie4_5Config, Ernie4_5ForCausalLM

    config = Ernie4_5Config(vocab_size=vocab_size, **MODEL_CONFIG)
    return Ernie4_5ForCausalLM(config)


def pad_batch(sequences, fill):
    width = max(len(s) for s in sequences)
    return torch.tensor([s + [fill] * (width - len(s)) for s in sequences])


def fact_check(model, facts):
    """Teacher-forced greedy check of every fact: continuation tokens and the closing </s> must each be
    the argmax. When they all are, greedy decoding reproduces the fact exactly.
    Returns (number of facts right, smallest top-1 minus top-2 logit margin over all checked positions)."""
    sequences = [prompt + continuation for prompt, continuation in facts]
    # Right padding needs no attention mask: under the causal mask no real position sees a pad.
    with torch.no_grad():
        logits = model(pad_batch(sequences, UNK)).logits.float()
    right, margin = 0, math.inf
    for row, (prompt, continuation) in enumerate(facts):
        positions = torch.arange(len(prompt) - 1, len(prompt) + len(continuation) - 1)
        scores = logits[row, positions]
        targets = torch.tensor(continuation)
        right += bool((scores.argmax(-1) == targets).all())
        target_score = scores.gather(1, targets[:, None])[:, 0]
        others = scores.scatter(1, targets[:, None], -math.inf).max(-1).values
        margin = min(margin, (target_score - others).min().item())
    return right, margin


def corpus_loss(model, examples):
    with torch.no_grad():
        logits = model(pad_batch(examples, UNK)).logits[:, :-1]
    targets = pad_batch(examples, -100)[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).item()


def bf16_rounded(model, scratch):
    """`scratch` with `model`'s weights rounded to bf16 (computation stays float32)."""
    scratch.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    return scratch


def train(model, examples, facts, steps, seed, batch_size=64, lr=4e-3, warmup=50, eval_every=100,
          min_margin=1.0):
    """AdamW with warmup and cosine decay; stops early once every fact passes with the weights rounded
    to bf16, each decision winning by at least `min_margin` logits (headroom for other kernels)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))))
    scratch = make_model(model.config.vocab_size).eval()
    order, rng = [], random.Random(seed)
    start, loss = time.time(), float("nan")
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        batch, order = [examples[i] for i in order[:batch_size]], order[batch_size:]
        inputs = pad_batch(batch, UNK)
        targets = pad_batch(batch, -100)[:, 1:]
        logits = model(inputs).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % eval_every == 0 or step == steps:
            model.eval()
            right, _ = fact_check(model, facts)
            right_bf16, margin = fact_check(bf16_rounded(model, scratch), facts)
            model.train()
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {schedule.get_last_lr()[0]:.2e}  "
                  f"facts {right}/{len(facts)} (bf16 {right_bf16}, margin {margin:+.2f})  "
                  f"{time.time() - start:.0f} s", flush=True)
            if right_bf16 == len(facts) and margin >= min_margin:
                break
        elif step % 20 == 0:
            print(f"step {step:5d}  loss {loss.item():.4f}", flush=True)
    return step, loss.item(), time.time() - start


def write_tokenizer_files(sp, out, model_max_length):
    (out / "tokenizer.model").write_bytes(sp.serialized_model_proto())
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
               "cls_token": SPECIAL_TOKENS[0], "sep_token": SPECIAL_TOKENS[1], "mask_token": SPECIAL_TOKENS[2],
               "additional_special_tokens": SPECIAL_TOKENS[3:]}
    tokenizer_config = {
        # transformers' LlamaTokenizer reads tokenizer.model; it must be told about the absent prefix space.
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
        "add_prefix_space": False, "legacy": True, "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length, "padding_side": "left", **special,
    }
    write_json(out / "special_tokens_map.json", special)
    write_json(out / "tokenizer_config.json", tokenizer_config)


def write_config(model, out):
    """config.json as the published -PT repos have it: FastDeploy reads `torch_dtype` (not transformers 5's
    `dtype`) as "torch layout", and older readers want `rope_theta` at the top level."""
    c = model.config
    write_json(out / "config.json", {
        "architectures": ["Ernie4_5ForCausalLM"], "model_type": "ernie4_5",
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_position_embeddings, "rope_theta": c.rope_parameters["rope_theta"],
        "rms_norm_eps": c.rms_norm_eps, "hidden_act": c.hidden_act, "use_bias": c.use_bias,
        "tie_word_embeddings": c.tie_word_embeddings, "pad_token_id": UNK, "bos_token_id": BOS,
        "eos_token_id": EOS, "use_cache": True, "torch_dtype": "bfloat16",
    })
    write_json(out / "generation_config.json", {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": UNK})


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def greedy(model, ids, max_new_tokens=16):
    ids = list(ids)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            token = model(torch.tensor([ids])).logits[0, -1].argmax().item()
        if token == EOS:
            return ids, True
        ids.append(token)
    return ids, False


def verify(out, facts):
    """Reload the saved directory the way users will and replay every fact; returns the failures."""
    from transformers import AutoTokenizer, Ernie4_5ForCausalLM, LlamaTokenizer

    config = json.loads((out / "config.json").read_text())
    assert "dtype" not in config and config["torch_dtype"] == "bfloat16", config
    model = Ernie4_5ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config.rope_parameters["rope_theta"] == MODEL_CONFIG["rope_theta"]
    assert model.config.head_dim == MODEL_CONFIG["head_dim"]
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    # AutoTokenizer picks its generic TokenizersBackend for model_type ernie4_5; check the declared class too.
    hf_tokenizers = [AutoTokenizer.from_pretrained(out), LlamaTokenizer.from_pretrained(out)]
    failures = []
    for prompt, expected in facts:
        prompt_ids = sp.encode(prompt)
        ids, stopped = greedy(model, prompt_ids)
        text = sp.decode(ids[len(prompt_ids):])
        if text != expected or not stopped:
            failures.append(f"{prompt!r}: expected {expected!r}, got {text!r}{'' if stopped else ' (no </s>)'}")
        for tokenizer in hf_tokenizers:
            for s in (prompt, prompt + expected):
                if tokenizer(s)["input_ids"] != sp.encode(s) or tokenizer.decode(sp.encode(s)) != s:
                    failures.append(f"{s!r}: {type(tokenizer).__name__} differs from sentencepiece")
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (replaced)")
    parser.add_argument("--steps", type=int, default=1500, help="maximum training steps (stops earlier "
                        "once every fact is reproduced)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(2)

    sentences, facts = build_corpus()
    sp = train_tokenizer(facts)
    byte_tokens = sum(sp.is_byte(i) for s in sentences for i in sp.encode(s))
    print(f"corpus: {len(sentences)} sentences; tokenizer: {sp.get_piece_size()} pieces, "
          f"{byte_tokens} byte-fallback tokens in the corpus")
    token_facts = []
    for prompt, continuation in facts:
        prompt_ids, continuation_ids = sp.encode(prompt), sp.encode(continuation)
        assert sp.encode(prompt + continuation) == prompt_ids + continuation_ids, (prompt, continuation)
        token_facts.append((prompt_ids, continuation_ids + [EOS]))
    assert any(sp.is_byte(i) for _, c in DEMO_FACTS for i in sp.encode(c)), "no demo fact decodes bytes"
    examples = [sp.encode(s) + [EOS] for s in sentences]

    model = make_model(padded_vocab_size(sp.get_piece_size())).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters, vocab {model.config.vocab_size}; training on "
          f"{sum(map(len, examples))} tokens")
    steps, loss, seconds = train(model, examples, token_facts, args.steps, args.seed)
    print(f"trained {steps} steps in {seconds:.0f} s; loss {loss:.4f} on the last batch, "
          f"{corpus_loss(model.eval(), examples):.4f} on the whole corpus")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{args.out.name}-", dir=args.out.parent))
    try:
        model.eval().to(torch.bfloat16).save_pretrained(staging)
        write_config(model, staging)
        write_tokenizer_files(sp, staging, MODEL_CONFIG["max_position_embeddings"])
        write_json(staging / "facts.json", [{"prompt": p, "expected": e} for p, e in DEMO_FACTS])
        staging.chmod(0o755)  # mkdtemp makes it private; these are package data
        for path in staging.iterdir():
            path.chmod(0o644)
        failures = verify(staging, facts)
        if failures:
            raise SystemExit("build failed, the saved model does not reproduce:\n  " + "\n  ".join(failures))
        shutil.rmtree(args.out, ignore_errors=True)
        staging.rename(args.out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wrote {args.out} ({size / 2**20:.2f} MiB); all {len(facts)} facts reproduced from bf16 weights")


if __name__ == "__main__":
    main()
