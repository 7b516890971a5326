"""A byte-level BPE tokenizer trained on the spot with the ``tokenizers`` library.

For ``scratch`` jobs with ``tokenizer.train`` (and the demo): no download, any text. Byte-level
means every input byte has a token, so nothing is ever unknown. One special token,
``<|endoftext|>`` (GPT-2's), separates documents and serves as BOS, EOS and padding.
Training is not bit-reproducible across runs (merge ties), so a job trains its tokenizer
once and keeps it in storage (``load_or_train_tokenizer``): every later session loads the
same vocabulary.
"""

from __future__ import annotations

import io
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from colabjob.errors import AlreadyExistsError, ConfigError

if TYPE_CHECKING:
    from colabjob.storage.store import Store

__all__ = ["EOS", "TOKENIZER_KEY", "load_or_train_tokenizer", "train_bpe", "wrap_tokenizer"]

EOS = "<|endoftext|>"
TOKENIZER_KEY = "artifacts/tokenizer.zip"  # under the job root: the job's one tokenizer


def train_bpe(texts: Iterable[str], *, vocab_size: int = 8192, min_frequency: int = 2) -> Any:
    """A ``tokenizers.Tokenizer`` (byte-level BPE) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ConfigError(f"vocab_size {vocab_size}: byte-level BPE needs at least 257")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def wrap_tokenizer(tok: Any) -> Any:
    """A transformers fast tokenizer around a trained ``tokenizers.Tokenizer``."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS
    )


def _pack_dir(directory: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(directory.iterdir()):
            if path.is_file():
                zf.write(path, path.name)
    return buf.getvalue()


def _load_packed(data: bytes, local_dir: Path | None) -> Any:
    """Unpack a stored tokenizer (into ``local_dir``, or a temporary directory) and load it."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="colabjob-tok-") as tmp:
        where = Path(local_dir or tmp)
        where.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for name in zf.namelist():
                if "/" in name or name.startswith("."):
                    raise ConfigError(f"unexpected file {name!r} in the stored tokenizer")
                (where / name).write_bytes(zf.read(name))
        return AutoTokenizer.from_pretrained(str(where))


def load_or_train_tokenizer(
    store: Store,
    texts: Iterable[str],
    *,
    vocab_size: int,
    min_frequency: int = 2,
    local_dir: str | Path | None = None,
) -> tuple[Any, bool]:
    """The job's tokenizer: loaded from ``store`` (``TOKENIZER_KEY``) or trained on ``texts``
    and stored there create-only (a concurrent writer's copy wins). Returns it and whether
    it was trained now."""
    where = Path(local_dir) if local_dir is not None else None
    if store.exists(TOKENIZER_KEY):
        return _load_packed(store.read_bytes(TOKENIZER_KEY), where), False
    tok = wrap_tokenizer(train_bpe(texts, vocab_size=vocab_size, min_frequency=min_frequency))
    with tempfile.TemporaryDirectory(prefix="colabjob-tok-") as tmp:
        tok.save_pretrained(tmp)
        data = _pack_dir(Path(tmp))
    try:
        store.create(TOKENIZER_KEY, data)
    except AlreadyExistsError:
        return _load_packed(store.read_bytes(TOKENIZER_KEY), where), False
    return _load_packed(data, where), True
