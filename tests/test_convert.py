"""The converters on real checkpoints written by transformers: exact round trips, the published -Paddle
layout, transformers logits, verify, and every bad input leaving nothing behind."""

from __future__ import annotations

import io
import json
import os
import pickle
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import save_tiny_moe_pt, save_tiny_pt
from converters.cli import main
from converters.convert import paddle2pt, pt2paddle, verify
from ernie_paddle.checkpoint import INDEX_FILE, Checkpoint, write_safetensors

H, I, NH, NKV, D, V = 64, 96, 4, 2, 16, 211


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    made = {
        "bf16": (root / "bf16-PT", save_tiny_pt(root / "bf16-PT", seed=1, dtype="bfloat16")),
        "fp32": (root / "fp32-PT", save_tiny_pt(root / "fp32-PT", seed=2)),
        "sharded": (root / "sharded-PT", save_tiny_pt(root / "sharded-PT", seed=3, dtype="bfloat16",
                                                      max_shard_size="40KB")),
        "untied": (root / "untied-PT", save_tiny_pt(root / "untied-PT", seed=4, tie_word_embeddings=False)),
        "moe": (root / "moe-PT", save_tiny_moe_pt(root / "moe-PT", seed=5)),
    }
    pt2paddle(made["bf16"][0], root / "bf16-Paddle", progress=False)
    return {k: v[0] for k, v in made.items()} | {"paddle": root / "bf16-Paddle", "torch": {k: v[1] for k, v in made.items()}}


def tensors(directory) -> dict:
    """name -> (dtype, shape, raw bytes); U16 counts as bf16, as the layouts define."""
    ckpt = Checkpoint(directory)
    try:
        return {n: (ckpt.dtype(n), ckpt.tensors[n].shape, ckpt.get(n).tobytes()) for n in ckpt.names}
    finally:
        ckpt.close()


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_failed_cleanly(code, err, dst: Path, *phrases):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convert: error: "), err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    assert not dst.exists()
    assert not dst.parent.exists() or not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]


