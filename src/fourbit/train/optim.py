"""bitsandbytes' paged AdamW, stream-ordered: the same kernels and paging, without the device syncs.

bitsandbytes' `Optimizer8bit.step` calls `torch.cuda.synchronize()` after every parameter's update
and once more at the end when paged. Its paged states are CPU-device tensors over CUDA managed
memory, so a CPU read of them (a checkpoint) must wait for the update kernel; nothing else needs
the wait: the prefetch and the update kernel are queued in stream order, and the parameters are
ordinary CUDA tensors. The sync drained the GPU once per step, and it stayed idle while the host
ran the step's tail and queued the next forward (the round-5 profile: about 4 ms of a 0.487 s
Llama-3-8B step). Here `step` queues the same prefetches and updates and returns at once;
`state_dict` synchronises first, so checkpoints read finished states.

`Switches.opt_async` off (bench's ':nooptasync' rows) runs bitsandbytes' own step.
"""
from __future__ import annotations

import inspect

import torch

from ..switches import Switches

_HOOKS = ("check_overrides", "to_gpu", "init_state", "prefetch_state", "update_step")


class _StreamOrderedStep:
    """Mixin over a bitsandbytes `Optimizer8bit` subclass (see the module docstring)."""

    _prefetched = False

    def prefetch_states(self) -> None:
        """Queue the paged states' prefetch now (the training loop calls this once the backward is
        queued, while the host is still ahead of the GPU); the next `step` then skips its own. The
        prefetch is a driver call of ~0.5 ms host time at Llama-3-8B's adapters (round 7)."""
        if not Switches.opt_async or not hasattr(self, "prefetch_state"):
            return
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and len(self.state[p]) > 0:
                    self.prefetch_state(p)
        self._prefetched = True

    @torch.no_grad()
    def step(self, closure=None):
        if not Switches.opt_async or not all(hasattr(self, h) for h in _HOOKS):
            # bitsandbytes' own step, unwrapped: torch hooks a class's step once (step hooks would run twice)
            return inspect.unwrap(super().step.__func__)(self, closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if len(self.state[p]) == 0:
                    self.init_state(group, p, gindex, pindex)
                    self.prefetch_state(p)
                elif not self._prefetched:
                    self.prefetch_state(p)
                self.update_step(group, p, gindex, pindex)
        self._prefetched = False
        return loss

    def state_dict(self):
        _sync_params(self)            # paged states are read by the CPU: the last update must be done
        return super().state_dict()

    def load_state_dict(self, state_dict):
        _sync_params(self)            # and not written by the CPU while an update still reads them
        return super().load_state_dict(state_dict)


def _sync_params(opt: torch.optim.Optimizer) -> None:
    for group in opt.param_groups:
        for p in group["params"]:
            if p.is_cuda:
                torch.cuda.synchronize(p.device)
                return


def paged_adamw(bits: int, params, **kw) -> torch.optim.Optimizer:
    """bitsandbytes' PagedAdamW32bit (bits=32) or PagedAdamW8bit (bits=8), stream-ordered."""
    import bitsandbytes as bnb
    base = bnb.optim.PagedAdamW32bit if bits == 32 else bnb.optim.PagedAdamW8bit
    cls = type(f"StreamOrdered{base.__name__}", (_StreamOrderedStep, base), {"__module__": __name__})
    return cls(params, **kw)
