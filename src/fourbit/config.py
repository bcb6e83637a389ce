"""Typed run configuration: YAML file + `--section.key=value` overrides.

Every field has a docstring (the string literal under it); `field_docs` reads them so the
docs (`docs/config.md`) and error messages come from one place. Unknown keys and wrong types are
rejected with the closest valid name, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import os
import textwrap
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml

from .errors import ConfigError


@dataclass
class QuantConfig:
    bits: Optional[int] = 4
    """Bits of the frozen base weights: 4 for QLoRA (NF4/FP4 through bitsandbytes), `none` for plain 16-bit LoRA."""
    type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type: `nf4` (NormalFloat, the QLoRA default) or `fp4`."""
    double_quant: bool = True
    """Quantize the per-block fp32 scales again to 8 bits (saves ~0.37 bits per parameter)."""
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """dtype the 4-bit weights are dequantized to for each matmul; also the dtype of LoRA weights and of unquantized layers."""
    blocksize: int = 64
    """Weights per quantization block (each block has one absmax scale)."""


@dataclass
class LoraConfig:
    r: int = 16
    """LoRA rank."""
    alpha: float = 32
    """LoRA scaling numerator: the update is (alpha / r) * B @ A."""
    dropout: float = 0.05
    """Dropout on the LoRA input path (0 disables it and enables the faster path)."""
    targets: Union[str, list[str]] = "all-linear"
    """`all-linear` (every linear layer of the decoder except the LM head) or a list of module names such as [q_proj, v_proj]."""


@dataclass
class DataConfig:
    train: Optional[str] = None
    """Training data: a .jsonl/.json/.parquet/.csv file, a folder of them, or a hub dataset name (`name` or `name:split`)."""
    eval: Optional[str] = None
    """Held-out data in the same forms as `train`; `none` for no evaluation."""
    format: Literal["auto", "messages", "alpaca", "prompt_completion", "text"] = "auto"
    """Row format: `messages` (list of {role, content}), `alpaca` (instruction/input/output), `prompt_completion`, `text`, or `auto` to detect it from the first row's fields."""
    max_length: int = 1024
    """Longest tokenized example; longer ones are handled by `truncation`."""
    chat_template: Optional[str] = None
    """Chat template to render `messages` rows: none uses the tokenizer's own; `chatml` uses the built-in ChatML template; any other value is a Jinja template string or a path to a .jinja file."""
    train_on: Literal["assistant", "all"] = "assistant"
    """Which tokens carry loss: `assistant` (completions and assistant turns, with their end-of-turn token) or `all`."""
    last_turn_only: bool = False
    """For multi-turn conversations, train only the last assistant turn instead of every assistant turn."""
    truncation: Literal["end", "drop", "error"] = "end"
    """What to do with an example longer than max_length: cut its end, drop it (counted), or stop with an error."""
    on_bad_row: Literal["error", "skip"] = "error"
    """What to do with a malformed row: stop with a message naming file, row and field, or skip it (counted per reason)."""
    packing: bool = False
    """Pack whole examples into max_length rows (best fit); positions restart per example and examples never attend to each other."""
    shuffle: bool = True
    """Shuffle training examples each epoch (seeded by train.seed)."""
    num_proc: int = 0
    """Worker processes for tokenization; 0 picks automatically (parallel only for large datasets)."""


