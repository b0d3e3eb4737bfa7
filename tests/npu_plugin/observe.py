"""What tests/test_npu.py checks, observed in a process whose `import paddle` loaded the host-memory
NPU plugin (CUSTOM_DEVICE_ROOT is read only then). Prints one JSON object on stdout; the fused-op
choices are logged on stderr.

    python observe.py MODEL_DIR
"""

import json
import logging
import sys

import numpy as np

from ernie_paddle import ErniePredictor, cpu_ops, device


def run(predictor, prompts) -> dict:
    return {"long": predictor.logits(prompts[:1]), "batch": predictor.logits(prompts),
            "greedy": [r.token_ids for r in predictor.generate(prompts, max_new_tokens=32)]}


def plain(predictor):
    """The predictor with every device-specific kernel (a layer's `fused`, the CPU operators) swapped
    for the plain path. The CPU operators are switched off for the whole process: the NPU run does
    not use them anyway."""
    cpu_ops.available = lambda: False
    for layer in predictor.model.sublayers():
        if getattr(layer, "fused", None) is not None:
            layer.fused = None
    return predictor


def main(model_dir: str):
    paddle = device.import_paddle()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s", force=True)
    observed = {"custom_device_types": paddle.device.get_all_custom_device_type(),
                "auto": device.resolve("auto")}

    # The CPU reference runs first: a predictor computes on the current device, so once the NPU
    # predictor exists the CPU one would quietly run on npu:1 too.
    reference = ErniePredictor.from_pretrained(model_dir, device="cpu", dtype="float32")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, reference.config.vocab_size, n).tolist() for n in (48, 29)]
    cpu_kernels = reference.logits(prompts)
    # The plugin runs Paddle's CPU kernels, so the NPU run must equal exactly a CPU run that takes
    # the same (plain) path; the CPU's own fused kernels only round differently.
    cpu = run(plain(reference), prompts)
    predictor = ErniePredictor.from_pretrained(model_dir, device="npu:1", dtype="float32")
    npu = run(predictor, prompts)

    observed.update(
        parameter_places=sorted({str(p.place) for p in predictor.model.parameters()}),
        parameter_bytes=sum(int(p.numel()) * 4 for p in predictor.model.parameters()),
        peak_memory_npu1=device.peak_memory("npu:1"),
        logits_max_diff={k: float(np.abs(cpu[k] - npu[k]).max()) for k in ("long", "batch")},
        logits_max_diff_cpu_kernels=float(np.abs(cpu_kernels - npu["batch"]).max()),
        greedy_cpu=cpu["greedy"], greedy_npu=npu["greedy"])
    print(json.dumps(observed))


if __name__ == "__main__":
    main(sys.argv[1])
