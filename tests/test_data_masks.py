"""Assistant-only masks for several chat-template families, each built here on a real tokenizer.

For every template we check the exact trained text: every assistant reply with its end-of-turn token,
and nothing of the prompt or the generation header (`<|im_start|>assistant\\n` etc.).
"""
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from fourbit.config import DataConfig
from fourbit.data import CHATML, build_examples, get_chat_template
from fourbit.data.render import encode
from fourbit.data.validate import Sample
from fourbit.errors import DataError

CONV = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4."}]

LLAMA3 = ("{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\\n\\n' %}"
         "{% set loop_messages = messages[1:] %}{% else %}{% set prefix = '' %}{% set loop_messages = messages %}"
         "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate') }}{% endif %}{% if message['role'] == 'assistant' %}"
         "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + "
         "'\\n' + (prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
# Mistral v0.3 style: the system prompt goes into the *last* user turn, so prefixes are not stable.
MISTRAL = ("{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
           "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
           "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
           "{%- if loop.last and system_message is defined %}"
           "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
           "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
           "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}{%- endif %}"
           "{%- endfor %}")
QWEN25 = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
          "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a "
          "helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{%- if message.role == 'user' "
          "or message.role == 'assistant' %}{{- '<|im_start|>' + message.role + '\\n' + message.content + "
          "'<|im_end|>\\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
          "{%- endif %}")
