"""fourbit's stream-ordered paged AdamW (`train.optim`) against bitsandbytes' own class: the same
updates and states bit for bit, with and without its device syncs; checkpoints read finished states."""
import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from fourbit.switches import Switches  # noqa: E402
from fourbit.train.optim import paged_adamw  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
pytestmark = pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")


def _run(make, device, steps=4):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(300, generator=g).to(device)),
              torch.nn.Parameter(torch.randn(7, 5, generator=g).to(device))]
    opt = make(params)
    for s in range(steps):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * s + i)).to(device)
        if s == 1:
            params[1].grad = None                       # a parameter without a gradient this step
        opt.step()
    sd = opt.state_dict()                               # read right after the last update
    return [p.detach().cpu().clone() for p in params], sd


def _states(sd):
    """Each parameter's state as {name: value}, bitsandbytes' FSDP-wrapped tensors unwrapped."""
    key = bnb.optim.optimizer.Optimizer8bit._FSDP_WRAPPED_QUANT_STATE_KEY
    out = []
    for st in sd["state"].values():
        flat = dict(st)
        flat.update(flat.pop(key, {}))
        out.append({k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in flat.items()})
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", (32, 8))
def test_same_updates_and_states_as_bitsandbytes(device, bits):
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    ref_cls = bnb.optim.PagedAdamW32bit if bits == 32 else bnb.optim.PagedAdamW8bit
    ref_p, ref_sd = _run(lambda ps: ref_cls(ps, **kw), device)
    ours_p, ours_sd = _run(lambda ps: paged_adamw(bits, ps, **kw), device)
    with Switches.set(opt_async=False):
        off_p, _ = _run(lambda ps: paged_adamw(bits, ps, **kw), device)
    assert Switches.opt_async
    for a, b, c in zip(ref_p, ours_p, off_p):
        assert torch.equal(a, b) and torch.equal(a, c)
    for sa, sb in zip(_states(ref_sd), _states(ours_sd)):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert (torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k]), k


def test_resumes_from_its_own_state_dict():
    """load_state_dict then more steps = the same run without the interruption."""
    kw = dict(lr=1e-2, weight_decay=0.01)
    full_p, _ = _run(lambda ps: paged_adamw(32, ps, **kw), "cpu", steps=4)
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(300, generator=g)), torch.nn.Parameter(torch.randn(7, 5, generator=g))]
    opt = paged_adamw(32, params, **kw)
    for s in range(2):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * s + i))
        if s == 1:
            params[1].grad = None
        opt.step()
    sd = opt.state_dict()
    opt2 = paged_adamw(32, params, **kw)
    opt2.load_state_dict(sd)
    for s in range(2, 4):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * s + i))
        opt2.step()
    for a, b in zip(full_p, params):
        assert torch.equal(a, b.detach())



@pytest.mark.parametrize("opt_async", (True, False))
def test_step_hooks_fire_once_per_step(opt_async):
    """The LoRA cast cache is advanced by an optimizer step post-hook (`lora.cache_optimizer_steps`)."""
    p = torch.nn.Parameter(torch.randn(10))
    bnb.optim.PagedAdamW32bit([torch.nn.Parameter(torch.randn(3))])   # a bitsandbytes instance hooks its class too
    opt = paged_adamw(32, [p], lr=1e-3)
    calls = []
    opt.register_step_post_hook(lambda o, a, k: calls.append(1))
    with Switches.set(opt_async=opt_async):
        for _ in range(3):
            p.grad = torch.ones_like(p)
            opt.step()
    assert len(calls) == 3


@pytest.mark.parametrize("device", DEVICES)
def test_early_prefetch_then_step_equals_step(device):
    """The loop queues the paged prefetch before its host read (`prefetch_states`); the step then skips
    its own: same update as a plain step, and the next step prefetches again."""
    kw = dict(lr=1e-2, weight_decay=0.01)

    def make_early(ps):
        opt = paged_adamw(32, ps, **kw)
        step = opt.step

        def early_step(closure=None):
            opt.prefetch_states()
            assert opt._prefetched or not any(len(opt.state[p]) for p in ps)
            out = step(closure)
            assert not opt._prefetched
            return out
        opt.step = early_step
        return opt
    a, _ = _run(lambda ps: paged_adamw(32, ps, **kw), device)
    b, _ = _run(make_early, device)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
