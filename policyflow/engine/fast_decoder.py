"""A slot-based KV-cache decoder for Llama-family models (Llama, Qwen2, Qwen3, Mistral).

The generic path (`hf_decoder.py`) calls the Hugging Face forward once per decode step; for
small models most of that time is Python overhead (mask building, cache objects, hooks).
This decoder runs the same arithmetic with plain tensor ops on the HF module's own
parameters (referenced, except for one fused copy of the q/k/v projections, refreshed when
the parameters change) and a preallocated cache:

    KV per layer: [slots S, 2 (key, value), capacity T, kv heads * head dim]   lengths: [S]

(time-major per row: a row's first t keys are one contiguous block, which is what a decode
step reads).

Row r of the cache belongs to one sequence; its tokens sit at positions 0..lengths[r]-1, so
a sequence's position ids are simply its cache positions (no left padding anywhere). Active
rows are always the prefix 0..n-1: `prefill` appends rows, `decode` runs one token for every
active row, `select_rows` compacts after sequences finish by moving tail rows into the holes
(a few row copies instead of re-gathering the whole cache). Refilling a freed slot is just a
prefill into the next free row, which is what continuous batching needs.

Decode attention is batched matmuls over rows. With at most 2 kv heads (Qwen2.5 0.5B-3B, the
tiny test model) all query heads of a row go through one matmul against the row's keys of
both kv heads, with the queries laid out block-diagonally (the zero blocks cost at most 2x
the attention FLOPs, which are tiny, and halve the number of small matmuls, the real cost);
with more kv heads, one batched matmul per kv head.

Supported configurations (anything else falls back to the generic path, see
`fast_path_problem`): SiLU gated MLP, RMSNorm, default rotary embeddings (`rope_type`
"default", any `rope_theta`), full attention in every layer (no sliding window), grouped-
query attention, optional q/k/v/o and MLP biases (Qwen2 has q/k/v bias), Qwen3's per-head
q/k RMSNorm, tied or untied output embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

FAST_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral"})


def fast_path_problem(model: torch.nn.Module) -> str | None:
    """Why `model` cannot use the fast decoder, or None when it can."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAST_MODEL_TYPES:
        return f"model_type {model_type!r} has no fast path (supported: {sorted(FAST_MODEL_TYPES)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} is not silu"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type != "default":
        return f"rope_type {rope_type!r} is not supported on the fast path (only 'default')"
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        return "sliding-window layers are not supported on the fast path"
    if model_type == "mistral" and getattr(config, "sliding_window", None) is not None:
        return "mistral sliding_window is set; the fast path only does full attention"
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers") or not hasattr(base, "rotary_emb"):
        return "model has no .model.layers / .model.rotary_emb (unexpected module layout)"
    if getattr(base.rotary_emb, "rope_type", "default") != "default":
        return "rotary embedding is not the default rope"
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        return "output embedding is missing or has a bias"
    if len({p.device for p in model.parameters()}) != 1:
        return "parameters live on several devices"
    for layer in base.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        projections = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        projections += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        # Exactly nn.Linear: LoRA wrappers or quantized subclasses compute something else.
        if any(type(p) is not torch.nn.Linear for p in projections):
            return "a decoder layer's projections are not plain nn.Linear (LoRA / quantized?)"
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        norms += [n for n in (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)) if n is not None]
        if not all(hasattr(n, "variance_epsilon") and hasattr(n, "weight") for n in norms):
            return "a decoder layer's norms are not RMSNorm"
    return None


def _bias(linear: torch.nn.Module) -> torch.Tensor | None:
    return getattr(linear, "bias", None)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as HF computes it: statistics in float32, weight applied in the input dtype."""
    if x.dtype == torch.float32:  # fewest full-width passes: one norm reduction, two multiplies
        mean_sq = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1])
        return (x * mean_sq.add_(eps).rsqrt_()).mul_(weight)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """HF's `x*cos + rotate_half(x)*sin`, with rotate_half's sign folded into the sin table."""
    out = x * cos
    return out.addcmul_(torch.roll(x, x.shape[-1] // 2, dims=-1), sin_signed)


def _matmul(h: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    return torch.mm(h, weight_t, out=out) if bias is None else torch.addmm(bias, h, weight_t, out=out)


def _add_matmul_(x: torch.Tensor, h: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x += h @ weight_t (+ bias), in place: the residual add fused into the matmul."""
    x.addmm_(h, weight_t)
    return x if bias is None else x.add_(bias)


