"""`ernie-paddle deploy` sizes tensor parallelism from the weights: the parameter count against
transformers' own models, FastDeploy's published recipes for 300B-A47B, a given size that cannot hold
the weights refused in one line, the CPU memory note; an --out that cannot be made; the XPU wint4 row
of docs/deployment.md against the rules."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from conftest import save_tiny_moe_pt, save_tiny_pt
from ernie_paddle import cli, deploy

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("render_configs", ROOT / "tools" / "render_configs.py")
render_configs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(render_configs)

# ERNIE-4.5-300B-A47B: the 21B-A3B stand-in (transformers' Ernie4_5_MoeConfig shape) scaled to the published model.
ERNIE_300B_A47B = {
    **render_configs.ERNIE_21B_A3B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 54,
    "num_attention_heads": 64, "num_key_value_heads": 8, "tie_word_embeddings": False,
    "extra": {**render_configs.ERNIE_21B_A3B["extra"], "moe_num_shared_experts": 0, "moe_layer_start_index": 3,
              "moe_layer_end_index": 53, "moe_intermediate_size": 3584, "moe_k": 8}}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for layout in ("pt", "paddle"):
        render_configs.write_stand_in(root / f"300b-{layout}", layout, ERNIE_300B_A47B)
        render_configs.write_stand_in(root / f"21b-{layout}", layout, render_configs.ERNIE_21B_A3B)
    # ERNIE-4.5-300B-A47B-W4A8C8-TP4-Paddle: quantized before publishing, served on 4 GPUs.
    w4a8 = {"quantization": "mix_quant", "moe_quant_type": "w4a8", "dense_quant_type": "wint8",
            "kv_cache_quant_type": "int8"}
    render_configs.write_stand_in(root / "300b-w4a8", "paddle", {
        **ERNIE_300B_A47B, "extra": {**ERNIE_300B_A47B["extra"], "quantization_config": w4a8}})
    unknown = {**w4a8, "moe_quant_type": "w9"}
    render_configs.write_stand_in(root / "300b-w9", "paddle", {
        **ERNIE_300B_A47B, "extra": {**ERNIE_300B_A47B["extra"], "quantization_config": unknown}})
    render_configs.write_stand_in(root / "0.3b-pt", "pt")
    return root


def run(capsys, engine, model: Path, out: Path, *flags):
    code = cli.main(["deploy", engine, "--model", str(model), "--out", str(out), "--no-port-check", *flags])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def plan(engine, model: Path, *flags, **options):
    """The plan with options the CLI does not (yet) spell: tensor_parallel_size None is "not given"."""
    args = cli._parser().parse_args(["deploy", engine, "--model", str(model), "--out", "unused",
                                     "--no-port-check", *flags])
    for name, value in options.items():
        setattr(args, name, value)
    return deploy.plan_deployment(args)


def one_error_line(code, err) -> str:
    assert code == 2 and err.count("\n") == 1 and err.startswith("ernie-paddle deploy: error: "), err
    return err


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_parameter_count_equals_transformers_model(tmp_path, kind):
    """The count deploy reads from config.json equals the parameters of the transformers model built
    from it (norms and the routers' correction biases aside), experts and an untied lm_head included."""
    save = save_tiny_moe_pt if kind == "moe" else save_tiny_pt
    model = save(tmp_path / "m", tie_word_embeddings=False, **({"moe_num_shared_experts": 2} if kind == "moe" else {}))
    expected = sum(p.numel() for name, p in model.named_parameters()
                   if "norm" not in name and "e_score_correction_bias" not in name)
    memory = plan("vllm", tmp_path / "m", "--dtype", "float32").memory
    assert memory.parameters == expected
    assert memory.weights == 4 * expected  # float32, unquantized


@pytest.mark.parametrize("model,parameters", [("300b-pt", 299.4e9), ("21b-pt", 21.8e9), ("0.3b-pt", 0.36e9)])
def test_published_models_counted_at_their_size(models, model, parameters):
    memory = plan("fastdeploy", models / model, "--quantization", "wint4", tensor_parallel_size=None).memory
    assert memory.parameters == pytest.approx(parameters, rel=0.01)


ONE = ["--tensor-parallel-size", "1"]


@pytest.mark.parametrize("flags,fix", [
    (["--quantization", "wint4", *ONE], "use --tensor-parallel-size 4 (FastDeploy's published recipe for "
                                        "ERNIE-4.5-300B-A47B with wint4 on gpu)"),
    (["--quantization", "wint8", *ONE], "use --tensor-parallel-size 8 (FastDeploy's published recipe"),
    (["--quantization", "block_wise_fp8", *ONE], "use --tensor-parallel-size 8"),
    (["--quantization", "wint4", "--tensor-parallel-size", "2"], "use --tensor-parallel-size 4"),
    ([], "use --quantization wint8 (tensor parallel 8), wint4 (4) or block_wise_fp8 (8)"),
    (["--quantization", "wint8", "--device", "xpu", *ONE], "use --tensor-parallel-size 8 (FastDeploy's published "
                                                           "recipe for ERNIE-4.5-300B-A47B with wint8 on xpu)"),
])
def test_given_tensor_parallel_that_cannot_hold_the_weights_is_refused(capsys, models, tmp_path, flags, fix):
    code, _, err = run(capsys, "fastdeploy", models / "300b-paddle", tmp_path / "d", *flags)
    err = one_error_line(code, err)
    assert "ERNIE-4.5-300B-A47B (299B parameters, " in err and fix in err
    assert "GB assumed per device" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags, tensor_parallel", [
    (["--quantization", "wint4"], 4), (["--quantization", "wint8"], 8),
    (["--quantization", "wint8", "--device-memory-gb", "141"], 4),  # no recipe for that memory: computed
])
def test_the_command_line_sizes_300b_when_no_size_is_given(capsys, models, tmp_path, flags, tensor_parallel):
    code, _, err = run(capsys, "fastdeploy", models / "300b-paddle", tmp_path / "d", *flags)
    assert code == 0, err
    written = "\n".join(p.read_text() for p in (tmp_path / "d").iterdir() if p.suffix in (".yaml", ".sh"))
    assert re.search(rf"tensor[_-]parallel[_-]size\W+{tensor_parallel}\b", written), written


