"""Tiny extractive-QA files in their published formats, written as the datasets publish them.

* ``SQUAD_V1`` / ``SQUAD_V2``: SQuAD JSON documents (unicode contexts whose character offsets
  differ from their UTF-8 byte offsets; v2 with unanswerable questions and plausible answers).
* ``write_squad_json(dir, document, name)`` -> file path.
* ``write_squad_parquet(dir, document, split="validation", config="plain_text")`` -> data dir, with
  ``<config>/<split>-00000-of-00001.parquet`` in the Hugging Face layout.
* ``write_triviaqa(dir, domain="wikipedia", split="dev", records=None, evidence=None, verified=False)``
  -> the ``qa/<domain>-<split>.json`` path, with the evidence files under ``evidence/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

BEYONCE = ("Beyoncé Giselle Knowles-Carter (/biːˈjɒnseɪ/ bee-YON-say; born September 4, 1981) is an American "
           "singer, songwriter, record producer and actress. Born and raised in Houston, Texas, she performed "
           "in various singing and dancing competitions as a child.")
ZURICH = ("Zürich (Züri in Swiss German) is the largest city in Switzerland. The Großmünster church stands on "
          "the Limmat; the Fraumünster across the river is known for windows by Marc Chagall. 🙂 Zürich is "
          "also home to the ETH.")
NORMANS = ("The Normans (Norman: Nourmands; French: Normands) were the people who in the 10th and 11th "
           "centuries gave their name to Normandy, a region in France.")


def _answer(context: str, text: str, occurrence: int = 0) -> dict:
    start = -1
    for _ in range(occurrence + 1):
        start = context.index(text, start + 1)
    return {"text": text, "answer_start": start}


SQUAD_V1 = {
    "version": "1.1",
    "data": [
        {"title": "Beyoncé", "paragraphs": [{"context": BEYONCE, "qas": [
            {"id": "56be85543aeaaa14008c9063", "question": "When did Beyonce start becoming popular?",
             "answers": [_answer(BEYONCE, "September 4, 1981")]},
            {"id": "56be85543aeaaa14008c9065", "question": "In what city and state did Beyonce  grow up? ",
             "answers": [_answer(BEYONCE, "Houston, Texas"), _answer(BEYONCE, "Houston")]},
        ]}]},
        {"title": "Zürich", "paragraphs": [{"context": ZURICH, "qas": [
            {"id": "zurich-1", "question": "Which church stands on the Limmat?",
             "answers": [_answer(ZURICH, "Großmünster")]},
            {"id": "zurich-2", "question": "What is Zürich called in Swiss German?",
             "answers": [{"text": "Züri", "answer_start": ZURICH.index("(Züri ") + 1}]},
            {"id": "zurich-3", "question": "Which university is in the city?",
             "answers": [_answer(ZURICH, "ETH")]},
        ]}]},
    ],
}

SQUAD_V2 = {
    "version": "v2.0",
    "data": [
        {"title": "Normans", "paragraphs": [{"context": NORMANS, "qas": [
            {"id": "56ddde6b9a695914005b9628", "question": "In what country is Normandy located?",
             "answers": [_answer(NORMANS, "France"), _answer(NORMANS, "France")], "is_impossible": False},
            {"id": "5ad39d53604f3c001a3fe8d1", "question": "Who gave their name to Normandy in the 1000's and 1100's",
             "answers": [], "is_impossible": True,
             "plausible_answers": [_answer(NORMANS, "Normans")]},
        ]}]},
    ],
}


def write_squad_json(dir, document: dict, name: str = "dev-v1.1.json") -> Path:
    path = Path(dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    return path


def write_squad_parquet(dir, document: dict, split: str = "validation", config: str = "plain_text") -> Path:
    rows = [(article["title"], paragraph["context"], qa) for article in document["data"]
            for paragraph in article["paragraphs"] for qa in paragraph["qas"]]
    answers_type = pa.struct([("text", pa.list_(pa.string())), ("answer_start", pa.list_(pa.int32()))])
    table = pa.table({
        "id": [qa["id"] for _, _, qa in rows],
        "title": [title for title, _, _ in rows],
        "context": [context for _, context, _ in rows],
        "question": [qa["question"] for _, _, qa in rows],
        "answers": pa.array([{"text": [a["text"] for a in qa["answers"]],
                              "answer_start": [a["answer_start"] for a in qa["answers"]]} for _, _, qa in rows],
                            type=answers_type),
    })
    folder = Path(dir) / config
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / f"{split}-00000-of-00001.parquet")
    return Path(dir)


# TriviaQA: the sample record of the official repository, with evidence written for it.
WEBBER = ("Andrew Lloyd Webber, Baron Lloyd-Webber (born 22 March 1948) is an English composer. His musical "
          "Sunset Boulevard premiered in London in 1993; the American premiere of Sunset Boulevard followed "
          "on 9 December 1993 in Los Angeles. The title refers to West Sunset Boulevard, and the show is "
          "sometimes billed as SUNSET BLVD.\nStarting in 2004 he wrote other shows.")
WEB_PAGE = ("The official website for Andrew Lloyd Webber ... from the musical Whistle Down the Wind ... "
            "American premiere of Sunset Boulevard on 9th December 1993 at the Shubert Theatre.")
NILE = "The Nile is a major north-flowing river in northeastern Africa, about 6,650 km long."
TRIVIAQA_RECORDS = [
    {
        "Answer": {"Aliases": ["Sunset Blvd", "West Sunset Boulevard", "Sunset Boulevard", "Sunset Bulevard",
                               "Sunset Blvd."],
                   "NormalizedAliases": ["west sunset boulevard", "sunset blvd", "sunset boulevard", "sunset bulevard"],
                   "NormalizedValue": "sunset boulevard", "Type": "WikipediaEntity", "Value": "Sunset Boulevard"},
        "EntityPages": [{"DocSource": "TagMe", "Filename": "Andrew_Lloyd_Webber.txt", "Title": "Andrew Lloyd Webber"}],
        "Question": "Which Lloyd Webber musical premiered in the US on 10th December 1993?",
        "QuestionId": "tc_33",
        "QuestionSource": "http://www.triviacountry.com/",
        "SearchResults": [{"Description": "...", "DisplayUrl": "www.andrewlloydwebber.com", "Filename": "35/35_995.txt",
                           "Rank": 0, "Title": "Andrew Lloyd Webber", "Url": "http://www.andrewlloydwebber.com/"}],
    },
    {
        "Answer": {"Aliases": ["Nile", "River Nile", "Nile River"],
                   "NormalizedAliases": ["nile", "river nile", "nile river"],
                   "NormalizedValue": "nile", "Type": "WikipediaEntity", "Value": "Nile"},
        "EntityPages": [{"DocSource": "TagMe", "Filename": "Nile.txt", "Title": "Nile"},
                        {"DocSource": "TagMe", "Filename": "Andrew_Lloyd_Webber.txt", "Title": "Andrew Lloyd Webber"}],
        "Question": "Which river flows north through Egypt?",
        "QuestionId": "qb_101",
        "QuestionSource": "http://www.quizballs.com/",
        "SearchResults": [],
    },
]
TRIVIAQA_EVIDENCE = {"wikipedia/Andrew_Lloyd_Webber.txt": WEBBER, "wikipedia/Nile.txt": NILE,
                     "web/35/35_995.txt": WEB_PAGE}


def write_triviaqa(dir, domain: str = "wikipedia", split: str = "dev", records=None, evidence=None,
                   verified: bool = False) -> Path:
    records = json.loads(json.dumps(TRIVIAQA_RECORDS if records is None else records))
    if domain == "wikipedia":
        for record in records:
            record["SearchResults"] = []
    root = Path(dir) / "triviaqa-rc"
    for name, text in (TRIVIAQA_EVIDENCE if evidence is None else evidence).items():
        path = root / "evidence" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    qa = root / "qa" / f"{'verified-' if verified else ''}{domain}-{split}.json"
    qa.parent.mkdir(parents=True, exist_ok=True)
    document = {"Data": records, "Domain": "Wikipedia" if domain == "wikipedia" else "Web",
                "VerifiedEval": verified, "Version": 1.0}
    qa.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    return qa


def make_word_tokenizer(dir, words, vocab_size: int = 600) -> Path:
    """A byte-level BPE tokenizer with RoBERTa's special tokens that encodes each of ``words``
    (after a space, as inside a text) as one token: trained on the words alone."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([" " + " ".join(words)] * 20, trainer)  # each word after a space
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", cls_token="<s>",
                                      sep_token="</s>", pad_token="<pad>", mask_token="<mask>", unk_token="<unk>",
                                      model_max_length=4096)
    folder = Path(dir) / "word_tokenizer"
    wrapped.save_pretrained(folder)
    return folder