class Scratch:
    """Named output buffers kept between forward passes: `scratch(name, rows, width)` is a
    [rows, width] view of buffer `name`, grown when too small. Contents live until the next
    call with the same name.

    For the largest temporaries of a step (q/k/v, MLP gate and up): on the CPU, fresh
    allocations of a few MB are mmap'd and page-faulted by the C allocator on every call
    (prefill at 256 prompts ran 1.17x faster with the MLP's two in scratch, measured). Other
    devices get fresh tensors: their caching allocators already reuse blocks, and memory kept
    here would be out of reach of a trainer sharing the device.
    """

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        self.buffers: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, rows: int, width: int) -> torch.Tensor:
        if self.device.type != "cpu":
            return torch.empty(rows, width, dtype=self.dtype, device=self.device)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < rows * width:
            buffer = self.buffers[name] = torch.empty(rows * width, dtype=self.dtype, device=self.device)
        return buffer[: rows * width].view(rows, width)


class _Layer:
    """One decoder layer's weights, with attribute lookups and transposes hoisted out of the loop.

    q/k/v are concatenated into one matrix (one matmul instead of three). That matrix is a
    copy: `stale()` notices when a source parameter was written (its autograd version counter
    moves, as it does for `load_state_dict` and optimiser steps) or had its storage replaced
    (`.to()`, `.data = ...`), and the decoder rebuilds the layer. Everything else references
    the module's parameters directly.
    """

    def __init__(self, layer: torch.nn.Module):
        self.module = layer
        a, m = layer.self_attn, layer.mlp
        self._qkv = (a.q_proj, a.k_proj, a.v_proj)
        self.wo_t, self.bo = a.o_proj.weight.t(), _bias(a.o_proj)
        self.wg_t, self.bg = m.gate_proj.weight.t(), _bias(m.gate_proj)
        self.wu_t, self.bu = m.up_proj.weight.t(), _bias(m.up_proj)
        self.wd_t, self.bd = m.down_proj.weight.t(), _bias(m.down_proj)
        self.ln1, self.eps1 = layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon
        self.ln2, self.eps2 = layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon
        qn, kn = getattr(a, "q_norm", None), getattr(a, "k_norm", None)  # Qwen3 per-head norms
        self.qn, self.qn_eps = (qn.weight, qn.variance_epsilon) if qn is not None else (None, 0.0)
        self.kn, self.kn_eps = (kn.weight, kn.variance_epsilon) if kn is not None else (None, 0.0)
        self._sources = [t for lin in self._qkv for t in (lin.weight, _bias(lin)) if t is not None]
        self._referenced = [t for t in layer.parameters() if all(t is not src for src in self._sources)]
        self._pointers = [t.data_ptr() for t in self._referenced]
        self.refuse()

    def refuse(self) -> None:
        with torch.no_grad():
            self.wqkv_t = torch.cat([lin.weight for lin in self._qkv]).t().detach()
            if all(_bias(lin) is None for lin in self._qkv):
                self.bqkv = None
            else:
                self.bqkv = torch.cat([
                    lin.bias if _bias(lin) is not None else lin.weight.new_zeros(lin.weight.shape[0])
                    for lin in self._qkv
                ]).detach()
        self._seen = [(t.data_ptr(), t._version) for t in self._sources]

    def stale(self) -> bool:
        return any((t.data_ptr(), t._version) != seen for t, seen in zip(self._sources, self._seen)) or any(
            t.data_ptr() != ptr for t, ptr in zip(self._referenced, self._pointers)
        )

    def mlp_(self, x: torch.Tensor, h: torch.Tensor, scratch: Scratch | None = None) -> torch.Tensor:
        """x += down(silu(gate(h)) * up(h)), in place (gate and up outputs in `scratch` buffers, if given)."""
        rows, width = h.shape[0], self.wg_t.shape[1]
        gate, up = (scratch("gate", rows, width), scratch("up", rows, width)) if scratch else (None, None)
        act = F.silu(_matmul(h, self.wg_t, self.bg, gate), inplace=True)
        act.mul_(_matmul(h, self.wu_t, self.bu, up))
        return _add_matmul_(x, act, self.wd_t, self.bd)


