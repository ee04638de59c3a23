"""Learning check: a label that only tokens past position 512 carry.

Each review is ~600 tokens: 540 filler words drawn from a shared vocabulary, then 64 words drawn
from its class's own vocabulary (token positions 541..604). The Longformer classifier (global
attention on <s>, a 32-token local window) sees the class words and learns the label; the RoBERTa
baseline, truncated to 512 tokens, only sees filler and stays at chance. Both start from the same
tiny random RoBERTa (the Longformer is its conversion) and train the same steps through
``ds_longformer.classify``.

(A single evidence token among 600 random ones is not learnt by a tiny transformer from scratch
in a CPU-sized budget -- transformers' RoBERTa fails it too even at 100 tokens -- so the evidence
is a span of class words, still entirely beyond position 512.)
"""

import random

from data_fixtures import make_tiny_roberta_tokenizer, write_imdb_parquet
from test_tasks import save_tiny_roberta
from transformers import AutoTokenizer

from ds_longformer import classify
from ds_longformer.convert import convert

FILLER_WORDS, CLASS_WORDS = 540, 64


def one_token_words(tokenizer) -> list[str]:
    """Words that the tokenizer encodes as a single token (after a space), in a fixed order."""
    candidates = sorted(t[1:] for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 2)
    return [w for w in candidates if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]


def make_reviews(words: list[str], n: int, split: str, rng: random.Random) -> list[dict]:
    vocab = {0: words[:5], 1: words[5:10]}
    filler = words[10:]
    reviews = []
    for i in range(n):
        label = i % 2
        text = [rng.choice(filler) for _ in range(FILLER_WORDS)]
        text += [rng.choice(vocab[label]) for _ in range(CLASS_WORDS)]
        reviews.append({"split": split, "label": label, "text": " " + " ".join(text)})
    return reviews


def test_longformer_learns_what_lies_past_512_tokens_and_the_baseline_cannot(tmp_path):
    tokenizer_dir = make_tiny_roberta_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    words = one_token_words(tokenizer)
    assert len(words) >= 20
    rng = random.Random(0)
    reviews = make_reviews(words, 320, "train", rng) + make_reviews(words, 100, "test", rng)
    data = write_imdb_parquet(tmp_path / "imdb", reviews)

    ids = tokenizer(reviews[0]["text"])["input_ids"]
    class_ids = set(tokenizer.convert_tokens_to_ids([f"Ġ{w}" for w in words[:10]]))
    assert len(ids) == FILLER_WORDS + CLASS_WORDS + 2
    assert min(i for i, t in enumerate(ids) if t in class_ids) > 512

    short = save_tiny_roberta(tmp_path / "short", tokenizer_dir, max_tokens=512, layers=1)
    convert(short, tmp_path / "long", max_pos=640, attention_window=32)
    accuracy = {}
    for model, path in (("Longformer", tmp_path / "long"), ("Roberta", short)):
        result = classify.main([
            "--dataset", "IMDB", "--data_dir", str(data), "--model", model, "--model_path", str(path),
            "--max_steps", "80", "--batch_size", "8", "--lr", "3e-3", "--warmup_steps", "10",
            "--val_check_interval", "40", "--save_every_n_steps", "0", "--seed", "0",
            "--default_root_dir", str(tmp_path), "--cache_dir", str(tmp_path / "cache"), "--project_name", model])
        accuracy[model] = result["test_metrics"]["test/accuracy"]
    assert accuracy["Longformer"] >= 0.9, accuracy
    assert accuracy["Roberta"] <= 0.65, accuracy  # 100 balanced test reviews: chance is 0.5
