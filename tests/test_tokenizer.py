"""BlipTokenizer against transformers' BertTokenizerFast on the same files (transformers is only an oracle here)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from blip.tokenizer import BlipTokenizer

transformers = pytest.importorskip("transformers")

# Special tokens deliberately away from bert-base-uncased's ids (0/100/101/102/103): nothing may be hard-coded.
VOCAB = (
    ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + "the a an of on in with and is are to at by for from near two three dog dogs cat woman man beach sitting "
    "standing sand water tree sky how many what where color there it yes no one picture photo red blue green cafe "
    "naive resume don isn i he she we you they s t m re ve ll d n do not can said hi twice ok be here been play "
    "un hello world mixed case".split()
    + list(".,!?'\"()-:;/")
    + ["你", "好", "世", "界", "e"]
    + ["##s", "##ing", "##ed", "##er", "##ly", "##t", "##able", "##n", "##'", "##o", "##x"]
)
TEXTS = [
    "A dog on the beach.",
    "Don't do that!",
    "I'm here, you're there; we've been... ok?",
    'He said "hi" (twice) - ok?',
    "it's the dog's ball, isn't it ?",
    "Café naïve résumé",
    "你好世界 hello 世界!",
    "MiXeD CaSe DOGS Sitting",
    "",
    "   ",
    "a" * 101,
    "dog" + "s" * 97,
    "dog" + "s" * 98,
    "unplayable playing played player",
    "a\tdog\nsitting\r\non  the\x00 sand",
    "a 🐶 on the beach",
    "[MASK] dog [SEP] cat [mask] [CLS]",
    "two red dogs and three blue cats sitting near a green tree on the sand by the water " * 3,
    "こんにちは dog",
]


def hf_tokenizer(folder: Path):
    return transformers.BertTokenizerFast.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """vocab: vocab.txt only; json: what transformers saves from it (tokenizer.json + tokenizer_config.json);
    cleanup: vocab.txt with clean_up_tokenization_spaces on; cased: vocab.txt with do_lower_case off."""
    root = tmp_path_factory.mktemp("tok")
    made = {}
    for name, config in [
        ("vocab", None),
        ("cleanup", {"clean_up_tokenization_spaces": True}),
        ("cased", {"do_lower_case": False}),
    ]:
        folder = root / name
        folder.mkdir()
        (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
        if config is not None:
            (folder / "tokenizer_config.json").write_text(json.dumps(config))
        made[name] = folder
    hf_tokenizer(made["vocab"]).save_pretrained(root / "json")
    made["json"] = root / "json"
    assert (made["json"] / "tokenizer.json").exists()
    return made


@pytest.mark.parametrize("kind", ["vocab", "json", "cleanup", "cased"])
def test_encode_and_batch_match_transformers(folders, kind):
    ours, hf = BlipTokenizer.from_pretrained(folders[kind]), hf_tokenizer(folders[kind])
    assert ours.vocab_size == len(VOCAB) == len(hf)
    for text in TEXTS:
        assert ours.encode(text) == hf(text)["input_ids"], text
    ids, mask = ours(TEXTS)
    ref = hf(TEXTS, padding=True, return_tensors="pt")
    assert ids.dtype == mask.dtype == torch.int64
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])


def test_special_token_ids_come_from_the_vocab(folders):
    tok = BlipTokenizer.from_pretrained(folders["vocab"])
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id) == (0, 2, 3, 4)
    assert tok.encode("dog")[0] == 3 and tok.encode("dog")[-1] == 4


def test_truncation_matches_transformers_and_keeps_sep(folders):
    ours, hf = BlipTokenizer.from_pretrained(folders["vocab"]), hf_tokenizer(folders["vocab"])
    text = TEXTS[-2]
    for max_length in (2, 3, 5, 17, 35, 200):
        ids = ours.encode(text, max_length=max_length)
        assert ids == hf(text, truncation=True, max_length=max_length)["input_ids"]
        assert len(ids) <= max_length and ids[-1] == ours.sep_token_id and ids[0] == ours.cls_token_id
    batch, mask = ours(TEXTS, max_length=7)
    ref = hf(TEXTS, padding=True, truncation=True, max_length=7, return_tensors="pt")
    assert torch.equal(batch, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
    with pytest.raises(ValueError, match="max_length"):
        ours.encode(text, max_length=1)


def _decode_cases(vocab_size: int) -> list[list[int]]:
    """Random id sequences over the whole vocabulary (specials, punctuation, apostrophes, ## pieces) and the two
    [DEC]/[ENC]-like ids just past it."""
    rng = random.Random(0)
    return [[rng.randrange(vocab_size + 2) for _ in range(rng.randint(0, 14))] for _ in range(300)]


@pytest.mark.parametrize("kind", ["vocab", "json", "cleanup", "cased"])
def test_decode_matches_transformers(folders, kind):
    ours, hf = BlipTokenizer.from_pretrained(folders[kind]), hf_tokenizer(folders[kind])
    dec, enc = ours.vocab_size, ours.vocab_size + 1
    cases = [[dec] + ours.encode(t)[1:] for t in TEXTS] + [[enc] + ours.encode(t) + [dec] for t in TEXTS]
    cases += _decode_cases(ours.vocab_size)
    for ids in cases:
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), (ids, skip)
    assert ours.batch_decode(cases) == hf.batch_decode(cases, skip_special_tokens=True)
    padded, _ = ours(TEXTS)
    padded[:, 0] = dec
    assert ours.batch_decode(padded) == [hf.decode(row, skip_special_tokens=True) for row in padded.tolist()]
    assert ours.decode(padded[1]) == hf.decode(padded[1].tolist(), skip_special_tokens=True)


def test_cleanup_setting_is_read_and_matters(folders):
    plain, cleaned = BlipTokenizer.from_pretrained(folders["vocab"]), BlipTokenizer.from_pretrained(folders["cleanup"])
    assert not plain.clean_up_tokenization_spaces and cleaned.clean_up_tokenization_spaces
    ids = plain.encode("don ' t do it , he ' s ok")
    assert plain.decode(ids) == "don ' t do it, he ' s ok"  # the WordPiece decoder's own per-token cleanup only
    assert cleaned.decode(ids) == "don't do it, he's ok"


def test_all_ways_of_loading_agree(folders):
    loaded = [
        BlipTokenizer.from_pretrained(p)
        for p in (folders["vocab"], folders["vocab"] / "vocab.txt", folders["json"], folders["json"] / "tokenizer.json")
    ]
    ids = [tok(TEXTS)[0] for tok in loaded]
    assert all(torch.equal(ids[0], other) for other in ids[1:])
    assert len({tok.vocab_size for tok in loaded}) == 1


def test_config_wins_over_tokenizer_json_normalizer(folders, tmp_path):
    """transformers' BertTokenizer rebuilds the normaliser from tokenizer_config.json; so do we."""
    data = json.loads((folders["json"] / "tokenizer.json").read_text())
    data["normalizer"]["lowercase"] = False
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    ours, hf = BlipTokenizer.from_pretrained(tmp_path), hf_tokenizer(tmp_path)
    assert ours.encode("MiXeD CaSe DOGS") == hf("MiXeD CaSe DOGS")["input_ids"] != [3, 2, 2, 2, 4]


@pytest.mark.parametrize("kind", ["vocab", "cleanup", "cased"])
def test_save_pretrained_round_trip(folders, kind, tmp_path):
    ours = BlipTokenizer.from_pretrained(folders[kind])
    ours.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).is_file()
    assert (tmp_path / "vocab.txt").read_text(encoding="utf-8").splitlines() == VOCAB
    again = BlipTokenizer.from_pretrained(tmp_path)
    hf_fast = hf_tokenizer(tmp_path)
    hf_auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ids, mask = ours(TEXTS)
    assert all(torch.equal(a, b) for a, b in zip(again(TEXTS), (ids, mask)))
    for hf in (hf_fast, hf_auto):
        ref = hf(TEXTS, padding=True, return_tensors="pt")
        assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
    cases = _decode_cases(ours.vocab_size)[:100]
    assert (
        again.batch_decode(cases) == hf_auto.batch_decode(cases, skip_special_tokens=True) == ours.batch_decode(cases)
    )


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*vocab\.txt"):
        BlipTokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        BlipTokenizer.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        BlipTokenizer.from_pretrained(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "vocab.txt").write_text("hello\nworld\n")
    with pytest.raises(ValueError, match=r"\[UNK\]|\[CLS\]"):
        BlipTokenizer.from_pretrained(other)
    (other / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (other / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        BlipTokenizer.from_pretrained(other)
