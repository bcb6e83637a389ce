"""Config: YAML + overrides, unknown keys and wrong types named with the closest valid key, docs in sync."""
import os

import pytest

from fourbit.config import Config, config_markdown, dump_config, field_docs, load_config
from fourbit.errors import ConfigError


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_yaml_and_overrides(tmp_path):
    path = _write(tmp_path, "model: m\nlora: {r: 8, targets: [q_proj, v_proj]}\ntrain: {lr: 1.0e-4}\n")
    cfg = load_config(path, ["--train.lr=3e-4", "--lora.targets=q_proj,k_proj", "--quant.bits=none",
                             "--train.grad_checkpointing=false", "--output=runs/x"])
    assert cfg.lora.r == 8 and cfg.train.lr == 3e-4 and cfg.lora.targets == ["q_proj", "k_proj"]
    assert cfg.quant.bits is None and cfg.train.grad_checkpointing is False and cfg.output == "runs/x"
    assert cfg.quant.type == "nf4" and cfg.quant.double_quant and cfg.train.optimizer == "paged_adamw_32bit"


def test_bare_off_in_yaml_is_the_word_off(tmp_path):
    cfg = load_config(_write(tmp_path, "model: m\ntrain: {checkpointing_policy: off}\n"))
    assert cfg.train.checkpointing_policy == "off"
    assert load_config(None, ["--train.checkpointing_policy=off"], base={"model": "m"}).train.checkpointing_policy == "off"


def test_issue_example_config_parses(tmp_path):
    path = _write(tmp_path, """
model: HuggingFaceTB/SmolLM2-135M-Instruct
quant: {bits: 4, type: nf4, double_quant: true, compute_dtype: bfloat16}
lora: {r: 16, alpha: 32, dropout: 0.05, targets: all-linear}
data: {train: data/train.jsonl, eval: data/eval.jsonl, format: auto, max_length: 1024}
train: {lr: 2.0e-4, epochs: 1, max_steps: -1, micro_batch_size: 2, grad_accum: 4,
        warmup_ratio: 0.03, schedule: cosine, max_grad_norm: 0.3,
        optimizer: paged_adamw_32bit, grad_checkpointing: true,
        log_every: 10, eval_every: 0, save_every: 100, seed: 0}
output: runs/my-run
""")
    cfg = load_config(path)
    assert cfg.lora.targets == "all-linear" and cfg.train.warmup_ratio == 0.03


@pytest.mark.parametrize("text,override,needle", [
    ("model: m\ntrain: {lrr: 1}\n", [], "Did you mean `train.lr`"),
    ("model: m\nlora: {rank: 8}\n", [], "`lora.rank`"),
    ("model: m\n", ["--train.micro_batchsize=2"], "Did you mean `train.micro_batch_size`"),
    ("model: m\ntrain: {lr: fast}\n", [], "`train.lr` must be float"),
    ("model: m\ntrain: {grad_checkpointing: 3}\n", [], "`train.grad_checkpointing` must be bool"),
    ("model: m\nquant: {type: nf5}\n", [], "Did you mean `nf4`"),
    ("model: m\ntrain: {schedule: cosin}\n", [], "Did you mean `cosine`"),
    ("model: m\nmodle: x\n", [], "Did you mean `model`"),
    ("lora: {r: 8}\n", [], "`model` is missing"),
    ("model: m\nlora: {r: 0}\n", [], "`lora.r` must be positive"),
    ("model: m\n", ["--train.lr"], "must look like --section.key=value"),
])
def test_bad_configs_are_named(tmp_path, text, override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, text), override)
    assert needle in str(e.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(_write(tmp_path, "model: m\nlora: {r: 4}\n"), ["--train.seed=7"])
    out = str(tmp_path / "resolved.yaml")
    dump_config(cfg, out)
    again = load_config(out)
    assert again == cfg


def test_every_field_has_a_docstring():
    import dataclasses
    for cls in [Config] + [f.default_factory for f in dataclasses.fields(Config) if f.default_factory is not dataclasses.MISSING]:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"


def test_docs_config_md_in_sync():
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "config.md")
    with open(path, encoding="utf-8") as f:
        assert f.read() == config_markdown(), "docs/config.md is stale: run python -m fourbit.config > docs/config.md"
