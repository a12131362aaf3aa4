"""Captions longer than 77 tokens: the chunk rule (pure) and the chunked encoding with the tiny model's encoders."""

from __future__ import annotations

import pytest
import torch

from sdxl_trainer.caching import text_chunks
from sdxl_trainer.caching.caching_args import CachingArgs
from sdxl_trainer.caching.encoders import Encoders
from sdxl_trainer.models import loading

BOS, EOS, PAD = 900, 901, 7


def test_max_token_length_maps_to_chunks_and_refuses_other_values():
    assert [text_chunks.max_chunks(n) for n in (77, 154, 231)] == [1, 2, 3]
    with pytest.raises(ValueError, match="--max_token_length 150"):
        text_chunks.max_chunks(150)


def test_chunks_needed_and_truncation_follow_75_tokens_per_chunk():
    assert [text_chunks.chunks_needed(n, 3) for n in (0, 1, 75, 76, 150, 151, 225, 500)] == [1, 1, 1, 2, 2, 3, 3, 3]
    assert [text_chunks.chunks_needed(n, 1) for n in (0, 76, 500)] == [1, 1, 1]
    assert not text_chunks.is_truncated(75, 1) and text_chunks.is_truncated(76, 1)
    assert not text_chunks.is_truncated(225, 3) and text_chunks.is_truncated(226, 3)


def test_chunk_ids_follow_kohyas_layout():
    content = list(range(1, 81))  # 80 tokens: a full first chunk and 5 tokens in the second
    first, second, third = text_chunks.chunk_token_ids(content, 3, BOS, EOS, PAD)
    # A full chunk: <BOS> 75 tokens <EOS>, nothing padded.
    assert first == [BOS, *range(1, 76), EOS]
    # A partial chunk: <BOS> tokens <EOS> then padding to 77.
    assert second == [BOS, 76, 77, 78, 79, 80, EOS] + [PAD] * 70
    # An empty chunk: <BOS> <EOS> <PAD>... (kohya turns <BOS> <PAD> into <BOS> <EOS>).
    assert third == [BOS, EOS] + [PAD] * 75
    assert all(len(c) == 77 for c in (first, second, third))
    # Beyond the capacity, tokens are dropped.
    (only,) = text_chunks.chunk_token_ids(content, 1, BOS, EOS, PAD)
    assert only == first


@pytest.fixture(scope="module")
def text_encoders(tiny_model_dir):
    return loading.load_text_encoders(str(tiny_model_dir))


@pytest.mark.parametrize("caption", ["a red house", "", " ".join(["word"] * 120), "zebra " * 40])
def test_one_chunk_is_exactly_the_tokenizers_own_padding_and_truncation(text_encoders, caption):
    for tokenizer in (text_encoders.tokenizer, text_encoders.tokenizer_2):
        expected = tokenizer(caption, padding="max_length", max_length=77, truncation=True).input_ids
        content = tokenizer(caption, add_special_tokens=False).input_ids
        special = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
        assert text_chunks.chunk_token_ids(content, 1, *special) == [expected]
        # An empty chunk is the empty caption's tokens.
        empty = tokenizer("", padding="max_length", max_length=77).input_ids
        assert text_chunks.chunk_token_ids(content, len(content) // 75 + 2, *special)[-1] == empty


def _encoders(tiny_model_dir, text_encoders, max_token_length: int) -> Encoders:
    args = CachingArgs(
        pretrained_model_name_or_path=str(tiny_model_dir), max_token_length=max_token_length, cache_dtype="fp32"
    )
    enc = Encoders(args, torch.device("cpu"))
    enc._text = text_encoders  # loaded once for the module
    return enc


def _caption_of(tokenizer, n_tokens: int, tail_word: str) -> str:
    """A caption of exactly n_tokens tokens whose tokens after the 75th are all `tail_word`."""
    head = " ".join(["red"] * 75)
    caption = head + " " + " ".join([tail_word] * (n_tokens - 75))
    assert len(tokenizer(caption, add_special_tokens=False).input_ids) == n_tokens
    return caption


def test_chunked_encoding_equals_single_chunk_encoding_for_short_captions(tiny_model_dir, text_encoders):
    captions = ["a red house by the sea", "", "two cats"]
    p77, pooled77, tokens77, chunks77 = _encoders(tiny_model_dir, text_encoders, 77).encode_texts(captions)
    p231, pooled231, tokens231, chunks231 = _encoders(tiny_model_dir, text_encoders, 231).encode_texts(captions)
    assert p77.shape == p231.shape == (3, 77, 80) and chunks77 == chunks231 == [1, 1, 1]
    assert torch.equal(p77, p231) and torch.equal(pooled77, pooled231)
    assert tokens77 == tokens231 and tokens77[1] == 0
    # And both equal the diffusers pipeline's own encoding (penultimate layers, pooled from encoder 2).
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir, local_files_only=True, vae=None, unet=None)
    with torch.no_grad():
        reference, _, reference_pooled, _ = pipe.encode_prompt(captions[0], do_classifier_free_guidance=False)
    torch.testing.assert_close(p231[0], reference[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled231[0], reference_pooled[0], rtol=1e-5, atol=1e-5)


def test_a_150_token_caption_changes_the_embedding_after_token_77(tiny_model_dir, text_encoders):
    tok = text_encoders.tokenizer
    a, b = _caption_of(tok, 150, "blue"), _caption_of(tok, 150, "green")  # same first 75 tokens
    p77, pooled77, tokens, chunks = _encoders(tiny_model_dir, text_encoders, 77).encode_texts([a, b])
    assert chunks == [1, 1] and tokens == [150, 150]
    assert torch.equal(p77[0], p77[1])  # truncated at 77: the two captions are indistinguishable
    p154, pooled154, _, chunks = _encoders(tiny_model_dir, text_encoders, 154).encode_texts([a, b])
    assert chunks == [2, 2] and p154.shape == (2, 154, 80)
    torch.testing.assert_close(p154[:, :77], p77, rtol=1e-6, atol=1e-6)  # the first chunk: the single-chunk encoding
    assert not torch.allclose(p154[0, 77:], p154[1, 77:], atol=1e-3)  # the words after token 77 now count
    torch.testing.assert_close(pooled154, pooled77, rtol=1e-6, atol=1e-6)  # pooled from the first chunk
    # The second chunk is encoded on its own: <BOS> + the 75 tail tokens + <EOS>.
    tail, _, _, _ = _encoders(tiny_model_dir, text_encoders, 77).encode_texts([" ".join(["blue"] * 75)])
    torch.testing.assert_close(p154[0, 77:], tail[0], rtol=1e-6, atol=1e-6)


def test_captions_of_different_lengths_keep_their_own_chunks_in_one_batch(tiny_model_dir, text_encoders):
    tok = text_encoders.tokenizer
    long = _caption_of(tok, 160, "blue")
    enc = _encoders(tiny_model_dir, text_encoders, 154)
    prompt, pooled, tokens, chunks = enc.encode_texts(["short", long])
    assert chunks == [1, 2] and tokens[1] == 160  # 160 > 150: truncated to two chunks
    alone, alone_pooled, _, _ = enc.encode_texts(["short"])
    torch.testing.assert_close(prompt[0, :77], alone[0], rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(prompt[0, 77:]) == 0  # padding to the batch's longest; the pipeline cuts it off
    torch.testing.assert_close(pooled[0], alone_pooled[0], rtol=1e-6, atol=1e-6)
