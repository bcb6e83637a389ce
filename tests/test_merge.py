"""fourbit merge: adapters made by peft itself, tiny random Llamas, real bitsandbytes NF4."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import make_tiny_llama
from fourbit.cli import main
from fourbit.errors import FourbitError
from fourbit.export.adapter import load_adapter, nf4_roundtrip
from fourbit.export.merge import merge_adapter, parse_size

QUANT = {"bits": 4, "type": "nf4", "double_quant": True, "blocksize": 64, "compute_dtype": "bfloat16"}


def make_peft_adapter(base_dir, out_dir, r=8, alpha=16, targets="all-linear", seed=1, **extra):
    """A PEFT LoRA adapter with random non-zero B (peft initialises B to 0), plus fourbit's quant key."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                                             task_type="CAUSAL_LM", **extra))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(out_dir)
    path = os.path.join(out_dir, "adapter_config.json")
    cfg = json.load(open(path))
    cfg["fourbit"] = {"quant": QUANT}
    json.dump(cfg, open(path, "w"))
    return str(out_dir)


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    return make_peft_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "adapter")


@pytest.fixture(scope="module")
def batch(smol_tokenizer):
    msgs = [[{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4, of course."}],
            [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]]
    texts = [smol_tokenizer.apply_chat_template(m, tokenize=False) for m in msgs]
    return smol_tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def logits_of(model, batch):
    with torch.no_grad():
        return model(**batch).logits.float()


def test_merge_original_matches_peft(tiny_model_dir, adapter_dir, batch, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    res = merge_adapter(adapter_dir, str(tmp_path / "m"), base="original")
    assert res.merged_tensors == 2 * 7 and res.base == "original"
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                    adapter_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(res.out_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    want, got = logits_of(ref, batch), logits_of(merged, batch)
    change = (want - logits_of(base, batch)).abs().max().item()
    err = (want - got).abs().max().item()
    # the only difference is the bf16 rounding of the merged weights (measured ~2e-3 on this model)
    assert change > 0.05, "the adapter must actually change the logits"
    assert err < 1e-2 and err < change / 10, (err, change)


def test_dequantized_base_is_what_bitsandbytes_loads(tiny_model_dir, adapter_dir, batch, tmp_path):
    """The NF4 round trip matches transformers+bitsandbytes bit for bit, and the merge matches 4-bit + adapter."""
    import bitsandbytes.functional as bnbf
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)
    q = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=qcfg, dtype=torch.bfloat16)
    w = load_file(os.path.join(tiny_model_dir, "model.safetensors"))["model.layers.1.mlp.down_proj.weight"]
    p = q.model.layers[1].mlp.down_proj.weight
    assert torch.equal(nf4_roundtrip(w, QUANT), bnbf.dequantize_4bit(p.data, p.quant_state).to(torch.bfloat16))

    res = merge_adapter(adapter_dir, str(tmp_path / "m"), base="dequantized")
    ref = PeftModel.from_pretrained(q, adapter_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(res.out_dir, dtype=torch.bfloat16).eval()
    orig = AutoModelForCausalLM.from_pretrained(merge_adapter(adapter_dir, str(tmp_path / "o"), base="original")
                                                .out_dir, dtype=torch.bfloat16).eval()
    want = logits_of(ref, batch)
    err_deq = (logits_of(merged, batch) - want).abs().max().item()
    err_orig = (logits_of(orig, batch) - want).abs().max().item()
    assert err_deq < 0.1 and err_deq < err_orig / 3, (err_deq, err_orig)


def test_output_folder_is_a_normal_transformers_model(adapter_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    res = merge_adapter(adapter_dir, str(tmp_path / "m"), max_shard_size="50KB")
    files = set(os.listdir(res.out_dir))
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "model.safetensors.index.json"} <= files
    index = json.load(open(os.path.join(res.out_dir, "model.safetensors.index.json")))
    assert res.shards > 2 and len(set(index["weight_map"].values())) == res.shards
    assert "quantization_config" not in json.load(open(os.path.join(res.out_dir, "config.json")))
    tok = AutoTokenizer.from_pretrained(res.out_dir)
    gen = GenerationConfig.from_pretrained(res.out_dir)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert tok.convert_tokens_to_ids("<|im_end|>") in eos and "<|im_end|>" in tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(res.out_dir)
    assert model.dtype == torch.bfloat16 and not any(n.endswith("weight_format") for n, _ in model.named_parameters())


def test_scale_rslora_and_alpha_pattern(tiny_model_dir, tmp_path):
    d = make_peft_adapter(tiny_model_dir, tmp_path / "a", r=4, alpha=8, targets=["q_proj", "v_proj"],
                          use_rslora=True, alpha_pattern={"v_proj": 2})
    a = load_adapter(d)
    assert a.layers["model.layers.0.self_attn.q_proj.weight"].scale == pytest.approx(8 / 2)
    assert a.layers["model.layers.0.self_attn.v_proj.weight"].scale == pytest.approx(2 / 2)
    assert len(a.layers) == 4


def test_nan_in_merged_weight_names_the_tensor(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    d = make_peft_adapter(tiny_model_dir, tmp_path / "a", targets=["q_proj"])
    path = os.path.join(d, "adapter_model.safetensors")
    sd = load_file(path)
    key = next(k for k in sd if "layers.1" in k and "lora_B" in k)
    sd[key][0, 0] = float("nan")
    save_file(sd, path)
    with pytest.raises(FourbitError, match=r"model\.layers\.1\.self_attn\.q_proj\.weight.*NaN"):
        merge_adapter(d, str(tmp_path / "m"))
    assert not os.path.exists(tmp_path / "m")


def test_user_errors(tiny_model_dir, adapter_dir, smol_tokenizer_dir, tmp_path):
    with pytest.raises(FourbitError, match="does not exist"):
        load_adapter(str(tmp_path / "nope"))
    with pytest.raises(FourbitError, match="model folder"):
        load_adapter(tiny_model_dir)
    other = make_tiny_llama(tmp_path / "other", smol_tokenizer_dir, hidden=32, heads=2, kv_heads=1)
    with pytest.raises(FourbitError, match="trained on another model"):
        merge_adapter(adapter_dir, str(tmp_path / "m"), model=other)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(FourbitError, match="not empty"):
        merge_adapter(adapter_dir, str(tmp_path / "busy"))
    assert main(["merge", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2


def test_cli_run_folder_with_drift(tiny_model_dir, adapter_dir, tmp_path, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(adapter_dir, run / "adapter")
    cfg = json.load(open(run / "adapter" / "adapter_config.json"))
    cfg["base_model_name_or_path"] = "no/such-model"  # the run config's `model` wins
    json.dump(cfg, open(run / "adapter" / "adapter_config.json", "w"))
    (run / "config.yaml").write_text(f"model: {tiny_model_dir}\ndata:\n  eval: null\n")
    rows = [{"messages": [{"role": "user", "content": f"Count to {i}."},
                          {"role": "assistant", "content": " ".join(str(j) for j in range(i))}]} for i in range(2, 8)]
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["merge", str(run), "--out", str(tmp_path / "m"), "--eval-data", str(tmp_path / "eval.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "dequantized base (default)" in out and "mean next-token KL" in out
    kl = float(out.split("mean next-token KL ")[1].split()[0])
    assert 0 <= kl < 1e-2, out


def test_parse_size():
    assert parse_size("2GB") == 2_000_000_000 and parse_size("1MiB") == 2 ** 20 and parse_size("10kb") == 10_000
    with pytest.raises(FourbitError):
        parse_size("big")


PEAK_SCRIPT = """
import sys, torch, safetensors, transformers
from fourbit.export import merge, adapter
adapter.nf4_roundtrip(torch.randn(64, 64, dtype=torch.bfloat16), {})  # load bitsandbytes' library first
def status(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # Linux: reset the peak (VmHWM) to the current RSS
before = status("VmRSS:")
merge.merge_adapter(sys.argv[1], sys.argv[2], base=sys.argv[3], max_shard_size="16MB", log=lambda s: None)
print(before, status("VmHWM:"))
"""


@pytest.mark.parametrize("base", ["original", "dequantized"])
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_streaming_peak_memory(tmp_path_factory, tmp_path, base):
    """A ~280 MB model in 16 MB shards merges with peak RSS growth of a few shards, not the model size."""
    from transformers import LlamaConfig, LlamaForCausalLM
    root = tmp_path_factory.getbasetemp() / "bigmodel"
    if not (root / "adapter").exists():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1536, num_hidden_layers=48,
                          num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(root / "model", max_shard_size="16MB")
        make_peft_adapter(root / "model", root / "adapter", targets=["q_proj", "down_proj"], r=4)
    model_bytes = sum(os.path.getsize(root / "model" / f) for f in os.listdir(root / "model")
                      if f.endswith(".safetensors"))
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(root / "adapter"), str(tmp_path / "m"), base],
                         capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    before, after = map(int, out.stdout.split()[-2:])
    growth = after - before
    print(f"model {model_bytes / 1e6:.0f} MB, peak RSS growth {growth / 1e6:.0f} MB ({base})")
    assert len([f for f in os.listdir(root / "model") if f.endswith(".safetensors")]) > 8
    assert growth < model_bytes / 4, (growth, model_bytes)
