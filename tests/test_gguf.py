"""fourbit export gguf: tiny random Llama / Qwen2 / Mistral, read back by transformers' GGUF reader
(an independent reader) and, where llama-cpp-python is installed, run by llama.cpp itself."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fourbit.cli import main
from fourbit.errors import FourbitError
from fourbit.export.gguf import export_gguf
from fourbit.export.gguf_lora import export_gguf_lora
from fourbit.export.merge import merge_adapter
from test_merge import make_peft_adapter

PROMPT = [{"role": "user", "content": "Hello there! What is 12 + 30, and why?"}]
SAMPLE = "Hello world, the quick fox: 12345  ünïcode\n<|im_start|>user\nhi<|im_end|>"


@pytest.fixture(scope="module")
def merged_dir(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    adapter = make_peft_adapter(tiny_model_dir, root / "adapter")
    return merge_adapter(adapter, str(root / "merged"), base="original", log=lambda s: None).out_dir


def hf_logits(model_dir, ids, **kw):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def prompt_ids(model_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def check_roundtrip(model_dir, gguf_file, tol, tokenizer=True):
    """Logits and tokenizer of the GGUF file, read by transformers, against the source folder."""
    from transformers import AutoTokenizer
    folder, name = os.path.split(gguf_file)
    ids = prompt_ids(model_dir)
    want, got = hf_logits(model_dir, ids), hf_logits(folder, ids, gguf_file=name)
    err = (want - got).abs().max().item()
    assert err <= tol, (err, tol)
    if not tokenizer:
        return err
    tok, gtok = AutoTokenizer.from_pretrained(model_dir), AutoTokenizer.from_pretrained(folder, gguf_file=name)
    assert gtok.chat_template == tok.chat_template and gtok.eos_token == tok.eos_token
    assert gtok(SAMPLE, add_special_tokens=False).input_ids == tok(SAMPLE, add_special_tokens=False).input_ids
    return err


def fields(gguf_file):
    from gguf import GGUFReader
    r = GGUFReader(gguf_file)
    big = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")
    return {k: f.contents() for k, f in r.fields.items() if k not in big}, {t.name: t for t in r.tensors}


@pytest.mark.parametrize("out_type,tol", [("bf16", 1e-5), ("f16", 1e-3), ("q8_0", 0.05)])
def test_llama_roundtrip_through_transformers(merged_dir, tmp_path, out_type, tol):
    res = export_gguf(merged_dir, str(tmp_path / f"m-{out_type}.gguf"), out_type)
    err = check_roundtrip(merged_dir, res.path, tol, tokenizer=out_type == "bf16")  # same metadata for all types
    meta, tensors = fields(res.path)
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.eos_token_id"] == 2 and meta["tokenizer.ggml.eot_token_id"] == 2  # <|im_end|>
    assert meta["tokenizer.ggml.bos_token_id"] == 1 and meta["tokenizer.ggml.padding_token_id"] == 2
    assert "<|im_end|>" in meta["tokenizer.chat_template"] and "output.weight" not in tensors  # tied
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert tensors["blk.1.ffn_down.weight"].tensor_type.name == out_type.upper()
    print(f"{out_type}: max |logit diff| {err:.2e}")


def test_qwen2_with_biases(smol_tokenizer_dir, tmp_path):
    """Qwen2 (no q/k permutation, attention biases, its own pre-tokenizer regex), untied head."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer
    smol = json.load(open(os.path.join(smol_tokenizer_dir, "tokenizer.json")))
    tok = Qwen2Tokenizer(vocab=smol["model"]["vocab"], merges=[tuple(m) for m in smol["model"]["merges"]],
                         unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = AutoTokenizer.from_pretrained(smol_tokenizer_dir).chat_template
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    d = str(tmp_path / "qwen")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    res = export_gguf(d, str(tmp_path / "q.gguf"), "bf16")
    check_roundtrip(d, res.path, 1e-5)
    meta, tensors = fields(res.path)
    assert meta["general.architecture"] == "qwen2" and meta["tokenizer.ggml.pre"] == "qwen2"
    assert "blk.0.attn_q.bias" in tensors and "output.weight" in tensors


def make_sentencepiece_dir(tmp_path):
    """A small SentencePiece BPE vocabulary (byte fallback) trained here, as a Llama-style tokenizer.json."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["The quick brown fox jumps over the lazy dog.", "Hello world, tiny corpus 12345.",
                                 "Mistral uses SentencePiece with byte fallback; [INST] and [/INST] mark turns."] * 60))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    merges = []
    for i in sorted(range(sp.vocab_size()), key=lambda i: -sp.get_score(i)):
        piece = sp.id_to_piece(i)
        if sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) or len(piece) < 2:
            continue
        split = next((k for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab), None)
        if split:
            merges.append((piece[:split], piece[split:]))
    tok = LlamaTokenizer(vocab=vocab, merges=merges)
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} "
                         "[/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    return tok


def test_mistral_sentencepiece(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM
    tok = make_sentencepiece_dir(tmp_path)
    cfg = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, sliding_window=None)
    torch.manual_seed(0)
    d = str(tmp_path / "tiny-mistral")
    MistralForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d)
    tok.save_pretrained(d)
    res = export_gguf(d, str(tmp_path / "m.gguf"), "f16")
    meta, _ = fields(res.path)
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.model"] == "llama"
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_token_id and meta["tokenizer.ggml.add_space_prefix"]
    ids = prompt_ids(d)
    folder, name = os.path.split(res.path)
    assert (hf_logits(d, ids) - hf_logits(folder, ids, gguf_file=name)).abs().max() < 1e-3
    from transformers import AutoTokenizer
    gtok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    text = "Hello world, the quick fox 12345 ü"  # ü is not in the vocabulary: byte fallback
    assert gtok(text).input_ids == tok(text).input_ids and gtok.chat_template == tok.chat_template


def test_cli_exports_a_run_folder_and_errors(tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    make_peft_adapter(tiny_model_dir, run / "adapter")
    (run / "config.yaml").write_text(f"model: {tiny_model_dir}\n")
    assert main(["export", "gguf", str(run), "--type", "q8_0"]) == 0
    assert os.path.isfile(run / "model-q8_0.gguf") and "wrote" in capsys.readouterr().out
    assert main(["export", "gguf", str(run), "--adapter-only", "--type", "f16"]) == 0
    assert os.path.isfile(run / "adapter-f16.gguf")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(FourbitError, match="model_type is `gpt2`"):
        export_gguf(str(tmp_path / "gpt2"), str(tmp_path / "x.gguf"))
    assert main(["export", "gguf", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_adapter_only_holds_the_lora(tiny_model_dir, tmp_path):
    """lora_a/lora_b read back equal the adapter's A and B (B's q/k rows permuted), alpha as trained."""
    from fourbit.export.adapter import load_adapter
    from fourbit.export.gguf_arch import permute_rows
    d = make_peft_adapter(tiny_model_dir, tmp_path / "a", r=8, alpha=16)
    res = export_gguf_lora(d, str(tmp_path / "lora.gguf"), "f16")
    meta, tensors = fields(res.path)
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora" and meta["adapter.lora.alpha"] == 16
    layer = load_adapter(d).layers["model.layers.1.self_attn.k_proj.weight"]
    a = np.asarray(tensors["blk.1.attn_k.weight.lora_a"].data, dtype=np.float32)
    b = np.asarray(tensors["blk.1.attn_k.weight.lora_b"].data, dtype=np.float32)
    assert np.allclose(a, layer.A.numpy(), atol=1e-3)
    assert np.allclose(b, permute_rows(layer.B.numpy(), 2), atol=1e-3)
    assert not np.allclose(b, layer.B.numpy(), atol=1e-3)


LLAMA_CPP = """
import json, sys, numpy as np
from llama_cpp import Llama
spec = json.loads(sys.argv[1])
llm = Llama(model_path=spec["model"], lora_path=spec.get("lora"), n_ctx=256, n_threads=1, logits_all=True,
            verbose=False)
