"""On a GPU the attention probe never synchronises the host with the device, keeps its values
right under bf16 autocast, and never allocates a whole (B, H, T, T) tensor. These tests need a
CUDA device: this project's CI machine has none (see test_cuda_sync.py)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.agent.test_attention import CausalSelfAttention, MHANet, TinyGPT, causal, explicit_max
from tests.agent.test_cuda_sync import no_sync
from tests.agent.test_watch import watch
from trimtab.attention import max_logit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_sampled_forwards_do_not_synchronise_and_values_hold_under_autocast() -> None:
    torch.manual_seed(0)
    gpt, mha = TinyGPT("nanogpt").cuda(), MHANet(batch_first=True).cuda()
    model = torch.nn.ModuleDict({"gpt": gpt, "mha": mha})
    watcher, sink = watch(model, torch.optim.SGD(model.parameters(), lr=0.0), sample_every=2)
    tokens, x = torch.randint(0, 50, (4, 2, 12), device="cuda"), torch.randn(4, 3, 9, 16, device="cuda")
    for step in range(4):
        with no_sync(True), torch.autocast("cuda", dtype=torch.bfloat16):  # the probe's work is all in here
            loss = gpt(tokens[step]).float().pow(2).mean() + mha(x[step]).float().pow(2).mean()
        loss.backward()  # type: ignore[no-untyped-call]
        watcher.step(loss, step, None, None)
    watcher.close()
    for step in (0, 2):
        attn = gpt.attention(0)
        assert isinstance(attn, CausalSelfAttention)
        q, k = attn.used[step]  # bf16, as the attention kernel saw them
        expected = explicit_max(q.float().cpu(), k.float().cpu(), 1 / math.sqrt(8), causal(12))
        assert sink.scalars[step]["attn/gpt.h.0.attn/max_logit"] == pytest.approx(expected, rel=1e-4)
        assert math.isfinite(sink.scalars[step]["attn/mha.attn/max_logit"])
    assert not any(k.startswith("attn/") for k in sink.scalars[1])


def test_a_long_sequence_is_measured_in_blocks() -> None:
    b, h, t, e = 1, 8, 8192, 64  # the whole float32 logits: 2 GiB
    q, k = (torch.randn(b, h, t, e, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    got = max_logit(q, k, e**-0.5, None, True)
    assert got is not None
    peak = torch.cuda.max_memory_allocated() - before
    assert peak < 256 << 20, f"{peak / 2**20:.0f} MiB"
    expected = -math.inf
    for at in range(0, t, 1024):  # the explicit computation, in blocks of its own
        logits = torch.einsum("bhle,bhse->bhls", q[:, :, at : at + 1024].double(), k.double()) * e**-0.5
        keep = torch.arange(t, device="cuda")[None, :] <= torch.arange(at, at + 1024, device="cuda")[:, None]
        expected = max(expected, float(logits.masked_fill(~keep, -math.inf).max()))
    assert float(got) == pytest.approx(expected, rel=1e-5)