# Qwen3 style: the last assistant turn carries an (empty) think block, earlier turns are rendered without it.
QWEN3 = ("{%- for message in messages %}{%- if message.role == 'assistant' %}{%- if loop.last %}"
         "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message.content + '<|im_end|>\\n' }}"
         "{%- else %}{{- '<|im_start|>assistant\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
         "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
         "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
CHATML_GEN = ("{%- for message in messages %}{%- if message['role'] == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
              "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}{%- else %}"
              "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
              "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def variant(tok_dir, template, specials=(), bos=None, eos=None):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.add_tokens([AddedToken(s, special=True, normalized=False) for s in specials], special_tokens=True)
    if bos:
        tok.bos_token = bos
    if eos:
        tok.eos_token = eos
    tok.chat_template = template
    return tok


def sentencepiece_like(template):
    """A Metaspace (SentencePiece-style) BPE tokenizer trained here, like Llama-2/Mistral's."""
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    corpus = [m["content"] for m in CONV] * 20 + [
        "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789!?.+"]
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>",
                                                                                       "[INST]", "[/INST]"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = template
    return tok


def trained_runs(tok, ids, labels):
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != -100:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def masks(tok, conv=CONV, train_on="assistant", last_turn_only=False, template=None):
    tmpl = template or get_chat_template(tok, None)
    ids, labels = encode(Sample(messages=conv), tok, tmpl, train_on, last_turn_only)
    assert len(ids) == len(labels) and labels[0] == -100
    return ids, labels


def test_chatml_smollm2(smol_tokenizer):
    ids, labels = masks(smol_tokenizer)
    assert trained_runs(smol_tokenizer, ids, labels) == ["Hello! How can I help?<|im_end|>", "It is 4.<|im_end|>"]
    # same tokens as transformers' own tokenization of the rendered chat
    ref = smol_tokenizer.apply_chat_template(CONV, tokenize=True, return_dict=True)["input_ids"]
    assert ids == list(ref)
    assert smol_tokenizer.convert_tokens_to_ids("<|im_end|>") in [lab for lab in labels if lab != -100]


def test_llama3(smol_tokenizer_dir):
    tok = variant(smol_tokenizer_dir, LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                               "<|eot_id|>"], bos="<|begin_of_text|>", eos="<|eot_id|>")
    ids, labels = masks(tok)
    assert trained_runs(tok, ids, labels) == ["Hello! How can I help?<|eot_id|>", "It is 4.<|eot_id|>"]
    assert ids[0] == tok.convert_tokens_to_ids("<|begin_of_text|>")


def test_gemma(smol_tokenizer_dir):
    tok = variant(smol_tokenizer_dir, GEMMA, ["<bos>", "<start_of_turn>", "<end_of_turn>"], bos="<bos>")
    ids, labels = masks(tok)
    assert trained_runs(tok, ids, labels) == ["Hello! How can I help?<end_of_turn>", "It is 4.<end_of_turn>"]
    assert "Be brief.\n\nHi there" in tok.decode(ids)             # system merged into the first user turn


def test_mistral_sentencepiece_system_in_last_user_turn():
    tok = sentencepiece_like(MISTRAL)
    ids, labels = masks(tok)
    runs = [r.strip() for r in trained_runs(tok, ids, labels)]
    assert runs == ["Hello! How can I help?</s>", "It is 4.</s>"]
    no_system = masks(tok, CONV[1:])
    assert [r.strip() for r in trained_runs(tok, *no_system)] == runs
    prompt_tokens = {tok.convert_tokens_to_ids(t) for t in ("[INST]", "[/INST]")}
    assert not prompt_tokens & {lab for lab in labels if lab != -100}


def test_qwen25_default_system(smol_tokenizer_dir):
    tok = variant(smol_tokenizer_dir, QWEN25)
    ids, labels = masks(tok, CONV[1:])
    assert "You are Qwen" in tok.decode(ids)
    assert trained_runs(tok, ids, labels) == ["Hello! How can I help?<|im_end|>", "It is 4.<|im_end|>"]


def test_qwen3_history_rewritten(smol_tokenizer_dir):
    tok = variant(smol_tokenizer_dir, QWEN3, ["<think>", "</think>"])
    ids, labels = masks(tok)
    assert trained_runs(tok, ids, labels) == ["Hello! How can I help?<|im_end|>",
                                              "<think>\n\n</think>\n\nIt is 4.<|im_end|>"]


def test_generation_markers_template(smol_tokenizer_dir):
    tok = variant(smol_tokenizer_dir, CHATML_GEN)
    ids, labels = masks(tok)
    assert trained_runs(tok, ids, labels) == ["Hello! How can I help?<|im_end|>", "It is 4.<|im_end|>"]


def test_last_turn_only_and_train_on_all(smol_tokenizer):
    ids, labels = masks(smol_tokenizer, last_turn_only=True)
    assert trained_runs(smol_tokenizer, ids, labels) == ["It is 4.<|im_end|>"]
    ids, labels = masks(smol_tokenizer, train_on="all")
    assert labels[0] == -100 and labels[1:] == ids[1:]


def test_prompt_completion_and_text_masks(smol_tokenizer):
    tok = smol_tokenizer
    ids, labels = encode(Sample(prompt="Translate: chat ->", completion=" cat", kind="prompt_completion"),
                         tok, None, "assistant", False)
    assert trained_runs(tok, ids, labels) == [" cat" + tok.eos_token]
    assert tok.decode(ids) == "Translate: chat -> cat" + tok.eos_token
    ids, labels = encode(Sample(prompt="A", completion=" b", kind="prompt_completion"), tok, None, "all", False)
    assert labels[1:] == ids[1:]
    ids, labels = encode(Sample(completion="Plain text here.", kind="text"), tok, None, "assistant", False)
    assert labels[0] == -100 and labels[1:] == ids[1:] and ids[-1] == tok.eos_token_id


def test_alpaca_masks_prompt(tmp_path, smol_tokenizer, monkeypatch):
    monkeypatch.setenv("FOURBIT_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "a.jsonl"
    f.write_text('{"instruction": "Add", "input": "2 and 2", "output": "4"}\n')
    (ex,), rep = build_examples(str(f), smol_tokenizer, DataConfig())
    assert rep.format == "alpaca"
    assert trained_runs(smol_tokenizer, ex.input_ids, ex.labels) == ["4<|im_end|>"]
    assert "Add\n\n2 and 2" in smol_tokenizer.decode(ex.input_ids)


def test_no_template_error_and_chatml_option(tmp_path, smol_tokenizer_dir, monkeypatch):
    monkeypatch.setenv("FOURBIT_CACHE", str(tmp_path / "cache"))
    tok = variant(smol_tokenizer_dir, None)
    tok.chat_template = None
    f = tmp_path / "chat.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}\n')
    with pytest.raises(DataError, match="no chat template.*data.chat_template: chatml"):
        build_examples(str(f), tok, DataConfig())
    assert get_chat_template(tok, "chatml") == CHATML
    (ex,), rep = build_examples(str(f), tok, DataConfig(chat_template="chatml"))
    assert rep.template == "chatml"
    assert trained_runs(tok, ex.input_ids, ex.labels) == ["Yo<|im_end|>"]
    jinja = tmp_path / "t.jinja"
    jinja.write_text(LLAMA3)
    assert get_chat_template(tok, str(jinja)) == LLAMA3
    with pytest.raises(DataError, match="not `chatml`, not an existing file"):
        get_chat_template(tok, "llama3")


def test_non_special_end_of_turn_is_noted(tmp_path, monkeypatch):
    monkeypatch.setenv("FOURBIT_CACHE", str(tmp_path / "cache"))
    tok = sentencepiece_like(None)
    f = tmp_path / "chat.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}\n')
    _, rep = build_examples(str(f), tok, DataConfig(chat_template="chatml"))
    assert any("not a special token" in n for n in rep.notes)
