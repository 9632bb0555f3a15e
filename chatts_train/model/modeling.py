"""ChatTS-14B as a native transformers model: Qwen2 + a time-series patch encoder.

Built on transformers' own `Qwen2ForCausalLM`; the official remote code is not used (it breaks on
transformers >= 4.56 generation). State-dict keys are exactly the published ones (`model.*`, `lm_head.*`,
`ts_encoder.mlp.{0,2,4,6,8}.*`, `ts_encoder.position_embedding.weight`), so the official weights load
and adapters trained here fit the official model.

Time series arrive already cut into encoder rows by the collator (`ts_patches`, `ts_positions`: all rows
of the batch in one flat tensor). The sequence already holds one `<ts>` token per row, so the true length
is known before the forward and labels line up; the k-th row goes to the k-th `<ts>` in row-major order.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..errors import CheckpointError, read_json_object
from .attention import allow_sdpa_kernels, choose_attention, register
from .timeseries import TSSpec
from ..tokens import IGNORE_INDEX, TS_END_TOKEN_ID, TS_TOKEN_ID
from .shards import check_shard, missing_shards, weight_map

register()  # the attention of cards without SDPA's flash kernel (attention.py), known to transformers


class ChatTSConfig(Qwen2Config):
    """Qwen2 config plus the `ts` block. Accepts both releases' config.json as they are."""

    model_type = "chatts"

    def __init__(self, ts: Optional[dict] = None, ts_token_start_index: int = TS_TOKEN_ID,
                 ts_token_end_index: int = TS_END_TOKEN_ID, **kwargs):
        self.ts = ts
        self.ts_token_start_index = ts_token_start_index
        self.ts_token_end_index = ts_token_end_index
        super().__init__(**kwargs)

    @property
    def ts_spec(self) -> TSSpec:
        return TSSpec.from_ts_config(self.ts)


