"""The machinery of the harness's decode loop (`bench.sampling.generation.KVCacheSampler`): the key/value cache written
in place and grouped by prompt length (`DecodeCache`), attention of one new token per row over it
(`decode_attention`), linear weights packed once for oneDNN on CPU (`packed_linears`), and the forward pass of
a decode step (`decode_step`: `FusedDecodeStep` on Llama, Mistral and Qwen2, else the model's own forward)."""

import bisect
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, get_layer_types_and_kwargs
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask


@dataclass
class RowGroup:
    """Rows `begin:end` of a decode batch that share key/value buffers: their prompts end at slot
    `prompt_width` of the buffers, and a row's own prompt starts at its `first_slot`."""

    begin: int
    end: int
    prompt_width: int
    first_slot: torch.Tensor


@dataclass
class RowMoves:
    """How a group's buffers lose rows in place: rows `sources` are copied over rows `targets`, and the group
    keeps its first `rows` rows (a view; nothing else is copied)."""

    rows: int
    targets: torch.Tensor
    sources: torch.Tensor


class DecodeCache(Cache):
    """The key/value cache of the harness's decode loop: buffers written in place (HF's DynamicLayer
    concatenates instead, copying every row's whole cache at every step), holding prompts prefilled
    elsewhere and right-aligned (`DecodeLayer.place`).

    Under `decode_attention`, rows of similar prompt length (a batch comes sorted by length) share buffers as
    wide as their own longest prompt, and the buffers grow by `growth` slots as tokens are decoded: attending
    to the cache costs in proportion to the slots read, and one buffer for the batch would read every row at
    the width of its longest prompt plus every slot the generation may still fill. For a model that keeps its
    own attention, the batch is one group with buffers sized once for the whole generation."""

    group_rows = 32  # rows per group: a multiple of `KVCacheSampler.prefill_rows` (bench perf: 16 or 32 rows
    # per group took the same time on its 64 prompts, 8 rows per group longer)
    growth = 32

    def __init__(self, num_layers: int, prompt_lengths: list[int], new_tokens: int, dtype: torch.dtype | None,
                 device, grouped: bool):
        self.new_tokens, self.dtype, self.grouped = new_tokens, dtype, grouped
        group_rows = self.group_rows if grouped else len(prompt_lengths)
        self.first_growth = min(self.growth, new_tokens) if grouped else new_tokens
        self.groups = []
        for begin in range(0, len(prompt_lengths), group_rows):
            lengths = prompt_lengths[begin:begin + group_rows]
            self.groups.append(RowGroup(begin, begin + len(lengths), max(lengths),
                                        torch.tensor([max(lengths) - n for n in lengths], device=device)))
        self.prompt_width = max(prompt_lengths)
        self.masks: tuple[tuple, list[torch.Tensor]] = ((), [])
        super().__init__(layers=[DecodeLayer(self) for _ in range(num_layers)])

    def blocked_slots(self, written: int, widths: tuple[int, ...]) -> list[torch.Tensor]:
        """Per group, an additive mask, -inf where a row may not attend (its left padding and the slots not
        written yet) and 0 elsewhere. The same for every layer of a step, so built once."""
        if self.masks[0] != (written, widths):
            masks = []
            for group, width in zip(self.groups, widths):
                slots = torch.arange(width, device=group.first_slot.device)
                blocked = (slots < group.first_slot[:, None]) | (slots >= group.prompt_width + written)
                masks.append(torch.zeros(blocked.shape, device=blocked.device).masked_fill_(
                    blocked, float("-inf"))[:, None, None])
            self.masks = (written, widths), masks
        return self.masks[1]

    def rows_to_keep(self, finished: torch.Tensor) -> torch.Tensor:
        """The rows that stay when the `finished` ones leave, ordered so that each group fills its finished
        rows with its own last live rows: `batch_select_indices` then copies only those rows, in place."""
        done = finished.tolist()
        keep = []
        for group in self.groups:
            live = [row for row in range(group.begin, group.end) if not done[row]]
            tail = iter(row for row in live if row >= group.begin + len(live))
            keep += [next(tail) if done[row] else row for row in range(group.begin, group.begin + len(live))]
        return torch.tensor(keep, dtype=torch.long, device=finished.device)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keeps (or repeats) the rows `indices`, in that order. Consecutive rows from the same group stay one
        group, and a group whose rows all stay, in order, keeps its buffers. A group that keeps its first rows,
        some replaced by its own later rows (`rows_to_keep`), copies just those rows in place; any other
        selection copies the group's buffers."""
        begins = [group.begin for group in self.groups]
        runs: list[tuple[int, list[int]]] = []  # (source group, its rows)
        for row in indices.tolist():
            source = bisect.bisect_right(begins, row) - 1
            if not runs or runs[-1][0] != source:
                runs.append((source, []))
            runs[-1][1].append(row - begins[source])
        runs_per_source = Counter(source for source, _ in runs)
        plan, groups, begin = [], [], 0
        for source, local in runs:
            group = self.groups[source]
            moves = [(target, row) for target, row in enumerate(local) if row != target]
            if local == list(range(group.end - group.begin)):
                selection = None
            elif (runs_per_source[source] == 1 and len(set(local)) == len(local)
                  and all(row >= len(local) for _, row in moves)):
                targets, sources = (torch.tensor([move[i] for move in moves], dtype=torch.long,
                                                 device=indices.device) for i in (0, 1))
                selection = RowMoves(len(local), targets, sources)
            else:
                selection = torch.tensor(local, device=indices.device)
            first_slot = (group.first_slot if selection is None
                          else group.first_slot[torch.tensor(local, device=group.first_slot.device)])
            groups.append(RowGroup(begin, begin + len(first_slot), group.prompt_width, first_slot))
            plan.append((source, selection))
            begin += len(first_slot)
        for layer in self.layers:
            layer.select(plan)
        self.groups, self.masks = groups, ((), [])