@dataclass
class TrainConfig:
    lr: float = 2.0e-4
    """Peak learning rate."""
    epochs: float = 1
    """Passes over the training data (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Optimizer steps to run; -1 derives it from epochs."""
    micro_batch_size: int = 2
    """Sequences per forward/backward pass."""
    grad_accum: int = 4
    """Micro-batches accumulated per optimizer step."""
    warmup_ratio: float = 0.03
    """Fraction of the steps spent warming the learning rate up linearly from 0."""
    warmup_steps: int = -1
    """Warmup length in steps; overrides warmup_ratio when >= 0."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of lr (cosine and linear schedules)."""
    weight_decay: float = 0.0
    """Decoupled weight decay of AdamW."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1.0e-8
    """AdamW epsilon."""
    max_grad_norm: float = 0.3
    """Clip the global gradient norm to this value; 0 disables clipping."""
    optimizer: Literal["paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch"] = "paged_adamw_32bit"
    """Optimizer: bitsandbytes' paged AdamW (32-bit or 8-bit states) or torch's AdamW."""
    grad_checkpointing: bool = True
    """Recompute each decoder layer's activations in the backward pass (less memory, ~30% more compute)."""
    log_every: int = 10
    """Log metrics every N optimizer steps."""
    eval_every: int = 0
    """Evaluate every N optimizer steps (0: only at the end, when eval data is given)."""
    eval_max_batches: int = 0
    """Limit each evaluation to this many micro-batches (0: the whole eval set)."""
    save_every: int = 100
    """Write a checkpoint every N optimizer steps (0: only the final adapter)."""
    keep_checkpoints: int = 0
    """Keep only the newest N checkpoints (0 keeps all); the newest complete one is never pruned."""
    resume: Literal["never", "auto", "always"] = "never"
    """`auto`: continue from the newest complete checkpoint in the run folder if there is one (falling back to the previous one, with a warning, if the newest is broken); `always`: like `--resume`, fail when there is none; `never`: start fresh."""
    max_bad_steps: int = 5
    """Stop the run after this many optimizer steps in a row with a non-finite loss or gradient (each is skipped, not applied)."""
    auto_micro_batch: bool = False
    """On out-of-memory, halve the micro-batch and double grad_accum (same effective batch) and retry the step."""
    checkpointing_policy: Literal["auto", "keep", "off", "selective", "full", "offload"] = "auto"
    """Activation checkpointing when grad_checkpointing is true: `keep` is `off` and also keeps each adapted layer's dequantized 16-bit base weight from forward to backward (GPU; fastest, +2 bytes a base weight); `full` keeps each decoder layer's input and recomputes the layer; `selective` keeps its input and its mid-layer residual and recomputes all but the two output projections (Llama/Mistral/Qwen layers; others as full); `offload` is selective with those tensors in CPU memory; `off` keeps everything; `auto` picks the fastest that fits the memory plan."""
    seed: int = 0
    """Seed for LoRA initialisation, data order and dropout."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: `auto` picks CUDA when available."""
    threads: int = 0
    """CPU threads for torch (0: torch's default)."""


@dataclass
class Config:
    model: Optional[str] = None
    """Base model: a hub id or a local folder with config.json and weights."""
    output: str = "runs/run"
    """Run folder: resolved config, metrics.jsonl, checkpoints/ and adapter/ are written here."""
    trust_remote_code: bool = False
    """Allow the model repository's own Python code to run (off unless you trust it)."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """Attention kernel passed to transformers; `auto` picks sdpa."""
    quant: QuantConfig = field(default_factory=QuantConfig)
    """Quantization of the frozen base model."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapter settings."""
    data: DataConfig = field(default_factory=DataConfig)
    """Datasets and how they are rendered."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation and logging."""




def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: t for name, t in hints.items() if dataclasses.is_dataclass(t)}


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _type_name(t: Any) -> str:
    origin = typing.get_origin(t)
    if origin is Literal:
        return " / ".join(f"`{a}`" for a in typing.get_args(t))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        name = " or ".join(_type_name(a) for a in args)
        return name + (" or none" if type(None) in typing.get_args(t) else "")
    if origin is list:
        return f"list of {_type_name(typing.get_args(t)[0])}"
    return getattr(t, "__name__", str(t))


