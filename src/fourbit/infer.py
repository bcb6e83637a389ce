"""Use a model: load base (+ adapter) for inference, generate, chat, held-out loss.

`--model` may be a base model (hub id or folder), a merged model folder, or a run folder (its
config names the base and its adapter/ is attached). The base loads in 4-bit when the adapter was
trained on a 4-bit base (so you chat with exactly what was trained), else in 16-bit; `--quant`
overrides. Generation goes through the chat template and stops at the end-of-turn token.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import torch

from .config import QuantConfig
from .errors import FourbitError

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


def resolve_model_and_adapter(model: str, adapter: Optional[str]) -> tuple[str, Optional[str], Optional[dict]]:
    """(base model, adapter folder or None, the run's quant settings or None) from CLI arguments."""
    run_cfg = os.path.join(model, "config.yaml")
    if os.path.isdir(model) and os.path.isfile(run_cfg) and not os.path.isfile(os.path.join(model, "config.json")):
        from .safety import safe_yaml_load
        cfg = safe_yaml_load(run_cfg)
        adapter = adapter or os.path.join(model, "adapter")
        if not os.path.isdir(adapter):
            raise FourbitError(f"Run folder `{model}` has no adapter/ yet (did training finish?). "
                               "Pass --adapter with a checkpoint's adapter folder instead.")
        return cfg["model"], adapter, cfg.get("quant")
    quant = None
    if adapter:
        from .lora import read_adapter_config
        quant = (read_adapter_config(adapter).get("fourbit") or {}).get("quant")
    return model, adapter, quant


def load_for_inference(model: str, adapter: Optional[str] = None, quant: str = "auto", device: str = "auto",
                       trust_remote_code: bool = False):
    """(model, tokenizer) ready for generation, adapter attached."""
    from .lora import load_adapter
    from .model import load_base, load_tokenizer, resolve_device
    base, adapter, trained_quant = resolve_model_and_adapter(model, adapter)
    dev = resolve_device(device)
    if quant == "auto":
        qcfg = QuantConfig(**{k: v for k, v in trained_quant.items() if k in QuantConfig.__dataclass_fields__}) \
            if trained_quant and trained_quant.get("bits") else None
    elif quant == "4":
        qcfg = QuantConfig()
    else:
        qcfg = None
    if qcfg is None:
        compute = (trained_quant or {}).get("compute_dtype", "bfloat16")
        qcfg = QuantConfig(bits=None, compute_dtype=compute)
    tok = load_tokenizer(adapter if adapter and os.path.isfile(os.path.join(adapter, "tokenizer_config.json")) else base,
                         trust_remote_code)
    m = load_base(base, qcfg, dev, trust_remote_code)
    if adapter:
        load_adapter(m, adapter)
    if dev.type == "cpu" and qcfg.bits == 4:
        # per-token dequantization dominates CPU generation; the dequantized weights are the exact
        # values the 4-bit forward uses, so answers are unchanged
        materialize_4bit(m)
    m.eval()
    m.config.use_cache = True
    return m, tok


def materialize_4bit(model: "torch.nn.Module") -> int:
    """Replace every 4-bit base weight by its dequantized 16-bit copy, for fast CPU inference.

    The values are exactly those the 4-bit forward computes (dequantization is deterministic), so
    outputs do not change; only memory (16-bit instead of 4-bit) and speed (no per-token
    dequantization) do. Returns the number of layers converted.
    """
    import torch.nn as nn

    from .lora import LoRALinear, _set_module, dequantize, is_4bit
    n = 0
    for name, m in list(model.named_modules()):
        if name.endswith(".base_layer") or not is_4bit(m.base_layer if isinstance(m, LoRALinear) else m):
            continue                                      # a LoRALinear's base is handled with its owner
        target = m.base_layer if isinstance(m, LoRALinear) else m
        dense = nn.Linear(target.in_features, target.out_features, bias=target.bias is not None,
                          device=target.weight.device, dtype=target.compute_dtype or torch.bfloat16)
        with torch.no_grad():
            dense.weight.copy_(dequantize(target))
            if target.bias is not None:
                dense.bias.copy_(target.bias)
        dense.requires_grad_(False)
        if isinstance(m, LoRALinear):
            m.base_layer = dense
        else:
            _set_module(model, name, dense)
        n += 1
    return n


def stop_ids(tokenizer, model=None) -> list[int]:
    """Token ids that end a reply: eos, the template's end-of-turn token, the generation config's eos."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    for t in END_OF_TURN:
        if t in vocab and (t in (tokenizer.chat_template or "") or t == tokenizer.eos_token):
            ids.add(vocab[t])
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(ids)


def _prompt_ids(tokenizer, messages: list[dict], template: Optional[str]) -> torch.Tensor:
    from .data import get_chat_template
    tmpl = get_chat_template(tokenizer, template)
    ids = tokenizer.apply_chat_template(messages, chat_template=tmpl, add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return torch.tensor([list(ids)], dtype=torch.long)


@torch.no_grad()
def generate_reply(model, tokenizer, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0,
                   top_p: float = 1.0, chat_template: Optional[str] = None, stream: bool = False,
                   raw: bool = False) -> str:
    """The assistant's reply to `messages` (greedy when temperature is 0), optionally streamed to stdout."""
    from transformers import TextStreamer
    if raw:
        ids = tokenizer(messages[-1]["content"], return_tensors="pt").input_ids
    else:
        ids = _prompt_ids(tokenizer, messages, chat_template)
    ids = ids.to(model.device)
    kw = dict(max_new_tokens=max_new_tokens, eos_token_id=stop_ids(tokenizer, model),
              pad_token_id=tokenizer.pad_token_id, attention_mask=torch.ones_like(ids), use_cache=True)
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if stream:
        kw["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = model.generate(ids, **kw)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


@torch.no_grad()
def heldout_loss(model, tokenizer, examples: list, micro_batch_size: int = 8, max_batches: int = 0) -> float:
    """Token-weighted mean next-token CE over `examples` (fourbit data Examples) on trained tokens.

    Batches are formed from length-sorted examples (less padding); `max_batches` > 0 stops early.
    """
    from .data import collate
    from .train.loss import causal_lm_loss
    was = model.training
    model.eval()
    total, n_total = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    for k, i in enumerate(range(0, len(order), micro_batch_size)):
        if max_batches and k >= max_batches:
            break
        b = collate([examples[j] for j in order[i:i + micro_batch_size]], tokenizer.pad_token_id)
        b = {k: v.to(model.device) for k, v in b.items()}
        ls, n = causal_lm_loss(model, b)
        total, n_total = total + float(ls), n_total + n
    model.train(was)
    if n_total == 0:
        raise FourbitError("The held-out set has no trainable tokens; nothing to measure.")
    return total / n_total


def _load_from_args(a):
    return load_for_inference(a.model, a.adapter, a.quant, a.device, a.trust_remote_code)


def _messages(system: Optional[str]) -> list[dict]:
    return [{"role": "system", "content": system}] if system else []


def generate_cmd(a) -> int:
    """`fourbit generate`: stream the reply to one prompt."""
    model, tok = _load_from_args(a)
    generate_reply(model, tok, _messages(a.system) + [{"role": "user", "content": a.prompt}], a.max_new_tokens,
                   a.temperature, a.top_p, a.chat_template, stream=True, raw=a.raw)
    return 0


def chat_cmd(a) -> int:
    """`fourbit chat`: an interactive conversation; /reset clears it, /exit or Ctrl-D leaves."""
    model, tok = _load_from_args(a)
    history = _messages(a.system)
    print("fourbit chat: type a message; /reset clears the conversation, /exit quits.", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = _messages(a.system)
            continue
        history.append({"role": "user", "content": text})
        print("assistant> ", end="", flush=True)
        reply = generate_reply(model, tok, history, a.max_new_tokens, a.temperature, a.top_p, a.chat_template,
                               stream=True)
        history.append({"role": "assistant", "content": reply})