def test_importable_without_paddle_or_torch():
    code = ("import sys, converters.convert, converters.cli, converters.mapping; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('paddle', 'torch', 'transformers')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("which", ["bf16", "sharded", "untied", "moe"])
def test_pt_to_paddle_and_back_is_bit_exact(models, tmp_path, which):
    src = models[which]
    pt2paddle(src, tmp_path / "P", progress=False)
    paddle2pt(tmp_path / "P", tmp_path / "PT", progress=False)
    assert tensors(tmp_path / "PT") == tensors(src)
    assert sorted(p.name for p in (tmp_path / "P").glob("*.safetensors")) == \
        sorted(p.name for p in src.glob("*.safetensors"))


def test_sharded_paddle_to_pt_and_back_is_bit_exact(models, tmp_path):
    pt2paddle(models["sharded"], tmp_path / "P", progress=False)
    paddle2pt(tmp_path / "P", tmp_path / "PT", progress=False)
    pt2paddle(tmp_path / "PT", tmp_path / "P2", progress=False)
    assert tensors(tmp_path / "P2") == tensors(tmp_path / "P")
    assert len(list((tmp_path / "P2").glob("*.safetensors"))) == len(list(models["sharded"].glob("*.safetensors")))


@pytest.mark.parametrize("which", ["bf16", "untied", "moe"])
def test_paddle_to_pt_and_back_is_bit_exact(models, tmp_path, which):
    # Paddle writers store bf16 as U16 with {"format": "np"}: start from such a file.
    pt2paddle(models[which], tmp_path / "made", progress=False)
    paddle = tmp_path / "P"
    paddle.mkdir()
    (paddle / "config.json").write_text((tmp_path / "made" / "config.json").read_text())
    ckpt = Checkpoint(tmp_path / "made")
    entries = [(n, "uint16" if ckpt.dtype(n) == "bfloat16" else ckpt.dtype(n), ckpt.tensors[n].shape,
                lambda n=n: ckpt.get(n)) for n in ckpt.names]
    write_safetensors(paddle / "model.safetensors", entries, {"format": "np"})
    paddle2pt(paddle, tmp_path / "PT", progress=False)
    pt2paddle(tmp_path / "PT", tmp_path / "P2", progress=False)
    assert tensors(tmp_path / "P2") == tensors(paddle)


def test_paddle_output_is_the_published_layout(models, tmp_path):
    model = models["torch"]["fp32"]
    pt2paddle(models["fp32"], tmp_path / "P", progress=False)
    ckpt = Checkpoint(tmp_path / "P")
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    layer = "model.layers.1"
    expected = {
        "ernie.embed_tokens.weight": sd["model.embed_tokens.weight"],
        "ernie.layers.1.self_attn.qkv_proj.weight": np.concatenate(
            [sd[f"{layer}.self_attn.{p}_proj.weight"].T for p in "qkv"], axis=1),
        "ernie.layers.1.self_attn.o_proj.weight": sd[f"{layer}.self_attn.o_proj.weight"].T,
        "ernie.layers.1.mlp.up_gate_proj.weight": np.concatenate(
            [sd[f"{layer}.mlp.gate_proj.weight"].T, sd[f"{layer}.mlp.up_proj.weight"].T], axis=1),
        "ernie.layers.1.mlp.down_proj.weight": sd[f"{layer}.mlp.down_proj.weight"].T,
        "ernie.layers.1.post_attention_layernorm.weight": sd[f"{layer}.post_attention_layernorm.weight"],
        "ernie.norm.weight": sd["model.norm.weight"],
    }
    for name, array in expected.items():
        np.testing.assert_array_equal(ckpt.get(name), array, err_msg=name)
    assert ckpt.tensors["ernie.layers.0.self_attn.qkv_proj.weight"].shape == (H, (NH + 2 * NKV) * D)
    assert ckpt.tensors["ernie.layers.0.mlp.up_gate_proj.weight"].shape == (H, 2 * I)
    assert "lm_head.weight" not in ckpt.names  # tied: the embedding is the head
    assert ckpt.metadata == {"format": "np"}
    config = json.loads((tmp_path / "P" / "config.json").read_text())
    assert config["dtype"] == "float32" and "torch_dtype" not in config
    assert config["architectures"] == ["Ernie4_5_ForCausalLM"]
    for key in ("rope_theta", "rms_norm_eps", "tie_word_embeddings", "num_key_value_heads", "head_dim"):
        assert key in config


def test_untied_lm_head_is_transposed(models, tmp_path):
    pt2paddle(models["untied"], tmp_path / "P", progress=False)
    head = models["torch"]["untied"].lm_head.weight.detach().numpy()
    np.testing.assert_array_equal(Checkpoint(tmp_path / "P").get("lm_head.weight"), head.T)


def test_round_trip_loads_in_transformers_with_identical_logits(models, tmp_path):
    import torch
    from transformers import Ernie4_5ForCausalLM

    pt2paddle(models["fp32"], tmp_path / "P", progress=False)
    paddle2pt(tmp_path / "P", tmp_path / "PT", progress=False)
    config = json.loads((tmp_path / "PT" / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and "dtype" not in config
    assert config["architectures"] == ["Ernie4_5ForCausalLM"]
    ids = torch.tensor([[1, 5, 17, 42, 99, 3, 150]])
    loaded = Ernie4_5ForCausalLM.from_pretrained(tmp_path / "PT").eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, models["torch"]["fp32"](ids).logits)


def test_moe_layout_and_logits(models, tmp_path):
    import torch
    from transformers import Ernie4_5_MoeForCausalLM

    pt2paddle(models["moe"], tmp_path / "P", progress=False)
    ckpt = Checkpoint(tmp_path / "P")
    assert ckpt.tensors["ernie.layers.1.mlp.gate.weight"].shape == (H, 4)
    assert ckpt.dtype("ernie.layers.1.mlp.gate.weight") == "float32"
    assert ckpt.tensors["ernie.layers.1.mlp.moe_statics.e_score_correction_bias"].shape == (1, 4)
    assert ckpt.tensors["ernie.layers.1.mlp.experts.3.up_gate_proj.weight"].shape == (H, 2 * 32)
    assert ckpt.tensors["ernie.layers.1.mlp.shared_experts.down_proj.weight"].shape == (32, H)
    # A multi-token-prediction tensor (published -Paddle MoE files carry them) is skipped.
    entries = [(n, ckpt.dtype(n), ckpt.tensors[n].shape, lambda n=n: ckpt.get(n)) for n in ckpt.names]
    entries.append(("ernie.mtp_linear_proj.0.weight", "float32", (2 * H, H), lambda: np.ones((2 * H, H), np.float32)))
    (tmp_path / "P2").mkdir()
    (tmp_path / "P2" / "config.json").write_text((tmp_path / "P" / "config.json").read_text())
    write_safetensors(tmp_path / "P2" / "model.safetensors", entries, {"format": "np"})
    result = paddle2pt(tmp_path / "P2", tmp_path / "PT", progress=False)
    assert result.skipped == ["ernie.mtp_linear_proj.0.weight"]
    assert tensors(tmp_path / "PT") == tensors(models["moe"])
    ids = torch.tensor([[1, 5, 17, 42, 99, 3]])
    loaded = Ernie4_5_MoeForCausalLM.from_pretrained(tmp_path / "PT").eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, models["torch"]["moe"](ids).logits)


def test_dtype_option_casts_but_keeps_the_router_float32(models, tmp_path):
    import torch

    pt2paddle(models["moe"], tmp_path / "P", dtype="bfloat16", progress=False)
    ckpt = Checkpoint(tmp_path / "P")
    assert ckpt.dtype("ernie.layers.1.mlp.gate.weight") == "float32"
    assert ckpt.dtype("ernie.layers.1.mlp.moe_statics.e_score_correction_bias") == "float32"
    embed = models["torch"]["moe"].model.embed_tokens.weight.detach().to(torch.bfloat16)
    assert ckpt.get("ernie.embed_tokens.weight").tobytes() == embed.view(torch.int16).numpy().tobytes()
    assert json.loads((tmp_path / "P" / "config.json").read_text())["dtype"] == "bfloat16"


def test_max_shard_size_and_index(models, capsys, tmp_path):
    code, out, _ = run(capsys, "pt2paddle", models["bf16"], tmp_path / "P", "--max-shard-size", "30KB")
    assert code == 0 and "wrote" in out
    index = json.loads((tmp_path / "P" / INDEX_FILE).read_text())
    files = sorted(p.name for p in (tmp_path / "P").glob("*.safetensors"))
    assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
    ckpt = Checkpoint(tmp_path / "P")
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in ckpt.tensors.values())
    assert set(index["weight_map"]) == set(ckpt.names)
    assert all((tmp_path / "P" / f).stat().st_size < 30_000 + 4096 for f in files)


