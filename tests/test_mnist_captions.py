"""The captioned MNIST shards of mnist_txt2img: held-out wordings really are unseen, and the
digit's name moves around inside varied training captions."""

import tarfile

import numpy as np

from sgm_jax.data import mnist_captions as M
from sgm_jax.nn.tokenizer import load_tokenizer, tokenize


def _captions(n: int, seed: int = 1) -> tuple[list[str], np.ndarray]:
    rng, distractors = np.random.default_rng(seed), M.distractor_words()
    labels = np.arange(n) % 10
    return [M.training_caption(int(d), rng, distractors) for d in labels], labels


def test_held_out_wordings_and_their_words_never_occur_in_training_captions():
    tok = load_tokenizer()
    captions, labels = _captions(20000)
    held_out = {M.caption(d, w) for d in range(10) for w in M.HELD_OUT_WORDINGS}
    assert not held_out & set(captions)
    ids = tokenize(tok, captions, max_length=24)
    seen = set(np.unique(ids).tolist())
    for word in M.HELD_OUT_ONLY_WORDS:  # each held-out wording has at least one of them
        (word_id,) = tok(word, add_special_tokens=False)["input_ids"]
        assert word_id not in seen, word
    assert all(any(w in M.caption(0, wording).replace(",", " ,").split() for w in M.HELD_OUT_ONLY_WORDS)
               for wording in M.HELD_OUT_WORDINGS)
    # every training caption names its digit once (as a word or as a numeral) ...
    names = [{tok(M.WORDS[d] + " " + str(d), add_special_tokens=False)["input_ids"][i] for i in (0, 1)}
             for d in range(10)]
    positions = []
    for row, d in zip(ids, labels):
        hits = [i for i, t in enumerate(row) if t in names[d]]
        assert len(hits) == 1 and not any(t in names[e] for e in range(10) if e != d for t in row)
        positions.append(hits[0])
    # ... at many token positions, and about DISTRACTOR_RATE of them hold a distractor word
    counts = np.bincount(positions)
    assert (counts >= 100).sum() >= 6, counts
    plain = {M.FRAMES[f].format(x=M.caption(d, p)) for f in range(len(M.FRAMES))
             for p in M.DIGIT_PHRASES for d in range(10)}
    rate = np.mean([c not in plain for c in captions])
    assert abs(rate - M.DISTRACTOR_RATE) < 0.02, rate


def test_shards_hold_padded_digits_and_deterministic_captions(tmp_path):
    a = M.write_shards(tmp_path / "a", limit=40, samples_per_shard=16)
    b = M.write_shards(tmp_path / "b", limit=40, samples_per_shard=16)
    assert a["samples"] == 40 and len(a["paths"]) == 3

    def read(paths):
        out = {}
        for path in paths:
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    out[member.name] = tar.extractfile(member).read()
        return out

    first, second = read(a["paths"]), read(b["paths"])
    assert first == second
    from PIL import Image
    import io
    for key in ("000000000", "000000039"):
        image = np.asarray(Image.open(io.BytesIO(first[f"{key}.png"])))
        label = int(first[f"{key}.cls"])
        assert image.shape == (32, 32) and image[:2].max() == 0 and image[:, -2:].max() == 0
        text = first[f"{key}.txt"].decode()
        assert M.WORDS[label] in text.split() or str(label) in text.split()
