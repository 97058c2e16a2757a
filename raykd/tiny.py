"""Tiny real transformers models for the embedded sample: the demo's teachers and students, and test fixtures.

They are ordinary Hugging Face models (BERT, ALBERT or DistilBERT shaped) with a WordPiece vocabulary that
covers the sample's lexicon whole, written with ``save_pretrained`` and loaded back by users' code through
``from_pretrained`` exactly as a hub model would be.
"""

from __future__ import annotations

import os
import string

from raykd.sample import lexicon

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[Q]", "[D]"]


def vocabulary(words: list[str] | None = None) -> list[str]:
    """Special tokens, ``words`` (default: the demo sample's :func:`~raykd.sample.lexicon`), then single
    characters, so that any other word still tokenises (character by character), never to [UNK]."""
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    words = lexicon() if words is None else [w for w in dict.fromkeys(words) if w not in chars]
    return SPECIAL + [f"[unused{i}]" for i in range(8)] + words + chars + ["##" + c for c in chars]


def write_tokenizer(out_dir: str, words: list[str] | None = None):
    """A BERT WordPiece tokenizer over :func:`vocabulary`, saved to ``out_dir``. Built from the vocab file with
    ``BertTokenizer`` (transformers 5's ``BertTokenizerFast(vocab_file=...)`` silently ignores the file).
    ``words``: whole-word entries instead of the demo lexicon (the msmarco-full preset's
    :func:`~raykd.sample.full_lexicon`, whose words the demo vocabulary splits into characters)."""
    from transformers import BertTokenizer

    os.makedirs(out_dir, exist_ok=True)
    vocab_path = os.path.join(out_dir, "vocab.txt")
    with open(vocab_path, "w") as f:
        f.write("\n".join(vocabulary(words)) + "\n")
    tok = BertTokenizer(vocab_path, do_lower_case=True)
    tok.save_pretrained(out_dir)
    return tok


def build_tiny_model(
    out_dir: str,
    arch: str = "bert",
    head: str = "encoder",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 2,
    intermediate: int = 128,
    max_position: int = 512,
    seed: int = 0,
    dropout: float = 0.1,
    words: list[str] | None = None,
) -> str:
    """Write a randomly initialised model + tokenizer to ``out_dir`` and return the path.

    ``arch``: ``bert`` | ``albert`` | ``distilbert``. ``head``: ``encoder`` (AutoModel) or ``cross_encoder``
    (AutoModelForSequenceClassification, one label: BERT_CAT's linear layer on CLS). ``dropout``: hidden and
    attention dropout (tiny models trained from scratch on the sample learn faster without). ``words``: the
    tokenizer's whole words (see :func:`write_tokenizer`)."""
    import torch
    from transformers import (
        AlbertConfig,
        AutoModel,
        AutoModelForSequenceClassification,
        BertConfig,
        DistilBertConfig,
    )

    torch.manual_seed(seed)
    tok = write_tokenizer(out_dir, words)
    vocab_size = len(tok.get_vocab())
    if arch == "bert":
        config = BertConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=intermediate,
            max_position_embeddings=max_position,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
        )
    elif arch == "albert":
        config = AlbertConfig(
            vocab_size=vocab_size,
            embedding_size=max(16, hidden // 2),
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=intermediate,
            max_position_embeddings=max_position,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            classifier_dropout_prob=dropout,
        )
    elif arch == "distilbert":
        config = DistilBertConfig(
            vocab_size=vocab_size,
            dim=hidden,
            n_layers=layers,
            n_heads=heads,
            hidden_dim=intermediate,
            max_position_embeddings=max_position,
            dropout=dropout,
            attention_dropout=dropout,
        )
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; expected bert, albert or distilbert")
    if head == "cross_encoder":
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config)
    elif head == "encoder":
        model = AutoModel.from_config(config)
    else:
        raise ValueError(f"unknown head {head!r}; expected encoder or cross_encoder")
    model.save_pretrained(out_dir)
    return out_dir