def test_verify_equal_and_one_element_differing(models, capsys, tmp_path):
    assert run(capsys, "verify", models["bf16"], models["paddle"])[0] == 0
    assert run(capsys, "verify", models["paddle"], models["bf16"])[0] == 0
    changed = tmp_path / "changed"
    changed.mkdir()
    (changed / "config.json").write_text((models["paddle"] / "config.json").read_text())
    ckpt = Checkpoint(models["paddle"])
    target = "ernie.layers.1.mlp.down_proj.weight"

    def tweak():
        array = ckpt.get(target).copy()
        array[3, 5] ^= 1  # one bit of one bf16 element
        return array

    entries = [(n, ckpt.dtype(n), ckpt.tensors[n].shape, tweak if n == target else lambda n=n: ckpt.get(n))
               for n in ckpt.names]
    write_safetensors(changed / "model.safetensors", entries, {"format": "np"})
    code, _, err = run(capsys, "verify", models["bf16"], changed)
    assert code == 1
    assert "model.layers.1.mlp.down_proj.weight" in err and "1 of" in err  # named in A's (-PT) layout
    assert verify(changed, models["paddle"], progress=False).difference.startswith(f"tensor {target!r}")
    assert "'lm_head.weight' is in" in verify(models["untied"], models["fp32"], progress=False).difference