class DecodeLayer(DynamicLayer):
    """One layer of a `DecodeCache`: a key and a value buffer per row group, zeroed, not empty (padding and
    unwritten slots are masked out, and a masked slot must still hold a finite value: a zero weight times NaN
    is NaN)."""

    def __init__(self, cache: DecodeCache):
        super().__init__()
        self.cache, self.key_buffers, self.value_buffers, self.written = cache, [], [], 0

    def get_seq_length(self) -> int:
        """Where the batch's longest prompt stands: the width of the attention mask HF builds."""
        return self.cache.prompt_width + self.written

    def place(self, rows: slice, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keys and values of prompts prefilled on their own, right-aligned in their group's buffers."""
        if not self.is_initialized:
            super().lazy_initialization(keys, values)
            for group in self.cache.groups:
                for buffers, like in ((self.key_buffers, keys), (self.value_buffers, values)):
                    buffers.append(like.new_zeros(
                        (group.end - group.begin, like.shape[1], group.prompt_width + self.cache.first_growth,
                         like.shape[-1]), dtype=self.cache.dtype or like.dtype))
        index = bisect.bisect_right([group.begin for group in self.cache.groups], rows.start) - 1
        group = self.cache.groups[index]
        if rows.stop > group.end:
            raise ValueError(f"rows {rows.start}:{rows.stop} span two groups of the decode cache")
        local = slice(rows.start - group.begin, rows.stop - group.begin)
        start, end = group.prompt_width - keys.shape[-2], group.prompt_width
        self.key_buffers[index][local, :, start:end] = keys
        self.value_buffers[index][local, :, start:end] = values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Writes a decode step's token of every row in place. Returns the groups for `decode_attention`, or,
        ungrouped, views of the written slots for the model's own attention."""
        if key_states.shape[-2] != 1:
            raise ValueError("a DecodeCache takes prompts through `place` and one token per step")
        for index, group in enumerate(self.cache.groups):
            slot = group.prompt_width + self.written
            if slot == self.key_buffers[index].shape[2]:
                self.grow(index, group.prompt_width + self.cache.new_tokens)
            self.key_buffers[index][:, :, slot] = key_states[group.begin:group.end, :, 0]
            self.value_buffers[index][:, :, slot] = value_states[group.begin:group.end, :, 0]
        self.written += 1
        if not self.cache.grouped:
            end = self.cache.prompt_width + self.written
            return self.key_buffers[0][:, :, :end], self.value_buffers[0][:, :, :end]
        widths = tuple(buffer.shape[2] for buffer in self.key_buffers)
        grouped = GroupedKeyValues(self.cache.groups, self.key_buffers, self.value_buffers,
                                   self.cache.blocked_slots(self.written, widths))
        return grouped, grouped

    def grow(self, index: int, capacity: int) -> None:
        for buffers in (self.key_buffers, self.value_buffers):
            old = buffers[index]
            width = min(old.shape[2] + self.cache.growth, capacity)
            buffers[index] = old.new_empty(old.shape[:2] + (width, old.shape[3]))
            buffers[index][:, :, :old.shape[2]] = old
            buffers[index][:, :, old.shape[2]:] = 0

    def select(self, plan: list[tuple[int, torch.Tensor | RowMoves | None]]) -> None:
        self.key_buffers = [selected_rows(self.key_buffers[source], how) for source, how in plan]
        self.value_buffers = [selected_rows(self.value_buffers[source], how) for source, how in plan]


def selected_rows(buffer: torch.Tensor, how: torch.Tensor | RowMoves | None) -> torch.Tensor:
    if how is None:
        return buffer
    if isinstance(how, RowMoves):
        buffer[how.targets] = buffer[how.sources]
        return buffer[:how.rows]
    return buffer[how]


@dataclass
class GroupedKeyValues:
    """What a grouped `DecodeLayer` hands `decode_attention` in place of one key and one value tensor."""

    groups: list[RowGroup]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    blocked: list[torch.Tensor]


DECODE_ATTENTION = "harness-decode"


def decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for the decode loop. One new token per row, attending group by group to a grouped
    `DecodeCache`: its heads grouped by the key/value head they share, and two matmuls over the
    group's buffers, instead of SDPA's CPU kernels, which spend several times longer on a single query row
    than reading the cache takes (`bench perf`'s profile). Prompts (more than one query per row) go to SDPA:
    measured, its kernels beat the two matmuls there."""
    if not isinstance(key, GroupedKeyValues):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    query = query.to(key.keys[0].dtype)  # see attend_one_token
    outputs = [attend_one_token(query[group.begin:group.end], keys, values, blocked, scaling)
               for group, keys, values, blocked in zip(key.groups, key.keys, key.values, key.blocked)]
    return torch.cat(outputs).transpose(1, 2), None


def attend_one_token(query, key, value, blocked, scaling):
    """query (B, heads, 1, d) on key and value (B, KV heads, slots, d); `blocked` (B, 1, 1, slots) is -inf
    where a row may not attend and 0 elsewhere."""
    batch, heads, _, dim = query.shape
    # The query takes the cache's dtype, not the reverse: casting the keys would copy every row's whole cache,
    # transposed, in every layer at every step, the largest cost of a decode step in the profile. SDPA under
    # autocast runs in that dtype too.
    grouped = query.reshape(batch, key.shape[1], heads // key.shape[1], dim).to(key.dtype)  # (B, KV heads, group, d)
    # The mask plus the scaled products, in one pass. Under bf16 the products are rounded to bf16 before the fp32
    # mask is added (SDPA keeps its scores in fp32): a slightly coarser logit, not why greedy outputs part from
    # `generate` (near-ties of bf16 rounding either way: docs/performance.md, tests/sampling/test_greedy_bf16.py).
    scores = torch.add(blocked, torch.matmul(grouped, key.transpose(-1, -2)), alpha=scaling)
    output = torch.matmul(scores.softmax(-1).to(value.dtype), value)
    return output.reshape(batch, heads, 1, dim)


AttentionInterface.register(DECODE_ATTENTION, decode_attention)
AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)


# Architectures whose attention hands the keys and values the cache returns straight to the attention function
# (read in their transformers source). A grouped `DecodeCache` returns row groups, not tensors: an attention
# that reads or transforms the keys in between (IDEFICS's key norm, Doge's dynamic mask) must not get them.
GROUPED_CACHE_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "ministral", "qwen2", "qwen2_moe", "qwen3", "gemma", "olmo", "olmo2", "olmo3",
    "granite", "phi", "phi3", "stablelm", "smollm3", "cohere", "starcoder2", "glm", "apertus", "arcee",
})


@contextmanager
def attention_for_decoding(model):
    """`decode_attention` for the duration of a decode loop, on models of `GROUPED_CACHE_MODEL_TYPES` that use
    SDPA over full attention with no logit soft-capping (which `decode_attention` does not apply); other
    models keep their own attention, over a `DecodeCache` of one group."""
    config = model.config
    text_config = config.get_text_config(decoder=True)
    usable = (config._attn_implementation == "sdpa" and text_config.model_type in GROUPED_CACHE_MODEL_TYPES
              and getattr(text_config, "attn_logit_softcapping", None) is None
              and all(kind == "full_attention" for kind in get_layer_types_and_kwargs(text_config)[0]))
    if not usable:
        yield
        return
    config._attn_implementation = DECODE_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


PACKED_LINEAR_ROWS = 64  # the batch oneDNN lays packed weights out for; any batch runs on them


def packed_linear_dtype(model) -> torch.dtype | None:
    """bf16 when the model's linear layers run in bf16 on a CPU whose oneDNN has bf16 kernels; else None."""
    if (model.device.type != "cpu" or not torch.backends.mkldnn.is_available()
            or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):  # private ops: absent from some builds
        return None
    dtype = autocast_dtype("cpu") or next(model.parameters()).dtype
    if dtype != torch.bfloat16 or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return dtype


@contextmanager
def packed_linears(model):
    """Every `nn.Linear` of a bf16 model on CPU runs, for the duration, on a copy of its weight cast once and
    reordered into oneDNN's blocked layout, the one PyTorch's compiler uses on CPU. On a plain row-major
    weight oneDNN re-blocks the weight inside every call; a decode step at batch 46 spends 22 ms in the
    linear layers on plain weights and 18 ms on packed ones (bench perf's generation part). The outputs are
    those of the autocast linear, bf16. Elsewhere (GPUs, fp32, CPUs without bf16 kernels) nothing changes."""
    dtype = packed_linear_dtype(model)
    patched = []
    if dtype is not None:
        for module in model.modules():
            if type(module) is torch.nn.Linear:
                weight = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach().to(dtype), PACKED_LINEAR_ROWS)
                bias = None if module.bias is None else module.bias.detach().to(dtype)
                module.forward = partial(packed_linear, weight, bias, dtype)  # shadows the class's forward
                patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def packed_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, inputs: torch.Tensor):
    return torch.ops.mkldnn._linear_pointwise(inputs.to(dtype).contiguous(), weight, bias, "none", [], "")


