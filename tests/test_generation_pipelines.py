"""Generation pipelines (text-generation, summarization, text2text-generation) and `fastlayers run`
for them, against transformers on the same folders.

Two tiny checkpoints saved by transformers' save_pretrained, each next to a byte-level BPE tokenizer
trained here with the `tokenizers` library (ByteLevel pre-tokenizer and decoder, BpeTrainer):
  - GPT-2 with "<|endoftext|>" as bos/eos/unk and no pad token (as the real GPT-2 tokenizer):
    text-generation equals transformers' own text-generation pipeline, greedy, for single prompts
    and for batches of prompts of different lengths (left-padded, longest first), full and new text;
  - BART with <s> <pad> </s> <unk> and a "<s> $A </s>" template, whose generation_config.json asks for
    beam search (num_beams, length_penalty, min/max length, no_repeat_ngram_size, forced bos/eos):
    summarization equals transformers' generate + decode (its summarization pipeline left in v5)
    with the folder's settings and with explicit ones, on right-padded batches.
Streaming: the text printed as tokens come joins to the pipeline's result; a multi-byte character
split over byte tokens is held back until complete. Weights are perturbed so that greedy choices
are well separated (checked for the batch compared with transformers).
"""
import io
import json
import sys
from pathlib import Path

import pytest
import torch

from fastlayers.models.pipelines import PipelineError, TextStreamer, pipeline
from model_helpers import perturb_

transformers = pytest.importorskip("transformers")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Transformers run attention over tokens; fused kernels make them faster!",
    "Hugging Face hosts many models, and GPT-2 is one of them.",
    "What's the weather like in Berlin today? It isn't raining.",
    "George Washington lived in Virginia before he became president.",
]
# different token counts (1 to ~12), and characters the BPE never merged (single-byte tokens)
PROMPTS = ["The quick brown fox", "Paris", "Hugging Face hosts many models, and", "東京 🙂 is", "zebra"]
DOCUMENTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France.",
    "Hugging Face hosts many models, and BART is one of them. What's the weather like in Berlin today?",
    "fused kernels",
]
GPT2_EOS = "<|endoftext|>"
N_POSITIONS = 48


