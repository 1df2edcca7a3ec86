"""CLIP BPE tokenizer (transformers' CLIPTokenizer) from local files only, and `tokenize`.

Tokenisation runs on the host, outside jit; embedders take the resulting int32 ids.
CLIP-L and OpenCLIP use the same BPE vocabulary (49,408 tokens, sot 49406, eot 49407);
they differ only in padding: eot for CLIP-L (transformers' pad token), 0 for OpenCLIP
(`open_clip.tokenize`). Each embedder class says which as its `pad_token` attribute.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from transformers import CLIPTokenizer

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
BPE_ENV_VAR = "SGM_JAX_CLIP_BPE"  # path to the BPE file or to a tokenizer folder
HF_CLIP_L = "openai/clip-vit-large-patch14"
USER_BPE_PATH = Path.home() / ".cache" / "sgm_jax" / BPE_FILENAME
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table, in vocabulary order:
    the printable bytes as themselves, then the others as code points 256, 257, ..."""
    byte_ids = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    byte_ids += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(byte_ids), 0
    for b in range(256):
        if b not in byte_ids:
            byte_ids.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(byte_ids, chars)}


def tokenizer_from_bpe(path: str | os.PathLike) -> CLIPTokenizer:
    """Build the CLIP tokenizer from open_clip's `bpe_simple_vocab_16e6.txt.gz`.

    Vocabulary order as open_clip / OpenAI build it (and as HF's vocab.json stores it):
    256 byte symbols, the same with `</w>`, the 48,894 merge results, then
    `<|startoftext|>`, `<|endoftext|>`.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    # transformers 5: vocab=/merges= take the objects (vocab_file=/merges_file= would be ignored).
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)


def _pretrained(name: str, **kwargs) -> CLIPTokenizer | None:
    """CLIPTokenizer.from_pretrained(local_files_only) or None. transformers 5 returns a
    2-token placeholder instead of raising when the files are absent: treat that as None."""
    try:
        tok = CLIPTokenizer.from_pretrained(name, local_files_only=True, **kwargs)
    except (OSError, ValueError):  # not in the local cache / not a tokenizer
        return None
    return tok if len(tok) > 512 else None


def _is_tokenizer_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in _TOKENIZER_FILES)


def _from_path(path: Path, subfolder: str | None) -> CLIPTokenizer | None:
    if path.is_file():
        return tokenizer_from_bpe(path)
    if not path.is_dir():
        return None
    # A diffusers-style checkpoint folder keeps its tokenizers in tokenizer/ and tokenizer_2/.
    for candidate in ([path / subfolder] if subfolder else []) + [path, path / "tokenizer"]:
        if _is_tokenizer_dir(candidate):
            return _pretrained(str(candidate))
    if (path / BPE_FILENAME).is_file():
        return tokenizer_from_bpe(path / BPE_FILENAME)
    return None


def _from_hf_cache(repo_id: str, subfolder: str | None = None) -> CLIPTokenizer | None:
    return _pretrained(repo_id, **({"subfolder": subfolder} if subfolder else {}))


def _default_bpe_paths() -> list[Path]:
    # the workplace's shared data beside a source checkout (as MNIST's ../shared/data/mnist)
    shared = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "clip" / BPE_FILENAME
    paths = [USER_BPE_PATH, shared]
    spec = importlib.util.find_spec("open_clip")  # open_clip ships the same file
    if spec is not None and spec.origin:
        paths.append(Path(spec.origin).parent / BPE_FILENAME)
    return paths


def load_tokenizer(source: str | os.PathLike | None = None, subfolder: str | None = None) -> CLIPTokenizer:
    """A CLIPTokenizer from local files (never the network).

    `source`: a tokenizer folder (vocab.json + merges.txt, or tokenizer.json); a
    diffusers-style checkpoint folder (uses `subfolder`, e.g. "tokenizer_2", else
    "tokenizer/"); the BPE file `bpe_simple_vocab_16e6.txt.gz`; or a Hugging Face repo id
    already in the local cache. With no source: $SGM_JAX_CLIP_BPE, the HF cache of
    openai/clip-vit-large-patch14, ~/.cache/sgm_jax/bpe_simple_vocab_16e6.txt.gz, then
    ../shared/data/clip beside a source checkout, then open_clip's bundled copy. Raises FileNotFoundError saying where to put the files.
    """
    if source is not None:
        tok = _from_path(Path(source).expanduser(), subfolder)
        if tok is None and not Path(source).expanduser().exists():
            tok = _from_hf_cache(str(source), subfolder)
        if tok is None:
            raise FileNotFoundError(
                f"no CLIP tokenizer at {str(source)!r}: expected a folder with vocab.json + merges.txt "
                f"(or tokenizer/, tokenizer_2/), the file {BPE_FILENAME}, or a Hugging Face repo id in the local cache"
            )
        return tok
    if os.environ.get(BPE_ENV_VAR):
        return load_tokenizer(os.environ[BPE_ENV_VAR])
    tok = _from_hf_cache(HF_CLIP_L)
    if tok is not None:
        return tok
    for path in _default_bpe_paths():
        if path.is_file():
            return tokenizer_from_bpe(path)
    raise FileNotFoundError(
        f"no CLIP tokenizer found: put {BPE_FILENAME} (from open_clip or OpenAI CLIP) at {USER_BPE_PATH}, "
        f"or set {BPE_ENV_VAR} to it or to a tokenizer folder, or pass the checkpoint's tokenizer folder"
    )


def tokenize(
    tokenizer: CLIPTokenizer,
    texts: str | Sequence[str],
    max_length: int = 77,
    pad_token: str | int = "eot",
) -> np.ndarray:
    """Texts -> int32 ids `[B, max_length]`: sot, tokens, eot, then padding.

    Long texts are cut to sot + (max_length - 2) tokens + eot, as the seed's tokenizers do.
    `pad_token`: "eot" (CLIP-L, transformers) or an id such as 0 (OpenCLIP); use the
    embedder's `pad_token` class attribute.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    ids = tokenizer(texts, truncation=True, max_length=max_length, padding=False)["input_ids"]
    pad_id = tokenizer.eos_token_id if pad_token == "eot" else int(pad_token)
    out = np.full((len(texts), max_length), pad_id, dtype=np.int32)
    for row, seq in zip(out, ids):
        row[: len(seq)] = seq
    return out
