"""`fourbit plan`: peak training memory predicted from the model's config alone, and the `train` gate.

The prediction is a sum of named terms (the breakdown the command prints), for the step as
`train.loop.prepare_run` sets it up (one flat fp32 adapter buffer `FlatLoRA` with one optimizer tensor;
on CUDA `fuse_layers` and the LoRA fast path, bf16 A and s*B cached per optimizer step):

    persistent  NF4 weights + scales (exact bytes), 16-bit embeddings / LM head / norms,
                LoRA weights (the flat buffer), their gradients, optimizer states (fp32; paged on CUDA)
    saved       activations autograd keeps for backward, by checkpointing policy (`estimate`):
                  keep       as off, + every adapted NF4 linear's dequantized 16-bit weight (CUDA fast
                             path; elsewhere keep runs as off)
                  off        every layer's (per-token bytes in `layer_parts`)
                  full       each layer's input (tokens x hidden), one whole layer recomputed in backward
                  selective  each layer's input x and mid-layer residual h (2 tensors a layer); backward
                             recomputes the MLP branch from h, then the attention branch from x, so the
                             transient is the larger branch, not the layer (Llama/Mistral/Qwen2/Qwen3;
                             other layers run as full)
                  offload    selective with x and h in pinned host RAM, 2 in flight on the GPU
                             (CPU: selective; unsplittable layers: their input on the host, whole recompute)
    transient   the largest of the loss chunks (CUDA's kernel holds a chunk's bf16 logits, 2V bytes a
                token; the CPU path 8V; two chunks overlap), one backward (recomputed layer / branch +
                its gradients + one dequantized weight), the optimizer step (the gathered flat gradient)
    runtime     CUDA: cuBLAS workspaces and allocator slack (inside the caching allocator) and the
                CUDA context (outside it); CPU: the process itself, and the freed heap blocks glibc keeps
                resident (an empirical term, CPU_RETAIN; benchmarks/RESULTS.md)

Where the per-token activation bytes come from (Llama-style layer, d = bytes of the compute dtype),
read off autograd's saved tensors (tests/test_plan.py counts them on a real model, per layer for
`off` and per recomputed branch for `selective`, and compares):
    each RMSNorm      4H + 4 (transformers: fp32 upcast; layer 0's first norm saves nothing);
                      fused (CUDA): its input, d*H (the layer input x or the residual h), + 4
    LoRA input        d*in + in per adapted linear with dropout (dropout output + bool mask);
                      without dropout d*in once per distinct input (q/k/v share one, gate/up one:
                      on CUDA these are the group GEMMs' saved x)
    attention (SDPA)  d*(2Q + 2K) + 4*heads  (q, k, v, output, fp32 logsumexp; the fused RoPE kernel
                      writes q, k, v as their own tensors); with a mask (padding, packing) K becomes Q
                      (k/v repeated) and the mask adds d*T per token
    MLP               3*d*I (gate, silu(gate), up); fused SwiGLU (CUDA): 2*d*I
    LoRA rank         d*r per adapted linear; the CPU path also keeps bf16 casts of A and B per layer
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from .config import Config
from .errors import FourbitError
from .plan_model import ModelSpec, lora_targets, model_spec, nf4_bytes

GiB = 1024 ** 3
MiB = 1024 ** 2
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
PAGED_MIN_NUMEL = 100_000      # bitsandbytes pages optimizer state of tensors at least this large
CUDA_RUNTIME = 64 * MiB        # cuBLAS / cuBLASLt workspaces, allocated through torch's allocator
CUDA_CONTEXT = 750 * MiB       # CUDA context + libraries, outside torch's allocator (H200, torch 2.11: 0.75 GiB)
ALLOCATOR_SLACK = 0.6          # caching allocator: reserved over allocated, share of the largest transient
                               # (fit to the H200 runs in benchmarks/RESULTS.md: 0.6-1.1 seen)
ALLOCATOR_SLACK_FULL = 0.33    # the same for `full`, whose transient is one whole recomputed layer
                               # (0.31-0.67 seen, lower for larger transients; session-2 grid)
CPU_PROCESS = 480 * MiB        # python + torch + transformers + bitsandbytes + fourbit, resident
CPU_ROOM = {"off": 0.9, "selective": 0.9, "full": 0.9}   # auto on CPU: share of the budget a policy's plan may take
# CPU: glibc's heap keeps freed blocks resident, so peak RSS exceeds the live bytes by about this share
# of the step's largest transient (loss chunk or backward), for every policy. Empirical: fit on nine
# SmolLM2-135M / tiny rows after `full` became a no-grad layer recompute (3665c79), six rows held out
# (benchmarks/RESULTS.md, CPU; all 15 within 10%).
CPU_RETAIN = 0.9


@dataclass
class Item:
    key: str
    label: str
    bytes: int
    where: str = "device"      # device (torch allocator) | outside (device, not torch's) | host


@dataclass
class PlanReport:
    """The predicted peak and its parts for one setting."""
    spec: ModelSpec
    device: str                                  # cuda | cpu
    micro_batch: int
    seq: int
    policy: str                                  # keep | off | selective | full | offload
    masked: bool
    items: list[Item] = field(default_factory=list)
    budget: Optional[int] = None
    budget_label: str = ""
    notes: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    auto: bool = False                           # the policy was chosen by checkpointing_policy auto
    by_policy: dict = field(default_factory=dict)   # policy -> predicted peak on the device (plan() fills it)

    def part(self, *keys: str) -> int:
        return sum(i.bytes for i in self.items if i.key in keys)

    @property
    def allocator_peak(self) -> int:
        """What torch's caching allocator reserves at the peak (CUDA `max_memory_reserved`), or RSS on CPU."""
        return sum(i.bytes for i in self.items if i.where == "device")

    @property
    def total(self) -> int:
        """Everything on the device at the peak (allocator + context + paged optimizer state)."""
        return sum(i.bytes for i in self.items if i.where in ("device", "outside"))

    @property
    def host(self) -> int:
        return sum(i.bytes for i in self.items if i.where == "host")

    @property
    def fits(self) -> Optional[bool]:
        return None if self.budget is None else self.total <= self.budget


