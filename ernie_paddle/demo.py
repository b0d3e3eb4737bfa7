"""`ernie-paddle demo`: the whole loop on the tiny ERNIE 4.5 embedded in the package.

-PT checkpoint -> `convert pt2paddle` -> ErniePredictor on Paddle -> generation, and, when torch and
transformers are installed, the logit agreement with transformers on the same prompts.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

DEMO_MODEL = Path(__file__).parent / "assets" / "ernie-4.5-tiny-demo-PT"


def demo_facts() -> list[dict]:
    """The prompts the demo model was trained to complete, with their expected continuations."""
    return json.loads((DEMO_MODEL / "facts.json").read_text(encoding="utf-8"))


def transformers_logits(model_dir: Path, batch: list[list[int]]) -> list[np.ndarray] | None:
    """float32 logits of transformers' Ernie4_5ForCausalLM, or None when it is not installed."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging
    except ImportError:
        return None
    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0].numpy() for ids in batch]


def run_demo(device: str = "auto", dtype: str = "auto", weight_dtype: str = "auto") -> int:
    from converters.convert import pt2paddle

    from .predictor import ErniePredictor

    facts = [f for f in demo_facts() if f["prompt"].isascii()][:4] + \
        [f for f in demo_facts() if not f["prompt"].isascii()][:4]
    print(f"1. the embedded model: {DEMO_MODEL.name} (-PT layout, transformers names)")
    with tempfile.TemporaryDirectory(prefix="ernie-demo-") as tmp:
        paddle_dir = Path(tmp) / "ernie-4.5-tiny-demo-Paddle"
        pt2paddle(DEMO_MODEL, paddle_dir, progress=False)
        print(f"2. converted to the -Paddle layout: convert pt2paddle {DEMO_MODEL.name} {paddle_dir.name}")
        pred = ErniePredictor.from_pretrained(paddle_dir, device=device, dtype=dtype, progress=False,
                                             weight_dtype=weight_dtype)
        print(f"3. generating on {pred.device} in {pred.dtype} (weights held in {pred.model.weight_dtype}) with Paddle "
              "(greedy; the model's text in brackets):")
        prompts = [f["prompt"] for f in facts]
        results = pred.generate(prompts, max_new_tokens=16, stop=["\n"])
        for prompt, result in zip(prompts, results):
            print(f"   {prompt}[{result.text}]")
        print(f"   ({sum(r.generated_tokens for r in results)} tokens for {len(prompts)} prompts in one batch)")

        ids = [pred.tokenizer.encode(p) for p in prompts]
        reference = transformers_logits(DEMO_MODEL, ids)
        if reference is None:
            print("4. logit agreement with transformers: skipped (pip install 'ernie-paddle[check]' to see it)")
            return 0
        ours = [pred.logits([row])[0] for row in ids]
        worst = max(float(np.abs(a - b).max()) for a, b in zip(ours, reference))
        same_top1 = sum(int(a[-1].argmax() == b[-1].argmax()) for a, b in zip(ours, reference))
        print(f"4. against transformers (PyTorch, float32) on the same prompts: max |\u0394logit| = {worst:.2e}, "
              f"next-token top-1 agrees {same_top1}/{len(ids)}")
        print("   full report: ernie-paddle check --model <dir>")
    return 0
