"""Pipelines: text in, Python objects out, on fastlayers models.

    from fastlayers.models import pipeline
    embed = pipeline("feature-extraction", "minilm")          # sentence embeddings (list of floats)
    rank = pipeline("sentence-similarity", "minilm")         # first text = query, the rest ranked
    pipeline("fill-mask" | "text-classification" | "token-classification" | "question-answering", dir)
    gen = pipeline("text-generation", gpt2_dir)               # [{"generated_text": prompt + continuation}]
    gen("Once upon a time", max_new_tokens=40, streamer=True)  # ... printed as the tokens come
    pipeline("summarization" | "text2text-generation", bart_dir)  # [{"summary_text"}] / [{"generated_text"}]

Each call takes one input (a str, or a {"question", "context"} dict for question answering) or a list
of them, and gives one result or a list of results. Inputs run in batches of `batch_size`, longest
first (less padding); results come back in input order. The model runs on the GPU when there is one
(device=None), in eval mode under `torch.inference_mode()`; scores are computed in float32.

Results use the field names of transformers' pipelines and, on the same checkpoint, the same
values (tests/test_pipelines.py compares them). Deliberate differences: "feature-extraction" pools
into one sentence embedding as sentence-transformers does (pooling="none" gives transformers' per-token
features); one input gives one result and a list gives a list, for every task (transformers wraps a
single text-classification result in a list, and unwraps a one-item fill-mask list); long inputs
are truncated to the model's limit; question answering (gone from transformers 5) follows
transformers 4's rules, documented on QuestionAnsweringPipeline.

Generation pipelines run the model's generate() (transformers' argument names; defaults from the
folder's generation_config.json) under torch.no_grad. text-generation follows transformers 5's
pipeline (left-padded batches, text = prompt + decode(new tokens)) except that it decodes greedily
unless asked to sample; summarization / text2text-generation follow transformers 4's (gone from
transformers 5), except that inputs are truncated to the model's limit.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .generation import GenerationConfig
from .loading import resolve_model_dir
from .tokenizer import Tokenizer, load_tokenizer

_UNSET = object()  # "argument not given" where None is a meaningful value (text-classification top_k)


class PipelineError(ValueError):
    """An input or argument a pipeline cannot handle (the message names it)."""


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _positive_int(value: Any, name: str, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PipelineError(f"{name}: expected a positive int{' or None' if allow_none else ''}, got {value!r}")
    return value


def _check_text(item: Any, index: int) -> str:
    if not isinstance(item, str):
        raise PipelineError(f"inputs[{index}]: expected a str, got {type(item).__name__} ({item!r:.60})")
    return item


class Pipeline:
    """Shared machinery: argument handling, length-sorted batching, the model forward.

    Subclasses set `task`, `auto_class` (the Auto class that loads the model) and `defaults`
    (every per-call argument with its default), and implement `_run(items, args, forward)` ->
    one result per item.
    """
    task = ""
    auto_class = None
    defaults: dict = {}
    # inference_mode for forward-only tasks; generation pipelines use no_grad, since generate() keeps
    # captured CUDA-graph sessions on the model that a later plain generate() call must be able to update
    _grad_mode = staticmethod(torch.inference_mode)

    def __init__(self, model, tokenizer: Tokenizer, *, batch_size: int = 8, model_dir: Optional[Path] = None,
                 **defaults):
        self.model = model
        self.tokenizer = tokenizer
        self.model_dir = model_dir
        self.batch_size = _positive_int(batch_size, "batch_size")
        unknown = sorted(set(defaults) - set(self.defaults))
        if unknown:
            raise TypeError(f"{self.task}: unknown arguments {unknown}; this task takes {sorted(self.defaults)}")
        self._defaults = {**self.defaults, **defaults}
        self._check_args(dict(self._defaults))

    @property
    def device(self) -> torch.device:
        return self.model.device

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(task={self.task!r}, model={type(self.model).__name__}, "
                f"device={self.device}, dtype={self.model.dtype}, batch_size={self.batch_size})")

    # ------------------------------------------------------------------ per-call arguments
    def _check_args(self, args: dict) -> dict:
        """Validates the task's arguments (raises PipelineError naming one); returns them."""
        return args

    def _is_single(self, inputs: Any) -> bool:
        return isinstance(inputs, str)

    def __call__(self, inputs, *, batch_size: Optional[int] = None, progress: Any = False, **kwargs):
        """Runs the task on one input or a list of inputs.

        batch_size: inputs per forward (default: the pipeline's). progress: False, True (a tqdm bar
        on stderr), or an object with `update(n)` (a tqdm the caller owns), advanced per batch.
        kwargs: the task's arguments (see the class), overriding the pipeline's defaults.
        Returns one result for a single input, else a list with one result per input.
        """
        unknown = sorted(set(kwargs) - set(self.defaults))
        if unknown:
            raise TypeError(f"{self.task}: unknown arguments {unknown}; this task takes {sorted(self.defaults)}")
        args = self._check_args({**self._defaults, **kwargs})
        single = self._is_single(inputs)
        if not single and not isinstance(inputs, (list, tuple)):
            raise PipelineError(f"inputs: expected {self._input_doc()} or a list of them, got {type(inputs).__name__}")
        items = [inputs] if single else list(inputs)
        batch_size = self.batch_size if batch_size is None else _positive_int(batch_size, "batch_size")
        bar, own_bar = progress, False
        if progress is True:
            from tqdm.auto import tqdm
            bar = tqdm(total=self._progress_total(items), file=sys.stderr, desc=self.task, unit="input")
            own_bar = True
        try:
            with self._grad_mode():
                results = self._run(items, args, batch_size, bar or None)
        finally:
            if own_bar:
                bar.close()
        return results[0] if single else results

    def _input_doc(self) -> str:
        return "a str"

    def _progress_total(self, items: list) -> int:
        """How many units `_batches` will report for these items (the progress bar's total)."""
        return len(items)

    def _batches(self, items: list, batch_size: int, key, bar):
        """Yields lists of item indices, longest first (key: an item's length proxy)."""
        order = sorted(range(len(items)), key=lambda i: -key(items[i]))
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            yield chunk
            if bar is not None:
                bar.update(len(chunk))

    def _forward(self, encoding, batch_size: int, fields: Sequence[str]) -> dict:
        """Runs the model on the rows of `encoding` (in chunks of batch_size) and returns the output
        fields as float32 CPU tensors, rows in encoding order. Padding rows never mix: each row
        attends to its own tokens only (attention_mask)."""
        names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in encoding]
        rows = encoding["input_ids"].shape[0]
        out = {f: [] for f in fields}
        for start in range(0, rows, batch_size):
            feed = {n: encoding[n][start:start + batch_size].to(self.device) for n in names}
            result = self.model(**feed)
            for f in fields:
                out[f].append(result[f].float().cpu())
        return {f: torch.cat(v) if v else torch.empty(0) for f, v in out.items()}

    def _encode(self, texts, pairs=None, **kwargs):
        return self.tokenizer(texts, pairs, padding=True, truncation=kwargs.pop("truncation", True),
                              return_tensors="pt", **kwargs)


