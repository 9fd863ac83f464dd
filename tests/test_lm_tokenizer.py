"""LmTokenizer (OPT byte-level BPE, T5 Unigram) against transformers' AutoTokenizer on the same folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from blip.tokenizer import BlipTokenizer, LmTokenizer, load_text_tokenizer
from blip.transforms import ImageTransform
from oracle import make_images
from oracle_tokenizers import write_opt_tokenizer, write_t5_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "a dog sitting on the beach",
    "Question: what is in the picture? Answer:",
    "Question: how many dogs are there? Short answer:",
    "The big yellow star is at the top left.",
    "There's a green shape in the center, isn't it ?",
    "I'm here, you're there; we've been... ok?",
    "Don't do that!",
    "",
    " ",
    "   leading and trailing spaces   ",
    "a  double  space and\ttab\nnewline\r\n end",
    "MiXeD CaSe DOGS Sitting",
    "Café naïve résumé — “quotes” ‘single’",
    "你好世界 hello こんにちは",
    "a 🐶 on the beach 🏖️",
    "<image><image> a photo of",
    "<image>a photo<image>",
    "a photo of <image> two cats",
    "</s> bos written literally </s>x<pad>y",
    "<s><unk><pad></s>",
    "<extra_id_0> a dog <extra_id_1> the beach <extra_id_99>",
    "<IMAGE> <image > < image>",
    "tokens 123 4567 3.14 -2 1e10",
    "two red dogs and three blue cats sitting near a green tree on the sand by the water " * 4,
    "\u00a0non-breaking\u2009thin\u3000ideographic spaces",
    "zero\u200bwidth and combining e\u0301",
]


KINDS = ["opt", "opt_hub", "opt_legacy", "opt_plain", "opt_json_bytelevel", "opt_json_nopost"]
KINDS += ["t5", "t5_plain", "t5_cleanup", "t5_normalizer", "t5_hub"]


def hf_tokenizer(folder: Path):
    return transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """opt / t5: what transformers 5 saves; opt_hub: the Salesforce repos' transformers-4 config with vocab.json +
    merges.txt only; opt_legacy: old-style AddedToken dicts, special_tokens_map.json and added_tokens.json;
    opt_plain / t5_plain: no <image>; t5_cleanup: clean_up_tokenization_spaces on; the others: see below."""
    root = tmp_path_factory.mktemp("lmtok")
    made = {name: root / name for name in KINDS}
    write_opt_tokenizer(made["opt"])
    write_opt_tokenizer(made["opt_plain"], with_image_token=False)
    write_opt_tokenizer(made["opt_hub"], hub_config=True)
    (made["opt_hub"] / "tokenizer.json").unlink()
    write_opt_tokenizer(made["opt_legacy"], hub_config=True)
    (made["opt_legacy"] / "tokenizer.json").unlink()
    legacy = json.loads((made["opt_legacy"] / "tokenizer_config.json").read_text())
    image_id = int(next(i for i, t in legacy.pop("added_tokens_decoder").items() if t["content"] == "<image>"))
    for role in ("bos_token", "eos_token", "unk_token", "pad_token"):
        legacy[role] = {"__type": "AddedToken", "content": legacy[role], "lstrip": False, "normalized": True,
                        "rstrip": False, "single_word": False}  # fmt: skip
    del legacy["clean_up_tokenization_spaces"]
    (made["opt_legacy"] / "tokenizer_config.json").write_text(json.dumps(legacy))
    (made["opt_legacy"] / "added_tokens.json").write_text(json.dumps({"<image>": image_id}))
    write_t5_tokenizer(made["t5"])
    write_t5_tokenizer(made["t5_plain"], with_image_token=False)
    write_t5_tokenizer(made["t5_cleanup"])
    _edit_json(made["t5_cleanup"] / "tokenizer_config.json", clean_up_tokenization_spaces=True)
    # tokenizer.json wins over add_bos_token: a post-processor without BOS (GPT2TokenizerFast's ByteLevel), or none
    for name, post in [("opt_json_bytelevel", {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                               "use_regex": True}), ("opt_json_nopost", None)]:  # fmt: skip
        write_opt_tokenizer(made[name], hub_config=True)
        _edit_json(made[name] / "tokenizer.json", post_processor=post)
    # T5Tokenizer keeps only a Precompiled normaliser: any other in tokenizer.json is ignored
    write_t5_tokenizer(made["t5_normalizer"])
    _edit_json(made["t5_normalizer"] / "tokenizer.json", normalizer={"type": "Lowercase"})
    # the Salesforce/blip2-flan-t5-* config (saved by transformers 4): the 100 sentinels listed, no added_tokens_decoder
    write_t5_tokenizer(made["t5_hub"])
    extras = [f"<extra_id_{i}>" for i in range(100)]
    hub = dict(additional_special_tokens=extras, eos_token="</s>", extra_ids=100, model_max_length=512,
               pad_token="<pad>", processor_class="Blip2Processor", sp_model_kwargs={}, special_tokens_map_file=None,
               tokenizer_class="T5Tokenizer", unk_token="<unk>")  # fmt: skip
    (made["t5_hub"] / "tokenizer_config.json").write_text(json.dumps(hub))
    special = dict(additional_special_tokens=extras, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    (made["t5_hub"] / "special_tokens_map.json").write_text(json.dumps(special))
    return made


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("kind", KINDS)
def test_encode_matches_transformers(folders, kind):
    ours, hf = LmTokenizer.from_pretrained(folders[kind]), hf_tokenizer(folders[kind])
    assert ours.vocab_size == len(ours) == len(hf)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        hf.bos_token_id,
        hf.eos_token_id,
        hf.pad_token_id,
    )
    for text in TEXTS:
        expected = hf(text)["input_ids"]
        assert ours.encode(text) == expected, text
        assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"], text
    if kind in ("opt_json_bytelevel", "opt_json_nopost"):  # transformers 5 ignores add_bos_token here
        assert ours.encode("a dog")[0] != ours.bos_token_id == 2
    elif kind.startswith("opt"):
        assert ours.encode("a dog")[0] == ours.bos_token_id == 2
    else:
        assert ours.encode("a dog")[-1] == ours.eos_token_id == 1 and ours.bos_token_id is None


@pytest.mark.parametrize("kind", KINDS)
def test_decode_matches_transformers(folders, kind):
    ours, hf = LmTokenizer.from_pretrained(folders[kind]), hf_tokenizer(folders[kind])
    generator = torch.Generator().manual_seed(0)
    rows = [hf(text)["input_ids"] for text in TEXTS]
    rows += [torch.randint(0, len(hf), (n,), generator=generator).tolist() for n in (1, 5, 17, 40)]
    for ids in rows:
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), ids
    assert ours.batch_decode(rows) == hf.batch_decode(rows, skip_special_tokens=True)
    # ids past the tokenizer (the LM's embedding is padded to a multiple of 64) are dropped, as transformers does
    ids = hf("a dog")["input_ids"] + [len(hf), len(hf) + 40]
    assert ours.decode(torch.tensor(ids)) == hf.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_batch_padding_and_truncation_match_transformers(folders, kind):
    ours, hf = LmTokenizer.from_pretrained(folders[kind]), hf_tokenizer(folders[kind])
    texts = ["a dog", "", "two red dogs and three blue cats sitting near a green tree"]
    for side in ("right", "left"):
        hf.padding_side = side
        expected = hf(texts, padding="longest", return_tensors="pt")
        input_ids, mask = ours(texts, padding_side=side)
        assert torch.equal(input_ids, expected["input_ids"]) and torch.equal(mask, expected["attention_mask"])
    hf.padding_side = "right"
    for max_length in (1, 2, 5, 9):
        expected = hf(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
        input_ids, mask = ours(texts, max_length=max_length)
        assert torch.equal(input_ids, expected["input_ids"]), max_length
        assert torch.equal(mask, expected["attention_mask"])
        assert ours.encode(texts[2], max_length=max_length) == expected["input_ids"][2][: int(mask[2].sum())].tolist()
    with pytest.raises(ValueError, match="max_length must be at least 1"):
        ours.encode("a dog", max_length=0)


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_image_tokens_match_blip2_processor(folders, kind):
    ours, hf = LmTokenizer.from_pretrained(folders[kind]), hf_tokenizer(folders[kind])
    processor = transformers.Blip2Processor(
        image_processor=transformers.BlipImageProcessor(size={"height": 16, "width": 16}),
        tokenizer=hf,
        num_query_tokens=4,
    )
    assert ours.image_token_id == hf.convert_tokens_to_ids("<image>") == len(hf) - 1
    images = [torch.zeros(3, 20, 20, dtype=torch.uint8)] * 2
    texts = ["Question: what is it? Answer:", "a photo of"]
    expected = processor(images=images, text=texts, padding="longest", return_tensors="pt")
    input_ids, mask = ours(texts, num_image_tokens=4)
    assert torch.equal(input_ids, expected["input_ids"]) and torch.equal(mask, expected["attention_mask"])
    assert input_ids[:, :4].eq(ours.image_token_id).all()
    expected = processor(images=images, text=texts, padding="longest", truncation=True, max_length=8,
                         return_tensors="pt")  # fmt: skip
    input_ids, mask = ours(texts, max_length=8, num_image_tokens=4)
    assert torch.equal(input_ids, expected["input_ids"]) and torch.equal(mask, expected["attention_mask"])
    plain = LmTokenizer.from_pretrained(folders[f"{kind}_plain"])
    assert plain.image_token_id is None
    with pytest.raises(ValueError, match="no <image> token"):
        plain(texts, num_image_tokens=4)


@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_round_trip(folders, kind, tmp_path):
    ours = LmTokenizer.from_pretrained(folders[kind])
    ours.save_pretrained(tmp_path / "saved")
    hf_saved, ours_saved = hf_tokenizer(tmp_path / "saved"), LmTokenizer.from_pretrained(tmp_path / "saved")
    hf = hf_tokenizer(folders[kind])
    assert len(hf_saved) == len(ours_saved) == len(hf)
    for text in TEXTS:
        expected = hf(text)["input_ids"]
        assert hf_saved(text)["input_ids"] == expected == ours_saved.encode(text), text
        assert hf_saved.decode(expected, skip_special_tokens=True) == hf.decode(expected, skip_special_tokens=True)
        assert ours_saved.decode(expected) == ours.decode(expected)
    # and from file texts held in memory, as a training checkpoint stores them
    files = {p.name: p.read_text(encoding="utf-8") for p in (tmp_path / "saved").iterdir()}
    from_files = LmTokenizer.from_files(files)
    assert [from_files.encode(t) for t in TEXTS] == [ours.encode(t) for t in TEXTS]


FILE_KINDS = [k for k in KINDS if k not in ("opt_hub", "opt_legacy")] + ["t5_metaspace"]


@pytest.fixture(scope="module")
def file_folders(folders, tmp_path_factory) -> dict[str, Path]:
    """t5_metaspace: tokenizer.json's pre-tokeniser is Metaspace alone (no WhitespaceSplit), as older T5 files have."""
    made = {k: folders[k] for k in FILE_KINDS if k in folders}
    made["t5_metaspace"] = tmp_path_factory.mktemp("lmtok_file") / "t5_metaspace"
    write_t5_tokenizer(made["t5_metaspace"])
    metaspace = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    _edit_json(made["t5_metaspace"] / "tokenizer.json", pre_tokenizer=metaspace)
    return made


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_file_pipeline_matches_tokenizers_backend(file_folders, kind, tmp_path):
    """pipeline="file" = transformers' TokenizersBackend, which transformers 5 uses for the Salesforce/blip2-* hub
    names; saved, it reads back the same in AutoTokenizer."""
    folder = file_folders[kind]
    ours, hf = (
        LmTokenizer.from_pretrained(folder, pipeline="file"),
        transformers.TokenizersBackend.from_pretrained(folder),
    )
    assert ours.pipeline == "file" and len(ours) == len(hf)
    rows = []
    for text in TEXTS:
        rows.append(hf(text)["input_ids"])
        assert ours.encode(text) == rows[-1], text
    for ids in rows:
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids)
    ours.save_pretrained(tmp_path / "saved")
    saved = hf_tokenizer(tmp_path / "saved")
    reread = LmTokenizer.from_pretrained(tmp_path / "saved")
    assert reread.pipeline == "file" and isinstance(load_text_tokenizer(tmp_path / "saved"), LmTokenizer)
    for text, ids in zip(TEXTS, rows, strict=True):
        assert saved(text)["input_ids"] == ids == reread.encode(text), text
    if kind in ("t5_normalizer", "t5_metaspace"):  # here the two pipelines differ
        class_ids = [LmTokenizer.from_pretrained(folder).encode(t) for t in TEXTS]
        assert class_ids != rows and class_ids == [hf_tokenizer(folder)(t)["input_ids"] for t in TEXTS]


