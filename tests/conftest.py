"""Tiny random models built in code: fast, offline, deterministic."""
from __future__ import annotations

import copy
import os

# never reach the network (Hugging Face datasets and hub, as lm-eval and the perplexity suite use them); set
# before anything imports them, since both read these once
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

torch.set_num_threads(min(2, os.cpu_count() or 1))

WORDS = ["the", "a", "robot", "cat", "dog", "paints", "reads", "writes", "quickly", "slowly", "red", "blue", "green", "house", "river", "city", "one", "two", "three", "four", "five", "plus", "minus", "equals", "answer", "question", "summary", "translate", "hello", "world", "and", "or", "but", "then", "so", "because", "is", "was", "will", "be", "can", "not", "yes", "no", "in", "on", "at", "of", "to", "from", "with"]
SPECIALS = ["<unk>", "<eos>", "<user>", "<assistant>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<' + m['role'] + '> ' + m['content'] + ' ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(vocab_size: int = len(SPECIALS) + len(WORDS), seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.3,  # sharp, varied logits: greedy outputs do not collapse to one token
        eos_token_id=1, pad_token_id=1, bos_token_id=None, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def perturbed(model: LlamaForCausalLM, scale: float, seed: int) -> LlamaForCausalLM:
    """A draft that agrees with the target often but not always."""
    torch.manual_seed(seed)
    draft = copy.deepcopy(model)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * scale * p.std())
    return draft.eval()


@pytest.fixture(scope="session")
def pair():
    target = tiny_llama(seed=0)
    return target, perturbed(target, 0.3, seed=1)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, pair):
    """The tiny pair saved as local model folders, as a user's own model would be."""
    root = tmp_path_factory.mktemp("models")
    tok = tiny_tokenizer()
    dirs = []
    for name, model in zip(("target", "draft"), pair):
        folder = root / name
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        dirs.append(str(folder))
    return dirs


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DECODEBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


SHARE_QUESTIONS = [
    {"question_id": "chat-1", "category": "writing", "turns": ["hello world", "the robot paints"]},
    {"question_id": "qa-1", "category": "qa", "turns": ["the cat reads"], "reference": ["yes"]},
    {"question_id": "qa-2", "category": "qa", "turns": ["one plus two equals"], "reference": ["three"]},
]


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, model_dirs):
    """Two real runs of ar, sps and pld on the tiny pair, the second with the models swapped (another target):
    what export, the several-run report and the browser test read. Returns their folders."""
    import json

    from harness.runner import RunConfig, Runner

    root = tmp_path_factory.mktemp("tiny-runs")
    data = root / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in SHARE_QUESTIONS))
    folders = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DECODEBENCH_CACHE", str(root / "cache"))
        for name, (target, draft) in (("tiny-a", model_dirs), ("tiny-b", model_dirs[::-1])):
            cfg = RunConfig(methods=["ar", "sps", "pld"], target=target, draft=draft, data=str(data),
                            max_new_tokens=12, out=str(root / name), warmup=False)
            Runner(cfg).run()
            folders.append(root / name)
    return folders


def pytest_collection_modifyitems(config, items):
    """Benchmarks (`bench`) run only when asked for: `--benchmark-only`, or a -m expression that names bench
    (`-m bench`). A plain `pytest` (CI) deselects them, since they take minutes."""
    if config.getoption("benchmark_only", default=False) or "bench" in (config.option.markexpr or ""):
        return
    benches = [item for item in items if item.get_closest_marker("bench")]
    if benches:
        config.hook.pytest_deselected(items=benches)
        items[:] = [item for item in items if not item.get_closest_marker("bench")]
