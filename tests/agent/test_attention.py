"""attn/<module>/max_logit: the largest pre-softmax attention logit, checked against the logits
computed by hand from the q and k each model really used, for nn.MultiheadAttention and for
modules calling F.scaled_dot_product_attention (nanoGPT style and Hugging Face style)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.functional import scaled_dot_product_attention  # imported by name, as Hugging Face does

from tests.agent.test_watch import Recorder, watch
from trimtab.watch import Watcher


def explicit_max(q: torch.Tensor, k: torch.Tensor, scale: float, allowed: torch.Tensor, bias: Any = 0.0) -> float:
    """max over allowed positions of scale * q.k + bias; q (B, H, L, E), k (B, Hk, S, E)."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = torch.einsum("bhle,bhse->bhls", q.double(), k.double()) * scale + bias
    return float(logits.masked_fill(~allowed, -math.inf).max())


def causal(length: int, keys: int | None = None) -> torch.Tensor:
    return torch.ones(length, keys or length, dtype=torch.bool).tril()


def loop(
    model: nn.Module,
    batches: list[list[torch.Tensor]],
    sample_every: int,
    probe: Any = None,
) -> tuple[Watcher, Recorder]:
    """One optimizer step per entry of ``batches`` (one forward per micro-batch in it)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watcher, sink = watch(model, opt, sample_every=sample_every, overhead_budget=None)
    for step, micro in enumerate(batches):
        for x in micro:
            if probe is not None:
                probe(step, x)
            loss = model(x).pow(2).mean() / len(micro)
            loss.backward()  # type: ignore[no-untyped-call]
        watcher.step(loss, step, None, None)
        opt.step()
        opt.zero_grad()
    watcher.close()
    return watcher, sink


# --------------------------------------------------------------------------- nn.MultiheadAttention


class MHANet(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1] if self.batch_first else x.shape[0]
        mask = ~causal(length)  # MultiheadAttention's convention: True = may NOT attend
        y, _ = self.attn(x, x, x, attn_mask=mask, need_weights=False, is_causal=True)
        out: torch.Tensor = self.out(y)
        return out


def mha_qk(attn: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k as (B, H, L, E) from (B, L, D) inputs, by the module's own weights."""
    d, h = attn.embed_dim, attn.num_heads
    w, b = attn.in_proj_weight, attn.in_proj_bias
    assert b is not None
    w_q, w_k = (w[:d], w[d : 2 * d]) if w is not None else (attn.q_proj_weight, attn.k_proj_weight)
    q = (query @ w_q.T + b[:d]).detach()
    k = (key @ w_k.T + b[d : 2 * d]).detach()
    return q.reshape(*q.shape[:2], h, d // h).transpose(1, 2), k.reshape(*k.shape[:2], h, d // h).transpose(1, 2)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_multihead_attention_logits_equal_the_explicit_computation(batch_first: bool) -> None:
    torch.manual_seed(0)
    model = MHANet(batch_first)
    with torch.no_grad():
        model.attn.in_proj_weight.mul_(4.0)  # logits of a few units, not all near zero
    batches = [[torch.randn(3, 9, 16) if batch_first else torch.randn(9, 3, 16)] for _ in range(5)]
    expected: dict[int, float] = {}

    def reference(step: int, x: torch.Tensor) -> None:
        xb = x if batch_first else x.transpose(0, 1)
        q, k = mha_qk(model.attn, xb, xb)
        expected[step] = explicit_max(q, k, 1 / math.sqrt(4), causal(9))

    _, sink = loop(model, batches, sample_every=2, probe=reference)
    for step in (0, 2, 4):
        assert sink.scalars[step]["attn/attn/max_logit"] == pytest.approx(expected[step], rel=1e-5)
    assert not any(k.startswith("attn/") for s in (1, 3) for k in sink.scalars[s])
    first = batches[0][0] if batch_first else batches[0][0].transpose(0, 1)
    unmasked = explicit_max(*mha_qk(model.attn, first, first), 0.5, torch.ones(9, 9, dtype=torch.bool))
    assert unmasked != pytest.approx(expected[0])  # the causal mask changes the answer here: it was applied


class CrossAttention(nn.Module):
    """Separate q/k projections (kdim != embed_dim), bias_k, add_zero_attn, a key padding mask
    and a float attention mask: every extra key position and mask MultiheadAttention has."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, kdim=5, vdim=5, add_bias_kv=True, add_zero_attn=True, batch_first=True)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, padding: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.attn(x, memory, memory, key_padding_mask=padding, attn_mask=bias)[0]
        return y


def test_multihead_cross_attention_with_every_extra_key_and_mask() -> None:
    torch.manual_seed(1)
    model = CrossAttention()
    with torch.no_grad():
        model.attn.bias_k.fill_(5.0)  # type: ignore[union-attr]
    x, memory = torch.randn(2, 4, 8), torch.randn(2, 6, 5)
    padded = torch.tensor([[False] * 6, [False] * 3 + [True] * 3])
    memory[padded] *= 30  # the padded keys would win if they were not masked out
    padding = torch.zeros(2, 6).masked_fill(padded, -math.inf)  # a float key padding mask, like the attn_mask
    bias = torch.linspace(-1, 1, 4 * 6).reshape(4, 6)
    watcher, sink = watch(model, None, sample_every=1)
    model(x, memory, padding, bias).sum().backward()
    watcher.step(None, 0, None, None)
    watcher.close()

    q, k = mha_qk(model.attn, x, memory)
    bias_k = model.attn.bias_k.detach().expand(2, 1, 8).reshape(2, 1, 2, 4).transpose(1, 2)  # type: ignore[union-attr]
    k = torch.cat([k, bias_k, torch.zeros(2, 2, 1, 4)], dim=2)  # + the bias key, + the zero key
    allowed = torch.cat([~padded, torch.ones(2, 2, dtype=torch.bool)], dim=1)[:, None, None, :]
    full_bias = F.pad(bias, (0, 2))
    expected = explicit_max(q, k, 0.5, allowed, full_bias)
    assert sink.scalars[0]["attn/attn/max_logit"] == pytest.approx(expected, rel=1e-5)
    # Each extra key and mask decides the answer here (so the check above covers it):
    assert expected != pytest.approx(explicit_max(q, k, 0.5, torch.ones_like(allowed), full_bias))  # padding
    no_bias_key = torch.cat([allowed[..., :6], torch.zeros_like(allowed[..., 6:7]), allowed[..., 7:]], dim=-1)
    assert expected != pytest.approx(explicit_max(q, k, 0.5, no_bias_key, full_bias))  # bias_k


# --------------------------------------------------------------------------- scaled_dot_product_attention


class CausalSelfAttention(nn.Module):
    """nanoGPT's: one qkv projection, F.scaled_dot_product_attention(..., is_causal=True)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.used: list[tuple[torch.Tensor, torch.Tensor]] = []  # the q, k of each call (test only)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        self.used.append((q.detach(), k.detach()))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        out: torch.Tensor = self.c_proj(y.transpose(1, 2).reshape(b, t, d))
        return out


class GQAAttention(nn.Module):
    """Hugging Face style: fewer key/value heads (GQA), an explicit scale and an additive
    float mask (large negative where masked, a position bias elsewhere), and
    scaled_dot_product_attention imported by name."""

    def __init__(self, d: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d // heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.scaling = 0.3
        self.used: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        self.used.append((q.detach(), k.detach(), mask))
        y = scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling, enable_gqa=True)
        out: torch.Tensor = self.o_proj(y.transpose(1, 2).reshape(b, t, -1))
        return out


class Block(nn.Module):
    def __init__(self, attn: nn.Module, d: int, norm: bool) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d) if norm else nn.Identity()
        self.attn = attn

    def forward(self, x: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.attn(self.ln(x), *extra)
        return out


class TinyGPT(nn.Module):
    def __init__(self, attn: str, d: int = 32, layers: int = 2, vocab: int = 50, norm: bool = True) -> None:
        super().__init__()
        self.attn = attn
        self.wte = nn.Embedding(vocab, d)
        make = (lambda: CausalSelfAttention(d, 4)) if attn == "nanogpt" else (lambda: GQAAttention(d, 4, 2))
        self.h = nn.ModuleList(Block(make(), d, norm) for _ in range(layers))
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx)
        extra: tuple[torch.Tensor, ...] = ()
        if self.attn == "hf":
            t = idx.shape[1]
            pos = torch.arange(t)
            bias = -0.05 * (pos[:, None] - pos[None, :]).abs().float()  # ALiBi-like: added, not masked
            padded = torch.zeros(idx.shape[0], t, dtype=torch.bool)
            padded[0, : t // 3] = True  # left padding of the first sequence
            allowed = causal(t)[None] & ~padded[:, None, :]
            extra = (torch.where(allowed, bias, torch.finfo(torch.float32).min)[:, None],)
        for block in self.h:
            x = block(x, *extra)
        out: torch.Tensor = self.lm_head(x)
        return out

    def attention(self, layer: int) -> Any:
        """The attention module of a layer (either kind)."""
        block = self.h[layer]
        assert isinstance(block, Block)
        return block.attn


@pytest.mark.parametrize("style", ["nanogpt", "hf"])
def test_scaled_dot_product_attention_logits_by_module(style: str) -> None:
    torch.manual_seed(0)
    model = TinyGPT(style)
    batches = [[torch.randint(0, 50, (2, 12))] for _ in range(3)]
    _, sink = loop(model, batches, sample_every=2)
    for step in (0, 2):
        keys = sorted(k for k in sink.scalars[step] if k.startswith("attn/"))
        assert keys == ["attn/h.0.attn/max_logit", "attn/h.1.attn/max_logit"]
        for i in range(2):
            attn = model.attention(i)
            if style == "nanogpt":
                q, k = attn.used[step]
                expected = explicit_max(q, k, 1 / math.sqrt(8), causal(12))
            else:
                q, k, mask = attn.used[step]
                allowed = mask > torch.finfo(torch.float32).min / 2
                expected = explicit_max(q, k, 0.3, allowed, mask)
            assert sink.scalars[step][f"attn/h.{i}.attn/max_logit"] == pytest.approx(expected, rel=1e-5), (step, i)
    assert not any(k.startswith("attn/") for k in sink.scalars[1])


def test_logits_are_exact_over_blocks_of_queries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 3 queries: each block gets its own rows of the causal and explicit masks."""
    import trimtab.attention as attention

    monkeypatch.setattr(attention, "LOGIT_CHUNK", 2 * 4 * 10 * 3)
    torch.manual_seed(3)
    q, k = torch.randn(2, 4, 10, 8), torch.randn(2, 2, 10, 8)
    q[:, :, 9] = 3 * k[:, :, 8].repeat_interleave(2, dim=1)  # the largest logit: query 9, key 8
    boolean = (torch.rand(2, 1, 10, 10) > 0.3) & causal(10)
    boolean[..., 9, 8] = True
    for mask, is_causal, allowed in [
        (None, True, causal(10)),
        (boolean, False, boolean),
        (torch.where(boolean, 0.5, -math.inf), False, boolean),
    ]:
        got = attention.max_logit(q, k, 0.25, mask, is_causal)
        bias = 0.5 if mask is not None and mask.is_floating_point() else 0.0
        expected = explicit_max(q, k, 0.25, allowed, bias)
        assert got is not None and float(got) == pytest.approx(expected, rel=1e-5)
        assert expected != pytest.approx(explicit_max(q, k, 0.25, allowed[..., :1, :], bias))  # rows matter


# --------------------------------------------------------------------------- cost and cadence


def test_nothing_is_installed_on_steps_that_are_not_sampled() -> None:
    torch.manual_seed(0)
    model = TinyGPT("nanogpt")
    seen: dict[int, tuple[bool, int, int]] = {}
    submodules = [m for m in model.modules() if m is not model]

    def look(module: nn.Module, args: Any) -> None:
        hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in submodules)
        attn = model.attention(0)
        seen[len(seen)] = (torch._C._is_torch_function_mode_enabled(), hooks, len(attn._forward_pre_hooks))

    model.attention(0).c_proj.register_forward_pre_hook(look)  # inside the forward, in the attention
    submodules.remove(model.attention(0).c_proj)
    batches = [[torch.randint(0, 50, (2, 8))] for _ in range(6)]
    watcher, sink = loop(model, batches, sample_every=3)
    for step in range(6):
        mode_on, hooks, attn_hooks = seen[step]
        if step % 3:
            assert not mode_on and hooks == 0, step
            assert not any(k.startswith("attn/") for k in sink.scalars[step])
        else:
            assert mode_on and attn_hooks > 0, step  # the check above can tell
            assert "attn/h.0.attn/max_logit" in sink.scalars[step]
    assert not torch._C._is_torch_function_mode_enabled()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in submodules)
    assert model._forward_pre_hooks == {} and watcher.attention is not None and not watcher.attention.armed


def test_gradient_accumulation_records_the_max_of_every_micro_batch() -> None:
    torch.manual_seed(0)
    model = TinyGPT("nanogpt", norm=False)  # no LayerNorm before attention: larger embeddings, larger logits
    with torch.no_grad():
        model.wte.weight[25:] *= 3.0
    small, large = torch.randint(0, 25, (2, 10)), torch.randint(25, 50, (2, 10))
    batches = [[small, large], [large, small]]
    watcher, sink = watch(model, None, sample_every=1)
    for step, micro in enumerate(batches):
        for x in micro:
            model(x).pow(2).mean().backward()
        with torch.no_grad():  # a validation pass: larger still, and not a training forward
            model.wte.weight.mul_(10.0)
            model(large)
            model.wte.weight.div_(10.0)
        watcher.step(None, step, None, None)
    watcher.close()
    attn = model.attention(0)
    assert isinstance(attn, CausalSelfAttention) and len(attn.used) == 6  # 2 x (2 micro-batches + 1 validation)
    small_0, large_0, validation_0, large_1, small_1, validation_1 = (
        explicit_max(q, k, 1 / math.sqrt(8), causal(10)) for q, k in attn.used
    )
    assert small_0 < large_0 < validation_0 and small_1 < large_1 < validation_1
    assert sink.scalars[0]["attn/h.0.attn/max_logit"] == pytest.approx(large_0, rel=1e-5)  # the second forward's
    assert sink.scalars[1]["attn/h.0.attn/max_logit"] == pytest.approx(large_1, rel=1e-5)  # the first forward's


class Raises(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(8, 2)
        self.fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.attn(x)
        if self.fail:
            raise RuntimeError("the user's bug")
        return y


def test_a_forward_that_raises_leaves_no_mode_on() -> None:
    model = Raises()
    watcher, sink = watch(model, None, sample_every=1)
    model.fail = True
    with pytest.raises(RuntimeError, match="the user's bug"):
        model(torch.randn(1, 4, 8))
    assert not torch._C._is_torch_function_mode_enabled()
    model.fail = False
    model(torch.randn(1, 4, 8)).sum().backward()
    watcher.step(None, 0, None, None)
    watcher.close()
    assert "attn/attn/max_logit" in sink.scalars[0]
    assert not sink.warnings


def test_attention_that_breaks_the_probe_is_warned_about_once_and_not_probed_again() -> None:
    """q and k of different widths: scaled_dot_product_attention refuses them (the user's
    error, raised as usual); the probe failing first must not change that, nor raise its own."""
    torch.manual_seed(0)

    class Odd(nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, k)

    model = Odd()
    watcher, sink = watch(model, None, sample_every=1)
    q, k5 = torch.randn(1, 1, 3, 4, requires_grad=True), torch.randn(1, 1, 3, 5)
    with pytest.raises(RuntimeError) as plain:
        F.scaled_dot_product_attention(q, k5, k5)
    with pytest.raises(RuntimeError) as raised:
        model(q, k5)
    assert "attn-logits" in sink.warnings and "'model'" in sink.warnings["attn-logits"]
    assert str(raised.value) == str(plain.value)  # torch's own error, not the probe's
    model(q, torch.randn(1, 1, 3, 4)).sum().backward()
    watcher.step(None, 0, None, None)
    watcher.step(None, 1, None, None)
    watcher.close()
    assert not any(k.startswith("attn/") for s in (0, 1) for k in sink.scalars.get(s, {}))
    assert not torch._C._is_torch_function_mode_enabled()


def test_the_option_turns_it_off() -> None:
    model = TinyGPT("nanogpt")
    watcher, sink = watch(model, None, sample_every=1, attention_logits=False)
    model(torch.randint(0, 50, (1, 5))).sum().backward()
    watcher.step(None, 0, None, None)
    watcher.close()
    assert watcher.attention is None and not any(k.startswith("attn/") for k in sink.scalars[0])