def train_byte_level_bpe(folder: Path, specials: list, config: dict, template=None) -> int:
    """A byte-level BPE (GPT-2 / BART style) trained on CORPUS, saved as tokenizer.json with
    `config` as tokenizer_config.json. template: (single, pair) for a TemplateProcessing post-processor
    over the specials. Returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if template is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=template[0], pair=template[1], special_tokens=[(t, tok.token_to_id(t)) for t in specials])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.get_vocab_size()


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    vocab = train_byte_level_bpe(folder, [GPT2_EOS], {
        "tokenizer_class": "GPT2Tokenizer", "bos_token": GPT2_EOS, "eos_token": GPT2_EOS, "unk_token": GPT2_EOS,
        "model_max_length": N_POSITIONS})
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=N_POSITIONS,
                                  bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    with torch.no_grad():
        perturb_(transformers.GPT2LMHeadModel(cfg), 0.2).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bart")
    specials = ["<s>", "<pad>", "</s>", "<unk>"]            # ids 0 1 2 3, BART's
    vocab = train_byte_level_bpe(folder, specials, {
        "tokenizer_class": "BartTokenizer", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "unk_token": "<unk>", "model_max_length": 62}, template=("<s> $A </s>", "<s> $A </s> </s> $B </s>"))
    torch.manual_seed(1)
    cfg = transformers.BartConfig(vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                                  decoder_ffn_dim=40, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
                                  activation_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                  decoder_start_token_id=2, forced_eos_token_id=2)
    model = transformers.BartForConditionalGeneration(cfg)
    with torch.no_grad():
        perturb_(model, 0.2)
    gc = model.generation_config         # what generation_config.json will say (bart-large-cnn's kind of settings)
    gc.num_beams, gc.length_penalty, gc.early_stopping = 3, 1.5, True
    gc.max_length, gc.min_length, gc.no_repeat_ngram_size, gc.forced_bos_token_id = 14, 4, 2, 0
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_text_generation(gpt2_dir):
    return transformers.pipeline("text-generation", model=str(gpt2_dir), tokenizer=str(gpt2_dir), device="cpu")


@pytest.fixture(scope="module")
def generator(gpt2_dir):
    return pipeline("text-generation", gpt2_dir)


@pytest.fixture(scope="module")
def bart_reference(bart_dir):
    """(transformers tokenizer, transformers BartForConditionalGeneration) on the BART folder."""
    return (transformers.AutoTokenizer.from_pretrained(str(bart_dir)),
            transformers.BartForConditionalGeneration.from_pretrained(str(bart_dir)).eval())


def _assert_greedy_well_conditioned(gpt2_dir, prompts, max_new_tokens):
    """transformers' greedy choices on the left-padded batch beat the runner-up by a margin, so 1e-6
    differences between the implementations cannot flip a token."""
    from gpt2_helpers import hf_generate
    tok = transformers.AutoTokenizer.from_pretrained(str(gpt2_dir), padding_side="left")
    tok.pad_token = GPT2_EOS
    ref = transformers.GPT2LMHeadModel.from_pretrained(str(gpt2_dir)).eval()
    enc = tok(prompts, padding=True, return_tensors="pt")
    hf_generate(ref, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens, pad_token_id=0)


# ---------------------------------------------------------------------------------------- text-generation
def test_text_generation_matches_transformers_pipeline(gpt2_dir, generator, hf_text_generation):
    _assert_greedy_well_conditioned(gpt2_dir, PROMPTS, 12)
    got = generator(PROMPTS, max_new_tokens=12)                          # one left-padded batch
    expect = [hf_text_generation(p, max_new_tokens=12, do_sample=False) for p in PROMPTS]
    assert got == expect
    assert all(r[0]["generated_text"].startswith(p) for r, p in zip(got, PROMPTS))
    assert generator(PROMPTS, max_new_tokens=12, batch_size=2) == got    # other batch compositions
    assert generator(PROMPTS[2], max_new_tokens=12) == got[2]            # one prompt: a list of one dict


def test_text_generation_matches_transformers_batched_pipeline(gpt2_dir, generator, hf_text_generation):
    # transformers batches only with a pad token: its users set pad = eos, as fastlayers does by itself
    hf_text_generation.tokenizer.pad_token = GPT2_EOS
    expect = hf_text_generation(PROMPTS, max_new_tokens=7, do_sample=False, batch_size=3)
    assert generator(PROMPTS, max_new_tokens=7, batch_size=3) == expect


def test_new_text_only_and_generate_arguments_pass_through(generator, hf_text_generation):
    kw = dict(max_new_tokens=9, repetition_penalty=1.4, no_repeat_ngram_size=2, min_new_tokens=3)
    got = generator(PROMPTS[:3], return_full_text=False, **kw)
    expect = [hf_text_generation(p, return_full_text=False, do_sample=False, **kw) for p in PROMPTS[:3]]
    assert got == expect
    # an eos the greedy continuation reaches early: that row stops there
    ids = generator.tokenizer.encode(got[0][0]["generated_text"])
    stop = ids[2]
    got = generator(PROMPTS[:3], max_new_tokens=9, eos_token_id=stop)
    expect = [hf_text_generation(p, max_new_tokens=9, eos_token_id=stop, do_sample=False) for p in PROMPTS[:3]]
    assert got == expect


def test_default_length_fills_the_positions_left(gpt2_dir, generator, hf_text_generation):
    # neither the call nor generation_config.json sets a length: 256 new tokens, cut to what
    # n_positions leaves (transformers' pipeline would ask for 256 and fail)
    prompt = PROMPTS[0]
    room = N_POSITIONS - len(generator.tokenizer.encode(prompt)) + 1
    got = generator(prompt)
    assert got == hf_text_generation(prompt, max_new_tokens=room, do_sample=False)


def test_sampling_reproducible_and_num_return_sequences(generator):
    kw = dict(do_sample=True, top_k=20, top_p=0.9, temperature=0.8, max_new_tokens=8, num_return_sequences=3)
    torch.manual_seed(5)
    a = generator(PROMPTS[:2], **kw)
    torch.manual_seed(5)
    b = generator(PROMPTS[:2], **kw)
    assert a == b
    assert [len(r) for r in a] == [3, 3]
    assert all(d["generated_text"].startswith(p) for r, p in zip(a, PROMPTS) for d in r)
    assert len({d["generated_text"] for d in a[0]}) > 1                   # three draws, not one


def test_empty_prompt_starts_from_bos(generator):
    out = generator("", max_new_tokens=5, return_full_text=False)
    assert out == generator("", max_new_tokens=5)                         # the prompt text is ""
    assert isinstance(out[0]["generated_text"], str) and out[0]["generated_text"]


# ---------------------------------------------------------------------------------------- streaming
def test_streamer_true_prints_the_generated_text(generator, capsys):
    for prompt in PROMPTS[2:4]:
        result = generator(prompt, max_new_tokens=15, streamer=True)
        assert capsys.readouterr().out == result[0]["generated_text"]
    result = generator(PROMPTS[0], max_new_tokens=15, streamer=True, return_full_text=False)
    assert capsys.readouterr().out == result[0]["generated_text"]


def test_streamer_callable_gets_pieces_as_tokens_come(generator):
    pieces = []
    result = generator(PROMPTS[2], max_new_tokens=15, streamer=pieces.append)
    assert len(pieces) > 3 and pieces[0] == PROMPTS[2]
    assert "".join(pieces) == result[0]["generated_text"]


def test_transformers_text_streamer_receives_the_tokens(gpt2_dir, generator, capsys):
    tok = transformers.AutoTokenizer.from_pretrained(str(gpt2_dir))
    result = generator(PROMPTS[0], max_new_tokens=10, return_full_text=False,
                       streamer=transformers.TextStreamer(tok, skip_prompt=True))
    assert capsys.readouterr().out == result[0]["generated_text"] + "\n"


def test_text_streamer_holds_back_split_characters(generator):
    text = "Paris 東京 🙂 naïve"
    ids = generator.tokenizer.encode(text)
    assert len(ids) > len(text.split()) + 6          # the CJK/emoji bytes are separate tokens here
    pieces = []
    streamer = TextStreamer(generator.tokenizer, pieces.append, prefix=">")
    streamer.put(torch.tensor([[7, 8]]))             # the prompt: skipped
    for i in ids:
        streamer.put(torch.tensor([i]))
    streamer.end()
    assert "".join(pieces) == ">" + text
    assert not any("\ufffd" in p for p in pieces)    # never half a character
    with pytest.raises(ValueError, match=r"one sequence, got a tensor of shape \(2, 3\)"):
        streamer.put(torch.zeros(2, 3, dtype=torch.long))


def test_streaming_needs_one_prompt_and_one_sequence(generator):
    with pytest.raises(PipelineError, match="streams one prompt, one sequence and num_beams=1, got 2 prompts"):
        generator(PROMPTS[:2], streamer=True, max_new_tokens=3)
    with pytest.raises(PipelineError, match="num_return_sequences=2"):
        generator(PROMPTS[0], streamer=True, max_new_tokens=3, do_sample=True, num_return_sequences=2)
    with pytest.raises(PipelineError, match="streamer: expected None, True"):
        generator(PROMPTS[0], streamer=42)


def test_text_generation_argument_errors(gpt2_dir, generator):
    with pytest.raises(TypeError, match=r"unknown arguments \['max_tokens'\]"):
        generator("x", max_tokens=3)
    with pytest.raises(PipelineError, match="max_new_tokens: expected an int >= 1, got 0"):
        generator("x", max_new_tokens=0)
    with pytest.raises(PipelineError, match="temperature: expected a float > 0"):
        pipeline("text-generation", gpt2_dir, do_sample=True, temperature=0.0)
    with pytest.raises(PipelineError, match=rf"inputs\[1\]: the prompt has \d+ tokens, the model takes at most "
                                            rf"{N_POSITIONS} positions"):
        generator(["ok", "fox " * 60])
    with pytest.raises(ValueError, match="max_new_tokens"):               # generate() names what does not fit
        generator("fox " * 20, max_new_tokens=40)
    assert generator.generation_config(max_new_tokens=4).max_new_tokens == 4


# ---------------------------------------------------------------------------------------- summarization
def _hf_summaries(bart_reference, docs, **kw):
    tok, ref = bart_reference
    enc = tok(docs, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = ref.generate(**enc, **kw)
    return tok.batch_decode(out, skip_special_tokens=True)


def test_summarization_matches_transformers_generate(bart_dir, bart_reference):
    summarize = pipeline("summarization", bart_dir)
    gc = summarize.generation_config()
    assert (gc.num_beams, gc.length_penalty, gc.max_length, gc.min_length, gc.no_repeat_ngram_size,
            gc.forced_bos_token_id, gc.forced_eos_token_id) == (3, 1.5, 14, 4, 2, 0, 2)
    got = summarize(DOCUMENTS)                                          # the folder's beam settings
    assert got == [{"summary_text": t} for t in _hf_summaries(bart_reference, DOCUMENTS)]
    assert summarize(DOCUMENTS[2]) == [got[2]]
    assert summarize(DOCUMENTS, batch_size=1) == got


@pytest.mark.parametrize("kw", [
    dict(num_beams=2, length_penalty=0.7, early_stopping=False, max_new_tokens=9),
    dict(num_beams=4, num_return_sequences=2, early_stopping="never", no_repeat_ngram_size=0),
    dict(num_beams=1, max_new_tokens=6, min_length=0),
], ids=["beams2-lp0.7", "beams4-return2-never", "greedy"])
def test_text2text_generation_with_explicit_settings(bart_dir, bart_reference, kw):
    generate = pipeline("text2text-generation", bart_dir)
    got = generate(DOCUMENTS, **kw)
    texts = _hf_summaries(bart_reference, DOCUMENTS, **kw)
    n = kw.get("num_return_sequences", 1)
    expect = [[{"generated_text": t} for t in texts[i * n:(i + 1) * n]] for i in range(len(DOCUMENTS))]
    assert got == (expect if n > 1 else [e[0] for e in expect])


def test_summarization_errors(bart_dir, gpt2_dir):
    summarize = pipeline("summarization", bart_dir)
    with pytest.raises(PipelineError, match="num_return_sequences: at most num_beams=3, got 5"):
        summarize("x", num_return_sequences=5)
    with pytest.raises(TypeError, match=r"unknown arguments \['streamer'\]"):
        summarize("x", streamer=True)
    with pytest.raises(ValueError, match="AutoModelForSeq2SeqLM supports"):
        pipeline("summarization", gpt2_dir)                               # a GPT-2 folder is no seq2seq model


def test_long_documents_are_truncated(bart_dir, bart_reference):
    tok, ref = bart_reference
    long_doc = " ".join(CORPUS * 3)                                       # > 62 tokens (model_max_length)
    enc = tok([long_doc], truncation=True, return_tensors="pt")
    assert enc["input_ids"].shape[1] == 62
    with torch.no_grad():
        expect = tok.batch_decode(ref.generate(**enc, num_beams=2), skip_special_tokens=True)
    assert pipeline("summarization", bart_dir)(long_doc, num_beams=2) == [{"summary_text": expect[0]}]


# ---------------------------------------------------------------------------------------- CLI
class _Recorder(io.StringIO):
    """stdout that counts its writes (streaming writes piece by piece)."""

    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, s):
        self.writes += 1
        return super().write(s)


def _json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_cli_streams_one_prompt(gpt2_dir, generator, monkeypatch):
    from fastlayers.cli import main
    out = _Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["run", "text-generation", "--model", str(gpt2_dir), PROMPTS[2], "--max-new-tokens", "12"]) == 0
    expect = generator(PROMPTS[2], max_new_tokens=12)[0]["generated_text"]
    assert out.getvalue() == expect + "\n"
    assert out.writes > 4                                                  # the prompt, then token by token


def test_cli_streaming_with_capsys(gpt2_dir, generator, capsys):
    from fastlayers.cli import main
    assert main(["run", "text-generation", "--model", str(gpt2_dir), PROMPTS[0], "--max-new-tokens", "6",
                 "--repetition-penalty", "1.5"]) == 0
    expect = generator(PROMPTS[0], max_new_tokens=6, repetition_penalty=1.5)[0]["generated_text"]
    assert capsys.readouterr().out == expect + "\n"


def test_cli_several_prompts_and_stdin_give_json_lines(gpt2_dir, generator, capsys, monkeypatch):
    from fastlayers.cli import main
    expect = [r[0] for r in generator(PROMPTS[:3], max_new_tokens=5)]
    assert main(["run", "text-generation", "--model", str(gpt2_dir), *PROMPTS[:3], "--max-new-tokens", "5"]) == 0
    assert _json_lines(capsys.readouterr().out) == expect
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(PROMPTS[:3]) + "\n\n"))
    assert main(["run", "text-generation", "--model", str(gpt2_dir), "--max-new-tokens", "5"]) == 0
    assert _json_lines(capsys.readouterr().out) == expect
    assert main(["run", "text-generation", "--model", str(gpt2_dir), PROMPTS[0], "--max-new-tokens", "5",
                 "--json"]) == 0
    assert _json_lines(capsys.readouterr().out) == expect[:1]


def test_cli_sampling_with_seed_is_reproducible(gpt2_dir, capsys):
    from fastlayers.cli import main
    argv = ["run", "text-generation", "--model", str(gpt2_dir), *PROMPTS[:2], "--max-new-tokens", "8", "--do-sample",
            "--temperature", "0.9", "--top-k", "30", "--top-p", "0.95", "--seed", "7"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first and len(_json_lines(first)) == 2


def test_cli_summarization_reads_documents_from_stdin(bart_dir, capsys, monkeypatch):
    from fastlayers.cli import main
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(DOCUMENTS) + "\n"))
    assert main(["run", "summarization", "--model", str(bart_dir), "--num-beams", "2", "--max-new-tokens", "6"]) == 0
    out = _json_lines(capsys.readouterr().out)
    assert out == pipeline("summarization", bart_dir)(DOCUMENTS, num_beams=2, max_new_tokens=6)
    assert set(out[0]) == {"summary_text"}


@pytest.mark.parametrize("argv, message", [
    (["run", "fill-mask", "--model", "/nowhere", "x", "--temperature", "0.5"],
     "--temperature: only the generation tasks"),
    (["run", "text-classification", "--model", "/nowhere", "x", "--seed", "1"], "--seed: only the generation tasks"),
    (["run", "text-generation", "--model", "{gpt2}", "x", "--max-new-tokens", "0"], "max_new_tokens: expected an int"),
    (["run", "summarization", "--model", "{gpt2}", "x"], "AutoModelForSeq2SeqLM supports ['bart'], got 'gpt2'"),
])
def test_cli_generation_errors(gpt2_dir, capsys, argv, message):
    from fastlayers.cli import main
    assert main([a.format(gpt2=str(gpt2_dir)) for a in argv]) == 2
    assert message in capsys.readouterr().err