def test_config_and_tokenizer_files_follow_the_target(models, tmp_path):
    src = tmp_path / "src"
    pt2paddle(models["bf16"], src, progress=False)
    config = json.loads((src / "config.json").read_text())
    config.update(fuse_rms_norm=True, use_flash_attention=False, max_sequence_length=4096, compression_ratio=1.0)
    (src / "config.json").write_text(json.dumps(config))
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Ernie4_5_Tokenizer", "legacy": True,
                                                           "auto_map": {"AutoTokenizer": ["x.Y", None]}}))
    (src / "tokenizer.model").write_bytes(b"sentencepiece")
    paddle2pt(src, tmp_path / "PT", progress=False)
    pt_config = json.loads((tmp_path / "PT" / "config.json").read_text())
    assert "fuse_rms_norm" not in pt_config and "dtype" not in pt_config
    assert pt_config["paddle_config"] == {"fuse_rms_norm": True, "use_flash_attention": False,
                                          "max_sequence_length": 4096}
    tokenizer = json.loads((tmp_path / "PT" / "tokenizer_config.json").read_text())
    assert tokenizer == {"tokenizer_class": "LlamaTokenizer", "legacy": True}
    assert (tmp_path / "PT" / "tokenizer.model").read_bytes() == b"sentencepiece"
    assert (tmp_path / "PT" / "generation_config.json").is_file()
    pt2paddle(tmp_path / "PT", tmp_path / "P", progress=False)
    back = json.loads((tmp_path / "P" / "config.json").read_text())
    assert back["fuse_rms_norm"] is True and back["max_sequence_length"] == 4096 and "paddle_config" not in back
    assert json.loads((tmp_path / "P" / "tokenizer_config.json").read_text())["tokenizer_class"] == "Ernie4_5_Tokenizer"


