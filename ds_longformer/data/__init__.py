"""Data layer of the tasks: loaders for the published dataset files and preprocessing.

Modules (each docstring documents its file formats and API):

* ``wikitext``       WikiText-103 -> cached MLM blocks, character counts, bits per character.
* ``mlm``            15% / 80-10-10 masking collator.
* ``imdb``           IMDB reviews (aclImdb folders or parquet).
* ``hyperpartisan``  SemEval-2019 by-article XML + hp-splits.json, or jsonl.
* ``classification`` tokenization of classification examples (global attention on ``<s>``).
* ``wikihop``        QAngaroo WikiHop JSON -> chunked Longformer inputs, candidate scoring helpers.
* ``squad`` / ``triviaqa`` / ``qa_features``  extractive QA files -> windows with span labels -> answers.
* ``collate``        padding collator shared by the tasks.
* ``common``         errors (``DataFormatError``, ``DatasetNotFoundError``) and shared helpers.
"""

from .common import DataFormatError, DatasetNotFoundError

__all__ = ["DataFormatError", "DatasetNotFoundError"]