def _coerce(value: Any, t: Any, where: str) -> Any:
    """Check `value` against type `t`; return it (ints widen to float). Raise ConfigError otherwise."""
    origin = typing.get_origin(t)
    bad = ConfigError(f"Config key `{where}` must be {_type_name(t)}, got {value!r} ({type(value).__name__}). "
                      f"Fix it in the YAML file or with --{where}=VALUE.")
    if origin is Literal:
        choices = typing.get_args(t)
        if isinstance(value, bool):  # YAML 1.1 reads a bare off/no/on/yes as a boolean
            for word in (("off", "no", "false") if value is False else ("on", "yes", "true")):
                if word in choices:
                    return word
        if value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        raise ConfigError(f"Config key `{where}` must be one of {', '.join(map(str, choices))}; got {value!r}.{hint}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(t)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError:
                continue
        raise bad
    if origin is list:
        if isinstance(value, str):  # `--lora.targets=q_proj,v_proj`
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, typing.get_args(t)[0], where) for v in value]
    if t is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `2e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad
    if t is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise bad


def _unknown(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean `{where}{close[0]}`?" if close else ""
    return ConfigError(f"Unknown config key `{where}{key}`.{hint} Valid keys here: {', '.join(valid)}. "
                       "See docs/config.md for every key.")


def _build(cls: type, values: dict, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"Config section `{prefix.rstrip('.')}` must be a mapping of keys to values, got {values!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise _unknown(str(key), names, prefix)
        t = hints[key]
        if dataclasses.is_dataclass(t):
            kwargs[key] = _build(t, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, t, f"{prefix}{key}")
    return cls(**kwargs)


def _parse_override(arg: str) -> tuple[list[str], Any]:
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"Override `{arg}` must look like --section.key=value (for example --train.lr=1e-4).")
    key, raw = arg[2:].split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None,
                base: Optional[dict] = None) -> Config:
    """Read a YAML config, apply `--a.b=value` overrides, validate every key and type.

    Args:
        path: YAML file (None: defaults only).
        overrides: strings like `--train.lr=1e-4`.
        base: a dict to start from instead of a file (used by tests and the quickstart).
    """
    raw: dict = dict(base or {})
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"Config file `{path}` not found. Pass the path of a YAML file, e.g. examples/quickstart.yaml.")
        with open(path, encoding="utf-8") as f:
            try:
                loaded = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"Config file `{path}` is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"Config file `{path}` must hold a mapping of keys to values at the top level.")
        raw.update(loaded)
    for arg in overrides or []:
        keys, value = _parse_override(arg)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"Override `{arg}`: `{k}` is not a section.")
        node[keys[-1]] = value
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)
    need(cfg.model is not None, "Config key `model` is missing: set it to a hub id or a local model folder "
                                "(e.g. model: HuggingFaceTB/SmolLM2-135M-Instruct).")
    need(cfg.quant.bits in (None, 4), f"Config key `quant.bits` must be 4 or none, got {cfg.quant.bits}.")
    need(cfg.quant.blocksize in (32, 64, 128, 256, 512, 1024, 2048, 4096),
         f"Config key `quant.blocksize` must be a power of two from 32 to 4096, got {cfg.quant.blocksize}.")
    if isinstance(cfg.lora.targets, str) and cfg.lora.targets != "all-linear":
        cfg.lora.targets = [t.strip() for t in cfg.lora.targets.split(",") if t.strip()]
    need(cfg.lora.r > 0, f"Config key `lora.r` must be positive, got {cfg.lora.r}.")
    need(0 <= cfg.lora.dropout < 1, f"Config key `lora.dropout` must be in [0, 1), got {cfg.lora.dropout}.")
    need(cfg.data.max_length > 1, f"Config key `data.max_length` must be at least 2, got {cfg.data.max_length}.")
    t = cfg.train
    need(t.lr > 0, f"Config key `train.lr` must be positive, got {t.lr}.")
    need(t.micro_batch_size > 0, f"Config key `train.micro_batch_size` must be positive, got {t.micro_batch_size}.")
    need(t.grad_accum > 0, f"Config key `train.grad_accum` must be positive, got {t.grad_accum}.")
    need(0 <= t.warmup_ratio < 1, f"Config key `train.warmup_ratio` must be in [0, 1), got {t.warmup_ratio}.")
    need(t.max_steps > 0 or t.epochs > 0, "Set `train.max_steps` > 0 or `train.epochs` > 0.")
    need(t.log_every > 0, f"Config key `train.log_every` must be positive, got {t.log_every}.")
    need(t.max_grad_norm >= 0, f"Config key `train.max_grad_norm` must be >= 0, got {t.max_grad_norm}.")


def to_dict(cfg: Any) -> dict:
    """The config as plain YAML-able data."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str) -> None:
    """Write the resolved config as YAML (every key, defaults included)."""
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def config_markdown() -> str:
    """docs/config.md: every key with type, default and meaning, from the dataclass docstrings."""
    lines = ["# Configuration reference", "",
             "Generated from the docstrings in `src/fourbit/config.py` (`python -m fourbit.config > docs/config.md`);",
             "a test keeps the two in sync. Set keys in the YAML file or override them on the command line",
             "with `--section.key=value` (e.g. `--train.lr=1e-4`, `--lora.targets=q_proj,v_proj`).", ""]
    top = field_docs(Config)
    lines += ["## Top level", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    sections = _section_classes()
    for f in dataclasses.fields(Config):
        if f.name not in sections:
            lines.append(f"| `{f.name}` | {_type_name(typing.get_type_hints(Config)[f.name])} | `{_fmt(f.default)}` | {top[f.name]} |")
    for name, cls in sections.items():
        lines += ["", f"## `{name}`", "", top[name], "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"| `{name}.{f.name}` | {_type_name(hints[f.name])} | `{_fmt(default)}` | {docs[f.name]} |")
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


if __name__ == "__main__":
    print(config_markdown(), end="")