def test_progress_bar_shows_bytes_per_second_on_a_terminal(models, tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    pt2paddle(models["bf16"], tmp_path / "P")
    assert "pt2paddle P:" in terminal.getvalue() and "B/s" in terminal.getvalue()


def test_overwrite_replaces_dst(models, capsys, tmp_path):
    dst = tmp_path / "P"
    dst.mkdir()
    (dst / "stale.txt").write_text("old")
    assert run(capsys, "pt2paddle", models["bf16"], dst, "--overwrite")[0] == 0
    assert not (dst / "stale.txt").exists() and (dst / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["P"]


def test_pdparams_needs_allow_pickle(models, capsys, tmp_path):
    src = tmp_path / "pickled"
    src.mkdir()
    (src / "config.json").write_text((models["paddle"] / "config.json").read_text())
    ckpt = Checkpoint(models["paddle"])
    state = {n: ckpt.get(n).copy() for n in ckpt.names} | {"StructuredToParameterName@@": {}}
    (src / "model_state.pdparams").write_bytes(pickle.dumps(state, protocol=4))  # what paddle.save writes
    dst = tmp_path / "PT"
    code, _, err = run(capsys, "paddle2pt", src, dst)
    assert_failed_cleanly(code, err, dst, "--allow-pickle", "pdparams")
    assert run(capsys, "paddle2pt", src, dst, "--allow-pickle")[0] == 0
    assert tensors(dst) == tensors(models["bf16"])
    assert not list(dst.glob("*.pdparams"))


def test_pdparams_with_foreign_objects_is_refused(models, capsys, tmp_path):
    src = tmp_path / "hostile"
    src.mkdir()
    (src / "config.json").write_text((models["paddle"] / "config.json").read_text())
    (src / "model_state.pdparams").write_bytes(pickle.dumps({"ernie.norm.weight": Path("x")}))
    dst = tmp_path / "PT"
    code, _, err = run(capsys, "paddle2pt", src, dst, "--allow-pickle")
    assert_failed_cleanly(code, err, dst, "refusing to load pathlib")


def test_subprocess_entry_points(models, tmp_path):
    dst = tmp_path / "P"
    proc = subprocess.run([sys.executable, "-m", "converters", "pt2paddle", models["bf16"], dst],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    from ernie_paddle.cli import main as ernie_main
    assert ernie_main(["convert", "verify", str(dst), str(models["bf16"]), "--quiet"]) == 0


# Bad input: each one line on stderr, a non-zero exit and no DST.

def test_missing_src(capsys, tmp_path):
    dst = tmp_path / "out"
    code, _, err = run(capsys, "pt2paddle", tmp_path / "nope", dst)
    assert_failed_cleanly(code, err, dst, "nope", "no such")


def test_hub_id_offline(capsys, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the environment variable is read at import only
    monkeypatch.chdir(tmp_path)
    dst = tmp_path / "out"
    code, _, err = run(capsys, "pt2paddle", "no-such-org/ERNIE-4.5-test", dst)
    assert_failed_cleanly(code, err, dst, "no-such-org/ERNIE-4.5-test", "cannot be fetched", "local model directory")


def test_a_dst_holding_src_is_named_so(models, capsys, tmp_path):
    src = copy_model(models["bf16"], tmp_path / "model")
    code, _, err = run(capsys, "pt2paddle", src, tmp_path)
    assert_failed_cleanly(code, err, tmp_path / "none", "DST holds SRC", "choose a DST outside it")
    assert src.exists()


@pytest.mark.parametrize("size", ["0", "0KB", "0.0001B"])
def test_a_shard_size_of_nothing_is_refused(models, capsys, tmp_path, size):
    dst = tmp_path / "out"
    with pytest.raises(SystemExit) as exit:
        run(capsys, "pt2paddle", models["bf16"], dst, "--max-shard-size", size)
    assert exit.value.code == 2 and "is not a size a shard can have" in capsys.readouterr().err
    assert not dst.exists()


@pytest.mark.parametrize("size", ["-5GB", "-1"])
def test_a_negative_shard_size_is_named(models, capsys, tmp_path, size):
    dst = tmp_path / "out"
    with pytest.raises(SystemExit) as exit:  # argparse alone said only 'expected one argument'
        run(capsys, "pt2paddle", models["bf16"], dst, "--max-shard-size", size)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and f"argument --max-shard-size: '{size}' is not a size" in err, err
    assert not dst.exists()


def test_src_already_in_the_target_layout(models, capsys, tmp_path):
    dst = tmp_path / "out"
    code, _, err = run(capsys, "pt2paddle", models["paddle"], dst)
    assert_failed_cleanly(code, err, dst, "already in the -Paddle layout", "use `convert paddle2pt`")
    code, _, err = run(capsys, "paddle2pt", models["bf16"], dst)
    assert_failed_cleanly(code, err, dst, "already in the -PT layout", "use `convert pt2paddle`")


def copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_unknown_architecture(models, capsys, tmp_path):
    src = copy_model(models["bf16"], tmp_path / "llama")
    config = json.loads((src / "config.json").read_text())
    config.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (src / "config.json").write_text(json.dumps(config))
    dst = tmp_path / "out"
    code, _, err = run(capsys, "pt2paddle", src, dst)
    assert_failed_cleanly(code, err, dst, "config.json", "LlamaForCausalLM", "not ERNIE 4.5")


def test_untied_head_under_a_config_without_the_tie_key(models, capsys, tmp_path):
    """Paddle-side code defaults to untied: an [H, V] head must not be dropped as a tied copy."""
    paddle_dir = tmp_path / "untied-Paddle"
    pt2paddle(models["untied"], paddle_dir, progress=False)
    config = json.loads((paddle_dir / "config.json").read_text())
    del config["tie_word_embeddings"]
    (paddle_dir / "config.json").write_text(json.dumps(config))
    dst = tmp_path / "out"
    code, _, err = run(capsys, "paddle2pt", paddle_dir, dst)
    assert_failed_cleanly(code, err, dst, "lm_head.weight", "untied head", '"tie_word_embeddings": false')


def test_truncated_safetensors(models, capsys, tmp_path):
    src = copy_model(models["bf16"], tmp_path / "cut")
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    dst = tmp_path / "out"
    code, _, err = run(capsys, "pt2paddle", src, dst)
    assert_failed_cleanly(code, err, dst, "model.safetensors", "truncated")


def test_corrupt_safetensors_header(models, capsys, tmp_path):
    src = copy_model(models["bf16"], tmp_path / "corrupt")
    weights = src / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:20] = b"\x00garbage!!\xff\xfe"
    weights.write_bytes(bytes(data))
    dst = tmp_path / "out"
    code, _, err = run(capsys, "pt2paddle", src, dst)
    assert_failed_cleanly(code, err, dst, "model.safetensors", "corrupt")


def test_index_naming_a_missing_shard(models, capsys, tmp_path):
    src = copy_model(models["sharded"], tmp_path / "partial")
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.unlink()
    dst = tmp_path / "out"
    code, _, err = run(capsys, "pt2paddle", src, dst)
    assert_failed_cleanly(code, err, dst, INDEX_FILE, shard.name, "missing")


def test_index_naming_a_tensor_its_shard_lacks(models, capsys, tmp_path):
    src = copy_model(models["sharded"], tmp_path / "inconsistent")
    index = json.loads((src / INDEX_FILE).read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = sorted(index["weight_map"].values())[0]
    (src / INDEX_FILE).write_text(json.dumps(index))
    dst = tmp_path / "out"
    code, _, err = run(capsys, "pt2paddle", src, dst)
    assert_failed_cleanly(code, err, dst, INDEX_FILE, "model.layers.9.mlp.up_proj.weight", "does not hold it")


def test_shape_contradicting_config(models, capsys, tmp_path):
    src = copy_model(models["bf16"], tmp_path / "mismatch")
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = 128
    (src / "config.json").write_text(json.dumps(config))
    dst = tmp_path / "out"
    code, _, err = run(capsys, "pt2paddle", src, dst)
    assert_failed_cleanly(code, err, dst, "model.layers.0.mlp.down_proj.weight", "[64, 96]", "[64, 128]",
                          "config.json")
    bad = copy_model(models["paddle"], tmp_path / "mismatch-P")  # the -Paddle side checks too
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(config | {"num_key_value_heads": 4}))
    code, _, err = run(capsys, "paddle2pt", bad, dst)
    assert_failed_cleanly(code, err, dst, "ernie.layers.0.self_attn.qkv_proj.weight", "[64, 128]", "[64, 192]")


def test_dst_exists_without_overwrite(models, capsys, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "pt2paddle", models["bf16"], dst)
    assert code != 0 and err.startswith("convert: error: ") and "--overwrite" in err
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_disk_write_failure(models, tmp_path):
    # A real failing write: the file size limit makes write() fail with EFBIG, as a full disk does with ENOSPC.
    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))

    dst = tmp_path / "new" / "out"
    proc = subprocess.run([sys.executable, "-m", "converters", "pt2paddle", models["fp32"], dst],
                          capture_output=True, text=True, preexec_fn=limit_file_size,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert_failed_cleanly(proc.returncode, proc.stderr, dst, "writing failed", "File too large")
    assert not (tmp_path / "new").exists()


def rewritten(src: Path, dst: Path, drop=(), add=None, config=None) -> Path:
    """A copy of the one-file checkpoint `src` without the tensors `drop`, with the arrays `add` (name ->
    (dtype, array)) appended, and config.json updated with `config`."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    if config:
        (dst / "config.json").write_text(json.dumps(json.loads((src / "config.json").read_text()) | config))
    ckpt = Checkpoint(src)
    entries = [(n, ckpt.dtype(n), ckpt.tensors[n].shape, lambda n=n: ckpt.read(n)) for n in ckpt.names if n not in drop]
    entries += [(n, dtype, a.shape, lambda a=a: a) for n, (dtype, a) in (add or {}).items()]
    write_safetensors(dst / "model.safetensors", entries, ckpt.metadata)
    return dst


def one_bit_flipped(array: np.ndarray) -> np.ndarray:
    array = array.copy()
    array.view(f"u{array.itemsize}")[3, 5] ^= 1
    return array


def test_a_distinct_head_under_a_tied_config_is_refused(models, capsys, tmp_path):
    """transformers keeps such a head (and warns); dropping it as a tied copy would change the outputs."""
    pt = rewritten(models["untied"], tmp_path / "tied-PT", config={"tie_word_embeddings": True})
    dst = tmp_path / "out"
    code, _, err = run(capsys, "pt2paddle", pt, dst)
    assert code == 2
    assert_failed_cleanly(code, err, dst, str(pt / "model.safetensors"), "'lm_head.weight' differs from the embedding",
                          '"tie_word_embeddings": false')
    # A -Paddle copy one bit away from the embedding: compared bit for bit.
    embedding = Checkpoint(models["paddle"]).read("ernie.embed_tokens.weight")
    paddle = rewritten(models["paddle"], tmp_path / "tied-Paddle",
                       add={"lm_head.weight": ("bfloat16", one_bit_flipped(embedding))})
    code, _, err = run(capsys, "paddle2pt", paddle, dst)
    assert_failed_cleanly(code, err, dst, str(paddle / "model.safetensors"), "'lm_head.weight' differs")
    # verify cannot call them equal to a model that lost the head.
    for a, b in ((pt, models["untied"]), (models["bf16"], paddle), (paddle, models["bf16"])):
        code, out, err = run(capsys, "verify", a, b)
        assert code == 2 and out == "" and "'lm_head.weight' differs" in err


def test_a_tied_copy_equal_to_the_embedding_is_skipped(models, tmp_path):
    embedding = Checkpoint(models["bf16"]).read("model.embed_tokens.weight")
    pt = rewritten(models["bf16"], tmp_path / "copy-PT", add={"lm_head.weight": ("bfloat16", embedding)})
    result = pt2paddle(pt, tmp_path / "P", progress=False)
    assert result.skipped == ["lm_head.weight"]
    assert tensors(tmp_path / "P") == tensors(models["paddle"])
    widened = (embedding.astype(np.uint32) << 16).view(np.float32)  # the same values in float32
    paddle = rewritten(models["paddle"], tmp_path / "copy-Paddle", add={"lm_head.weight": ("float32", widened)})
    assert paddle2pt(paddle, tmp_path / "PT", progress=False).skipped == ["lm_head.weight"]
    assert tensors(tmp_path / "PT") == tensors(models["bf16"])
    assert verify(paddle, models["bf16"], progress=False).difference is None


EXPERT = [f"model.layers.1.mlp.experts.2.{p}_proj.weight" for p in ("gate", "up", "down")]


@pytest.mark.parametrize("which, drop, named", [
    ("moe", EXPERT, "'model.layers.1.mlp.experts.2.gate_proj.weight' (and 2 more) is missing"),
    ("moe", ["model.norm.weight", "model.layers.1.mlp.moe_statics.e_score_correction_bias"],
     "'model.layers.1.mlp.moe_statics.e_score_correction_bias' (and 1 more) is missing"),
    ("bf16", ["model.layers.0.self_attn.o_proj.weight"], "'model.layers.0.self_attn.o_proj.weight' is missing"),
    ("moe-Paddle", ["ernie.layers.1.mlp.experts.3.down_proj.weight"],
     "'ernie.layers.1.mlp.experts.3.down_proj.weight' is missing"),
    ("paddle", ["ernie.norm.weight"], "'ernie.norm.weight' is missing"),
])
def test_an_incomplete_checkpoint_is_refused_before_writing(models, capsys, tmp_path, which, drop, named):
    if which == "moe-Paddle":
        pt2paddle(models["moe"], tmp_path / "moe-Paddle", progress=False)
    src = rewritten(tmp_path / which if which == "moe-Paddle" else models[which], tmp_path / "incomplete", drop=drop)
    dst = tmp_path / "new" / "out"
    code, _, err = run(capsys, "paddle2pt" if "addle" in which else "pt2paddle", src, dst)
    assert code == 2
    assert_failed_cleanly(code, err, dst, f"{src}: tensor {named}", "config.json describes needs it")
    assert not dst.parent.exists()


def test_a_tensor_config_json_has_no_place_for_is_refused(models, capsys, tmp_path):
    extra = Checkpoint(models["moe"]).read("model.layers.1.mlp.experts.0.down_proj.weight")
    src = rewritten(models["moe"], tmp_path / "five-experts",
                    add={"model.layers.1.mlp.experts.4.down_proj.weight": ("float32", extra)})
    dst = tmp_path / "out"
    code, _, err = run(capsys, "pt2paddle", src, dst)
    assert_failed_cleanly(code, err, dst, "'model.layers.1.mlp.experts.4.down_proj.weight' has no place in the moe")
