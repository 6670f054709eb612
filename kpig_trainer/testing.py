"""A tiny random Llama and a tokenizer trained on the spot: fast, offline models for tests and
for trying the API (``tiny_llama()``, or the model alias ``"tiny-llama"``)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

__all__ = ["CHATML_TEMPLATE", "TINY_SPECIAL_TOKENS", "TINY_VERSION", "save_tiny_llama", "tiny_llama", "tiny_tokenizer"]

TINY_VERSION = 1  # bump when tiny_llama's defaults change, so cached copies are rebuilt

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML chat template of the tiny tokenizer (the same turn format as SmolLM2-135M-Instruct)."""

TINY_SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
}
"""Special tokens of the tiny tokenizer; eos ends a ChatML turn, as in SmolLM2, and pad differs from eos."""

_TINY_CORPUS = """\
Write a short answer to the question below. Use complete sentences.
Definition: In this task you are given a sentence and you must classify its sentiment as positive or negative.
Input: The movie was wonderful and the actors were great. Output: positive
Input: The food was cold, and the service was slow. Output: negative
Translate the following sentence from English to French: The cat sleeps on the mat.
Summarize the paragraph in one sentence. The river flows through the old town, past the market and the church.
Answer the question with yes or no. Is the sky blue on a clear day? Yes.
Given a list of numbers, return the largest one: 3, 17, 8, 42, 5. The answer is 42.
Instruction: Rewrite the text so that it is more formal. Text: hey, what's up? we need to talk about the report.
Extract the names of the people mentioned in the story. Alice met Bob at the station in the morning.
Question: What is the capital of France? Answer: Paris is the capital of France.
Classify the topic of the news article: sports, politics, science, or business.
The scientists announced a new discovery about the structure of water molecules.
You are a helpful assistant. Please explain why the days are longer in summer than in winter.
Generate a title for the following article about healthy eating and daily exercise.
Fill in the blank with the correct word: She ___ to school every day. (walks / walk)
Count the number of vowels in the word "education". There are five vowels.
Identify whether the two sentences are paraphrases of each other. Respond with True or False.
Because the bridge was closed, the drivers had to take a longer road along the coast.
Numbers like 1, 2, 10, 100 and 2024 appear in dates, prices ($19.99) and scores (3-1).
Emails, code and symbols: user@example.com, print("hello"), a + b = c, 50% off!
"""


@functools.lru_cache(maxsize=8)
def _trained_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    # Byte-level BPE: every string, including unseen characters, round-trips exactly.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TINY_SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TINY_CORPUS.splitlines(), trainer)
    return tokenizer.to_str()


def tiny_tokenizer(vocab_size: int = 512, chat_template: bool = True):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on a small built-in English corpus.

    Deterministic; has ``TINY_SPECIAL_TOKENS`` and, unless ``chat_template=False``, the ChatML
    ``CHATML_TEMPLATE`` (pass ``False`` to exercise plain-prompt fallbacks). No bos is added on encode.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(vocab_size)),
        chat_template=CHATML_TEMPLATE if chat_template else None,
        clean_up_tokenization_spaces=False,  # keep decode an exact inverse of encode
        model_max_length=2048,
        **TINY_SPECIAL_TOKENS,
    )


def tiny_llama(
    seed: int = 0,
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    chat_template: bool = True,
):
    """A randomly initialised tiny ``LlamaForCausalLM`` and its tokenizer (see `tiny_tokenizer`).

    Same seed, same weights; the global torch RNG is left untouched. The model uses grouped-query
    attention and tied embeddings like SmolLM2, and is returned in eval mode.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer(vocab_size, chat_template=chat_template)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads // 2 if num_heads % 2 == 0 else num_heads,
        max_position_embeddings=tokenizer.model_max_length,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval(), tokenizer


def save_tiny_llama(path: str | os.PathLike, seed: int = 0, **kwargs) -> Path:
    """Save ``tiny_llama(seed, **kwargs)`` (model and tokenizer) to ``path`` for loading by path."""
    path = Path(path)
    model, tokenizer = tiny_llama(seed, **kwargs)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
