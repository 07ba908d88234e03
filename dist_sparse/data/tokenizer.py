"""SentencePiece training/loading and the equivalent Hugging Face fast tokenizer.

The corpus is tokenised by a SentencePiece model (unigram or BPE) whose first five ids are
the BERT special tokens. Training and evaluation code, and later users of an exported model,
only ever see the Hugging Face fast tokenizer saved next to the data, so that tokenizer is
built to give exactly the ids SentencePiece gives; the `.model` file is kept beside it as the
source of truth.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

# Fixed ids: the model code, the collator and meta.json all rely on them.
SPECIAL_TOKENS: dict[str, str] = {
    "pad": "[PAD]",
    "unk": "[UNK]",
    "cls": "[CLS]",
    "sep": "[SEP]",
    "mask": "[MASK]",
}
SPECIAL_IDS: dict[str, int] = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}

TOKENIZER_TYPES = ("unigram", "bpe")
SPM_MODEL_NAME = "spm.model"  # not "tokenizer.model": transformers would try to convert it

_METASPACE = "\u2581"
# sentencepiece ModelProto enums (sentencepiece_model.proto)
_SPM_TYPE_NAMES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}
_PIECE_NORMAL, _PIECE_UNKNOWN, _PIECE_CONTROL, _PIECE_USER_DEFINED = 1, 2, 3, 4


# --------------------------------------------------------------------------- training


def train_sentencepiece(
    texts: Iterable[str],
    model_path: str | os.PathLike,
    *,
    vocab_size: int,
    model_type: str = "unigram",
    seed: int = 1234,
    num_threads: int | None = None,
    input_sentence_size: int = 300_000,
) -> Path:
    """Train a SentencePiece model on `texts` (one segment per item) and write `model_path`.

    At most `input_sentence_size` segments (a seeded sample) are used: segments are whole
    paragraphs, and the trainer's memory grows with the text it holds.

    Special ids are fixed: [PAD]=0 (pad), [UNK]=1 (unk), [CLS]=2, [SEP]=3, [MASK]=4
    (user-defined symbols); BOS/EOS are disabled because BERT uses [CLS]/[SEP] instead.
    """
    if model_type not in TOKENIZER_TYPES:
        raise ValueError(f"tokenizer type must be one of {TOKENIZER_TYPES}, got {model_type!r}")
    if vocab_size < 16:
        raise ValueError(f"--vocab-size must be at least 16, got {vocab_size}")
    model_path = Path(model_path)
    if model_path.suffix != ".model":
        raise ValueError(f"sentencepiece model path must end in .model, got {model_path}")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    # Sampling of input sentences (when the corpus is larger than input_sentence_size) uses
    # sentencepiece's global generator: seed it so the same corpus gives the same model.
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_nonempty(texts),
            model_prefix=str(model_path.with_suffix("")),
            model_type=model_type,
            vocab_size=vocab_size,
            pad_id=SPECIAL_IDS["pad"],
            pad_piece=SPECIAL_TOKENS["pad"],
            unk_id=SPECIAL_IDS["unk"],
            unk_piece=SPECIAL_TOKENS["unk"],
            bos_id=-1,
            eos_id=-1,
            user_defined_symbols=[SPECIAL_TOKENS[k] for k in ("cls", "sep", "mask")],
            # Segments are whole paragraphs; the default limit (4192 bytes) would silently
            # drop long ones from training.
            max_sentence_length=1 << 16,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise ValueError(sentencepiece_hint(str(err), vocab_size)) from None
    # The trainer writes a .vocab file too; only the .model is needed.
    model_path.with_suffix(".vocab").unlink(missing_ok=True)
    return model_path


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        if text and not text.isspace():
            yield text


# --------------------------------------------------------------------------- loading


def sentencepiece_hint(message: str, vocab_size: int) -> str:
    """One line for a sentencepiece training failure, with the fix that matches it.

    sentencepiece fails in two opposite ways on a vocabulary size: too high for a small corpus
    ("Vocabulary size is too high (8000). Please set it to a value <= 1234.") and too low for the
    corpus' characters ("Vocabulary size is smaller than required_chars. 100 vs 409."), each
    character being a piece of its own.
    """
    last_line = message.strip().splitlines()[-1] if message.strip() else message
    high = re.search(r"too high \((\d+)\).*?<= (\d+)", message)
    if high:
        return (f"--vocab-size {vocab_size} is too large for this corpus: sentencepiece can make at most "
                f"{high.group(2)} pieces from it; lower --vocab-size to {high.group(2)} or less, or add text")
    low = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if low:
        return (f"--vocab-size {vocab_size} is too small for this corpus: its {low.group(2)} distinct characters "
                f"each need a piece; raise --vocab-size above {low.group(2)}")
    return f"sentencepiece training failed: {last_line}"


def resolve_sentencepiece_model(path: str | os.PathLike) -> Path:
    """Find the .model file given a .model file, a tokenizer dir or a prepared data dir."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".model":
            raise ValueError(
                f"--tokenizer {path}: expected a sentencepiece .model file or a directory "
                f"written by prepare-data"
            )
        return path
    for candidate in (path / SPM_MODEL_NAME, path / "tokenizer" / SPM_MODEL_NAME):
        if candidate.is_file():
            return candidate
    if not path.exists():
        raise ValueError(f"--tokenizer {path}: no such file or directory")
    raise ValueError(
        f"--tokenizer {path}: no {SPM_MODEL_NAME} found in it (nor in {path}/tokenizer); pass a "
        f"sentencepiece .model file or a directory written by prepare-data"
    )