def test_vllm_serves_300b_unquantized_so_no_node_holds_it(capsys, models, tmp_path):
    code, _, err = run(capsys, "vllm", models / "300b-pt", tmp_path / "d", "--tensor-parallel-size", "8")
    err = one_error_line(code, err)
    assert "599 GB of weights in bfloat16" in err and "`ernie-paddle deploy fastdeploy --quantization wint4`" in err


@pytest.mark.parametrize("model,flags,tp", [
    ("300b-paddle", ["--quantization", "wint4"], 4), ("300b-paddle", ["--quantization", "wint8"], 8),
    ("300b-paddle", ["--quantization", "block_wise_fp8"], 8),
    ("300b-pt", ["--quantization", "wint4", "--device", "xpu"], 4),
    ("300b-paddle", ["--quantization", "wint8", "--device", "dcu", "--max-num-batched-tokens", "32768"], 8),
    ("300b-paddle", ["--quantization", "wint8", "--device", "iluvatar", "--max-model-len", "8192"], 16),
    ("21b-paddle", ["--quantization", "wint8", "--device", "iluvatar", "--max-model-len", "8192"], 4),
    ("21b-pt", ["--quantization", "wint4"], 1), ("21b-pt", [], 1), ("0.3b-pt", [], 1),
])
def test_tensor_parallel_not_given_follows_the_published_recipe(models, model, flags, tp):
    chosen = plan("fastdeploy", models / model, *flags, tensor_parallel_size=None)
    assert chosen.settings["tensor_parallel_size"] == tp
    if tp > 1:
        assert any(note.startswith(f"Tensor parallel {tp} (FastDeploy's published recipe for ")
                   for note in chosen.notes)
        assert any(note.startswith("Memory: ") and "GB assumed per device" in note for note in chosen.notes)


