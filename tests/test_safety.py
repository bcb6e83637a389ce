"""fourbit.safety: malicious pickles and YAML never run, names never leave their folder."""
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from fourbit.errors import FourbitError
from fourbit.safety import (check_adapter_config, check_no_pickle_payload, check_remote_code, read_json,
                            read_safetensors, safe_join, safe_torch_load, safe_yaml_load)


class _Evil:
    """Unpickling this runs `touch MARKER`."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("fmt", ["torch_zip", "raw_pickle"])
@pytest.mark.parametrize("ext", [".bin", ".pt", ".ckpt", ".pkl"])
def test_malicious_pickle_is_refused_without_running(tmp_path, fmt, ext):
    marker = tmp_path / "PWNED"
    path = tmp_path / f"adapter_model{ext}"
    payload = {"lora_A": torch.zeros(2, 2), "x": _Evil(marker)}
    if fmt == "torch_zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(FourbitError) as e:
        check_no_pickle_payload(str(path))
    msg = str(e.value)
    assert str(path) in msg and "pickled code" in msg and "GLOBAL" in msg
    assert "system" in msg  # names the callable it tried to import
    assert not marker.exists()


def test_plain_tensor_pickle_is_accepted(tmp_path):
    path = tmp_path / "opt.pt"
    torch.save({"state": {0: {"step": 3, "exp_avg": torch.ones(3)}},
                "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]}, path)
    check_no_pickle_payload(str(path))
    assert safe_torch_load(str(path))["state"][0]["step"] == 3
    check_no_pickle_payload(str(tmp_path / "whatever.safetensors"))  # not a pickle extension: nothing to do


def test_truncated_torch_file_names_it(tmp_path):
    path = tmp_path / "optimizer.pt"
    torch.save({"a": torch.arange(1000)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(FourbitError, match="optimizer.pt.*truncated or corrupt"):
        safe_torch_load(str(path))


def test_safe_join(tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "sub").mkdir()
    assert safe_join(str(root), "sub/a.safetensors") == os.path.join(str(root), "sub/a.safetensors")
    for bad in ["../x", "sub/../../x", "/etc/passwd", "", "a\\..\\b", "a\x00b", "C:/x"]:
        with pytest.raises(FourbitError) as e:
            safe_join(str(root), bad)
        assert repr(bad) in str(e.value) and str(root) in str(e.value)
    outside = tmp_path / "secret"
    outside.mkdir()
    os.symlink(outside, root / "link")
    with pytest.raises(FourbitError, match="symlink"):
        safe_join(str(root), "link/id_rsa")
    os.symlink(root / "sub", root / "inner")  # a symlink that stays inside is fine
    safe_join(str(root), "inner/x")


def test_read_safetensors_truncated_and_garbage(tmp_path):
    good = tmp_path / "adapter_model.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(good))
    assert read_safetensors(str(good))["w"].shape == (64, 64)
    data = good.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(FourbitError, match="trunc.safetensors.*truncated or not a valid"):
        read_safetensors(str(trunc))
    short_header = tmp_path / "head.safetensors"
    short_header.write_bytes(data[:20])
    with pytest.raises(FourbitError, match="head.safetensors"):
        read_safetensors(str(short_header))
    pkl = tmp_path / "pickle.safetensors"
    torch.save({"w": torch.ones(2)}, pkl)
    with pytest.raises(FourbitError, match="pickle.safetensors"):
        read_safetensors(str(pkl))
    with pytest.raises(FourbitError, match="does not exist"):
        read_safetensors(str(tmp_path / "nope.safetensors"))


def test_yaml_python_tags_refused(tmp_path):
    marker = tmp_path / "PWNED"
    bad = tmp_path / "evil.yaml"
    bad.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(FourbitError) as e:
        safe_yaml_load(str(bad))
    assert "evil.yaml" in str(e.value) and "Refused" in str(e.value)
    assert not marker.exists()
    obj = tmp_path / "obj.yaml"
    obj.write_text("x: !!python/object:collections.OrderedDict {}\n")
    with pytest.raises(FourbitError, match="obj.yaml"):
        safe_yaml_load(str(obj))
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1, 2\n")
    with pytest.raises(FourbitError, match="broken.yaml.*not valid YAML"):
        safe_yaml_load(str(broken))
    ok = tmp_path / "ok.yaml"
    ok.write_text("train: {lr: 0.001}\n")
    assert safe_yaml_load(str(ok)) == {"train": {"lr": 0.001}}


def test_read_json_names_file(tmp_path):
    p = tmp_path / "adapter_config.json"
    p.write_text("{not json")
    with pytest.raises(FourbitError, match="adapter_config.json.*not valid JSON"):
        read_json(str(p))


PEFT_CFG = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "bias": "none",
            "target_modules": ["q_proj", "v_proj"], "modules_to_save": None, "task_type": "CAUSAL_LM",
            "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "megatron_config": None,
            "megatron_core": "megatron.core", "auto_mapping": None, "rank_pattern": {}, "alpha_pattern": {}}


def test_adapter_config_accepts_peft_layout(tmp_path):
    assert check_adapter_config(dict(PEFT_CFG), str(tmp_path))["r"] == 8
    check_adapter_config({**PEFT_CFG, "target_modules": "all-linear"}, str(tmp_path))
    check_adapter_config({**PEFT_CFG, "target_modules": ["model.layers.0.self_attn.q_proj"],
                          "rank_pattern": {"q_proj": 4}}, str(tmp_path))


@pytest.mark.parametrize("change,word", [
    ({"target_modules": ["../../etc/passwd"]}, "target_modules"),
    ({"target_modules": ["q_proj/x"]}, "target_modules"),
    ({"target_modules": [".*proj"]}, "target_modules"),
    ({"target_modules": []}, "target_modules"),
    ({"modules_to_save": ["lm_head", "/abs"]}, "modules_to_save"),
    ({"r": 0}, "`r`"), ({"r": "8"}, "`r`"), ({"r": 10**9}, "`r`"), ({"r": True}, "`r`"),
    ({"lora_alpha": float("nan")}, "lora_alpha"), ({"lora_alpha": -1}, "lora_alpha"),
    ({"lora_dropout": 1.5}, "lora_dropout"),
    ({"peft_type": "IA3"}, "peft_type"),
    ({"megatron_core": "os"}, "megatron_core"),
    ({"megatron_config": {"x": 1}}, "megatron_config"),
    ({"auto_mapping": {"parent_library": "os; rm -rf /"}}, "auto_mapping"),
    ({"trust_remote_code": True}, "trust_remote_code"),
    ({"rank_pattern": {"../x": 4}}, "rank_pattern"),
])
def test_adapter_config_refusals(tmp_path, change, word):
    with pytest.raises(FourbitError) as e:
        check_adapter_config({**PEFT_CFG, **change}, str(tmp_path))
    assert word in str(e.value) and os.path.join(str(tmp_path), "adapter_config.json") in str(e.value)


def test_remote_code_needs_opt_in():
    cfg = {"model_type": "custom", "auto_map": {"AutoModelForCausalLM": "modeling_x.X"}}
    with pytest.raises(FourbitError, match="trust_remote_code: true"):
        check_remote_code(cfg, False, "someone/model")
    check_remote_code(cfg, True, "someone/model")
    check_remote_code({"model_type": "llama"}, False, "x")


def test_json_roundtrip_peft_file(tmp_path):
    p = tmp_path / "adapter_config.json"
    p.write_text(json.dumps(PEFT_CFG))
    assert check_adapter_config(read_json(str(p)), str(tmp_path))["target_modules"] == ["q_proj", "v_proj"]