def read_model_proto(model_path: str | os.PathLike) -> sentencepiece_model_pb2.ModelProto:
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(model_path).read_bytes())
    except Exception as err:  # protobuf raises DecodeError, a plain Exception subclass
        raise ValueError(f"{model_path} is not a sentencepiece model: {err}") from err
    if not proto.pieces:
        raise ValueError(f"{model_path} is not a sentencepiece model (no pieces)")
    return proto


def sentencepiece_model_type(model_path: str | os.PathLike) -> str:
    """'unigram' or 'bpe' (other types are rejected by `check_sentencepiece_model`)."""
    return _SPM_TYPE_NAMES.get(read_model_proto(model_path).trainer_spec.model_type, "unknown")


def check_sentencepiece_model(model_path: str | os.PathLike) -> sentencepiece_model_pb2.ModelProto:
    """Reject models whose ids or options the pipeline and the fast tokenizer cannot honour."""
    proto = read_model_proto(model_path)
    retrain = "train a new one (leave out --tokenizer)"
    kind = _SPM_TYPE_NAMES.get(proto.trainer_spec.model_type, "unknown")
    if kind not in TOKENIZER_TYPES:
        raise ValueError(f"{model_path}: model type {kind!r} is not supported; {retrain}")
    for role, token_id in SPECIAL_IDS.items():
        piece = proto.pieces[token_id].piece if token_id < len(proto.pieces) else None
        if piece != SPECIAL_TOKENS[role]:
            raise ValueError(
                f"{model_path}: id {token_id} must be {SPECIAL_TOKENS[role]} but is {piece!r}; "
                f"{retrain}"
            )
    norm = proto.normalizer_spec
    unsupported = {
        "byte_fallback": proto.trainer_spec.byte_fallback,
        "treat_whitespace_as_suffix": proto.trainer_spec.treat_whitespace_as_suffix,
        "split_by_whitespace=false": not proto.trainer_spec.split_by_whitespace,
        "add_dummy_prefix=false": not norm.add_dummy_prefix,
        "remove_extra_whitespaces=false": not norm.remove_extra_whitespaces,
        "escape_whitespaces=false": not norm.escape_whitespaces,
    }
    bad = [name for name, is_set in unsupported.items() if is_set]
    if bad:
        raise ValueError(f"{model_path}: unsupported sentencepiece options {bad}; {retrain}")
    return proto


# --------------------------------------------------------------------------- conversion