@pytest.mark.parametrize("quantization,tp", [("wint4", 4), ("wint8", 8), ("block_wise_fp8", 8)])
def test_computed_size_agrees_with_the_recipes(models, quantization, tp):
    """With the recipes off (a device memory given), the estimate alone reaches the published sizes on 80 GB."""
    chosen = plan("fastdeploy", models / "300b-paddle", "--quantization", quantization,
                  tensor_parallel_size=None, device_memory_gb=80)
    assert chosen.settings["tensor_parallel_size"] == tp
    assert any("the fewest gpu devices that hold" in note for note in chosen.notes)


def test_smaller_devices_need_more_of_them(models):
    assert plan("fastdeploy", models / "300b-paddle", "--quantization", "wint4", tensor_parallel_size=None,
                device_memory_gb=40).settings["tensor_parallel_size"] == 8
    assert plan("fastdeploy", models / "21b-paddle", "--quantization", "wint8", tensor_parallel_size=None,
                device_memory_gb=24).settings["tensor_parallel_size"] == 2  # FastDeploy's table: A10 24GB, 2


def test_nothing_on_one_node_holds_300b_in_bf16(models):
    with pytest.raises(deploy.ErnieError, match=r"does not fit on one node: at tensor parallel 8 each gpu needs "
                                                r"\d+ GB .*; use --quantization wint8 \(tensor parallel 8\)"):
        plan("fastdeploy", models / "300b-paddle", tensor_parallel_size=None)
    # FastDeploy 2.1 splits the KV heads (TP at most 8 for 8 KV heads): the Iluvatar recipe's 16 is out of reach
    with pytest.raises(deploy.ErnieError, match="at tensor parallel 8 each iluvatar needs"):
        plan("fastdeploy", models / "300b-paddle", "--fastdeploy-version", "2.1", "--device", "iluvatar",
             "--quantization", "wint8", "--max-model-len", "8192", tensor_parallel_size=None)


def test_given_size_below_the_recipe_that_fits_is_noted(capsys, models, tmp_path):
    code, _, err = run(capsys, "fastdeploy", models / "300b-paddle", tmp_path / "d", "--device", "xpu",
                       "--quantization", "wint4", "--tensor-parallel-size", "2")
    assert code == 0, err
    readme = (tmp_path / "d" / "README.md").read_text()
    assert "FastDeploy's published recipe for ERNIE-4.5-300B-A47B with wint4 on xpu uses tensor parallel 4" in readme


def test_vllm_cpu_states_the_ram_it_needs(capsys, models, tmp_path):
    code, out, err = run(capsys, "vllm", models / "300b-pt", tmp_path / "d", "--device", "cpu")
    assert code == 0 and "tensor parallel 1" in out
    note = ("vLLM on CPU keeps ERNIE-4.5-300B-A47B (299B parameters, 1198 GB of weights in float32) and 14 GB of "
            "KV cache in the serving machine's RAM, about 1212 GB in all; deploy cannot check that machine.")
    assert err == f"note: Memory: {note}\n"
    assert f"- Memory: {note}" in (tmp_path / "d" / "README.md").read_text()
    code, _, err = run(capsys, "vllm", models / "300b-pt", tmp_path / "share", "--device", "cpu",
                       "--gpu-memory-utilization", "0.5")
    assert code == 0 and "and takes 0.5 of that RAM for the KV cache" in err


@pytest.mark.parametrize("out,message", [
    ("afile/x", "--out {tmp}/afile/x: {tmp}/afile is a file, not a directory; choose another --out"),
    ("afile/deeper/x", "{tmp}/afile is a file, not a directory"),
    ("/proc/nope", "/proc/nope: cannot create it (No such file or directory); choose a writable place for --out"),
])
def test_out_that_cannot_be_made_is_one_error_line(capsys, models, tmp_path, out, message):
    (tmp_path / "afile").write_text("")
    code, _, err = run(capsys, "vllm", models / "0.3b-pt", tmp_path / out)
    assert message.format(tmp=tmp_path) in one_error_line(code, err)
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


def test_out_parents_are_made_and_nothing_else_left(capsys, models, tmp_path):
    assert run(capsys, "vllm", models / "0.3b-pt", tmp_path / "a" / "b" / "d")[0] == 0
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["d"]
    assert oct((tmp_path / "a" / "b" / "d" / "launch.sh").stat().st_mode & 0o777) == "0o755"


