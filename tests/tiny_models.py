"""Tiny Hugging Face model directories made with save_pretrained (nothing is downloaded)."""

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

WORDS = 60  # word tokens "w0".."w59" after the specials <unk> <s> </s> <pad>

ARCHS = {
    "llama": lambda vocab: LlamaConfig(
        vocab_size=vocab,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "qwen2": lambda vocab: Qwen2Config(
        vocab_size=vocab,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    ),
}


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over "w0".."w59" (ids 4..63), built in code."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{f"w{i}": 4 + i for i in range(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def save_tiny_model(path: Path, arch: str = "llama", vocab_size: int = 64, tokenizer: bool = False, seed: int = 0):
    """Write a tiny `arch` model (fp32) to `path`, with the word tokenizer if asked; returns it."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(ARCHS[arch](vocab_size), dtype=torch.float32).eval()
    model.save_pretrained(path)
    if tokenizer:
        word_tokenizer().save_pretrained(path)
    return model