# ---------------------------------------------------------------------------------------- embeddings
_POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len", "none")
_ST_POOLING_KEYS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                    "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
                    "pooling_mode_weightedmean_tokens": None, "pooling_mode_lasttoken": None}


def sentence_transformers_settings(model_dir: Union[str, Path]) -> dict:
    """What a sentence-transformers folder says about embeddings, as pipeline arguments.

    Reads modules.json (the Transformer module's folder, the Pooling module's config, whether a
    Normalize module follows) and sentence_bert_config.json (max_seq_length, do_lower_case).
    Returns {"transformer_dir": Path, "pooling": str, "normalize": bool, "max_length": int|None,
    "do_lower_case": bool}; a folder without modules.json gives mean pooling, no normalisation.
    Raises PipelineError for a pooling config fastlayers does not implement (several modes, or
    weighted-mean / last-token pooling).
    """
    root = resolve_model_dir(model_dir)
    settings = {"transformer_dir": root, "pooling": "mean", "normalize": False, "max_length": None,
                "do_lower_case": False}
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return settings
    modules = json.loads(modules_file.read_text())
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        folder = root / module.get("path", "")
        if kind == "Transformer":
            settings["transformer_dir"] = folder
            st_config = folder / "sentence_bert_config.json"
            if not st_config.is_file():
                st_config = root / "sentence_bert_config.json"
            if st_config.is_file():
                data = json.loads(st_config.read_text())
                settings["max_length"] = data.get("max_seq_length")
                settings["do_lower_case"] = bool(data.get("do_lower_case", False))
        elif kind == "Pooling":
            config = json.loads((folder / "config.json").read_text())
            modes = [k for k, v in config.items() if k in _ST_POOLING_KEYS and v]
            if len(modes) != 1 or _ST_POOLING_KEYS[modes[0]] is None:
                raise PipelineError(f"{folder / 'config.json'}: pooling: fastlayers implements exactly one of "
                                    f"{[k for k, v in _ST_POOLING_KEYS.items() if v]}, got {modes}")
            settings["pooling"] = _ST_POOLING_KEYS[modes[0]]
        elif kind == "Normalize":
            settings["normalize"] = True
    return settings


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Sentence embeddings from token states as sentence-transformers pools them.

    hidden (B, L, H) float; attention_mask (B, L) 0/1. pooling: "mean" (mean over tokens),
    "mean_sqrt_len" (sum / sqrt(token count)), "max" (per feature over tokens), "cls" (first token).
    Returns (B, H) in hidden's dtype.
    """
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)                      # (B, L, 1)
    if pooling == "max":
        return hidden.masked_fill(mask == 0, -1e9).max(dim=1).values
    summed = (hidden * mask).sum(dim=1)                                      # (B, H)
    count = mask.sum(dim=1).clamp(min=1e-9)                                  # (B, 1)
    if pooling == "mean":
        return summed / count
    if pooling == "mean_sqrt_len":
        return summed / count.sqrt()
    raise PipelineError(f"pooling: expected one of {list(_POOLING_MODES[:-1])}, got {pooling!r}")


class FeatureExtractionPipeline(Pipeline):
    """Sentence embeddings.

    Arguments (pipeline defaults, overridable per call):
      pooling: "mean" | "cls" | "max" | "mean_sqrt_len" | "none" -- from the folder's
        sentence-transformers Pooling module, else "mean". "none" gives transformers'
        feature-extraction output: the last hidden state, one list of H floats per token.
      normalize: L2-normalise each embedding (True when the folder has a Normalize module).
      max_length: truncation length (sentence_bert_config.json's max_seq_length, else the
        tokenizer's model_max_length).
      return_tensors: False -> lists of floats; True -> float32 CPU tensors, (H,) per input
        ((L, H) with pooling="none").
      do_lower_case: lower-case texts first (sentence_bert_config.json's do_lower_case).
    Result per input: a list of H floats (or a tensor).
    """
    task = "feature-extraction"
    defaults = {"pooling": "mean", "normalize": False, "max_length": None, "return_tensors": False,
                "do_lower_case": False}

    def _check_args(self, args):
        if args["pooling"] not in _POOLING_MODES:
            raise PipelineError(f"pooling: expected one of {list(_POOLING_MODES)}, got {args['pooling']!r}")
        if args["normalize"] and args["pooling"] == "none":
            raise PipelineError("normalize: needs pooled embeddings, got pooling='none'")
        _positive_int(args["max_length"], "max_length", allow_none=True)
        return args

    def embed(self, texts: list, args: dict, batch_size: int, bar) -> list:
        """One float32 CPU tensor per text: (H,) pooled, or (L_i, H) with pooling="none"."""
        texts = [_check_text(t, i) for i, t in enumerate(texts)]
        if args["do_lower_case"]:
            texts = [t.lower() for t in texts]
        out = [None] * len(texts)
        for chunk in self._batches(texts, batch_size, len, bar):
            enc = self._encode([texts[i] for i in chunk], max_length=args["max_length"])
            hidden = self._forward(enc, batch_size, ["last_hidden_state"])["last_hidden_state"]   # (b, L, H)
            mask = enc["attention_mask"]
            if args["pooling"] == "none":
                for row, i in enumerate(chunk):
                    out[i] = hidden[row][mask[row].bool()]
                continue
            emb = pool(hidden, mask, args["pooling"])                                             # (b, H)
            if args["normalize"]:
                emb = F.normalize(emb, p=2, dim=1)
            for row, i in enumerate(chunk):
                out[i] = emb[row]
        return out

    def _run(self, items, args, batch_size, bar):
        vectors = self.embed(items, args, batch_size, bar)
        return vectors if args["return_tensors"] else [v.tolist() for v in vectors]


class SentenceSimilarityPipeline(FeatureExtractionPipeline):
    """Ranks texts by cosine similarity of their embeddings to a query.

    Input: a list [query, text_1, ..., text_n] (n >= 1), or {"source_sentence": query,
    "sentences": [...]} (the Hugging Face inference API's form); a list of such dicts gives one
    ranking each. Arguments: as feature-extraction, plus top_k (None = all).
    Result: a list of {"index": i (0-based among the texts after the query), "text", "score"},
    best first.
    """
    task = "sentence-similarity"
    defaults = {**FeatureExtractionPipeline.defaults, "top_k": None}

    def _check_args(self, args):
        args = super()._check_args(args)
        if args["pooling"] == "none":
            raise PipelineError("pooling: sentence-similarity needs pooled embeddings, got 'none'")
        _positive_int(args["top_k"], "top_k", allow_none=True)
        return args

    def _input_doc(self):
        return "a list [query, text, ...] or a {'source_sentence', 'sentences'} dict"

    def _is_single(self, inputs):
        return isinstance(inputs, dict) or (isinstance(inputs, (list, tuple)) and
                                            all(isinstance(x, str) for x in inputs) and len(inputs) > 0)

    def _group(self, item, index) -> tuple:
        if isinstance(item, dict):
            if set(item) != {"source_sentence", "sentences"}:
                raise PipelineError(f"inputs[{index}]: expected keys ['sentences', 'source_sentence'], "
                                    f"got {sorted(item)}")
            query, texts = item["source_sentence"], list(item["sentences"])
        elif isinstance(item, (list, tuple)):
            query, texts = (item[0], list(item[1:])) if item else (None, [])
        else:
            raise PipelineError(f"inputs[{index}]: expected {self._input_doc()}, got {type(item).__name__}")
        if not texts:
            raise PipelineError(f"inputs[{index}]: expected a query and at least one text to rank, "
                                f"got {1 if query is not None else 0} text(s)")
        for j, t in enumerate([query, *texts]):
            if not isinstance(t, str):
                raise PipelineError(f"inputs[{index}]: text {j}: expected a str, got {type(t).__name__}")
        return query, texts

    def _progress_total(self, items):
        # every text of every group is embedded once, and counted
        return sum(1 + len(self._group(item, i)[1]) for i, item in enumerate(items))

    def _run(self, items, args, batch_size, bar):
        groups = [self._group(item, i) for i, item in enumerate(items)]
        flat = [t for q, texts in groups for t in (q, *texts)]
        vectors = self.embed(flat, args, batch_size, bar)
        results, at = [], 0
        for query, texts in groups:
            q = F.normalize(vectors[at], dim=0)
            docs = F.normalize(torch.stack(vectors[at + 1:at + 1 + len(texts)]), dim=1)   # (n, H)
            scores = docs @ q                                                              # (n,)
            at += 1 + len(texts)
            order = torch.argsort(scores, descending=True, stable=True).tolist()
            if args["top_k"] is not None:
                order = order[:args["top_k"]]
            results.append([{"index": j, "text": texts[j], "score": float(scores[j])} for j in order])
        return results


# ---------------------------------------------------------------------------------------- fill-mask
class FillMaskPipeline(Pipeline):
    """Predicts the tokens at the tokenizer's mask token ("[MASK]" for BERT).

    Arguments: top_k (5); targets (None, or words to score instead of the whole vocabulary; a word
    not in the vocabulary is scored by its first token, as transformers does).
    Result per input (transformers' fields): a list of top_k {"score", "token", "token_str",
    "sequence"} for one mask; with several masks, one such list per mask (then "sequence" keeps
    the special tokens, as transformers does). Raises PipelineError for an input without a mask.
    """
    task = "fill-mask"
    defaults = {"top_k": 5, "targets": None}

    def _check_args(self, args):
        _positive_int(args["top_k"], "top_k")
        if self.tokenizer.mask_token_id is None:
            raise PipelineError(f"model: the tokenizer of {self.model_dir} has no mask token")
        targets = args["targets"]
        if targets is not None:
            targets = [targets] if isinstance(targets, str) else list(targets)
            if not targets or not all(isinstance(t, str) for t in targets):
                raise PipelineError(f"targets: expected a str or a non-empty list of str, got {args['targets']!r}")
        return args

    def _target_ids(self, targets) -> Optional[torch.Tensor]:
        if targets is None:
            return None
        targets = [targets] if isinstance(targets, str) else targets
        vocab = self.tokenizer.get_vocab()
        ids = []
        for t in targets:
            if t in vocab:
                ids.append(vocab[t])
                continue
            pieces = self.tokenizer.encode(t, add_special_tokens=False)
            if pieces:
                ids.append(pieces[0])
        if not ids:
            raise PipelineError(f"targets: none of {targets} maps to a token of the vocabulary")
        return torch.tensor(sorted(set(ids)))

    def _run(self, items, args, batch_size, bar):
        texts = [_check_text(t, i) for i, t in enumerate(items)]
        target_ids = self._target_ids(args["targets"])
        mask_id, pad_id = self.tokenizer.mask_token_id, self.tokenizer.pad_token_id
        results = [None] * len(texts)
        for chunk in self._batches(texts, batch_size, len, bar):
            enc = self._encode([texts[i] for i in chunk])
            logits = self._forward(enc, batch_size, ["logits"])["logits"]                   # (b, L, V)
            for row, i in enumerate(chunk):
                ids = enc["input_ids"][row][enc["attention_mask"][row].bool()]              # (L_i,)
                positions = (ids == mask_id).nonzero().flatten().tolist()
                if not positions:
                    raise PipelineError(f"inputs[{i}]: no mask token ({self.tokenizer.mask_token}) in "
                                        f"{texts[i]!r:.80} (after truncation to {ids.numel()} tokens)")
                probs = logits[row, positions].softmax(dim=-1)                             # (m, V)
                if target_ids is not None:
                    probs = probs[:, target_ids]
                k = min(args["top_k"], probs.shape[-1])
                values, predictions = probs.topk(k)
                single = len(positions) == 1
                per_mask = []
                for m, position in enumerate(positions):
                    row_results = []
                    for score, p in zip(values[m].tolist(), predictions[m].tolist()):
                        token = int(target_ids[p]) if target_ids is not None else p
                        filled = ids.clone()
                        filled[position] = token
                        filled = filled[filled != pad_id]
                        row_results.append({"score": score, "token": token,
                                            "token_str": self.tokenizer.decode([token]),
                                            "sequence": self.tokenizer.decode(filled, skip_special_tokens=single)})
                    per_mask.append(row_results)
                results[i] = per_mask[0] if single else per_mask
        return results


# ---------------------------------------------------------------------------------------- classification
_FUNCTIONS = ("softmax", "sigmoid", "none")


class TextClassificationPipeline(Pipeline):
    """Classifies a text, or a pair given as {"text", "text_pair"}.

    Arguments: top_k -- not given: the best label as one {"label", "score"} dict; an int: that many,
    best first, as a list; None: every label, best first. function_to_apply: "softmax" | "sigmoid" |
    "none"; default as transformers: none for problem_type "regression", sigmoid for
    "multi_label_classification" or num_labels == 1, softmax otherwise.
    """
    task = "text-classification"
    defaults = {"top_k": _UNSET, "function_to_apply": None}

    def _check_args(self, args):
        if args["top_k"] is not _UNSET:
            _positive_int(args["top_k"], "top_k", allow_none=True)
        f = args["function_to_apply"]
        if f is not None and str(f).lower() not in _FUNCTIONS:
            raise PipelineError(f"function_to_apply: expected None or one of {list(_FUNCTIONS)}, got {f!r}")
        return args

    def _is_single(self, inputs):
        return isinstance(inputs, (str, dict))

    def _input_doc(self):
        return "a str or a {'text', 'text_pair'} dict"

    def _function(self, requested) -> str:
        if requested is not None:
            return str(requested).lower()
        config = self.model.config
        if config.problem_type == "regression":
            return "none"
        if config.problem_type == "multi_label_classification" or config.num_labels == 1:
            return "sigmoid"
        return "softmax"

    @staticmethod
    def _split(item, index) -> tuple:
        if isinstance(item, str):
            return item, None
        if isinstance(item, dict) and "text" in item and set(item) <= {"text", "text_pair"}:
            if not isinstance(item["text"], str) or not isinstance(item.get("text_pair", ""), str):
                raise PipelineError(f"inputs[{index}]: 'text' and 'text_pair' must be str")
            return item["text"], item.get("text_pair")
        raise PipelineError(f"inputs[{index}]: expected a str or a {{'text', 'text_pair'}} dict, got "
                            f"{type(item).__name__} ({item!r:.60})")

    def _run(self, items, args, batch_size, bar):
        parts = [self._split(item, i) for i, item in enumerate(items)]
        function = self._function(args["function_to_apply"])
        id2label = self.model.config.id2label
        results = [None] * len(parts)
        for chunk in self._batches(parts, batch_size, lambda p: len(p[0]) + len(p[1] or ""), bar):
            # Pairs and single texts encode separately: the tokenizer takes one form per call.
            for with_pair in (False, True):
                rows = [i for i in chunk if (parts[i][1] is not None) == with_pair]
                if not rows:
                    continue
                enc = self._encode([parts[i][0] for i in rows], [parts[i][1] for i in rows] if with_pair else None)
                logits = self._forward(enc, batch_size, ["logits"])["logits"]               # (b, num_labels)
                if function == "softmax":
                    scores = logits.softmax(dim=-1)
                elif function == "sigmoid":
                    scores = logits.sigmoid()
                else:
                    scores = logits
                for row, i in enumerate(rows):
                    s = scores[row].tolist()
                    if args["top_k"] is _UNSET:
                        best = max(range(len(s)), key=lambda j: s[j])
                        results[i] = {"label": id2label[best], "score": s[best]}
                        continue
                    ranked = sorted(({"label": id2label[j], "score": v} for j, v in enumerate(s)),
                                    key=lambda d: d["score"], reverse=True)
                    results[i] = ranked if args["top_k"] is None else ranked[:args["top_k"]]
        return results


_AGGREGATIONS = ("none", "simple", "first", "average", "max")


class TokenClassificationPipeline(Pipeline):
    """Labels each token (named entities, ...).

    Arguments: aggregation_strategy -- "none": one dict per token {"entity", "score", "index",
    "word" (the token, "##" pieces as they are), "start", "end"}; "simple": adjacent tokens with the
    same entity (B-/I- tags merged) grouped into {"entity_group", "score" (mean), "word", "start",
    "end"}; "first" / "average" / "max": words first labelled by their first token / mean scores /
    most confident token, then grouped as "simple" (transformers' strategies). ignore_labels
    (["O"]): entities dropped from the result. start/end are character offsets into the input.
    """
    task = "token-classification"
    defaults = {"aggregation_strategy": "none", "ignore_labels": ("O",)}

    def _check_args(self, args):
        if str(args["aggregation_strategy"]).lower() not in _AGGREGATIONS:
            raise PipelineError(f"aggregation_strategy: expected one of {list(_AGGREGATIONS)}, "
                                f"got {args['aggregation_strategy']!r}")
        args["aggregation_strategy"] = str(args["aggregation_strategy"]).lower()
        return args

    def _run(self, items, args, batch_size, bar):
        texts = [_check_text(t, i) for i, t in enumerate(items)]
        results = [None] * len(texts)
        ignore = set(args["ignore_labels"] or ())
        for chunk in self._batches(texts, batch_size, len, bar):
            enc = self._encode([texts[i] for i in chunk], return_offsets_mapping=True,
                               return_special_tokens_mask=True)
            scores = self._forward(enc, batch_size, ["logits"])["logits"].softmax(dim=-1)   # (b, L, num_labels)
            for row, i in enumerate(chunk):
                tokens = self._tokens(texts[i], enc, row, scores[row])
                entities = self._aggregate(tokens, args["aggregation_strategy"])
                results[i] = [e for e in entities if e.get("entity", e.get("entity_group")) not in ignore]
        return results

    def _tokens(self, text, enc, row, scores) -> list:
        """One record per non-special token: word, scores (num_labels,), start, end, index, is_subword."""
        tok = self.tokenizer
        prefix = getattr(tok.backend_tokenizer.model, "continuing_subword_prefix", None)
        records = []
        ids = enc["input_ids"][row].tolist()
        special = enc["special_tokens_mask"][row].tolist()
        offsets = enc["offset_mapping"][row].tolist()
        mask = enc["attention_mask"][row].tolist()
        for idx, (token_id, is_special, (start, end), keep) in enumerate(zip(ids, special, offsets, mask)):
            if is_special or not keep:
                continue
            word = tok.convert_ids_to_tokens(token_id)
            piece = text[start:end]
            if prefix:
                is_subword = len(word) != len(piece)
            else:  # no "##"-style marker: a token glued to the previous character continues a word
                is_subword = start > 0 and " " not in text[start - 1:start + 1]
            if token_id == tok.unk_token_id:
                word, is_subword = piece, False
            records.append({"word": word, "scores": scores[idx], "start": start, "end": end, "index": idx,
                            "is_subword": is_subword})
        return records

    def _label(self, scores: torch.Tensor) -> tuple:
        best = int(scores.argmax())
        return self.model.config.id2label[best], float(scores[best])

    def _aggregate(self, tokens: list, strategy: str) -> list:
        if strategy in ("none", "simple"):
            entities = []
            for t in tokens:
                label, score = self._label(t["scores"])
                entities.append({"entity": label, "score": score, "index": t["index"], "word": t["word"],
                                 "start": t["start"], "end": t["end"]})
            return entities if strategy == "none" else self._group(entities)
        words, group = [], []
        for t in tokens:
            if group and not t["is_subword"]:
                words.append(self._word(group, strategy))
                group = []
            group.append(t)
        if group:
            words.append(self._word(group, strategy))
        return self._group(words)

    def _word(self, pieces: list, strategy: str) -> dict:
        """One word from its tokens, labelled by the strategy."""
        if strategy == "first":
            label, score = self._label(pieces[0]["scores"])
        elif strategy == "max":
            label, score = self._label(max(pieces, key=lambda p: float(p["scores"].max()))["scores"])
        else:  # average
            label, score = self._label(torch.stack([p["scores"] for p in pieces]).mean(dim=0))
        return {"entity": label, "score": score,
                "word": self.tokenizer.convert_tokens_to_string([p["word"] for p in pieces]),
                "start": pieces[0]["start"], "end": pieces[-1]["end"]}

    @staticmethod
    def _tag(label: str) -> tuple:
        if label.startswith(("B-", "I-")):
            return label[0], label[2:]
        return "I", label

    def _group(self, entities: list) -> list:
        """Merges runs of entities with the same tag (a "B-" starts a new run)."""
        groups, run = [], []
        for e in entities:
            bi, tag = self._tag(e["entity"])
            if run and not (tag == self._tag(run[-1]["entity"])[1] and bi != "B"):
                groups.append(self._close(run))
                run = []
            run.append(e)
        if run:
            groups.append(self._close(run))
        return groups

    def _close(self, run: list) -> dict:
        return {"entity_group": run[0]["entity"].split("-", 1)[-1],
                "score": sum(e["score"] for e in run) / len(run),
                "word": self.tokenizer.convert_tokens_to_string([e["word"] for e in run]),
                "start": run[0]["start"], "end": run[-1]["end"]}


# ---------------------------------------------------------------------------------------- QA
class QuestionAnsweringPipeline(Pipeline):
    """Extracts the answer to a question from a context.

    Input: {"question": str, "context": str} (or a list of them). Arguments: top_k (1), max_answer_len
    (15 tokens), max_seq_len (384, capped at the model's limit), doc_stride (128, capped at half
    max_seq_len), handle_impossible_answer (False), align_to_words (True: an answer starting or
    ending inside a word is widened to the whole word).
    A context longer than max_seq_len is split into overlapping windows (doc_stride tokens shared).
    Per window, as transformers 4 did: start and end logits are softmaxed over the context tokens
    and the [CLS] token, [CLS] is then set aside, and a span scores start_prob * end_prob; spans lie
    within the context with start <= end < start + max_answer_len. The best spans of all windows
    are ranked together. With handle_impossible_answer, the [CLS] null score (worst over windows)
    competes as {"answer": "", "start": 0, "end": 0}.
    Result: {"score", "start", "end", "answer"}, start/end character offsets into the context
    (answer == context[start:end]); a list of top_k such dicts when top_k > 1.
    """
    task = "question-answering"
    defaults = {"top_k": 1, "max_answer_len": 15, "max_seq_len": 384, "doc_stride": 128,
                "handle_impossible_answer": False, "align_to_words": True}

    def _check_args(self, args):
        for name in ("top_k", "max_answer_len", "max_seq_len", "doc_stride"):
            _positive_int(args[name], name)
        return args

    def _is_single(self, inputs):
        return isinstance(inputs, dict)

    def _input_doc(self):
        return "a {'question', 'context'} dict"

    def __call__(self, inputs=None, *, question=None, context=None, **kwargs):
        """`qa({"question": q, "context": c})`, a list of such dicts, or `qa(question=q, context=c)`."""
        if question is not None or context is not None:
            if inputs is not None:
                raise PipelineError("inputs: pass either inputs or question=/context=, not both")
            if isinstance(question, (list, tuple)) != isinstance(context, (list, tuple)):
                raise PipelineError("question/context: expected both str or both lists of the same length")
            if isinstance(question, (list, tuple)):
                if len(question) != len(context):
                    raise PipelineError(f"context: expected {len(question)} contexts (one per question), "
                                        f"got {len(context)}")
                inputs = [{"question": q, "context": c} for q, c in zip(question, context)]
            else:
                inputs = {"question": question, "context": context}
        return super().__call__(inputs, **kwargs)

    @staticmethod
    def _split(item, index) -> tuple:
        if not (isinstance(item, dict) and set(item) == {"question", "context"}):
            raise PipelineError(f"inputs[{index}]: expected a {{'question', 'context'}} dict, got "
                                f"{type(item).__name__} ({item!r:.60})")
        q, c = item["question"], item["context"]
        if not isinstance(q, str) or not isinstance(c, str) or not q.strip() or not c.strip():
            raise PipelineError(f"inputs[{index}]: question and context must be non-empty str, got "
                                f"question={q!r:.40}, context={c!r:.40}")
        return q, c

    @staticmethod
    def _char_span(enc, row: int, start: int, end: int, align_to_words: bool) -> tuple:
        """Character offsets in the context of tokens start..end of `row`; widened to whole words
        when align_to_words (a span may start or end inside a word)."""
        encoding = enc.encodings[row]
        if align_to_words:
            first, last = encoding.token_to_word(start), encoding.token_to_word(end)
            if first is not None and last is not None:
                return (encoding.word_to_chars(first, sequence_index=1)[0],
                        encoding.word_to_chars(last, sequence_index=1)[1])
        return encoding.offsets[start][0], encoding.offsets[end][1]

    def _run(self, items, args, batch_size, bar):
        pairs = [self._split(item, i) for i, item in enumerate(items)]
        limit = self.tokenizer.model_max_length
        max_seq_len = args["max_seq_len"] if limit is None else min(args["max_seq_len"], limit)
        stride = min(args["doc_stride"], max_seq_len // 2)
        cls_id = self.tokenizer.cls_token_id
        results = [None] * len(pairs)
        for chunk in self._batches(pairs, batch_size, lambda p: len(p[0]) + len(p[1]), bar):
            try:
                enc = self._encode([pairs[i][0] for i in chunk], [pairs[i][1] for i in chunk],
                                   truncation="only_second", max_length=max_seq_len, stride=stride,
                                   return_overflowing_tokens=True, return_offsets_mapping=True)
            except ValueError as e:  # a question too long for max_seq_len, or for doc_stride
                raise PipelineError(f"max_seq_len={max_seq_len}, doc_stride={stride}: the questions of inputs "
                                    f"{sorted(chunk)} leave too little room for the context: {e}") from e
            out = self._forward(enc, batch_size, ["start_logits", "end_logits"])
            answers = {i: [] for i in chunk}
            null_score = {i: 1e6 for i in chunk}
            for r, sample in enumerate(enc["overflow_to_sample_mapping"].tolist()):
                i = chunk[sample]
                seq_ids = enc.sequence_ids(r)
                context = torch.tensor([s == 1 for s in seq_ids])                      # (L,) bool
                kept = context.clone()
                if cls_id is not None:
                    kept |= enc["input_ids"][r] == cls_id
                start = out["start_logits"][r].masked_fill(~kept, -10000.0).softmax(-1)   # (L,)
                end = out["end_logits"][r].masked_fill(~kept, -10000.0).softmax(-1)
                null_score[i] = min(null_score[i], float(start[0] * end[0]))
                spans = start[:, None] * end[None, :]                                   # (L, L)
                L = spans.shape[0]
                allowed = torch.ones(L, L, dtype=torch.bool).triu().tril(args["max_answer_len"] - 1)
                allowed &= context[:, None] & context[None, :]
                spans = spans.masked_fill(~allowed, -1.0).flatten()
                k = min(args["top_k"], int(allowed.sum()))
                if k == 0:
                    continue
                scores, flat = spans.topk(k)
                text = pairs[i][1]
                for score, f in zip(scores.tolist(), flat.tolist()):
                    a, b = self._char_span(enc, r, *divmod(f, L), args["align_to_words"])
                    answers[i].append({"score": score, "start": a, "end": b, "answer": text[a:b]})
            for i in chunk:
                ranked = answers[i]
                if args["handle_impossible_answer"]:
                    ranked.append({"score": null_score[i], "start": 0, "end": 0, "answer": ""})
                ranked = sorted(ranked, key=lambda d: d["score"], reverse=True)[:args["top_k"]]
                results[i] = ranked[0] if args["top_k"] == 1 and ranked else ranked
        return results


# ---------------------------------------------------------------------------------------- generation
# generate()'s arguments that the generation pipelines pass through: GenerationConfig's fields (the
# folder's generation_config.json gives their defaults) and the CUDA-graph switch.
_GENERATE_ARGS = tuple(sorted(GenerationConfig.field_names() - {"output_scores", "return_dict_in_generate"})) + (
    "use_cuda_graph",)
# transformers' text-generation pipeline default when neither the call nor the checkpoint's
# generation config sets a length (generate's own default is max_length=20, prompt included)
_DEFAULT_MAX_NEW_TOKENS = 256


def _pad_rows(rows: list, pad_id: int, side: str) -> tuple:
    """Token-id lists padded with pad_id on `side` ("left" | "right") to the longest:
    (input_ids (B, L), attention_mask (B, L)), int64, mask 1 = token."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        at = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[b, at] = torch.tensor(r, dtype=torch.long)
        mask[b, at] = 1
    return ids, mask


class TextStreamer:
    """Generated text as it comes, for `generate(streamer=...)` (transformers' put/end protocol).

    generate() calls put(prompt (1, P)) first -- skipped unless skip_prompt=False -- then put(token)
    once per step ((1,) tensor), then end(). Each put decodes the tokens so far and emits the text
    not emitted yet, holding back trailing U+FFFD: with byte-level BPE (GPT-2, BART) a token may end
    inside a multi-byte character, which decodes as U+FFFD until a later token completes it.
    (transformers' TextStreamer holds text back to the last space instead, so it prints word by
    word.) The pieces join to exactly decode(all tokens) for decoders whose text of a token prefix
    is a prefix of the text: byte-level BPE, WordPiece, Metaspace.

    out: None -> sys.stdout (looked up at each write, flushed); an object with write() (flushed when
      it has flush()); or a callable receiving each piece of text.
    prefix: text emitted before the first token (the pipeline's prompt with return_full_text).
    One sequence only: a batch raises ValueError. Reusable: end() resets it.
    """

    def __init__(self, tokenizer: Tokenizer, out: Any = None, *, prefix: str = "", skip_prompt: bool = True,
                 skip_special_tokens: bool = True, clean_up_tokenization_spaces: Optional[bool] = None):
        if out is not None and not hasattr(out, "write") and not callable(out):
            raise TypeError(f"out: expected None, an object with write() or a callable, got {type(out).__name__}")
        self.tokenizer, self.out, self.prefix, self.skip_prompt = tokenizer, out, prefix, skip_prompt
        self.decode_kwargs = {"skip_special_tokens": skip_special_tokens,
                              "clean_up_tokenization_spaces": clean_up_tokenization_spaces}
        self._reset()

    def _reset(self) -> None:
        self._tokens: list = []
        self._emitted = 0             # characters of decode(self._tokens) already emitted
        self._started = False

    def _emit(self, text: str) -> None:
        if not text:
            return
        out = sys.stdout if self.out is None else self.out
        if hasattr(out, "write"):
            out.write(text)
            if hasattr(out, "flush"):
                out.flush()
        else:
            out(text)

    def put(self, tokens) -> None:
        if isinstance(tokens, torch.Tensor):
            # the prompt comes as (1, P), each step as (1,): more rows are a batch
            rows = tokens.shape[0] if tokens.dim() > 1 else (tokens.numel() if self._started else 1)
            if rows != 1:
                raise ValueError(f"tokens: TextStreamer streams one sequence, got a tensor of shape "
                                 f"{tuple(tokens.shape)}")
            tokens = tokens.reshape(-1).tolist()
        elif isinstance(tokens, int):
            tokens = [tokens]
        else:
            tokens = [int(t) for t in tokens]
        if not self._started:
            self._started = True
            self._emit(self.prefix)
            if self.skip_prompt:
                return
        self._tokens.extend(tokens)
        text = self.tokenizer.decode(self._tokens, **self.decode_kwargs).rstrip("\ufffd")
        if len(text) > self._emitted:
            self._emit(text[self._emitted:])
            self._emitted = len(text)

    def end(self) -> None:
        if not self._started:
            self._emit(self.prefix)
        self._emit(self.tokenizer.decode(self._tokens, **self.decode_kwargs)[self._emitted:])
        self._reset()


class _GenerationPipeline(Pipeline):
    """What the generation tasks share: generate() arguments (passed through, checked when given),
    the pad id, decoding. Arguments not given come from the folder's generation_config.json, else
    the model config, else transformers' generate() defaults."""
    _grad_mode = staticmethod(torch.no_grad)
    decode_defaults = {"skip_special_tokens": True, "clean_up_tokenization_spaces": None}
    generate_defaults = {name: _UNSET for name in _GENERATE_ARGS}

    def _generate_kwargs(self, args: dict) -> dict:
        return {name: args[name] for name in _GENERATE_ARGS if args[name] is not _UNSET}

    def _generation_config(self, gen: dict) -> GenerationConfig:
        """The model's generation defaults updated by this call's arguments, validated."""
        fields = {k: v for k, v in gen.items() if k != "use_cuda_graph"}
        try:
            gc = self.model._generation_defaults().updated(**fields)
            gc.validate()
        except (TypeError, ValueError) as e:
            raise PipelineError(f"{self.task}: {e}") from None
        return gc

    def generation_config(self, **kwargs) -> GenerationConfig:
        """The generation settings a call with these arguments uses (the pipeline's defaults, then the
        folder's generation config, then transformers' defaults)."""
        unknown = sorted(set(kwargs) - set(self.defaults))
        if unknown:
            raise TypeError(f"{self.task}: unknown arguments {unknown}; this task takes {sorted(self.defaults)}")
        return self._generation_config(self._generate_kwargs(self._check_args({**self._defaults, **kwargs})))

    def _check_args(self, args):
        self._generation_config(self._generate_kwargs(args))
        if not isinstance(args["skip_special_tokens"], bool):
            raise PipelineError(f"skip_special_tokens: expected a bool, got {args['skip_special_tokens']!r}")
        return args

    def _pad_id(self, gc: GenerationConfig) -> int:
        """The pad id of prompts and finished rows: the call's or generation config's pad_token_id, else
        the tokenizer's pad token, else the first eos id (GPT-2 has no pad token: transformers users set
        pad = eos, and generate() does the same), else 0."""
        if gc.pad_token_id is not None:
            return int(gc.pad_token_id)
        if self.tokenizer.pad_token_id is not None:
            return self.tokenizer.pad_token_id
        eos = gc.eos_ids or ([self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else [])
        return eos[0] if eos else 0

    def _decode(self, sequences: torch.Tensor, args: dict) -> list:
        return self.tokenizer.batch_decode(sequences.cpu(), skip_special_tokens=args["skip_special_tokens"],
                                           clean_up_tokenization_spaces=args["clean_up_tokenization_spaces"])


class TextGenerationPipeline(_GenerationPipeline):
    """Continues prompts with a decoder-only model (GPT-2), as transformers' text-generation pipeline.

    Result per prompt: a list of num_return_sequences {"generated_text"} dicts -- prompt +
    continuation (return_full_text=True), or the continuation alone (False); a list of prompts gives
    a list of such lists. The continuation is decode(new tokens, skip_special_tokens=True).
    Arguments: return_full_text (True); streamer (None; see below); skip_special_tokens (True);
    clean_up_tokenization_spaces (None: the tokenizer's); and generate()'s: max_new_tokens,
    max_length, min_new_tokens, min_length, do_sample, temperature, top_k, top_p,
    repetition_penalty, no_repeat_ngram_size, num_return_sequences, num_beams, eos_token_id,
    pad_token_id, use_cuda_graph ... When neither the call nor generation_config.json sets a length,
    max_new_tokens is 256 (transformers' pipeline default), cut to the room the model's positions
    leave. Decoding is greedy unless do_sample=True or the checkpoint's generation config says so
    (transformers' pipeline samples at temperature 0.7 by default).
    Prompts are encoded as the tokenizer does (special tokens added, no truncation; an empty prompt
    becomes the bos token) and batched LEFT-padded with an attention mask, longest first. The pad
    id: pad_token_id if set, else the tokenizer's pad token, else eos (GPT-2 tokenizers have none).
    streamer: True prints the text to stdout as it comes; a file-like object (write()) or a callable
      receives the pieces; an object with put()/end() (transformers' TextStreamer, or fastlayers'
      TextStreamer) receives the token ids. Streamed text joins to the result's generated_text
      (with the prompt first when return_full_text). Streaming takes one prompt, one sequence and
      num_beams=1.
    """
    task = "text-generation"
    defaults = {"return_full_text": True, "streamer": None, **_GenerationPipeline.decode_defaults,
                **_GenerationPipeline.generate_defaults}

    def _check_args(self, args):
        args = super()._check_args(args)
        if not isinstance(args["return_full_text"], bool):
            raise PipelineError(f"return_full_text: expected a bool, got {args['return_full_text']!r}")
        s = args["streamer"]
        if not (s is None or isinstance(s, bool) or hasattr(s, "put") or hasattr(s, "write") or callable(s)):
            raise PipelineError(f"streamer: expected None, True, a file-like object, a callable or an object with "
                                f"put()/end(), got {type(s).__name__}")
        return args

    def _streamer(self, args: dict, texts: list, gc: GenerationConfig):
        s = args["streamer"]
        if s is None or s is False:
            return None
        if len(texts) != 1 or gc.num_return_sequences != 1 or gc.num_beams != 1:
            raise PipelineError(f"streamer: streams one prompt, one sequence and num_beams=1, got {len(texts)} "
                                f"prompts, num_return_sequences={gc.num_return_sequences}, num_beams={gc.num_beams}")
        if hasattr(s, "put"):
            return s
        return TextStreamer(self.tokenizer, None if s is True else s,
                            prefix=texts[0] if args["return_full_text"] else "",
                            skip_special_tokens=args["skip_special_tokens"],
                            clean_up_tokenization_spaces=args["clean_up_tokenization_spaces"])

    def _prompt_ids(self, text: str, index: int, gc: GenerationConfig) -> list:
        ids = self.tokenizer.encode(text)
        limit = self.model.max_positions
        if not ids:    # transformers generates from the bos token (then skipped in the text)
            bos = gc.bos_token_id if gc.bos_token_id is not None else self.tokenizer.bos_token_id
            if bos is None:
                raise PipelineError(f"inputs[{index}]: an empty prompt starts from the bos token, and neither the "
                                    "generation config nor the tokenizer has one")
            ids = [int(bos)]
        if len(ids) > limit:
            raise PipelineError(f"inputs[{index}]: the prompt has {len(ids)} tokens, the model takes at most {limit} "
                                "positions (prompt + new tokens)")
        return ids

    def _run(self, items, args, batch_size, bar):
        texts = [_check_text(t, i) for i, t in enumerate(items)]
        gen = self._generate_kwargs(args)
        gc = self._generation_config(gen)
        gen["pad_token_id"] = self._pad_id(gc)
        saved = self.model._generation_defaults()           # the folder's generation config
        length_set = ("max_new_tokens" in gen or "max_length" in gen or saved.max_new_tokens is not None
                      or saved.max_length != GenerationConfig.max_length)
        streamer = self._streamer(args, texts, gc)
        prompts = [self._prompt_ids(t, i, gc) for i, t in enumerate(texts)]
        results = [None] * len(texts)
        for chunk in self._batches(prompts, batch_size, len, bar):
            input_ids, mask = _pad_rows([prompts[i] for i in chunk], gen["pad_token_id"], "left")   # (b, P)
            P = input_ids.shape[1]
            call = dict(gen)
            if not length_set:
                call["max_new_tokens"] = max(1, min(_DEFAULT_MAX_NEW_TOKENS, self.model.max_positions - P + 1))
            out = self.model.generate(input_ids, attention_mask=mask, streamer=streamer, **call)  # (b * n, P + new)
            new_text = self._decode(out[:, P:], args)
            n = out.shape[0] // len(chunk)
            for row, i in enumerate(chunk):
                prefix = texts[i] if args["return_full_text"] else ""
                results[i] = [{"generated_text": prefix + t} for t in new_text[row * n:(row + 1) * n]]
        return results


class Text2TextGenerationPipeline(_GenerationPipeline):
    """Generates text from text with an encoder-decoder model (BART), as transformers 4's
    text2text-generation pipeline (gone from transformers 5).

    Result per input: a list of num_return_sequences {"generated_text"} dicts; a list of inputs
    gives one such list each, flattened to one dict each when num_return_sequences is 1 (as
    transformers). The text is decode(output, skip_special_tokens=True).
    Arguments: truncation (True: inputs cut to the tokenizer's model_max_length; transformers does
    not truncate, and fails on too long an input), skip_special_tokens, clean_up_tokenization_spaces,
    and generate()'s (num_beams, length_penalty, early_stopping, max_length, max_new_tokens,
    min_length, no_repeat_ngram_size, forced_bos_token_id, forced_eos_token_id, do_sample, ...),
    whose defaults are the folder's generation_config.json (e.g. bart-large-cnn: 4 beams,
    length_penalty 2, max_length 142, min_length 56, no_repeat_ngram_size 3). The model config's
    `prefix` (T5's) goes before each input. Inputs are batched right-padded with an attention mask,
    longest first.
    """
    task = "text2text-generation"
    result_key = "generated_text"
    defaults = {"truncation": True, **_GenerationPipeline.decode_defaults, **_GenerationPipeline.generate_defaults}

    def _check_args(self, args):
        args = super()._check_args(args)
        if not isinstance(args["truncation"], bool):
            raise PipelineError(f"truncation: expected a bool, got {args['truncation']!r}")
        return args

    def __call__(self, inputs, **kwargs):
        results = super().__call__(inputs, **kwargs)
        if not self._is_single(inputs) and all(len(r) == 1 for r in results):
            return [r[0] for r in results]
        return results

    def _run(self, items, args, batch_size, bar):
        texts = [_check_text(t, i) for i, t in enumerate(items)]
        gen = self._generate_kwargs(args)
        gen["pad_token_id"] = self._pad_id(self._generation_config(gen))
        prefix = getattr(self.model.config, "prefix", None) or ""
        inputs = [self.tokenizer.encode(prefix + t, truncation=args["truncation"]) for t in texts]
        results = [None] * len(texts)
        for chunk in self._batches(inputs, batch_size, len, bar):
            input_ids, mask = _pad_rows([inputs[i] for i in chunk], gen["pad_token_id"], "right")   # (b, Ls)
            out = self.model.generate(input_ids, attention_mask=mask, **gen)                          # (b * n, Lt)
            decoded = self._decode(out, args)
            n = out.shape[0] // len(chunk)
            for row, i in enumerate(chunk):
                results[i] = [{self.result_key: t} for t in decoded[row * n:(row + 1) * n]]
        return results


class SummarizationPipeline(Text2TextGenerationPipeline):
    """Summarizes documents (BART): as text2text-generation, with {"summary_text"} results."""
    task = "summarization"
    result_key = "summary_text"


# ---------------------------------------------------------------------------------------- factory
TASKS = {
    "feature-extraction": FeatureExtractionPipeline,
    "sentence-similarity": SentenceSimilarityPipeline,
    "fill-mask": FillMaskPipeline,
    "text-classification": TextClassificationPipeline,
    "token-classification": TokenClassificationPipeline,
    "question-answering": QuestionAnsweringPipeline,
    "text-generation": TextGenerationPipeline,
    "text2text-generation": Text2TextGenerationPipeline,
    "summarization": SummarizationPipeline,
}
TASK_ALIASES = {"sentiment-analysis": "text-classification", "ner": "token-classification",
                "embeddings": "feature-extraction"}


def _auto_class(task: str):
    from . import auto
    return {
        "feature-extraction": auto.AutoModel, "sentence-similarity": auto.AutoModel,
        "fill-mask": auto.AutoModelForMaskedLM, "text-classification": auto.AutoModelForSequenceClassification,
        "token-classification": auto.AutoModelForTokenClassification,
        "question-answering": auto.AutoModelForQuestionAnswering,
        "text-generation": auto.AutoModelForCausalLM, "text2text-generation": auto.AutoModelForSeq2SeqLM,
        "summarization": auto.AutoModelForSeq2SeqLM,
    }[task]


def pipeline(task: str, model: Union[str, Path], device: Union[str, torch.device, None] = None, dtype=None, *,
             tokenizer: Union[str, Path, Tokenizer, None] = None, batch_size: int = 8, **kwargs) -> Pipeline:
    """A pipeline for `task` on the checkpoint folder `model` (or a name resolve_model_dir knows,
    e.g. "minilm").

    task: one of TASKS (aliases: "sentiment-analysis", "ner", "embeddings"). "text-generation" loads
      AutoModelForCausalLM (GPT-2), "summarization" / "text2text-generation" AutoModelForSeq2SeqLM (BART).
    device: None -> "cuda" when a GPU is there, else "cpu". dtype: None -> the checkpoint's (as
      "auto"); a torch dtype or a name ("bf16", "float16", "float32").
    tokenizer: a folder or Tokenizer (default: the model folder's tokenizer.json).
    batch_size: inputs per forward. kwargs: the task's arguments, as defaults for every call
      (feature-extraction: pooling, normalize, max_length, ...; generation tasks: generate()'s
      arguments such as max_new_tokens, num_beams; see each pipeline class).
    Raises PipelineError for an unknown task, ValueError for a model that is not a folder, and
    the loaders' errors for a checkpoint that does not fit the task's model class.
    """
    name = TASK_ALIASES.get(task, task)
    if name not in TASKS:
        raise PipelineError(f"task: expected one of {sorted(TASKS)} (or aliases {sorted(TASK_ALIASES)}), "
                            f"got {task!r}")
    cls = TASKS[name]
    model_dir = resolve_model_dir(model)
    settings = {}
    if name in ("feature-extraction", "sentence-similarity"):
        st = sentence_transformers_settings(model_dir)
        model_dir = st.pop("transformer_dir")
        settings = {k: v for k, v in st.items() if v is not None}
    device = _default_device() if device is None else torch.device(device)
    net = _auto_class(name).from_pretrained(model_dir, dtype=dtype, device=device)
    net.eval()
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = load_tokenizer(model_dir if tokenizer is None else tokenizer)
    return cls(net, tokenizer, batch_size=batch_size, model_dir=model_dir, **{**settings, **kwargs})