# ------------------------------------------------------------------ activations

ATTN_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_ROLES = ("gate_proj", "up_proj", "down_proj")


def layer_parts(spec: ModelSpec, d: int, targets: set[str], r: int, dropout: bool, masked: bool, seq: int,
                first: bool = False, fused: bool = False) -> dict[str, float]:
    """Bytes autograd saves per token in one decoder layer, by branch (see the module docstring).

    attn, mlp: what the attention branch (norm1 .. o_proj) and the MLP branch (norm2 .. down_proj)
    save besides their inputs; attn_in, mlp_in: the branch input (x, h = x + attn) when a saved
    tensor is that very tensor (the fused norms keep their input; transformers' norms keep an fp32
    copy instead, counted in attn / mlp). fused: CUDA's `fuse_layers` and LoRA fast path (groups
    when dropout is 0). first: layer 0, whose input (the frozen embedding) needs no gradient.
    """
    H, I = spec.hidden, spec.intermediate
    Q, K = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    roles = {l.role: l for l in spec.linears[: len(spec.linears) // max(spec.layers, 1)]}
    lora = [r_ for r_ in roles if r_ in targets]

    def lora_in(names: tuple, width: int, needs_mask: bool = True) -> int:
        n = sum(1 for x in names if x in lora)
        if not n:
            return 0
        return n * (d + (1 if needs_mask else 0)) * width if dropout else d * width   # one shared x without dropout

    if not spec.llama_like:     # generic: every linear's LoRA input, every output once, attention core
        b = 8 * H + sum((d + (1 if dropout else 0)) * l.in_features for l in roles.values() if l.role in lora)
        b += sum(d * l.out_features for l in roles.values()) + d * 2 * Q + 4 * spec.heads
        return {"attn_in": 0, "attn": b + d * r * len(lora) + (d * seq if masked else 0), "mlp_in": 0, "mlp": 0}
    norm = 4 if fused else 4 * H + 4          # 1/rms (fused), or the fp32 upcast + 1/rms (transformers)
    kv = Q if masked else K
    attn = 0 if first else norm
    attn += lora_in(("q_proj", "k_proj", "v_proj"), H, needs_mask=not first)   # layer 0: input needs no grad
    attn += d * (2 * Q + 2 * kv) + 4 * spec.heads        # SDPA: q, k, v, output, fp32 logsumexp
    if masked:
        attn += d * seq                                  # the float mask SDPA builds per layer
    if "o_proj" in lora and dropout:
        attn += (d + 1) * Q                              # without dropout o_proj's input is SDPA's saved output
    attn += d * r * sum(1 for x in ATTN_ROLES if x in lora)
    mlp = norm + lora_in(("gate_proj", "up_proj"), H)
    mlp += (2 if fused else 3) * d * I                   # gate, up (+ silu(gate) unfused)
    if "down_proj" in lora:
        mlp += (d + 1) * I if dropout else d * I
    mlp += d * r * sum(1 for x in MLP_ROLES if x in lora)
    return {"attn_in": d * H if fused and not first else 0, "attn": attn, "mlp_in": d * H if fused else 0, "mlp": mlp}


def layer_saved_bytes(spec: ModelSpec, d: int, targets: set[str], r: int, dropout: bool, masked: bool,
                      seq: int, first: bool = False, fused: bool = False) -> float:
    """Bytes autograd saves per token for one decoder layer (the sum of `layer_parts`)."""
    return sum(layer_parts(spec, d, targets, r, dropout, masked, seq, first, fused).values())


def _largest_linear(spec: ModelSpec) -> int:
    return max((l.numel for l in spec.linears), default=0)


def effective_policy(policy: str, device: str, spec: ModelSpec) -> str:
    """What runs: keep needs the CUDA fast path (else off); selective needs a Llama-style layer (else full);
    offload on CPU is selective (or full);
    offload of a layer that cannot be split keeps its input on the host ("offload-layer")."""
    split = spec.splittable
    if policy == "keep":
        return "keep" if device == "cuda" and split else "off"       # the fast path keeps them, on CUDA
    if policy == "selective":
        return "selective" if split else "full"
    if policy == "offload":
        if device != "cuda":
            return "selective" if split else "full"
        return "offload" if split else "offload-layer"
    return policy


# ------------------------------------------------------------------ the plan

def resolve_policy(cfg: Config) -> str:
    t = cfg.train
    if not t.grad_checkpointing:
        return "off"
    # plan() resolves auto by the budget; without one, the middle of the road
    return "selective" if t.checkpointing_policy == "auto" else t.checkpointing_policy


def estimate(cfg: Config, spec: ModelSpec, device: str = "cuda", micro_batch: Optional[int] = None,
             seq: Optional[int] = None, policy: Optional[str] = None, masked: Optional[bool] = None) -> PlanReport:
    """Predicted peak memory of training `cfg` on `spec` (overrides for what-if searches)."""
    mb = micro_batch or cfg.train.micro_batch_size
    T = seq or cfg.data.max_length
    policy = policy or resolve_policy(cfg)
    if masked is None:   # packed rows and padded batches give SDPA a mask; flash-attention never does
        masked = (cfg.data.packing or mb > 1) and cfg.attn_implementation != "flash_attention_2"
    d = DTYPE_BYTES[cfg.quant.compute_dtype]
    rep = PlanReport(spec, device, mb, T, policy, masked)
    add = lambda *a: rep.items.append(Item(*a))

    # persistent: the base model
    if cfg.quant.bits == 4:
        packed = scales = 0
        for l in spec.linears:
            p, s = nf4_bytes(l.numel, cfg.quant.blocksize, cfg.quant.double_quant)
            packed, scales = packed + p, scales + s
        add("nf4", f"NF4 weights, {len(spec.linears)} linears ({sum(l.numel for l in spec.linears) / 1e9:.2f}B "
                   "params, 4 bits each)", packed)
        add("scales", "quantization scales (" + ("double-quant uint8 + fp32 second level)" if cfg.quant.double_quant
                                                 else "fp32 absmax)"), scales)
    else:
        add("base16", f"16-bit linear weights ({len(spec.linears)} linears)", d * sum(l.numel for l in spec.linears))
    add("embed", "input embedding (16-bit)" + (", tied to the LM head" if spec.tied else ""), d * spec.embed_params)
    if spec.head_params:
        add("head", "LM head (16-bit)", d * spec.head_params)
    add("norms", "norms, biases and buffers (16-bit)", d * spec.other_params + spec.buffers_bytes)

    # persistent: LoRA, gradients, optimizer (as train.loop.prepare_run sets them up)
    chosen = lora_targets(spec, cfg.lora.targets)
    r = cfg.lora.r
    per_weight = [r * l.in_features for l in chosen] + [r * l.out_features for l in chosen]   # A, B per linear
    n_lora = sum(per_weight)
    opt = cfg.train.optimizer
    flat = opt != "paged_adamw_8bit"          # lora.FlatLoRA: one fp32 buffer, one optimizer tensor
    tensors = [n_lora] if flat else per_weight
    add("lora", f"LoRA weights, fp32 ({n_lora / 1e6:.1f}M params on {len(chosen)} linears"
                + (", one flat buffer)" if flat else ")"), 4 * n_lora)
    add("grads", "LoRA gradients, fp32", 4 * n_lora)
    if opt == "paged_adamw_8bit":
        states = sum(2 * (n + 4 * math.ceil(n / 256)) if n >= 4096 else 8 * n for n in tensors)
        small = sum(2 * (n + 4 * math.ceil(n / 256)) if n >= 4096 else 8 * n for n in tensors if n < PAGED_MIN_NUMEL)
    else:
        states, small = 8 * n_lora, 8 * sum(n for n in tensors if n < PAGED_MIN_NUMEL)
    if opt.startswith("paged") and device == "cuda":
        if small:
            add("optim", "optimizer states (AdamW m, v) of small tensors", small)
        if states - small:
            add("optim_paged", "optimizer states, paged (CUDA managed memory, evictable)", states - small, "outside")
    else:
        add("optim", f"optimizer states ({opt}: AdamW m and v)", states)

    fast = device == "cuda" and spec.splittable          # CUDA: fuse_layers and the LoRA fast path
    if fast:   # lora.cache_optimizer_steps: bf16 A and s*B per adapted linear, + the stacked A of each group
        grouped = sum(r * l.in_features for l in chosen if cfg.lora.dropout == 0 and l.role in
                      ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
        add("lora_lowp", "LoRA weights cast to 16 bits once per optimizer step (cached)",
            DTYPE_BYTES[cfg.quant.compute_dtype] * (n_lora + grouped))

    # activations
    tok = mb * T
    H, I, L = spec.hidden, spec.intermediate, max(spec.layers, 1)
    Q, kv = spec.heads * spec.head_dim, (spec.heads if masked else spec.kv_heads) * spec.head_dim
    fused = fast
    tset = {l.role for l in chosen}
    kw = dict(spec=spec, d=d, targets=tset, r=r, dropout=cfg.lora.dropout > 0, masked=masked, seq=T, fused=fused)
    parts = layer_parts(**kw)
    first = sum(layer_parts(**kw, first=True).values())
    per_layer = sum(parts.values())
    casts = {"attn": 0, "mlp": 0}          # bf16 copies of A and B each LoRA layer keeps (unfused path), per layer
    if not fused:
        for l in chosen:
            casts["mlp" if l.role in MLP_ROLES else "attn"] += d * r * (l.in_features + l.out_features) // L
    cast = casts["attn"] + casts["mlp"]
    hid = d * H                                            # one token x hidden tensor, per token
    top = tok * ((hid + 4 if fused else 4 * H + 4) + hid) + 2 * d * spec.head_dim * tok   # final norm, grad of the
    mode = effective_policy(policy, device, spec)                                        # hidden; cos/sin
    weight = d * _largest_linear(spec)
    mlp_grads = tok * (3 * d * I + 2 * hid)
    what = f"checkpointing `{policy}`" + (f" (runs as `{mode}`)" if mode != policy and mode != "offload-layer" else "")
    if mode in ("off", "keep"):
        saved = tok * (first + (L - 1) * per_layer) + cast * L
        add("act", f"activations: {L} layers x {per_layer / 1024:.1f} KiB/token x {tok} tokens "
                   "(no checkpointing)", int(saved + top))
        bwd_tr, bwd_what = weight + mlp_grads, "MLP gradients + one dequantized weight"
        if mode == "keep" and cfg.quant.bits == 4:
            add("kept_w", f"dequantized base weights kept for backward ({len(chosen)} adapted linears, "
                          f"{d * 8} bits each; `keep`)", d * sum(l.numel for l in chosen))
            bwd_tr, bwd_what = mlp_grads, "MLP gradients"
    elif mode in ("full", "offload-layer"):
        if mode == "full":
            add("act", f"activations: each layer's input ({L} x {tok} tokens x {hid} B), {what}",
                int(L * hid * tok + top))
        else:
            add("act_host", f"layer inputs offloaded to host memory ({L} x {tok} tokens)", L * hid * tok, "host")
            add("act", f"activations: layer inputs in flight (2 x {tok} tokens), {what}", int(2 * hid * tok + top))
        recompute = tok * (per_layer - parts["attn_in"]) + cast   # the layer input is the kept tensor
        bwd_tr, bwd_what = recompute + weight + mlp_grads, "recomputed layer + MLP gradients + one dequantized weight"
    else:                                                      # selective / offload: two tensors a layer, split recompute
        if mode == "selective":
            add("act", f"activations: each layer's input and mid-layer residual (2 x {L} x {tok} tokens), {what}",
                int(2 * L * hid * tok + top))
        else:
            add("act_host", f"layer inputs and mid-layer residuals offloaded to host memory (2 x {L} x {tok} tokens)",
                2 * L * hid * tok, "host")
            add("act", f"activations: 2 offloaded tensors in flight ({tok} tokens each), {what}",
                int(2 * hid * tok + top))
        # backward recomputes one branch at a time; its saved tensors, its gradients, the branch output
        # handle, the incoming gradient and the input's gradient are alive together
        attn_grads = 2 * d * (Q + 2 * kv) + d * Q + 4 * Q          # dq dk dv (+ their cat), d(attn out), fp32 dq
        mlp_tr = tok * (parts["mlp"] + 3 * d * I + 3 * hid) + casts["mlp"]
        attn_tr = tok * (parts["attn"] + attn_grads + 3 * hid) + casts["attn"]
        branch = "MLP" if mlp_tr >= attn_tr else "attention"
        bwd_tr = max(mlp_tr, attn_tr) + weight
        bwd_what = f"recomputed {branch} branch + its gradients + one dequantized weight"
    n_loss = mb * (T - 1)
    from .kernels.lm_loss import chunk_tokens
    wide = device == "cuda" and mode in ("off", "keep")           # as train/loss.py picks it: the kernel's
    chunk = min(chunk_tokens(spec.vocab, kernel=wide), n_loss)     # 2V a token, small chunks when recomputing
    # a chunk's logits: CUDA's kernel overwrites the bf16 logits with dz (2V a token); the CPU path adds
    # an fp32 copy and a bf16 dz (8V); a chunk's buffers are freed before the next chunk's exist
    per_tok = (2 if device == "cuda" else 8) * spec.vocab
    loss_tr = per_tok * chunk + 2 * hid * tok                      # + hidden copies
    act_dev = rep.part("act")
    step_tr = (4 * n_lora if flat else 0) - act_dev           # flat.grad gathered once the activations are freed
    if loss_tr >= bwd_tr and loss_tr >= step_tr:
        add("loss", f"loss: LM head + cross-entropy, chunks of {chunk} tokens x {spec.vocab} vocab", int(loss_tr))
    elif bwd_tr >= step_tr:
        add("backward", f"backward peak: {bwd_what}", int(bwd_tr))
    else:
        add("step", "optimizer step: the gradients gathered into the flat buffer (activations freed)", int(step_tr))

    if device == "cuda":
        # Cached blocks of the loss chunk and of the backward do not fit each other's requests exactly.
        moving = max(loss_tr, bwd_tr)
        slack = ALLOCATOR_SLACK_FULL if mode == "full" else ALLOCATOR_SLACK
        add("runtime", "cuBLAS workspaces + caching-allocator slack", int(CUDA_RUNTIME + slack * moving))
        add("context", "CUDA context and libraries", CUDA_CONTEXT, "outside")
    else:
        add("runtime", "the process itself (python, torch, transformers, bitsandbytes)", CPU_PROCESS)
        retain = CPU_RETAIN * max(loss_tr, bwd_tr)
        add("heap", "freed heap blocks glibc keeps resident (empirical)", int(retain))
    if not spec.llama_like:
        rep.notes.append(f"`{spec.model_type}` is not a Llama-style model: activations are an approximation.")
    elif policy in ("selective", "offload") and not spec.splittable:
        rep.notes.append(f"`{spec.model_type}` layers are not split by `{policy}`: it runs as "
                         f"{'full' if mode == 'full' else 'offload of whole layers'}.")
    if policy == "offload" and device != "cuda":
        rep.notes.append("offload moves tensors off a GPU; on CPU it is `selective` (nothing to move).")
    return rep


# ------------------------------------------------------------------ budget, advice, report

def parse_size(text: str) -> int:
    """`24GiB`, `24GB`, `24g`, `1.5TiB`, `800MiB` -> bytes (GB/G/GiB all mean 2**30: GPU sizes are quoted that way)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if not m:
        raise FourbitError(f"--memory `{text}` is not a size; write e.g. 24GiB, 80GB or 512MiB.")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def detect_memory(device: str) -> tuple[Optional[int], str]:
    """(bytes the run may use, description): the GPU's total memory, or the machine's available RAM."""
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            return None, "no CUDA GPU visible"
        free, total = torch.cuda.mem_get_info()
        name = torch.cuda.get_device_name()
        return total, f"{name}: {total / GiB:.1f} GiB total, {free / GiB:.1f} GiB free now"
    avail = None
    try:
        import psutil
        vm = psutil.virtual_memory()
        avail, total = vm.available, vm.total
    except ImportError:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        avail, total = info.get("MemAvailable"), info.get("MemTotal")
    return avail, f"CPU RAM: {avail / GiB:.1f} GiB available of {total / GiB:.1f} GiB"


def _largest(fn, lo: int, hi: int) -> Optional[int]:
    """Largest x in [lo, hi] with fn(x) true (fn monotone), None if fn(lo) is false."""
    if not fn(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fn(mid) else (lo, mid - 1)
    return lo


def policy_order(device: str) -> tuple[str, ...]:
    """Checkpointing policies from fastest to most frugal. CUDA: keep (off + the dequantized weights);
    offload keeps less on the GPU than full and is now faster, so full is skipped; CPU: keep is off
    there, offload is selective, full keeps less."""
    return ("keep", "off", "selective", "offload") if device == "cuda" else ("off", "selective", "full")


def _thriftier(policy: str, device: str, spec: ModelSpec) -> list[str]:
    """The policies that keep less than `policy` on `device`, next one first."""
    order = policy_order(device)
    for p in (policy, effective_policy(policy, device, spec)):      # keep on CPU runs as off, ...
        if p in order:
            return list(order[order.index(p) + 1:])
    return ["offload"] if device == "cuda" else ["full"]          # full on CUDA


def _policy_flags(policy: str) -> str:
    if policy == "off":
        return "--train.grad_checkpointing=false"
    return f"--train.grad_checkpointing=true --train.checkpointing_policy={policy}"


def advise(cfg: Config, spec: ModelSpec, rep: PlanReport) -> list[str]:
    """Settings that make a run fit: largest micro-batch / max_length per checkpointing policy, dropout."""
    if rep.budget is None or rep.fits:
        return []
    B, mb0, T0 = rep.budget, rep.micro_batch, rep.seq

    def fits(c=cfg, **kw):
        args = {"micro_batch": mb0, "seq": T0, "policy": rep.policy, **kw}
        return estimate(c, spec, rep.device, masked=rep.masked if args["micro_batch"] > 1 or cfg.data.packing
                        else None, **args).total <= B
    fixed = rep.total - rep.part("act", "loss", "backward", "step", "runtime", "heap")
    if fixed > B:
        return [f"the model alone ({fixed / GiB:.1f} GiB without activations) is over the budget: use a "
                "larger GPU, fewer LoRA targets (lora.targets) or a smaller model"]
    out = []
    for pol in [rep.policy] + _thriftier(rep.policy, rep.device, spec):
        flag = "" if pol == rep.policy else _policy_flags(pol)
        mb = _largest(lambda m: fits(micro_batch=m, policy=pol), 1, mb0)
        if mb is not None:
            accum = math.ceil(cfg.train.micro_batch_size * cfg.train.grad_accum / mb)
            same = mb == mb0
            out.append((flag + ("" if same else f" --train.micro_batch_size={mb} --train.grad_accum={accum}"
                                " (same effective batch)")).strip())
            break
        ml = _largest(lambda t: fits(micro_batch=1, seq=t, policy=pol), 64, T0)
        if ml is not None:
            out.append(f"{flag} --train.micro_batch_size=1 --data.max_length={ml // 64 * 64}".strip())
    if cfg.lora.dropout > 0:
        import dataclasses
        c0 = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, dropout=0.0))
        if fits(c0):
            out.append("--lora.dropout=0 (no dropout copies of each adapted layer's input) fits as it is")
    return out


def _fmt(n: float) -> str:
    return f"{n / GiB:8.2f} GiB" if abs(n) >= 0.1 * GiB else f"{n / MiB:8.1f} MiB"


def format_report(rep: PlanReport) -> str:
    s = rep.spec
    how = " (auto: the fastest that fits)" if rep.auto else ""
    lines = [f"model     {s.source} ({s.model_type}, {s.layers} layers, hidden {s.hidden}, vocab {s.vocab})",
             f"setting   {rep.device}, micro-batch {rep.micro_batch} x {rep.seq} tokens, checkpointing "
             f"`{rep.policy}`{how}, attention mask {'yes' if rep.masked else 'no'}", ""]
    for i in rep.items:
        tag = {"outside": "  (not in torch's allocator)", "host": "  (host RAM)"}.get(i.where, "")
        lines.append(f"  {_fmt(i.bytes)}  {i.label}{tag}")
    lines.append(f"  {'-' * 12}")
    what = "peak RSS" if rep.device == "cpu" else "torch max reserved"
    lines.append(f"  {_fmt(rep.allocator_peak)}  predicted {what}")
    if rep.device == "cuda":
        lines.append(f"  {_fmt(rep.total)}  predicted peak on the GPU (all of the above but host RAM)")
    if rep.host:
        lines.append(f"  {_fmt(rep.host)}  host RAM for offloaded activations")
    lines.append("")
    if rep.by_policy:
        where = "GPU" if rep.device == "cuda" else "RAM"
        lines.append(f"policies  peak {where} by checkpointing policy, fastest first: " + ", ".join(
            f"{p} {v / GiB:.2f} GiB" for p, v in rep.by_policy.items()))
    if rep.budget is None:
        lines.append(f"budget    unknown ({rep.budget_label}); pass --memory 24GiB to check a size")
    else:
        verdict = "fits" if rep.fits else "does NOT fit"
        lines.append(f"budget    {rep.budget / GiB:.1f} GiB ({rep.budget_label}): {verdict}, "
                     f"{abs(rep.budget - rep.total) / GiB:.1f} GiB {'to spare' if rep.fits else 'over'}")
    for a in rep.advice:
        lines.append(f"  try     {a}")
    for n in rep.notes:
        lines.append(f"note      {n}")
    return "\n".join(lines)


def plan(cfg: Config, memory: Optional[str] = None, device: Optional[str] = None) -> PlanReport:
    """The plan for a run config: model shapes from the config alone, budget given or detected.

    checkpointing_policy auto takes the fastest policy of `policy_order` whose peak fits the budget
    (CUDA: keep, off, selective, offload; CPU: off, selective, full), the smallest when none does."""
    if device is None and cfg.train.device == "cuda":
        device = "cuda"                 # planning for a GPU needs none here (the budget: --memory)
    if device is None:
        from .model import resolve_device
        device = resolve_device(cfg.train.device).type
    spec = model_spec(cfg.model, cfg.trust_remote_code)
    budget, label = (parse_size(memory), "--memory") if memory else detect_memory(device)
    order = policy_order(device)
    by_policy = {p: estimate(cfg, spec, device, policy=p).total for p in order}
    policy, auto = None, cfg.train.grad_checkpointing and cfg.train.checkpointing_policy == "auto"
    if auto and budget is not None:
        room = CPU_ROOM if device != "cuda" else {}
        policy = next((p for p in order if by_policy[p] <= budget * room.get(p, 1.0)),
                      min(order, key=by_policy.get))                   # none fits: the smallest (advice follows)
    rep = estimate(cfg, spec, device, policy=policy)
    rep.budget, rep.budget_label = budget, label
    rep.auto, rep.by_policy = auto and policy is not None, by_policy
    rep.advice = advise(cfg, spec, rep)
    return rep


def plan_cmd(cfg: Config, args) -> int:
    """`fourbit plan CONFIG [--memory 24GiB]`: print the breakdown; exit 0 if it fits (or unknown), 1 if not."""
    rep = plan(cfg, getattr(args, "memory", None))
    print(format_report(rep))
    return 1 if rep.fits is False else 0


def check_fits(cfg: Config, force: bool, device) -> PlanReport:
    """The gate `fourbit train` runs before loading anything.

    Raises FourbitError with the breakdown and the settings that would fit when the predicted peak is
    over the device's memory (`force` turns that into a warning). The budget is the GPU's total memory
    (CUDA) or the available RAM (CPU); FOURBIT_MEMORY=24GiB overrides it.
    """
    import sys
    dev = getattr(device, "type", device)
    rep = plan(cfg, os.environ.get("FOURBIT_MEMORY"), dev)
    if rep.fits is False:
        msg = (f"this run needs about {rep.total / GiB:.1f} GiB but {rep.budget_label} has {rep.budget / GiB:.1f} "
               f"GiB.\n{format_report(rep)}\nChange a setting above, or pass --force to try anyway.")
        if not force:
            raise FourbitError(msg)
        print(f"warning (--force): {msg}", file=sys.stderr, flush=True)
    return rep
