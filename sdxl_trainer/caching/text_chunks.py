"""Captions longer than CLIP's 77 positions (`--max_token_length 77|154|231`): pure token-chunking rules.

CLIP's text encoders have 77 position embeddings: <BOS>, 75 caption tokens, <EOS> (or padding). A longer
caption is cut into chunks of 75 tokens; each chunk becomes its own 77-token sequence
`<BOS> tokens <EOS> <PAD>...`, is encoded on its own, and the chunks' hidden states are concatenated
(k chunks -> k*77 rows); the pooled embedding comes from the first chunk. This is the chunk rule of
kohya's sd-scripts (`--max_token_length 150/225`), including its edge cases: a chunk filled with 75 tokens
ends in <EOS>, and an empty chunk is `<BOS> <EOS> <PAD>...` (the empty caption's tokens). Unlike kohya,
which strips the inner <BOS>/<EOS> rows and always encodes every chunk (a short caption trains beside
empty chunks), an item keeps exactly the chunks its caption needs, as ComfyUI and A1111 encode long
prompts at inference; the trainer pads a batch to its longest caption and masks the padding out of
cross-attention, so padding changes nothing.

Written by hand: tokenizers truncate or pad one sequence, none splits one caption into CLIP-sized chunks.
"""

from __future__ import annotations

import math

CHUNK_TOKENS = 77  # CLIP's positions: <BOS> + 75 caption tokens + <EOS>
CONTENT_TOKENS = CHUNK_TOKENS - 2
MAX_TOKEN_LENGTHS = (77, 154, 231)


def max_chunks(max_token_length: int) -> int:
    """77 -> 1, 154 -> 2, 231 -> 3; anything else is refused naming the flag."""
    if max_token_length not in MAX_TOKEN_LENGTHS:
        choices = ", ".join(map(str, MAX_TOKEN_LENGTHS))
        raise ValueError(f"--max_token_length {max_token_length}: choose one of {choices}")
    return max_token_length // CHUNK_TOKENS


def chunks_needed(num_content_tokens: int, max_num_chunks: int) -> int:
    """Chunks a caption of this many tokens (without <BOS>/<EOS>) is encoded as: at least 1, at most the limit."""
    return max(1, min(max_num_chunks, math.ceil(num_content_tokens / CONTENT_TOKENS)))


def is_truncated(num_content_tokens: int, max_num_chunks: int) -> bool:
    """True when the caption has more tokens than `max_num_chunks` chunks hold (the rest is dropped)."""
    return num_content_tokens > max_num_chunks * CONTENT_TOKENS


def chunk_token_ids(content_ids: list[int], num_chunks: int, bos: int, eos: int, pad: int) -> list[list[int]]:
    """`num_chunks` sequences of 77 ids: `<BOS> up-to-75 tokens <EOS> <PAD>...` each.

    `content_ids` is the caption's tokens without <BOS>/<EOS>; tokens beyond the chunks' capacity are dropped.
    A chunk with no tokens left is `<BOS> <EOS> <PAD>...`. With one chunk this is exactly what the tokenizer
    gives with `padding="max_length", truncation=True, max_length=77`."""
    chunks = []
    for c in range(num_chunks):
        part = list(content_ids[c * CONTENT_TOKENS : (c + 1) * CONTENT_TOKENS])
        ids = [bos, *part, eos]
        chunks.append(ids + [pad] * (CHUNK_TOKENS - len(ids)))
    return chunks