class TimeSeriesEncoder(nn.Module):
    """The published patch encoder: `ts.num_layers` Linear layers with GELU between, nothing else.

    0801 adds a position table whose row `max_sequence_length` is the padding row; each MLP input row is
    the patch's values followed by the patch's position embeddings, time-major (width 8 + 8 * 16).
    """

    def __init__(self, config: ChatTSConfig):
        super().__init__()
        spec = config.ts_spec
        ts = config.ts
        self.use_position_embedding = spec.use_position_embedding
        if spec.use_position_embedding:
            self.position_embedding = nn.Embedding(spec.max_length + 1, spec.embedding_dim)
        layers: list[nn.Module] = []
        width = spec.row_width
        for i in range(int(ts["num_layers"])):
            if i:
                layers.append(nn.GELU())
            layers.append(nn.Linear(width, int(ts["hidden_size"])))
            width = int(ts["hidden_size"])
        self.mlp = nn.Sequential(*layers)

    def forward(self, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        rows = patches
        if self.use_position_embedding:
            pos = self.position_embedding(positions)  # [P, patch, dim]
            rows = torch.cat([patches, pos.flatten(1).to(patches.dtype)], dim=-1)
        return self.mlp(rows)


@dataclass
class ChatTSOutput(CausalLMOutputWithPast):
    """`loss` is the mean over answer tokens; `loss_sum` and `num_tokens` let callers average across
    micro-steps and ranks by tokens instead of averaging per-sample means."""

    loss_sum: Optional[torch.Tensor] = None
    num_tokens: Optional[torch.Tensor] = None


class ChatTSForCausalLM(Qwen2ForCausalLM):
    config_class = ChatTSConfig
    _no_split_modules = ["Qwen2DecoderLayer", "TimeSeriesEncoder"]

    def __init__(self, config: ChatTSConfig):
        if not getattr(config, "ts", None):
            raise CheckpointError("config has no `ts` block: this is not a ChatTS checkpoint")
        super().__init__(config)
        self.ts_encoder = TimeSeriesEncoder(config)
        # True: transformers' own loss over full-vocabulary logits at every position, the usual recipe, kept
        # as the baseline of `benchmarks/memprobe.py --baseline hf` and as a reference in tests.
        self.full_vocabulary_loss = False
        # True: the recomputed decoder layers' inputs wait for the backward in pinned host memory (lora.py)
        self.checkpoints_on_cpu = False
        # How the vocabulary matrices are read where they may be ZeRO-3 partitions: set by the loader of a
        # DeepSpeed run (fit/vocab_parallel.py's SlicedVocabulary); None: they are whole, read as usual.
        self.vocabulary = None
        self.post_init()

    def embed(self, input_ids: torch.Tensor, ts_patches: Optional[torch.Tensor] = None,
              ts_positions: Optional[torch.Tensor] = None, table: Optional[torch.Tensor] = None,
              ts_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token embeddings with every `<ts>` position overwritten by its encoder row, in order.

        The encoder runs on every call, also with zero rows: under ZeRO-3 every rank must run the same
        modules each step or the parameter all-gathers deadlock. Without rows (a decoding step) no position
        is overwritten, even if the model itself generated a `<ts>` token. `table`: the embedding's ZeRO-3
        partitioned weight, to look the rows up in each rank's slice instead of gathering it; collective.
        `ts_index`: the `<ts>` positions of the flattened ids where the batcher found them (batching.py);
        otherwise they are searched for here, and the host waits for that search.
        """
        if table is not None:
            embeds = self.vocabulary.lookup(table, input_ids)
            if torch.is_grad_enabled():  # what PEFT's input-require-grads hook on the skipped module does
                embeds.requires_grad_()
        else:
            embeds = self.model.embed_tokens(input_ids)
        spec = self.config.ts_spec
        if ts_patches is None:
            ts_patches = embeds.new_zeros(0, spec.patch_size)
            ts_positions = torch.zeros(0, spec.patch_size, dtype=torch.long, device=embeds.device)
        feats = self.ts_encoder(ts_patches.to(embeds.dtype), ts_positions)
        where = torch.zeros(0, dtype=torch.long, device=embeds.device)
        if len(feats):
            where = ts_index if ts_index is not None else torch.nonzero(
                input_ids.reshape(-1) == self.config.ts_token_start_index).flatten()
            if len(where) != len(feats):
                raise ValueError(f"{len(where)} `<ts>` positions for {len(feats)} encoder rows: build inputs "
                                 f"with ChatTSProcessor, which writes one `<ts>` per patch")
        # Into a copy of `embeds` by (row, column), not through a flattened view: a view reaching the first
        # decoder layer makes its compiled graph differ from the other layers' (one graph more to compile)
        seq = embeds.shape[1]
        return embeds.index_put((where // seq, where % seq), feats.to(embeds.dtype))

    def prepare_inputs_for_generation(self, *args, **kwargs):
        """Series go in with the prompt only; cached decoding steps see just the new token."""
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        cache_position = inputs.get("cache_position")
        if inputs.get("past_key_values") is not None and cache_position is not None and int(cache_position[0]) > 0:
            inputs.pop("ts_patches", None)
            inputs.pop("ts_positions", None)
        return inputs

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values=None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        cache_position: Optional[torch.LongTensor] = None,
        logits_to_keep: int | torch.Tensor = 0,
        ts_patches: Optional[torch.Tensor] = None,
        ts_positions: Optional[torch.Tensor] = None,
        ts_index: Optional[torch.Tensor] = None,
        answer_index: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> ChatTSOutput:
        # Training and scoring under ZeRO-3 read the vocabulary matrices from each rank's slice instead of
        # gathering 1.45 GiB each; generation (no labels: ranks may decode different lengths) gathers.
        head = self.vocabulary.partitioned_weight(self.lm_head) if self.vocabulary is not None else None
        sliced = labels is not None and not self.full_vocabulary_loss and head is not None
        if inputs_embeds is None:
            table = self.vocabulary.partitioned_weight(self.model.embed_tokens) if sliced else None
            inputs_embeds = self.embed(input_ids, ts_patches, ts_positions, table, ts_index)
        if labels is not None:
            # No KV cache in training: it costs memory, and with one transformers cannot see that restarting
            # position_ids mean packed samples (it then would not keep attention inside each sample).
            use_cache = False
            if attention_mask is None and position_ids is None and set(self.config.layer_types) == {"full_attention"}:
                # Unpacked, right-padded rows (the batcher leaves the mask out): plain causal attention. Left to
                # itself transformers takes the positions it makes up for a possible pack and builds a
                # [seq x seq] mask, which sends SDPA from its flash kernel to the masked memory-efficient
                # one and repeats K/V for every query head: 1.7x the micro-step at 4,096 positions on an
                # H200 and 4.7 GiB more (benchmarks/RESULTS.md). The mapping is transformers' own way in.
                attention_mask = {"full_attention": None}
        out = self.model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            cache_position=cache_position,
            **kwargs,
        )
        hidden = out.last_hidden_state
        if labels is None:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            return ChatTSOutput(logits=self.lm_head(hidden[:, keep, :]), past_key_values=out.past_key_values)
        targets = labels[:, 1:]
        mask = targets != IGNORE_INDEX
        num_tokens = mask.sum()
        if self.full_vocabulary_loss:
            logits = self.lm_head(hidden)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
            return ChatTSOutput(loss=loss, loss_sum=loss * num_tokens, num_tokens=num_tokens, logits=logits)
        # Logits only where a label exists: the full [seq x 152064] logits (and their fp32 copies) would
        # cost several GB at 4096 tokens for the ~100 answer tokens that carry a loss. With the batcher's
        # `answer_index` the rows are picked without the host waiting for the GPU (a boolean index waits).
        if answer_index is not None:
            answer = hidden.reshape(-1, hidden.shape[-1]).index_select(0, answer_index)
            answer_targets = labels.reshape(-1).index_select(0, answer_index + 1)
        else:
            answer, answer_targets = hidden[:, :-1][mask], targets[mask]
        if sliced:
            logits = None
            loss_sum = self.vocabulary.cross_entropy_sum(answer, head, answer_targets)
        else:
            logits = self.lm_head(answer).float()
            loss_sum = F.cross_entropy(logits, answer_targets, reduction="sum")
        return ChatTSOutput(loss=loss_sum / num_tokens.clamp(min=1), loss_sum=loss_sum, num_tokens=num_tokens,
                            logits=logits, past_key_values=out.past_key_values)


def pick_attention(requested: Optional[str] = None) -> str:
    """The attention of a model loaded outside training (generation, evaluation, merging) on this process's
    device: attention.choose_attention for its card, with the SDPA kernels it has (allow_sdpa_kernels)."""
    if requested == "eager":
        return requested
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    flash = capability is not None and capability >= (8, 0) and torch.backends.cuda.flash_sdp_enabled()
    allow_sdpa_kernels(flash or capability is None)
    return choose_attention(capability, flash, importlib.util.find_spec("flash_attn") is not None, requested)


def read_chatts_config(path: str) -> dict:
    """config.json of a ChatTS folder as a dict; a clear error when it is missing or not ChatTS."""
    cfg_file = os.path.join(path, "config.json")
    raw = read_json_object(cfg_file, CheckpointError, f"{path}: no config.json; point --model_path at a ChatTS "
                           f"checkpoint folder", "download it again")
    if not raw.get("ts"):
        raise CheckpointError(f"{cfg_file}: no `ts` block, so this is not a ChatTS config "
                              f"(model_type {raw.get('model_type')!r})")
    missing = [k for k in ("patch_size", "num_layers", "hidden_size") if k not in raw["ts"]]
    if missing:
        raise CheckpointError(f"{cfg_file}: the `ts` block lacks {', '.join(missing)}; compare it with the published "
                              f"ChatTS-14B config.json")
    return raw


def config_of(path: str) -> ChatTSConfig:
    """The ChatTS config of a folder, from its config.json alone (no weights needed)."""
    raw = read_chatts_config(path)
    raw.pop("model_type", None)
    return ChatTSConfig(**raw)


def missing_shards_message(path: str, missing: list[str]) -> str:
    return (f"{path}: the weight shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} named in "
            f"model.safetensors.index.json {'are' if len(missing) > 1 else 'is'} missing: the download is incomplete, "
            f"download {'them' if len(missing) > 1 else 'it'} again")


def check_checkpoint(path: str) -> ChatTSConfig:
    """Fail early and clearly on a folder that is not a complete ChatTS checkpoint."""
    config = config_of(path)
    missing = missing_shards(path)
    if missing:
        raise CheckpointError(missing_shards_message(path, missing))
    for shard in sorted(set(weight_map(path).values())):
        check_shard(path, shard)
    return config


def load_model(path: str, dtype: torch.dtype = torch.float16, attn_implementation: Optional[str] = None,
               **kwargs) -> ChatTSForCausalLM:
    """Load a ChatTS checkpoint folder (either release). Under an active ZeRO-3 `HfDeepSpeedConfig`
    transformers builds the model inside `deepspeed.zero.Init`, so no rank holds the whole model."""
    config = check_checkpoint(path)
    return ChatTSForCausalLM.from_pretrained(path, config=config, dtype=dtype,
                                             attn_implementation=pick_attention(attn_implementation), **kwargs)