class FastDecoder:
    """Slot KV cache plus prefill/decode for one Llama-family model. Not thread-safe.

    Memory: the KV cache (layers · slots · 2 · capacity · kv heads · head dim) plus one copy
    of the q/k/v projection weights. `prefill_tokens` bounds the padded tokens per prefill
    sub-batch (None: 1024 on CPU, 16384 elsewhere); long prompts go a few rows at a time.
    """

    continuous = True  # rows can be added while others are in flight

    def __init__(self, model: torch.nn.Module, *, prefill_tokens: int | None = None):
        problem = fast_path_problem(model)
        if problem:
            raise ValueError(f"FastDecoder cannot run this model: {problem}; use the generic backend")
        self.model = model
        cfg = model.config
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        first = model.model.layers[0].self_attn
        self.head_dim = first.q_proj.weight.shape[0] // self.num_heads
        self.scale = self.head_dim**-0.5
        self._prefill_tokens = prefill_tokens
        self.short_prompt = 64  # prompts up to this long use explicit attention in prefill
        self.slots = 0
        self.capacity = 0
        self.n = 0  # active rows are 0..n-1
        self.kv: list[torch.Tensor] = []  # per layer [slots, 2 (key, value), capacity, kv heads*head_dim]
        self.lengths = torch.zeros(0, dtype=torch.long)
        self.refresh()

    # -- weights -------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read the model's parameters (after a weight swap, a move, or a `.data` write).

        In-place writes through autograd-visible ops (`load_state_dict`, optimiser steps) are
        noticed without it; writes through `.data` and replaced modules are not.
        """
        base = self.model.model
        embed = base.embed_tokens.weight
        if self.n and self.kv and (self.kv[0].dtype, self.kv[0].device) != (embed.dtype, embed.device):
            raise RuntimeError("cannot change the model's dtype/device while sequences are in flight")
        self.embed = embed
        self.dtype, self.device = embed.dtype, embed.device
        self.norm_w, self.norm_eps = base.norm.weight, base.norm.variance_epsilon
        head = self.model.get_output_embeddings().weight
        self.head_t = head.t()
        self._pointers = [(t, t.data_ptr()) for t in (embed, self.norm_w, head)]
        self.layers = [_Layer(layer) for layer in base.layers]
        self.inv_freq = base.rotary_emb.inv_freq
        self.rope_scale = float(getattr(base.rotary_emb, "attention_scaling", 1.0))
        if self.kv and (self.kv[0].dtype, self.kv[0].device) != (self.dtype, self.device):
            self.kv, self.slots, self.capacity = [], 0, 0  # reallocated by reserve()
            self.lengths = torch.zeros(0, dtype=torch.long)
        self.lengths = self.lengths.to(self.device)
        # CPU: small sub-batches keep prefill temporaries small enough to be reused instead of
        # fresh mmap'd (page-faulting) memory, measured faster at 256 prompts; accelerators
        # prefer big batches.
        self.prefill_tokens = self._prefill_tokens or (1024 if self.device.type == "cpu" else 16384)
        self._cos = self._sin = torch.zeros(0, self.head_dim, device=self.device)
        self.scratch = Scratch(self.dtype, self.device)
        self._rope_table(self.capacity)

    def _sync_weights(self) -> None:
        """Follow the module's parameters: re-fuse q/k/v after writes, re-read moved storage."""
        if any(t.data_ptr() != ptr for t, ptr in self._pointers):
            self.refresh()
            return
        for i, layer in enumerate(self.layers):
            if layer.stale():
                self.layers[i] = _Layer(layer.module)

    # -- cache bookkeeping ----------------------------------------------------------------
    @torch.inference_mode()
    def reserve(self, rows: int, length: int) -> None:
        """Make room for `rows` rows of up to `length` tokens each (grows, never shrinks)."""
        if rows <= self.slots and length <= self.capacity:
            return
        slots = max(rows, self.slots)
        capacity = max(self.capacity, -(-length // 16) * 16)
        width = self.num_kv_heads * self.head_dim
        for i in range(len(self.layers)):
            new = torch.zeros(slots, 2, capacity, width, dtype=self.dtype, device=self.device)
            if i < len(self.kv):
                new[: self.slots, :, : self.capacity] = self.kv[i]
                self.kv[i] = new
            else:
                self.kv.append(new)
        lengths = torch.zeros(slots, dtype=torch.long, device=self.device)
        lengths[: self.slots] = self.lengths
        self.lengths, self.slots, self.capacity = lengths, slots, capacity
        # Flat index of (row, key/value, position 0) in a cache viewed as [slots*2*capacity, width].
        rows = torch.arange(slots, device=self.device)
        self._key_base = rows * 2 * capacity
        self._positions = torch.arange(capacity, device=self.device)
        # Block-diagonal queries (see the module docstring); off-diagonal blocks stay zero.
        self._queries = torch.zeros(slots, self.num_heads, width, dtype=self.dtype, device=self.device)
        self._rope_table(capacity)

    def _rope_table(self, length: int) -> None:
        if self._cos.shape[0] >= length:
            return
        # Same arithmetic as HF's rotary embedding: float32 positions times inv_freq.
        pos = torch.arange(length, device=self.device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq.to(self.device, torch.float32)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        sign = torch.ones(self.head_dim, device=self.device)
        sign[: self.head_dim // 2] = -1.0
        self._cos = (emb.cos() * self.rope_scale).to(self.dtype)
        self._sin = (emb.sin() * self.rope_scale * sign).to(self.dtype)  # rotate_half's sign folded in

    @torch.inference_mode()
    def select_rows(self, keep: Sequence[int]) -> None:
        """Compact: new row i is old row keep[i]; rows past len(keep) become free."""
        moves = [(i, k) for i, k in enumerate(keep) if i != k]
        if moves:
            dst = torch.tensor([i for i, _ in moves], device=self.device)
            src = torch.tensor([k for _, k in moves], device=self.device)
            for cache in self.kv:
                cache[dst] = cache[src]
            self.lengths[dst] = self.lengths[src]
        self.n = len(keep)

    # -- forward passes -------------------------------------------------------------------
    def _qkv(self, w: _Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lead: tuple[int, ...]):
        """Normed input -> (roped q and k as [*lead, H+Hkv, D], v as [*lead, Hkv, D])."""
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = _matmul(_rms_norm(x, w.ln1, w.eps1), w.wqkv_t, w.bqkv, self.scratch("qkv", x.shape[0], w.wqkv_t.shape[1]))
        split = (H + Hkv) * D
        if w.qn is None:
            qk = qkv[:, :split].view(*lead, H + Hkv, D)
        else:  # Qwen3: RMSNorm over each head's q and k before the rotation
            q = _rms_norm(qkv[:, : H * D].reshape(*lead, H, D), w.qn, w.qn_eps)
            k = _rms_norm(qkv[:, H * D : split].reshape(*lead, Hkv, D), w.kn, w.kn_eps)
            qk = torch.cat([q, k], dim=-2)
        return _rope(qk, cos, sin), qkv[:, split:].view(*lead, Hkv, D)

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], reserve: int = 0) -> torch.Tensor:
        """Write `prompts` into rows n..n+m-1; return next-token logits [m, V] (float32).

        Identical prompts (a GRPO group's G samples) run once: each distinct prompt is computed
        in one row, then its K/V positions are copied to the rows of its repeats.
        """
        self._sync_weights()
        m, start = len(prompts), self.n
        longest = max(len(p) for p in prompts)
        self.reserve(start + m, max(longest, reserve))
        first: dict[tuple[int, ...], int] = {}
        which = [first.setdefault(tuple(p), len(first)) for p in prompts]  # prompt i is distinct prompt which[i]
        distinct = list(first) if len(first) < m else prompts
        per_batch = max(1, self.prefill_tokens // longest)
        out = [self._prefill(distinct[i : i + per_batch]) for i in range(0, len(distinct), per_batch)]
        logits = out[0] if len(out) == 1 else torch.cat(out)
        if len(distinct) == m:
            return logits
        which_m = torch.tensor(which, device=self.device)
        rows = start + which_m
        for cache in self.kv:  # gathered (a copy) before the write, so overlapping rows are safe
            cache[start : start + m, :, :longest] = cache[rows, :, :longest]
        self.lengths[start : start + m] = self.lengths[rows]
        self.n = start + m
        return logits[which_m]

    def _prefill(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Right-padded batch forward over whole prompts; K/V go to rows n..n+m-1.

        Only each prompt's last position needs a next-token distribution, so the last layer
        runs attention, o_proj and the MLP for that position alone (its K/V still come from
        every position): the same numbers for that position, a quarter fewer FLOPs in a
        4-layer model's prompt pass.
        """
        m, start = len(prompts), self.n
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        L = max(len(p) for p in prompts)
        lens = torch.tensor([len(p) for p in prompts], device=self.device)
        ids = torch.tensor([list(p) + [0] * (L - len(p)) for p in prompts], dtype=torch.long, device=self.device)
        ar = self._positions[:L]
        visible = (ar[None, :] <= ar[:, None])[None] & (ar[None, :] < lens[:, None])[:, None, :]  # [m, Lq, Lk]
        rows, last = torch.arange(m, device=self.device), lens - 1
        cos, sin = self._cos[:L, None, :], self._sin[:L, None, :]  # broadcast over heads
        x = F.embedding(ids.view(-1), self.embed)  # [m*L, E]
        for li, w in enumerate(self.layers):
            qk, v = self._qkv(w, x, cos, sin, (m, L))  # [m, L, heads, D]
            k = qk[:, :, H:]
            self.kv[li][start : start + m, 0, :L] = k.reshape(m, L, Hkv * D)
            self.kv[li][start : start + m, 1, :L] = v.reshape(m, L, Hkv * D)
            if li == len(self.layers) - 1:  # the last layer: only the last position of each prompt
                x = x.view(m, L, -1)[rows, last]
                attn = self._prompt_attention(qk[rows, last, None, :H], k, v, visible[rows, last, None])
            else:
                attn = self._prompt_attention(qk[:, :, :H], k, v, visible)
            _add_matmul_(x, attn.reshape(x.shape[0], H * D), w.wo_t, w.bo)
            w.mlp_(x, _rms_norm(x, w.ln2, w.eps2), self.scratch)
        self.lengths[start : start + m] = lens
        self.n = start + m
        return torch.mm(_rms_norm(x, self.norm_w, self.norm_eps), self.head_t).float()

    def _prompt_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Grouped attention of queries q [m, Lq, H, D] over k, v [m, L, Hkv, D] where visible [m, Lq, L]; [m, Lq, H, D]."""
        m, Lq, H, D = q.shape
        L, Hkv = k.shape[1], k.shape[2]
        G = H // Hkv
        if L > self.short_prompt:  # long prompts: SDPA's fused kernel, no Lq x L score matrix per head kept
            attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  attn_mask=visible[:, None], enable_gqa=Hkv != H)
            return attn.transpose(1, 2)
        # Short prompts: explicit grouped attention (cheaper than SDPA), queries laid out [m*Hkv, G*Lq, D].
        bias = torch.zeros(m, Lq, L, dtype=self.dtype, device=self.device).masked_fill_(~visible, float("-inf"))
        bias = bias[:, None, None].expand(m, Hkv, G, Lq, L).reshape(m * Hkv, G * Lq, L)
        queries = q.reshape(m, Lq, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(m * Hkv, G * Lq, D)
        keys_t = k.permute(0, 2, 3, 1).reshape(m * Hkv, D, L)
        values = v.permute(0, 2, 1, 3).reshape(m * Hkv, L, D)
        probs = self._softmax(torch.baddbmm(bias, queries, keys_t, alpha=self.scale))
        return torch.bmm(probs, values).view(m, Hkv, G, Lq, D).permute(0, 3, 1, 2, 4)

    def _softmax(self, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[-1] < 16 and scores.device.type == "cpu":
            # torch's CPU softmax over a last dim shorter than 16 takes a scalar path (5x slower
            # at 256x4x11, measured); exp(s - max) / sum in plain ops is the same function.
            h = scores.float()
            e = (h - h.amax(-1, keepdim=True)).exp_()
            return e.div_(e.sum(-1, keepdim=True)).to(self.dtype)
        if self.dtype == torch.float32:
            return torch.softmax(scores, dim=-1)
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(self.dtype)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token to each active row 0..n-1; return next-token logits [n, V] (float32)."""
        self._sync_weights()
        n, H, Hkv, D, cap = self.n, self.num_heads, self.num_kv_heads, self.head_dim, self.capacity
        G, width = H // Hkv, Hkv * D
        pos = self.lengths[:n]
        T = int(pos.max()) + 1
        if T > cap:
            raise RuntimeError("KV cache capacity exceeded; reserve() a longer cache before decoding")
        cos, sin = self._cos[pos].unsqueeze(1), self._sin[pos].unsqueeze(1)
        # Row r sees cache positions 0..pos[r] (its new token included).
        bias = torch.zeros(n, 1, T, dtype=self.dtype, device=self.device)
        bias.masked_fill_((self._positions[:T] > pos[:, None]).unsqueeze(1), float("-inf"))
        base = self._key_base[:n] + pos
        slots = torch.cat([base, base + cap])  # where this step's keys, then values, go
        x = F.embedding(tokens.to(self.device), self.embed)  # [n, E]
        for li, w in enumerate(self.layers):
            qk, v = self._qkv(w, x, cos, sin, (n,))
            kv = self.kv[li]
            kv.view(-1, width).index_copy_(0, slots, torch.cat([qk[:, H:].reshape(n, width), v.reshape(n, width)]))
            row = 2 * cap * width  # stride between rows of the cache
            if Hkv <= 2:  # one [H, width] x [width, T] product per row, queries block-diagonal
                queries = self._queries[:n]
                queries.view(n, Hkv, G, Hkv, D).diagonal(dim1=1, dim2=3).copy_(
                    qk[:, :H].view(n, Hkv, G, D).permute(0, 2, 3, 1)
                )
                keys_t = kv.as_strided((n, width, T), (row, 1, width))
                values = kv.as_strided((n, T, width), (row, width, 1), cap * width)
                scores = torch.baddbmm(bias, queries, keys_t, alpha=self.scale)  # [n, H, T]
                out = torch.bmm(self._softmax(scores), values)  # [n, H, width]: keep each head's block
                attn = out.view(n, Hkv, G, Hkv, D).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).reshape(n, H * D)
            else:  # one batched product per kv head against its column block of the cache
                parts = []
                for h in range(Hkv):
                    keys_t = kv.as_strided((n, D, T), (row, 1, width), h * D)
                    values = kv.as_strided((n, T, D), (row, width, 1), cap * width + h * D)
                    scores = torch.baddbmm(bias, qk[:, h * G : (h + 1) * G], keys_t, alpha=self.scale)
                    parts.append(torch.bmm(self._softmax(scores), values))  # [n, G, D]
                attn = torch.cat(parts, dim=1).view(n, H * D)
            _add_matmul_(x, attn, w.wo_t, w.bo)
            w.mlp_(x, _rms_norm(x, w.ln2, w.eps2), self.scratch)
        self.lengths[:n] += 1
        return torch.mm(_rms_norm(x, self.norm_w, self.norm_eps), self.head_t).float()
