"""Learning checks: what only a reader of more than 512 tokens can learn.

1. Classification (ds_longformer.classify): a label that only tokens past position 512 carry.

Each review is ~600 tokens: 540 filler words drawn from a shared vocabulary, then 64 words drawn
from its class's own vocabulary (token positions 541..604). The Longformer classifier (global
attention on <s>, a 32-token local window) sees the class words and learns the label; the RoBERTa
baseline, truncated to 512 tokens, only sees filler and stays at chance. Both start from the same
tiny random RoBERTa (the Longformer is its conversion) and train the same steps through
``ds_longformer.classify``.

(A single evidence token among 600 random ones is not learnt by a tiny transformer from scratch
in a CPU-sized budget -- transformers' RoBERTa fails it too even at 100 tokens -- so the evidence
is a span of class words, still entirely beyond position 512.)

2. Extractive QA (ds_longformer.qa) on ds_longformer.synthetic_qa's documents: the clue that tells
which of 4 items is the answer lies more than 512 tokens before every item. Same kind of tiny
model (2 layers, hidden 32, init std 0.3, dropout 0), the same steps for both; measured on one
CPU core: the Longformer reaches dev F1 99-100 by step 150 (seeds 0-3; 98-100 at step 100), the
512-token baseline 22-30 (chance 25); the test takes ~1:45 (the baseline's full attention over
512 tokens is the slower run).
"""

import random

from data_fixtures import make_tiny_roberta_tokenizer, write_imdb_parquet
from qa_fixtures import make_word_tokenizer
from test_tasks import save_tiny_roberta
from transformers import AutoTokenizer

from ds_longformer import classify, qa
from ds_longformer.convert import convert
from ds_longformer.synthetic_qa import vocabulary, write_long_range_qa

FILLER_WORDS, CLASS_WORDS = 540, 64
QA_TRAIN_DOCS, QA_DEV_DOCS, QA_STEPS = 1000, 100, 150  # F1 100 at step 150 for seeds 0-3 (98-100 at 100)


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


def test_longformer_answers_questions_whose_clue_lies_512_tokens_from_the_answer(tmp_path):
    """Extractive QA through ``ds_longformer.qa`` on the synthetic long-range documents
    (ds_longformer.synthetic_qa): the clue that singles out the answer lies more than 512 tokens
    before every item, so each 512-token window of the baseline holds either the clue or the
    items, and it can only guess among the 4 items (F1 25). The Longformer reads a whole document
    (<= 880 tokens) in one 1024-token window with global attention on the question."""
    tokenizer_dir = make_word_tokenizer(tmp_path, vocabulary())
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = tmp_path / "longrange"
    write_long_range_qa(data / "train-v1.1.json", tokenizer, QA_TRAIN_DOCS, seed=0)
    write_long_range_qa(data / "dev-v1.1.json", tokenizer, QA_DEV_DOCS, seed=1, id_prefix="dev")
    # one model for both: a tiny RoBERTa of 512 positions (the baseline) and its Longformer conversion
    short = save_tiny_roberta(tmp_path / "short", tokenizer_dir, max_tokens=512, layers=2, initializer_range=0.3)
    convert(short, tmp_path / "long", max_pos=1024, attention_window=32)
    f1 = {}
    for model, path in (("Longformer", tmp_path / "long"), ("Roberta", short)):
        result = qa.main([
            "--data_dir", str(data), "--model", model, "--model_path", str(path), "--max_seq_len", "1024",
            "--max_steps", str(QA_STEPS), "--batch_size", "16", "--lr", "5e-3", "--warmup_steps", "20",
            "--val_check_interval", str(QA_STEPS), "--save_every_n_steps", "0", "--seed", "0",
            "--default_root_dir", str(tmp_path), "--cache_dir", str(tmp_path / "cache"), "--project_name", model])
        f1[model] = result["val_metrics"]["f1"]
    assert f1["Longformer"] >= 80, f1
    assert f1["Roberta"] <= 45, f1  # guessing among the 4 items: 25