def decode_cache(model, prompt_lengths: list[int], new_tokens: int) -> Cache:
    """The cache of a decode loop over prompts of these lengths (sorted): a `DecodeCache`, grouped by prompt
    length under `decode_attention`, when every layer attends to the whole context; otherwise (sliding windows,
    linear attention, shared KV) the model's own dynamic cache. Under autocast, keys and values are stored in
    its dtype: attention casts them to it at every step anyway (keys leave the rotary embedding in fp32), so
    the stored values are the ones attention reads, at half the bytes."""
    config = model.config.get_text_config(decoder=True)
    layer_types, _ = get_layer_types_and_kwargs(config)
    if any(kind != "full_attention" for kind in layer_types):
        return DynamicCache(config=model.config)
    return DecodeCache(len(layer_types), prompt_lengths, new_tokens, autocast_dtype(model.device.type), model.device,
                       grouped=model.config._attn_implementation == DECODE_ATTENTION)


class FusedDecodeStep:
    """The forward pass of one decode step (a token per row, over a grouped `DecodeCache`) of a Llama, Mistral
    or Qwen2 model: pre-norm layers of rotary attention and a gated MLP. It calls the model's own modules in
    the order the model's forward does, without the forward's per-call machinery (mask building, output
    records, the attention registry), and rotates the queries and keys in one pass. On CPU in bf16, q/k/v run
    as one packed matmul and gate/up as another. The logits are bit-identical to the model's forward
    (tests/sampling/test_generation.py); a 46-row step of SmolLM2 takes about a tenth less time."""

    LAYERS = {"LlamaForCausalLM": "LlamaDecoderLayer", "MistralForCausalLM": "MistralDecoderLayer",
              "Qwen2ForCausalLM": "Qwen2DecoderLayer"}

    @classmethod
    def fits(cls, model, cache) -> bool:
        """Only on these exact classes (not subclasses, nor FSDP's wrappers of them), whose forward this one
        repeats, and only over the grouped cache `decode_attention` reads."""
        layer_type = cls.LAYERS.get(type(model).__name__)
        return (layer_type is not None and isinstance(cache, DecodeCache) and cache.grouped
                and all(type(layer).__name__ == layer_type for layer in model.model.layers))

    def __init__(self, model, cache: "DecodeCache"):
        self.model, self.cache = model, cache
        dtype = packed_linear_dtype(model)
        self.layers = [(layer, fused_packed_linear(dtype, layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                   layer.self_attn.v_proj),
                        fused_packed_linear(dtype, layer.mlp.gate_proj, layer.mlp.up_proj))
                       for layer in model.model.layers[:len(cache.layers)]]

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, attention_mask=None) -> torch.Tensor:
        decoder = self.model.model
        hidden = decoder.embed_tokens(tokens[:, None])
        cos, sin = decoder.rotary_emb(hidden, position_ids=positions[:, None])
        half = sin.shape[-1] // 2  # rotate_half(x) * sin is x rolled by half times sin with its first half negated
        cos, signed_sin = cos[:, :, None], torch.cat((-sin[..., :half], sin[..., half:]), -1)[:, :, None]
        for (layer, qkv, gate_up), cache_layer in zip(self.layers, self.cache.layers):
            attention, mlp = layer.self_attn, layer.mlp
            query, key, value = self.rotated_projections(attention, layer.input_layernorm(hidden), qkv, cos,
                                                         signed_sin)
            keys_values, _ = cache_layer.update(key, value)
            output, _ = decode_attention(attention, query, keys_values, keys_values, None, scaling=attention.scaling)
            hidden = hidden + attention.o_proj(output.reshape(*hidden.shape[:2], -1))
            normed = layer.post_attention_layernorm(hidden)
            if gate_up is None:
                hidden = hidden + mlp(normed)
            else:
                gate, up = gate_up(normed).chunk(2, dim=-1)
                hidden = hidden + mlp.down_proj(mlp.act_fn(gate) * up)
        return self.model.lm_head(decoder.norm(hidden))[:, -1]

    @staticmethod
    def rotated_projections(attention, normed, qkv, cos, signed_sin):
        """Queries, keys and values (batch, heads, 1, head_dim), the queries and keys rotated together."""
        projections = (qkv(normed) if qkv is not None else
                       torch.cat([attention.q_proj(normed), attention.k_proj(normed), attention.v_proj(normed)], -1))
        projections = projections.view(*normed.shape[:2], -1, attention.head_dim)
        heads = attention.config.num_attention_heads
        kv_heads = (projections.shape[2] - heads) // 2
        rotary = projections[:, :, :heads + kv_heads]
        rotated = rotary * cos + rotary.roll(attention.head_dim // 2, -1) * signed_sin
        return (rotated[:, :, :heads].transpose(1, 2), rotated[:, :, heads:].transpose(1, 2),
                projections[:, :, heads + kv_heads:].transpose(1, 2))


def fused_packed_linear(dtype: torch.dtype | None, *linears: torch.nn.Linear):
    """Linear layers of one input as one packed matmul (their outputs side by side), or None off the packed
    path (`packed_linear_dtype`) or when they differ in having a bias."""
    if (dtype is None or any(type(linear) is not torch.nn.Linear for linear in linears)
            or len({linear.bias is None for linear in linears}) > 1):
        return None
    weight = torch.ops.mkldnn._reorder_linear_weight(
        torch.cat([linear.weight.detach() for linear in linears]).to(dtype), PACKED_LINEAR_ROWS)
    bias = None if linears[0].bias is None else torch.cat([linear.bias.detach() for linear in linears]).to(dtype)
    return partial(packed_linear, weight, bias, dtype)


def hf_decode_step(model, cache: Cache, tokens: torch.Tensor, positions: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=positions[:, None],
                 past_key_values=cache, use_cache=True).logits[:, -1]


def decode_step(model, cache: Cache):
    """The forward pass of a decode step: `FusedDecodeStep` where it fits, else the model's own forward."""
    if FusedDecodeStep.fits(model, cache):
        return FusedDecodeStep(model, cache)
    return partial(hf_decode_step, model, cache)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
