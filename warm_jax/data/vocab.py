"""Vocabularies with T5/seqio ids (pad=0, eos=1, unk=2, no bos), behind one interface.

`Vocab` is a SentencePiece model; `HFTokenizerVocab` a Hugging Face tokenizer.json (the
`tokenizers` package). Both offer pad_id / eos_id / unk_id, vocab_size, sha256 (of the
file's bytes, which cards record), encode, encode_batch, decode, id_to_piece and
piece_to_id; `load_vocab(path)` picks one by the file's name. ``sentencepiece`` and
``tokenizers`` are imported lazily, and seqio only by :meth:`Vocab.seqio_vocabulary`, so
this module imports on machines without them.
"""
from __future__ import annotations

import hashlib
import os
from typing import Iterable, Optional, Sequence

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
# Pieces kept whole: newlines (the T5 normaliser would drop them) and the prompt scaffold.
USER_SYMBOLS = ("\n", "SUBREDDIT:", "TITLE:", "POST:", "TL;DR:", "r/")


def _spm():
    try:
        import sentencepiece
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ImportError("warm_jax.data.vocab needs the 'sentencepiece' package "
                          "(pip install 'warm_jax[data]')") from e
    return sentencepiece


def train_vocab(texts: Iterable[str], model_path: str, vocab_size: int = 512,
                model_type: str = "bpe", character_coverage: float = 1.0,
                seed_sentencepiece_size: int = 100_000,
                user_symbols: Sequence[str] = USER_SYMBOLS) -> "Vocab":
    """Train a SentencePiece model on ``texts`` and write it atomically.

    BPE is the default: on a small, repetitive corpus such as the miniature
    world the unigram trainer collapses to a few hundred sub-word pieces.
    ``vocab_size`` is an upper bound (hard_vocab_limit=False): a small corpus
    gives a smaller vocabulary. Ids follow T5/seqio: pad 0, eos 1, unk 2, no bos.
    Training is single-threaded so the same texts give the same model bytes.
    """
    import io

    spm = _spm()
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_vocab needs at least one non-empty text")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=int(vocab_size),
        model_type=model_type, hard_vocab_limit=False, character_coverage=character_coverage,
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
        user_defined_symbols=list(user_symbols), num_threads=1,
        seed_sentencepiece_size=seed_sentencepiece_size, shuffle_input_sentence=False,
        max_sentence_length=1 << 16, minloglevel=2)
    model_path = os.fspath(model_path)
    os.makedirs(os.path.dirname(model_path) or ".", exist_ok=True)
    tmp = f"{model_path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, model_path)
    return Vocab.load(model_path)


def _text_ids(ids: Iterable[int], vocab_size: int) -> list[int]:
    """The ids up to the first eos, without pad and out-of-range ids."""
    out = []
    for i in ids:
        i = int(i)
        if i == EOS_ID:
            break
        if i != PAD_ID and 0 <= i < vocab_size:
            out.append(i)
    return out


class Vocab:
    """A SentencePiece model with T5/seqio special ids."""

    pad_id = PAD_ID
    eos_id = EOS_ID
    unk_id = UNK_ID

    def __init__(self, model_proto: bytes, model_path: Optional[str] = None):
        spm = _spm()
        self._proto = model_proto
        self.model_path = model_path
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        if (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id()) != (PAD_ID, EOS_ID, UNK_ID):
            raise ValueError(
                f"{model_path or 'model'}: expected pad/eos/unk ids 0/1/2, got "
                f"{self._sp.pad_id()}/{self._sp.eos_id()}/{self._sp.unk_id()}")
        self.sha256 = hashlib.sha256(model_proto).hexdigest()

    @classmethod
    def load(cls, model_path: str) -> "Vocab":
        """Load a SentencePiece .model file."""
        model_path = os.fspath(model_path)
        with open(model_path, "rb") as f:
            return cls(f.read(), model_path)

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no eos appended)."""
        return list(self._sp.encode(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self._sp.encode(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``: stops at the first eos, ignores pad and out-of-range ids."""
        out = _text_ids(ids, self.vocab_size)
        return self._sp.decode(out)

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        """Id of a piece (unk_id if the model lacks it)."""
        return int(self._sp.piece_to_id(piece))

    def seqio_vocabulary(self):
        """The same model as a seqio.SentencePieceVocabulary (imports seqio)."""
        if self.model_path is None:
            raise ValueError("seqio_vocabulary() needs a Vocab loaded from a file")
        import seqio  # deferred: seqio pulls in TensorFlow

        return seqio.SentencePieceVocabulary(self.model_path, extra_ids=0)

    def __repr__(self) -> str:
        return f"Vocab({self.model_path!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"