def build_fast_tokenizer(model_path: str | os.PathLike) -> Tokenizer:
    """A `tokenizers.Tokenizer` giving the same ids as the SentencePiece model at `model_path`.

    Pipeline, mirroring sentencepiece's normaliser and encoder:
    precompiled charsmap (e.g. nmt_nfkc) -> drop leading/trailing spaces and collapse runs
    (remove_extra_whitespaces) -> Metaspace: spaces to U+2581 plus a dummy prefix, split into
    words (exact because pieces never contain an inner U+2581 with split_by_whitespace) ->
    Unigram or BPE over the same pieces and ids. A BERT post-processor adds [CLS]/[SEP].
    """
    proto = check_sentencepiece_model(model_path)
    pieces = [(p.piece, p.score) for p in proto.pieces]
    if proto.trainer_spec.model_type == 1:
        model = models.Unigram(pieces, unk_id=SPECIAL_IDS["unk"], byte_fallback=False)
    else:
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        model = models.BPE(
            vocab,
            bpe_merges(proto),
            unk_token=SPECIAL_TOKENS["unk"],
            # sentencepiece's BPE emits one [UNK] per run of unknown characters.
            fuse_unk=True,
            byte_fallback=False,
            dropout=None,
        )
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = _normalizer(proto.normalizer_spec.precompiled_charsmap)
    # "always": every text piece between special tokens gets the dummy prefix, as each
    # segment would when sentencepiece encodes it on its own.
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=_METASPACE, prepend_scheme="always", split=True
    )
    tokenizer.decoder = decoders.Metaspace(replacement=_METASPACE, prepend_scheme="always")
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS.values()]
    )
    tokenizer.post_processor = bert_post_processor()
    return tokenizer


def _normalizer(precompiled_charsmap: bytes) -> normalizers.Normalizer:
    steps = [
        # sentencepiece's remove_extra_whitespaces acts on ASCII spaces after the charsmap
        # (which already maps tabs, newlines, NBSP... to spaces); Strip() would also remove
        # other Unicode whitespace, so use exact regexes instead (\A, \z: in Oniguruma ^ and $
        # also match at newlines, which the "identity" rule keeps).
        normalizers.Replace(Regex(r"\A +| +\z"), ""),
        normalizers.Replace(Regex(" {2,}"), " "),
    ]
    if precompiled_charsmap:  # empty for the "identity" normalisation rule
        steps.insert(0, normalizers.Precompiled(precompiled_charsmap))
    return normalizers.Sequence(steps)


def bpe_merges(proto: sentencepiece_model_pb2.ModelProto) -> list[tuple[str, str]]:
    """Merges equivalent to sentencepiece's BPE encoder.

    sentencepiece repeatedly joins the adjacent pair whose concatenation is the
    highest-scoring normal piece, whatever merge created that piece in training. So every
    split of a piece into two normal pieces is a merge, ranked by the score of the result.
    """
    normal = {p.piece: (-p.score, i) for i, p in enumerate(proto.pieces) if p.type == _PIECE_NORMAL}
    ranked = []
    for piece, rank in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((rank, normal[left], normal[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def bert_post_processor() -> processors.TemplateProcessing:
    cls, sep = SPECIAL_TOKENS["cls"], SPECIAL_TOKENS["sep"]
    return processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, SPECIAL_IDS["cls"]), (sep, SPECIAL_IDS["sep"])],
    )


def wrap_hf_tokenizer(tokenizer: Tokenizer, seq_len: int):
    """The `transformers` fast tokenizer around `tokenizer`, with BERT's special tokens."""
    from transformers import PreTrainedTokenizerFast  # heavy import, only when needed

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=seq_len,
        # token_type_ids are not returned by default for a generic fast tokenizer.
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        **{f"{role}_token": token for role, token in SPECIAL_TOKENS.items()},
    )


def save_tokenizer(model_path: str | os.PathLike, out_dir: str | os.PathLike, seq_len: int):
    """Write a directory that `AutoTokenizer.from_pretrained` loads, plus the .model file.

    Returns the `transformers` tokenizer that was saved.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_tokenizer = wrap_hf_tokenizer(build_fast_tokenizer(model_path), seq_len)
    hf_tokenizer.save_pretrained(str(out_dir))
    target = out_dir / SPM_MODEL_NAME
    if Path(model_path).resolve() != target.resolve():
        shutil.copyfile(model_path, target)
    return hf_tokenizer


def load_tokenizer(path: str | os.PathLike):
    """Load the fast tokenizer from a prepared data dir or its `tokenizer/` subdir."""
    from transformers import AutoTokenizer

    path = Path(path)
    for candidate in (path, path / "tokenizer"):
        if (candidate / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(str(candidate))
    raise ValueError(
        f"{path} holds no tokenizer (no tokenizer.json in it or in {path}/tokenizer); "
        f"run `dist-sparse prepare-data` to create one"
    )
