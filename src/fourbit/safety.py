"""Safe handling of files that come from outside: adapters, checkpoints, configs.

Why this module exists: a pickle (`.bin`, `.pt`, `.ckpt`, ...) can run arbitrary code when it is
loaded, a YAML file can construct Python objects, and a name read from a config or an
`adapter_config.json` can point outside its folder (`../../.ssh/id_rsa`). Every loader in fourbit
goes through the helpers here, so the rules live in one place:

- weights are read only through safetensors (`read_safetensors`);
- our own optimizer state is read with `torch.load(weights_only=True)` (`safe_torch_load`), and a
  pickle that names any Python callable (a `GLOBAL` opcode the weights-only unpickler refuses) is
  refused before anything in it runs;
- YAML goes through `yaml.safe_load` (`safe_yaml_load`), so `!!python/object` tags are refused;
- names become paths only through `safe_join`, which refuses absolute paths, `..` and symlinks
  that leave the folder;
- untrusted adapter configs are validated field by field (`check_adapter_config`), and a model
  that ships its own code needs `trust_remote_code: true` (`check_remote_code`).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import pickletools
import re
import zipfile
from typing import Any

import yaml

from .errors import FourbitError

PICKLE_EXTENSIONS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z0-9_\-]+)*$")  # q_proj, model.layers.0.mlp


def safe_join(root: str, name: str) -> str:
    """`root/name`, refusing any `name` that could leave `root`.

    Refused: empty names, absolute paths, NUL bytes, backslashes, any `..` component, and paths
    that (through a symlink) resolve outside `root`.

    Returns:
        The joined path (not resolved), which lies inside `root`.
    """
    def refuse(why: str) -> FourbitError:
        return FourbitError(f"Refused the name {name!r}: {why}, so it could reach outside the folder `{root}`. "
                            "Names in configs, manifests and adapter files must be relative paths inside their "
                            "folder (no leading `/`, no `..`); fix or remove the file that gave this name.")
    if not isinstance(name, str) or not name.strip():
        raise refuse("it is empty or not a string")
    if "\x00" in name or "\\" in name:
        raise refuse("it contains a NUL byte or a backslash")
    if os.path.isabs(name) or re.match(r"^[A-Za-z]:", name):
        raise refuse("it is an absolute path")
    if ".." in name.split("/"):
        raise refuse("it contains a `..` component")
    joined = os.path.join(root, name)
    real_root = os.path.realpath(root)
    real = os.path.realpath(joined)
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise refuse(f"it resolves (through a symlink) to `{real}`")
    return joined


def _pickle_globals(data: bytes, limit: int = 20) -> list[str]:
    """The `module.name` of every GLOBAL / STACK_GLOBAL opcode in a pickle, found without running it."""
    found, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            if op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
            if len(found) >= limit:
                break
    except Exception:  # a truncated or odd pickle: report what was seen so far
        pass
    return found


def _suspicious_globals(path: str) -> list[str]:
    """GLOBALs in the pickle(s) of `path` (a plain pickle or torch's zip format) outside torch's own."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                blobs = [z.read(n) for n in z.namelist() if n.endswith(".pkl")]
        else:
            with open(path, "rb") as f:
                blobs = [f.read()]
    except (OSError, zipfile.BadZipFile):
        return []
    names = [g for b in blobs for g in _pickle_globals(b)]
    harmless = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.set", "builtins.frozenset")
    return list(dict.fromkeys(g for g in names if not g.startswith(harmless)))


def safe_torch_load(path: str, map_location: Any = "cpu", what: str = "file") -> Any:
    """`torch.load(path, weights_only=True)` with user-facing errors naming the file.

    A pickle that carries code (any Python callable beyond tensors and plain containers) is refused
    before it runs; a truncated or corrupt file is reported as such.
    """
    import torch
    if not os.path.isfile(path):
        raise FourbitError(f"The {what} `{path}` does not exist. Check the path.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL [\w.]+", str(e))
        glob = m.group(0) if m else ", ".join(f"GLOBAL {g}" for g in _suspicious_globals(path)[:5])
        if not glob:
            raise FourbitError(
                f"Refused: the {what} `{path}` uses pickle features the safe loader does not accept "
                f"({str(e).strip().splitlines()[-1][:200]}). Re-save it with torch.save, or as .safetensors.") from None
        raise FourbitError(
            f"Refused: the {what} `{path}` contains pickled code ({glob}); loading it could run arbitrary "
            "programs, so fourbit will not open it. Use only files you or fourbit wrote; weights should come "
            "as .safetensors files.") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise FourbitError(f"The {what} `{path}` is truncated or corrupt and cannot be read "
                           f"({str(e).splitlines()[0][:200]}). Re-create it, or resume from another "
                           "checkpoint.") from None


def check_no_pickle_payload(path: str) -> None:
    """Refuse a pickle-format file (`.bin/.pt/.pth/.ckpt/.pkl`) that carries code; naming the file.

    Files with other extensions are left to their own loaders (safetensors needs no check).
    """
    if path.lower().endswith(PICKLE_EXTENSIONS):
        safe_torch_load(path, what="file given as an adapter or checkpoint")


def read_safetensors(path: str, device: str = "cpu") -> dict:
    """All tensors of a .safetensors file; a missing, truncated or corrupt file is a FourbitError naming it."""
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise FourbitError(f"The weights file `{path}` does not exist. Check the path or re-create the file.")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
        if len(head) == 8 and os.path.getsize(path) < 8 + int.from_bytes(head, "little"):
            raise ValueError("the header is longer than the file")
        return load_file(path, device=device)
    except Exception as e:  # SafetensorError is not importable under one stable name across versions
        raise FourbitError(f"The weights file `{path}` is truncated or not a valid safetensors file "
                           f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__}). "
                           "Re-create it (an interrupted copy or save leaves such files).") from None


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's content, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def fsync_dir(path: str) -> None:
    """Make a rename or a new file in folder `path` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def read_json(path: str, what: str = "JSON file") -> Any:
    """Parse a JSON file; errors name the file and the line."""
    if not os.path.isfile(path):
        raise FourbitError(f"The {what} `{path}` does not exist.")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FourbitError(f"The {what} `{path}` is not valid JSON ({e}). Fix or re-create it.") from None


def safe_yaml_load(path: str) -> Any:
    """`yaml.safe_load` of a file; Python object tags (`!!python/object...`) are refused, naming the file."""
    if not os.path.isfile(path):
        raise FourbitError(f"The YAML file `{path}` does not exist. Check the path.")
    with open(path, encoding="utf-8") as f:
        try:
            return yaml.safe_load(f)
        except yaml.constructor.ConstructorError as e:
            tag = f" ({e.problem})" if e.problem else ""
            raise FourbitError(f"Refused: the YAML file `{path}` uses a tag that builds Python objects{tag}; "
                               "fourbit reads only plain YAML (mappings, lists, strings, numbers). "
                               "Remove the `!!python/...` tags.") from None
        except yaml.YAMLError as e:
            raise FourbitError(f"The YAML file `{path}` is not valid YAML: {e}") from None


# Keys of a PEFT adapter_config.json that could make a loader import or run code.
_CODE_KEYS = ("megatron_config", "megatron_core", "auto_mapping", "trust_remote_code", "custom_modules",
              "_custom_modules", "runtime_config")


def check_adapter_config(cfg: dict, folder: str) -> dict:
    """Validate an untrusted `adapter_config.json` (PEFT layout) before any of it is used.

    Checks: `peft_type` is LORA; `r` a positive int and `lora_alpha` a finite positive number
    (both bounded); `lora_dropout` in [0, 1); target/saved module names are plain (dotted)
    identifiers without path separators; no key asks a loader to import modules or run code.

    Returns:
        `cfg` itself, so callers can write `cfg = check_adapter_config(read_json(p), folder)`.
    """
    where = f"`{os.path.join(folder, 'adapter_config.json')}`"

    def bad(msg: str) -> FourbitError:
        return FourbitError(f"Refused the adapter config {where}: {msg}. Fix that field or re-save the adapter "
                            "with fourbit or PEFT.")
    if not isinstance(cfg, dict):
        raise bad("it must hold a JSON object")
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise bad(f"`peft_type` is {peft_type!r}; only LORA adapters are supported")
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or not 0 < r <= 65536:
        raise bad(f"`r` must be a positive integer of at most 65536, got {r!r}")
    alpha = cfg.get("lora_alpha", r)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) \
            or not 0 < alpha <= 1e6:
        raise bad(f"`lora_alpha` must be a finite positive number, got {alpha!r}")
    dropout = cfg.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise bad(f"`lora_dropout` must be a number in [0, 1), got {dropout!r}")
    for key in _CODE_KEYS:
        value = cfg.get(key)
        if key == "megatron_core" and value in (None, "megatron.core"):
            continue
        if key == "auto_mapping" and (value is None or (isinstance(value, dict) and all(
                isinstance(v, str) and (v == "" or _NAME_RE.match(v)) for v in value.values()))):
            continue  # informational for AutoPeftModel; fourbit never imports from it
        if value not in (None, False, {}, []):
            raise bad(f"the key `{key}` = {value!r} would make a loader import or run code")
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        names = cfg.get(key)
        if names is None:
            if key == "target_modules":
                raise bad("`target_modules` is missing")
            continue
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, list) or not names and key == "target_modules":
            raise bad(f"`{key}` must be a list of module names, got {cfg.get(key)!r}")
        for n in names:
            if not isinstance(n, str) or not (_NAME_RE.match(n) or (key == "target_modules" and n == "all-linear")):
                raise bad(f"`{key}` contains {n!r}, which is not a plain module name such as `q_proj` or "
                          "`model.layers.0.mlp` (no `/`, `..` or regular expressions)")
    for key in ("rank_pattern", "alpha_pattern"):
        pat = cfg.get(key) or {}
        if not isinstance(pat, dict):
            raise bad(f"`{key}` must be an object of module name -> number")
        for n, v in pat.items():
            if not _NAME_RE.match(str(n)) or isinstance(v, bool) or not isinstance(v, (int, float)) \
                    or not math.isfinite(v) or v <= 0:
                raise bad(f"`{key}` entry {n!r}: {v!r} is not a plain module name with a positive number")
    base = cfg.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise bad(f"`base_model_name_or_path` must be a string, got {base!r}")
    return cfg


def check_remote_code(model_config: dict, trust_remote_code: bool, model: str) -> None:
    """Refuse a model whose config.json asks to run its own code (`auto_map`) unless the user opted in."""
    if model_config.get("auto_map") and not trust_remote_code:
        raise FourbitError(f"The model `{model}` ships its own Python code (config.json has `auto_map`), which "
                           "fourbit does not run by default. If you trust its authors, set `trust_remote_code: true` "
                           "in the config (or --trust_remote_code=true); otherwise use a model supported by "
                           "transformers.")