def test_file_pipeline_needs_tokenizer_json(folders):
    with pytest.raises(ValueError, match=r"no tokenizer\.json \(needed for its own pipeline\)"):
        LmTokenizer.from_pretrained(folders["opt_hub"], pipeline="file")
    with pytest.raises(ValueError, match="pipeline must be 'class' or 'file'"):
        LmTokenizer.from_pretrained(folders["opt"], pipeline="json")


def test_load_text_tokenizer_picks_the_family(folders, tmp_path):
    assert isinstance(load_text_tokenizer(folders["opt"]), LmTokenizer)
    assert load_text_tokenizer(folders["opt_hub"]).family == "bpe"
    assert load_text_tokenizer(folders["t5"]).family == "t5"
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog"]) + "\n")
    assert isinstance(load_text_tokenizer(bert), BlipTokenizer)
    transformers.BertTokenizerFast.from_pretrained(str(bert)).save_pretrained(tmp_path / "bert_json")
    assert isinstance(load_text_tokenizer(tmp_path / "bert_json"), BlipTokenizer)
    (tmp_path / "bert_json" / "tokenizer_config.json").unlink()  # a WordPiece tokenizer.json alone
    assert isinstance(load_text_tokenizer(tmp_path / "bert_json"), BlipTokenizer)
    bare = tmp_path / "bare"
    shutil.copy(folders["opt"] / "vocab.json", bare.mkdir() or bare / "vocab.json")
    shutil.copy(folders["opt"] / "merges.txt", bare / "merges.txt")  # no config: GPT-2 defaults, no BOS
    assert load_text_tokenizer(bare).encode("a dog") == hf_tokenizer(folders["opt_plain"])("a dog")["input_ids"][1:]


