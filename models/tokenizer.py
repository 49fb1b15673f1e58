"""Tokenizers for the zoo: a small wrapper around the `tokenizers` library on a checkpoint's
`tokenizer.json`.

`load_tokenizer(dir)` reads `tokenizer.json`, then `tokenizer_config.json` and
`special_tokens_map.json` (special tokens, `model_max_length`, padding and truncation sides, decode
clean-up) and `config.json` (`max_position_embeddings`, to bound a missing or sentinel
`model_max_length`). Encoding gives the same ids, masks, type ids and offsets as transformers'
`AutoTokenizer` on the same folder (tests/test_tokenizer.py proves it), as int64 tensors the models
take (`model(**tok(texts))`), or as Python lists.

Guarantees:
- Every call sets the backend's truncation and padding explicitly (a `tokenizer.json` often carries
  its own, e.g. MiniLM's "pad everything to 128"), under a lock, so no setting leaks from the file
  or from one call into the next, and threads may share one tokenizer.
- Defaults are model-ready: `padding=True` (to the longest in the batch), `truncation=True` (to
  `model_max_length`), `return_tensors="pt"`. transformers defaults to no padding, no truncation and
  lists; pass `padding=False, truncation=False, return_tensors=None` for that.
- A bad argument raises ValueError/TypeError naming the argument, the expected and the actual value.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

TOKENIZER_FILE = "tokenizer.json"

# transformers marks "no limit" with int(1e30); anything this large is a sentinel, not a length.
_SENTINEL_MAX_LENGTH = 10**12

# Which model inputs a tokenizer class returns when tokenizer_config.json does not list them
# (transformers' per-class `model_input_names`); every other class returns token_type_ids too.
_NO_TOKEN_TYPE_CLASSES = ("GPT2", "Roberta", "Bart", "Llama", "T5", "XLMRoberta", "Camembert",
                          "Longformer", "DistilBert", "Bloom", "Qwen2", "Gemma", "CodeGen", "MBart")

# Checkpoints whose position table reserves `pad_token_id + 1` slots (RoBERTa's offset) usable by
# no token: their longest input is max_position_embeddings - 2.
_POSITION_OFFSET_MODEL_TYPES = ("roberta", "xlm-roberta", "camembert", "longformer", "bart", "mbart")

_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                        "mask_token")

_TRUNCATION_STRATEGIES = ("longest_first", "only_first", "only_second", "do_not_truncate")
_PADDING_STRATEGIES = ("longest", "max_length", "do_not_pad")

# transformers' clean_up_tokenization: spaces that WordPiece-style decoding leaves before
# punctuation and English contractions.
_CLEANUP_REPLACEMENTS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                         (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class TokenizerError(ValueError):
    """A tokenizer folder that cannot be read, or an argument the tokenizer cannot honour."""


class BatchEncoding(dict):
    """What `Tokenizer.__call__` returns: a dict of model inputs with attribute access.

    Keys: `input_ids`, `attention_mask`, and `token_type_ids` (when the tokenizer's model takes
    them); on request `offset_mapping`, `special_tokens_mask`, `overflow_to_sample_mapping`.
    With `return_tensors="pt"` the values are int64 tensors, (B, L) -- `offset_mapping` (B, L, 2),
    `overflow_to_sample_mapping` (B,) -- else Python lists (unbatched for a single text).
    `encodings` holds the `tokenizers.Encoding` of each row (overflow rows included).
    """

    def __init__(self, data: dict, encodings: Optional[list] = None):
        super().__init__(data)
        self.encodings = encodings

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no key {name!r}; keys: {sorted(self)}") from None

    def to(self, device: Union[str, torch.device]) -> "BatchEncoding":
        """Moves every tensor value to `device` in place; returns self (as transformers does)."""
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                self[key] = value.to(device)
        return self

    def _encoding(self, batch_index: int):
        if not self.encodings:
            raise TokenizerError("this BatchEncoding carries no tokenizers.Encoding objects")
        if not 0 <= batch_index < len(self.encodings):
            raise IndexError(f"batch_index: expected 0 <= batch_index < {len(self.encodings)}, got {batch_index}")
        return self.encodings[batch_index]

    def sequence_ids(self, batch_index: int = 0) -> list:
        """Per token of row `batch_index`: 0 (first text), 1 (text_pair) or None (special/pad)."""
        return self._encoding(batch_index).sequence_ids

    def word_ids(self, batch_index: int = 0) -> list:
        """Per token of row `batch_index`: the index of the word it comes from, None for special/pad."""
        return self._encoding(batch_index).word_ids

    def tokens(self, batch_index: int = 0) -> list:
        """The token strings of row `batch_index`."""
        return self._encoding(batch_index).tokens


def _token_content(value: Any) -> Optional[str]:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: not readable as JSON ({e})") from e
    return data if isinstance(data, dict) else {}


def _position_limit(model_config: dict) -> Optional[int]:
    """The longest input the model's position table allows, from config.json, or None."""
    for key in ("max_position_embeddings", "n_positions"):
        value = model_config.get(key)
        if isinstance(value, int) and value > 0:
            if model_config.get("model_type") in _POSITION_OFFSET_MODEL_TYPES and key == "max_position_embeddings":
                return value - 2
            return value
    return None