def test_docs_table_puts_xpu_wint4_for_moe_where_the_rules_do(capsys, models, tmp_path):
    """docs/deployment.md's release table names XPU wint4 (MoE models only) in the first release that
    accepts it; FastDeploy 2.0's Kunlun docs already serve 300B-A47B in WINT4."""
    accepted = [version for version in deploy.FASTDEPLOY
                if run(capsys, "fastdeploy", models / "21b-paddle", tmp_path / version, "--device", "xpu",
                       "--quantization", "wint4", "--fastdeploy-version", version)[0] == 0]
    assert accepted == list(deploy.FASTDEPLOY)
    assert one_error_line(*run(capsys, "fastdeploy", models / "0.3b-pt", tmp_path / "dense", "--device", "xpu",
                               "--quantization", "wint4")[::2])
    rows = re.findall(r"^\| FastDeploy (\d\.\d)[^|]*\|[^|]*\|[^|]*\|([^|]*)\|$",
                      (ROOT / "docs" / "deployment.md").read_text(), re.M)
    first = next(version for version, quantization in rows if re.search(r"xpu:[^;]*wint4", quantization))
    assert first == accepted[0]


def test_chosen_tensor_parallel_writes_the_published_configs(tmp_path):
    """configs/ stays as it is when deploy chooses the tensor-parallel size itself (every reference
    deployment that does not name one is a one-device recipe)."""
    for model, (values, layout, targets) in render_configs.MODELS.items():
        source = tmp_path / "models" / model
        render_configs.write_stand_in(source, layout, values)
        for name, (engine, device, quantization, flags) in targets.items():
            committed = ROOT / "configs" / model / name
            if "--tensor-parallel-size" in flags or not committed.exists():
                continue
            chosen = plan(engine, source, "--model-ref", f"baidu/{model}", "--device", device, "--quantization",
                          quantization, *flags, tensor_parallel_size=None)
            out = deploy.write_deployment(chosen, tmp_path / model / name)
            for file in committed.iterdir():
                assert (out / file.name).read_text() == file.read_text(), f"{model}/{name}/{file.name}"


def test_a_checkpoint_quantized_before_publishing_is_sized_by_its_own_quantization(capsys, models, tmp_path):
    code, _, err = run(capsys, "fastdeploy", models / "300b-w4a8", tmp_path / "given", "--tensor-parallel-size", "4")
    assert code == 0, err
    memory = plan("fastdeploy", models / "300b-w4a8", tensor_parallel_size=None).memory
    assert memory.served_as == "its own w4a8 / wint8" and memory.fits(4) and not memory.fits(2)
    code, _, err = run(capsys, "fastdeploy", models / "300b-w9", tmp_path / "unknown")
    assert 'deploy does not know the size of "w9" weights' in one_error_line(code, err)


@pytest.mark.parametrize("engine, flags, message", [
    ("fastdeploy", ["--device-memory-gb", "0"], "--device-memory-gb 0.0: must be a positive number of GB"),
    ("fastdeploy", ["--device-memory-gb", "nan"], "--device-memory-gb nan: must be a positive number of GB"),
    ("vllm", ["--device", "cpu", "--device-memory-gb", "16"], "--device-memory-gb 16.0: not for --device cpu"),
])
def test_bad_device_memory_is_one_error_line(capsys, models, tmp_path, engine, flags, message):
    code, _, err = run(capsys, engine, models / "300b-pt", tmp_path / "d", "--quantization", "wint4", *flags) \
        if engine == "fastdeploy" else run(capsys, engine, models / "300b-pt", tmp_path / "d", *flags)
    assert message in one_error_line(code, err)


def test_a_refused_size_points_to_device_memory_when_it_assumed_it(capsys, models, tmp_path):
    code, _, err = run(capsys, "fastdeploy", models / "300b-paddle", tmp_path / "d", "--quantization", "wint4",
                       "--tensor-parallel-size", "2")
    assert "(or, with devices that hold more, --device-memory-gb)" in one_error_line(code, err)
    assert run(capsys, "fastdeploy", models / "300b-paddle", tmp_path / "e", "--quantization", "wint4",
               "--tensor-parallel-size", "2", "--device-memory-gb", "141")[0] == 0