def seqio_vocabulary(model_path: str):
    """A seqio.SentencePieceVocabulary over ``model_path`` (imports seqio)."""
    return Vocab.load(model_path).seqio_vocabulary()


# Names a tokenizer.json may give its padding / end-of-sequence / unknown tokens.
_HF_PAD = ("<pad>", "[PAD]", "<|pad|>", "<|endoftext|>")
_HF_EOS = ("</s>", "<eos>", "<|endoftext|>", "<|end_of_text|>", "[SEP]")
_HF_UNK = ("<unk>", "[UNK]", "<|unk|>")


class HFTokenizerVocab:
    """A Hugging Face tokenizer.json behind the data pipeline's vocabulary interface.

    The pipeline pads with id 0 and ends sequences with id 1 (T5/seqio ids), so the
    tokenizer's padding token must have id 0 and its end-of-sequence token id 1 (the tiny
    fixtures' and warm-jax's own tokenizers do; Llama's, whose id 0 is <unk>, do not, and
    are refused with a one-line error naming the file and the ids). No special tokens are
    added by encode (no bos, no eos), as for `Vocab`.
    """

    pad_id = PAD_ID
    eos_id = EOS_ID

    def __init__(self, data: bytes, path: Optional[str] = None,
                 pad_token: Optional[str] = None, eos_token: Optional[str] = None):
        try:
            import tokenizers
        except ImportError as e:  # pragma: no cover - depends on the installation
            raise ImportError("tokenizer.json vocabularies need the 'tokenizers' package "
                              "(pip install 'warm_jax[data]')") from e
        where = path or "tokenizer.json"
        try:
            self._tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # tokenizers raises its own Exception subclass
            raise ValueError(f"{where}: not a readable tokenizer.json ({str(e)[:200]})") from e
        self.model_path = path
        self.sha256 = hashlib.sha256(data).hexdigest()
        pad = self._find(pad_token, _HF_PAD)
        eos = self._find(eos_token, _HF_EOS)
        if pad != PAD_ID or eos != EOS_ID:
            raise ValueError(
                f"{where}: the data pipeline needs the padding token at id {PAD_ID} and the "
                f"end-of-sequence token at id {EOS_ID}; this tokenizer has pad id {pad} and eos "
                f"id {eos} (pass pad_token / eos_token, or use a tokenizer with those ids)")
        unk = self._find(None, _HF_UNK)
        self.unk_id = UNK_ID if unk is None else unk

    def _find(self, name: Optional[str], candidates: Sequence[str]) -> Optional[int]:
        for c in ([name] if name else candidates):
            i = self._tok.token_to_id(c)
            if i is not None:
                return int(i)
        return None

    @classmethod
    def load(cls, path: str, **kw) -> "HFTokenizerVocab":
        path = os.fspath(path)
        with open(path, "rb") as f:
            return cls(f.read(), path, **kw)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._tok.encode_batch(list(texts),
                                                             add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``: stops at the first eos, ignores pad and out-of-range ids."""
        out = _text_ids(ids, self.vocab_size)
        return self._tok.decode(out, skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i)) or ""

    def piece_to_id(self, piece: str) -> int:
        i = self._tok.token_to_id(piece)
        return self.unk_id if i is None else int(i)

    def seqio_vocabulary(self):
        raise NotImplementedError(f"{self.model_path}: seqio tasks read SentencePiece "
                                  "vocabularies only; the DataProvider path reads tokenizer.json")

    def __repr__(self) -> str:
        return (f"HFTokenizerVocab({self.model_path!r}, vocab_size={self.vocab_size}, "
                f"sha256={self.sha256[:12]})")


def load_vocab(path: str):
    """A SentencePiece .model (Vocab) or a Hugging Face tokenizer.json (HFTokenizerVocab)."""
    path = os.fspath(path)
    if path.endswith(".json"):
        return HFTokenizerVocab.load(path)
    return Vocab.load(path)


def file_sha256(path: str) -> str:
    """The sha256 of a vocabulary file's bytes (what cards record as vocab_sha256)."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