def test_missing_or_bad_files_are_clear_errors(folders, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no tokenizer in .*tokenizer\.json, vocab\.txt, vocab\.json"):
        load_text_tokenizer(empty)
    with pytest.raises(FileNotFoundError, match="expected a folder"):
        load_text_tokenizer(tmp_path / "nowhere")
    t5_no_json = tmp_path / "t5"
    t5_no_json.mkdir()
    shutil.copy(folders["t5"] / "tokenizer_config.json", t5_no_json)
    (t5_no_json / "spiece.model").write_bytes(b"\x00")
    with pytest.raises(ValueError, match=r"spiece\.model without tokenizer\.json is not supported"):
        load_text_tokenizer(t5_no_json)
    (t5_no_json / "spiece.model").unlink()
    with pytest.raises(ValueError, match=r"no tokenizer\.json$"):
        LmTokenizer.from_pretrained(t5_no_json)
    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    with pytest.raises(ValueError, match="unsupported tokenizer_class 'LlamaTokenizer'"):
        load_text_tokenizer(other)
    with pytest.raises(ValueError, match="tokenizer.json is not valid JSON"):
        LmTokenizer.from_files({"tokenizer.json": "{"})
    with pytest.raises(ValueError, match="unexpected tokenizer file name"):
        LmTokenizer.from_files({"../tokenizer.json": "{}"})


# ---- the whole BLIP-2 processor: image preprocessing + text with the 32 image tokens ----

CLIP = dict(image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])