def _special_token_id(name: str) -> property:
    """A property giving the id of the special token `name` (None when the tokenizer has none)."""
    return property(lambda self: self.token_to_id(getattr(self, name)),
                    doc=f"The id of `{name}`, None when the tokenizer has none.")


class Tokenizer:
    """A `tokenizers.Tokenizer` with the special tokens and limits of its checkpoint folder.

    Built by `load_tokenizer(dir)`; can wrap an in-memory `tokenizers.Tokenizer` directly:
    `Tokenizer(backend, config={...})` with `config` as tokenizer_config.json would hold.
    """

    def __init__(self, backend, config: Optional[dict] = None, *, position_limit: Optional[int] = None,
                 name_or_path: str = ""):
        config = dict(config or {})
        self._backend = backend
        self._lock = threading.Lock()
        self.name_or_path = name_or_path
        self.config = config

        # Special tokens: the config first, then the file's own padding setting for the pad token
        # (transformers does the same).
        for name in _SPECIAL_TOKEN_NAMES:
            setattr(self, name, _token_content(config.get(name)))
        file_padding = backend.padding
        if self.pad_token is None and file_padding is not None:
            self.pad_token = file_padding.get("pad_token")
        self.pad_token_type_id = int(file_padding.get("pad_type_id", 0)) if file_padding else 0

        self.padding_side = self._side(config.get("padding_side", "right"), "padding_side")
        self.truncation_side = self._side(config.get("truncation_side", "right"), "truncation_side")

        max_length = config.get("model_max_length")
        if not isinstance(max_length, (int, float)) or max_length <= 0 or max_length >= _SENTINEL_MAX_LENGTH:
            max_length = position_limit
        elif position_limit is not None:
            max_length = min(int(max_length), position_limit)
        self.model_max_length: Optional[int] = None if max_length is None else int(max_length)

        names = config.get("model_input_names")
        if not names:
            cls = str(config.get("tokenizer_class") or "")
            names = (["input_ids", "attention_mask"] if cls.startswith(_NO_TOKEN_TYPE_CLASSES)
                     else ["input_ids", "token_type_ids", "attention_mask"])
        self.model_input_names = list(names)
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))

    # ------------------------------------------------------------------ vocabulary
    @staticmethod
    def _side(value: Any, name: str) -> str:
        if value not in ("right", "left"):
            raise TokenizerError(f"{name}: expected 'right' or 'left', got {value!r}")
        return value

    @property
    def backend_tokenizer(self):
        """The wrapped `tokenizers.Tokenizer` (its padding/truncation are reset on every call)."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """The base vocabulary's size, without added tokens (transformers' `vocab_size`)."""
        return self._backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        """The full vocabulary's size, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict:
        """{token: id}, added tokens included."""
        return self._backend.get_vocab(with_added_tokens=True)

    def token_to_id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self._backend.token_to_id(token)

    bos_token_id = _special_token_id("bos_token")
    eos_token_id = _special_token_id("eos_token")
    unk_token_id = _special_token_id("unk_token")
    sep_token_id = _special_token_id("sep_token")
    pad_token_id = _special_token_id("pad_token")
    cls_token_id = _special_token_id("cls_token")
    mask_token_id = _special_token_id("mask_token")

    @property
    def all_special_ids(self) -> list:
        ids = {self.token_to_id(getattr(self, name)) for name in _SPECIAL_TOKEN_NAMES}
        return sorted(i for i in ids if i is not None)

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        """Token strings of `ids` (an int gives a str; a list or 1-D tensor gives a list)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        special = set(self.all_special_ids) if skip_special_tokens else ()
        return [self._backend.id_to_token(int(i)) for i in ids if int(i) not in special]

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self.token_to_id(tokens)
        return [self.token_to_id(t) for t in tokens]

    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        """Joins token strings as the tokenizer's decoder does ("un", "##able" -> "unable")."""
        decoder = self._backend.decoder
        return decoder.decode(list(tokens)) if decoder is not None else " ".join(tokens)

    # ------------------------------------------------------------------ decoding
    def decode(self, ids, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: Optional[bool] = None) -> str:
        """Text of one sequence of ids (int, list of ints, or 1-D tensor).

        Matches transformers' `decode`: the backend's decoder, then the contraction/punctuation
        clean-up when `clean_up_tokenization_spaces` (default: tokenizer_config.json's, else False)
        asks for it, never for BPE models.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() > 1:
                raise ValueError(f"ids: expected one sequence (0-D or 1-D), got a tensor of shape {tuple(ids.shape)};"
                                 " use batch_decode")
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        text = self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        clean = clean_up_tokenization_spaces
        if clean is None:
            clean = self.clean_up_tokenization_spaces
        if clean and type(self._backend.model).__name__ != "BPE":
            for old, new in _CLEANUP_REPLACEMENTS:
                text = text.replace(old, new)
        return text

    def batch_decode(self, sequences, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: Optional[bool] = None) -> list:
        """`decode` of each row of `sequences` (a list of id lists or a 2-D tensor)."""
        if isinstance(sequences, torch.Tensor):
            if sequences.dim() != 2:
                raise ValueError(f"sequences: expected a 2-D tensor (B, L), got shape {tuple(sequences.shape)}")
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens, clean_up_tokenization_spaces) for s in sequences]

    # ------------------------------------------------------------------ encoding
    def __call__(self, text, text_pair=None, *, padding: Union[bool, str] = True,
                 truncation: Union[bool, str] = True, max_length: Optional[int] = None, stride: int = 0,
                 pad_to_multiple_of: Optional[int] = None, padding_side: Optional[str] = None,
                 add_special_tokens: bool = True, return_tensors: Optional[str] = "pt",
                 return_token_type_ids: Optional[bool] = None, return_attention_mask: bool = True,
                 return_offsets_mapping: bool = False, return_special_tokens_mask: bool = False,
                 return_overflowing_tokens: bool = False) -> BatchEncoding:
        """Encodes a text, a pair, or a batch of either.

        text: str or list of str; text_pair: None, or the same form as `text` (the second segment,
          token type 1 for BERT).
        padding: True/"longest" (to the longest row), "max_length" (to `max_length`, default
          `model_max_length`), False/"do_not_pad".
        truncation: True/"longest_first", "only_first", "only_second", False/"do_not_truncate";
          to `max_length`, default `model_max_length` (no truncation when neither is known).
        stride, return_overflowing_tokens: with truncation, the cut-off tokens come back as extra
          rows that overlap the previous row by `stride` tokens; `overflow_to_sample_mapping`
          (B_rows,) says which input each row belongs to.
        return_tensors: "pt" -> int64 tensors (B, L) (padding required for unequal lengths), None ->
          lists, unbatched when `text` is a single str and no overflow rows are asked for.
        Returns a BatchEncoding; raises ValueError/TypeError naming a bad argument.
        """
        batched = self._check_text(text, "text")
        if text_pair is not None:
            pair_batched = self._check_text(text_pair, "text_pair")
            if pair_batched != batched:
                raise TypeError(f"text_pair: expected the same form as text ({'a list' if batched else 'a str'}), "
                                f"got {type(text_pair).__name__}")
            if batched and len(text) != len(text_pair):
                raise ValueError(f"text_pair: expected {len(text)} texts (one per text), got {len(text_pair)}")
        texts = list(text) if batched else [text]
        if text_pair is not None:
            pairs = list(text_pair) if batched else [text_pair]
            items = list(zip(texts, pairs))
        else:
            items = texts

        padding_strategy = self._padding_strategy(padding)
        truncation_strategy = self._truncation_strategy(truncation)
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length <= 0):
            raise ValueError(f"max_length: expected a positive int or None, got {max_length!r}")
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 0:
            raise ValueError(f"stride: expected an int >= 0, got {stride!r}")
        if pad_to_multiple_of is not None and (isinstance(pad_to_multiple_of, bool)
                                               or not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of <= 0):
            raise ValueError(f"pad_to_multiple_of: expected a positive int or None, got {pad_to_multiple_of!r}")
        side = self.padding_side if padding_side is None else self._side(padding_side, "padding_side")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors: expected 'pt' or None, got {return_tensors!r}")
        if return_overflowing_tokens and truncation_strategy == "do_not_truncate":
            raise ValueError("return_overflowing_tokens: needs truncation, got truncation="
                             f"{truncation!r}")

        limit = max_length if max_length is not None else self.model_max_length
        if padding_strategy == "max_length" and limit is None:
            raise ValueError("padding: 'max_length' needs max_length, got max_length=None and no "
                             "model_max_length for this tokenizer")
        if truncation_strategy == "do_not_truncate" or limit is None:
            truncation_args = None
        else:
            truncation_args = dict(max_length=limit, stride=stride, strategy=truncation_strategy,
                                   direction=self.truncation_side)
        if padding_strategy == "do_not_pad":
            padding_args = None
        else:
            if self.pad_token_id is None:
                raise ValueError(f"padding: this tokenizer has no pad token (pad_token={self.pad_token!r}); "
                                 "pass padding=False")
            padding_args = dict(direction=side, pad_id=self.pad_token_id, pad_type_id=self.pad_token_type_id,
                                pad_token=self.pad_token, pad_to_multiple_of=pad_to_multiple_of,
                                length=limit if padding_strategy == "max_length" else None)

        with self._lock:
            if return_overflowing_tokens and stride > 0 and truncation_args is not None:
                self._check_stride(items, text_pair is not None, limit, stride, truncation_strategy,
                                   add_special_tokens)
            if truncation_args is None:
                self._backend.no_truncation()
            else:
                self._backend.enable_truncation(**truncation_args)
            if padding_args is None:
                self._backend.no_padding()
            else:
                self._backend.enable_padding(**padding_args)
            try:
                encodings = self._backend.encode_batch(items, add_special_tokens=add_special_tokens)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # Rust errors (and panics) name no argument: say which settings failed
                raise TokenizerError(f"tokenizers could not encode with truncation={truncation_strategy!r}, "
                                     f"max_length={limit}, stride={stride}: {e}") from e
            finally:
                self._backend.no_truncation()
                self._backend.no_padding()

        rows, sample_of_row = [], []
        for i, encoding in enumerate(encodings):
            extra = encoding.overflowing if return_overflowing_tokens else []
            for e in [encoding, *extra]:
                rows.append(e)
                sample_of_row.append(i)
        if return_overflowing_tokens and padding_args is not None and padding_args["length"] is None:
            # The backend pads each input's overflow rows among themselves; a batch needs one length.
            longest = max((len(e.ids) for e in rows), default=0)
            if pad_to_multiple_of:
                longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
            for e in rows:
                e.pad(longest, direction=side, pad_id=self.pad_token_id, pad_type_id=self.pad_token_type_id,
                      pad_token=self.pad_token)

        want_types = ("token_type_ids" in self.model_input_names if return_token_type_ids is None
                      else return_token_type_ids)
        data = {"input_ids": [e.ids for e in rows]}
        if want_types:
            data["token_type_ids"] = [e.type_ids for e in rows]
        if return_attention_mask:
            data["attention_mask"] = [e.attention_mask for e in rows]
        if return_special_tokens_mask:
            data["special_tokens_mask"] = [e.special_tokens_mask for e in rows]
        if return_offsets_mapping:
            data["offset_mapping"] = [[tuple(o) for o in e.offsets] for e in rows]

        if return_tensors == "pt":
            lengths = {len(ids) for ids in data["input_ids"]}
            if len(lengths) > 1:
                raise ValueError(f"return_tensors: 'pt' needs rows of one length, got lengths {sorted(lengths)} "
                                 f"with padding={padding!r}; pass padding=True or return_tensors=None")
            width = lengths.pop() if lengths else 0
            for key, value in data.items():
                t = torch.tensor(value, dtype=torch.int64)
                data[key] = t.reshape(len(rows), width, 2) if key == "offset_mapping" else t.reshape(len(rows), width)
            if return_overflowing_tokens:
                data["overflow_to_sample_mapping"] = torch.tensor(sample_of_row, dtype=torch.int64)
        else:
            if return_overflowing_tokens:
                data["overflow_to_sample_mapping"] = sample_of_row
            elif not batched:
                data = {key: value[0] for key, value in data.items()}
        return BatchEncoding(data, rows)

    def _check_stride(self, items: list, pairs: bool, limit: int, stride: int, strategy: str,
                      add_special_tokens: bool) -> None:
        """Raises ValueError where an overflowing text leaves `stride` or fewer tokens a row (the
        `tokenizers` library panics there). Caller holds the lock."""
        self._backend.no_truncation()
        self._backend.no_padding()
        specials = self._backend.num_special_tokens_to_add(pairs) if add_special_tokens else 0
        firsts = [item[0] for item in items] if pairs else items
        lengths = [len(e.ids) for e in self._backend.encode_batch(firsts, add_special_tokens=False)]
        if pairs:
            seconds = [len(e.ids) for e in self._backend.encode_batch([item[1] for item in items],
                                                                        add_special_tokens=False)]
            if strategy == "only_second":
                lengths, others = seconds, lengths
            elif strategy == "only_first":
                others = seconds
            else:
                return  # longest_first splits the budget between both texts: left to the library
        else:
            others = [0] * len(items)
        for i, (n, other) in enumerate(zip(lengths, others)):
            room = limit - specials - other
            if n > room and 0 < room <= stride:
                raise ValueError(f"stride: expected fewer than the {room} tokens a row has for input {i}'s truncated "
                                 f"text (max_length={limit} - {specials} special tokens - {other} tokens of the other "
                                 f"text), got stride={stride}")

    def encode(self, text: str, text_pair: Optional[str] = None, *, add_special_tokens: bool = True,
               truncation: Union[bool, str] = False, max_length: Optional[int] = None) -> list:
        """The ids (a list of ints) of one text or pair, unpadded; untruncated unless asked."""
        out = self(text, text_pair, padding=False, truncation=truncation, max_length=max_length,
                   add_special_tokens=add_special_tokens, return_tensors=None, return_attention_mask=False,
                   return_token_type_ids=False)
        return out["input_ids"]

    def tokenize(self, text: str, text_pair: Optional[str] = None, add_special_tokens: bool = False) -> list:
        """The token strings of one text (without special tokens unless asked)."""
        return self(text, text_pair, padding=False, truncation=False, return_tensors=None,
                    add_special_tokens=add_special_tokens).encodings[0].tokens

    # ------------------------------------------------------------------ argument checks
    @staticmethod
    def _check_text(value: Any, name: str) -> bool:
        """True for a batch (list/tuple of str), False for one str; raises TypeError otherwise."""
        if isinstance(value, str):
            return False
        if isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if not isinstance(item, str):
                    raise TypeError(f"{name}: expected a str or a list of str, got a list whose item {i} is "
                                    f"{type(item).__name__} ({item!r:.60})")
            return True
        raise TypeError(f"{name}: expected a str or a list of str, got {type(value).__name__}")

    @staticmethod
    def _padding_strategy(padding: Any) -> str:
        if padding is True:
            return "longest"
        if padding is False or padding is None:
            return "do_not_pad"
        if padding in _PADDING_STRATEGIES:
            return padding
        raise ValueError(f"padding: expected True, False or one of {list(_PADDING_STRATEGIES)}, got {padding!r}")

    @staticmethod
    def _truncation_strategy(truncation: Any) -> str:
        if truncation is True:
            return "longest_first"
        if truncation is False or truncation is None:
            return "do_not_truncate"
        if truncation in _TRUNCATION_STRATEGIES:
            return truncation
        raise ValueError(f"truncation: expected True, False or one of {list(_TRUNCATION_STRATEGIES)}, "
                         f"got {truncation!r}")

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name_or_path!r}, vocab_size={len(self)}, model_max_length={self.model_max_length}, "
                f"padding_side={self.padding_side!r}, special_tokens="
                f"{ {n: getattr(self, n) for n in _SPECIAL_TOKEN_NAMES if getattr(self, n) is not None} })")


def load_tokenizer(path: Union[str, Path]) -> Tokenizer:
    """The tokenizer of a checkpoint folder (or of `resolve_model_dir`'s names, e.g. "minilm").

    Reads `tokenizer.json` (required), `tokenizer_config.json` and `special_tokens_map.json`
    (special tokens, `model_max_length`, sides, clean-up; the config wins where both name a token)
    and `config.json` (`max_position_embeddings` / `n_positions` bound `model_max_length`, and
    stand in for it when it is missing or transformers' "no limit" sentinel).
    Raises TokenizerError when the folder has no tokenizer.json, or a file is not valid JSON.
    """
    from tokenizers import Tokenizer as BackendTokenizer

    from .loading import resolve_model_dir  # a folder, or a name such as "minilm"; else ValueError

    folder = resolve_model_dir(path)
    file = folder / TOKENIZER_FILE
    if not file.is_file():
        raise TokenizerError(f"path: expected a directory with {TOKENIZER_FILE} (the `tokenizers` library's file; "
                             f"slow-tokenizer vocab files are not read), found none in {folder}")
    try:
        backend = BackendTokenizer.from_file(str(file))
    except Exception as e:
        raise TokenizerError(f"{file}: the tokenizers library cannot read it ({e})") from e
    config = _read_json(folder / "special_tokens_map.json")
    config.update(_read_json(folder / "tokenizer_config.json"))
    return Tokenizer(backend, config, position_limit=_position_limit(_read_json(folder / "config.json")),
                     name_or_path=str(folder))