ids = spec["ids"]
assert llm.tokenize(spec["text"].encode(), add_bos=False, special=True) == ids, "tokenizer differs"
llm.eval(ids)
np.save(spec["out"], np.array(llm.scores[:len(ids)]))
llm.reset()
gen = []
for t in llm.generate(ids, temp=0.0, top_k=1):
    gen.append(int(t))
    if len(gen) == 12 or t == llm.token_eos():
        break
print(json.dumps({"gen": gen, "eos": llm.token_eos(), "template": llm.metadata.get("tokenizer.chat_template")}))
"""


def run_llama_cpp(tmp_path, **spec):
    """llama.cpp in a subprocess (a crash in native code must not take pytest down)."""
    spec["out"] = str(tmp_path / "scores.npy")
    out = subprocess.run([sys.executable, "-c", LLAMA_CPP, json.dumps(spec)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return np.load(spec["out"]), json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(__import__("importlib").util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
@pytest.mark.parametrize("out_type", ["bf16", "f16"])
def test_llama_cpp_runs_the_export(merged_dir, tiny_model_dir, tmp_path, out_type):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(merged_dir)
    text = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    want = hf_logits(merged_dir, ids).numpy()
    greedy = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()

    merged = export_gguf(merged_dir, str(tmp_path / "m.gguf"), out_type).path
    scores, info = run_llama_cpp(tmp_path, model=merged, ids=ids, text=text)
    assert np.abs(scores - want).max() < 2e-2
    assert info["gen"] == greedy and info["eos"] == tok.eos_token_id and info["template"] == tok.chat_template

    base = export_gguf(tiny_model_dir, str(tmp_path / "base.gguf"), out_type).path
    adapter = os.path.join(os.path.dirname(merged_dir), "adapter")
    lora = export_gguf_lora(adapter, str(tmp_path / "lora.gguf"), "f16").path
    scores, _ = run_llama_cpp(tmp_path, model=base, lora=lora, ids=ids, text=text)
    assert np.abs(scores - want).max() < 2e-2