@pytest.mark.parametrize("kind", ["opt", "t5"])
@pytest.mark.parametrize("layout", ["transformers5", "hub"])
def test_blip2_processor_folder(folders, kind, layout, tmp_path):
    """transformers 5 saves one processor_config.json with the image processor nested in it; the hub repos have
    preprocessor_config.json plus a flat processor_config.json ({"num_query_tokens": 32, ...})."""
    image_processor = transformers.BlipImageProcessor(size={"height": 224, "width": 224}, do_convert_rgb=True, **CLIP)
    processor = transformers.Blip2Processor(
        image_processor=image_processor, tokenizer=hf_tokenizer(folders[kind]), num_query_tokens=32
    )
    folder = tmp_path / "processor"
    processor.save_pretrained(folder)
    if layout == "hub":
        nested = json.loads((folder / "processor_config.json").read_text())
        flat = {**nested.pop("image_processor"), "processor_class": "Blip2Processor"}
        (folder / "preprocessor_config.json").write_text(json.dumps(flat))
        (folder / "processor_config.json").write_text(json.dumps(nested))
        assert nested == {"num_query_tokens": 32, "processor_class": "Blip2Processor"}
    loaded = transformers.AutoProcessor.from_pretrained(str(folder))
    assert type(loaded).__name__ == "Blip2Processor" and loaded.num_query_tokens == 32

    images = make_images(3, seed=1) + [make_images(1)[0].convert("RGBA"), make_images(1)[0].convert("L")]
    texts = ["Question: what is it? Answer:", "a photo of", "", "two dogs", "The big yellow star."]
    expected = loaded(images=images, text=texts, padding="longest", return_tensors="pt")
    transform = ImageTransform.from_pretrained(folder)
    assert transform == ImageTransform(image_size=224)
    assert torch.equal(transform(images), expected["pixel_values"])
    input_ids, mask = load_text_tokenizer(folder)(texts, num_image_tokens=32)
    assert torch.equal(input_ids, expected["input_ids"]) and torch.equal(mask, expected["attention_mask"])
    # text only: no image tokens, as Blip2Processor
    assert torch.equal(
        load_text_tokenizer(folder)(texts)[0], loaded(text=texts, padding="longest", return_tensors="pt")["input_ids"]
    )


def test_image_transform_saves_blip2_processor_class(tmp_path):
    ImageTransform(image_size=224).save_pretrained(tmp_path, processor_class="Blip2Processor")
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["processor_class"] == "Blip2Processor" and saved["size"] == {"height": 224, "width": 224}
    assert ImageTransform.from_pretrained(tmp_path / "preprocessor_config.json") == ImageTransform(image_size=224)
    (tmp_path / "processor_config.json").write_text(json.dumps({"num_query_tokens": 32}))  # flat: ignored
    assert ImageTransform.from_pretrained(tmp_path) == ImageTransform(image_size=224)
    with pytest.raises(ValueError, match="has no image_processor settings"):
        ImageTransform.from_pretrained(tmp_path / "processor_config.json")
