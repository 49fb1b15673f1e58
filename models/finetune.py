"""Fine-tuning a local checkpoint: the loop behind `fastlayers finetune`.

    from fastlayers.models.finetune import finetune_text_classification, finetune_causal_lm
    result = finetune_text_classification("minilm", out="sentiment-minilm")   # the shipped data set
    result["accuracy"], result["baseline_accuracy"]                        # held-out, vs the majority class
    finetune_causal_lm("gpt2-folder", "corpus.txt", out="gpt2-tuned", block_size=128)

What a run does:
- text-classification: reads labelled texts (JSON lines {"text": ..., "label": ...}, or TSV
  text<TAB>label; default: SENTIMENT_DATA, shipped with the package), numbers the label names in
  sorted order (numerically when every name is an integer), holds out `eval_fraction` of every
  label (a stratified split drawn from `seed`), and loads AutoModelForSequenceClassification from
  the base checkpoint with id2label from the data: the body from the checkpoint, a new head
  initialised as transformers does. Reports held-out accuracy before and after training next to
  the majority-class baseline (always predicting the training split's most frequent label).
- causal-lm: tokenizes a text file (eos appended), cuts it into blocks of `block_size` tokens
  (the tail shorter than a block is dropped), holds out `eval_fraction` of the blocks, and reports
  held-out loss and perplexity before and after.
- Training: AdamW (no weight decay on biases and norm weights), linear warmup then linear decay to
  0 (torch's LinearLR, chained by SequentialLR), gradient-norm clipping, dropout as the config
  says. dtype "bf16" runs the forward under bf16 autocast (parameters and optimizer state stay
  float32); it is the default on CUDA, "fp32" on CPU (CPU bf16 autocast works but is slower).
- Progress: a tqdm bar (loss, samples/s) on stderr when asked (default: when stderr is a terminal),
  and one line per epoch through `log` (mean loss, samples/s, tokens/s; tokens = real tokens,
  padding not counted).
- Saving (when `out` is given): save_pretrained, the base folder's tokenizer files, and
  finetune_results.json (the returned dict). transformers' AutoModelFor*.from_pretrained and
  AutoTokenizer load the folder, and `fastlayers run text-classification --model OUT` prints the
  label names. `out` must not exist or be empty (overwrite=True replaces files in it).

Every argument is checked before anything loads; a bad one raises FinetuneError (a ValueError)
naming it. Nothing is downloaded.

SENTIMENT_DATA: 360 short English review sentences (180 positive, 180 negative) written for this
project: products, films, books, restaurants, hotels and services, the two labels over the same
topics so that topic words do not give the label away. See models/data/README.md.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import torch

from .loading import resolve_model_dir
from .tokenizer import load_tokenizer

SENTIMENT_DATA = Path(__file__).resolve().parent / "data" / "sentiment.jsonl"
RESULTS_FILE = "finetune_results.json"
# tokenizer files copied next to the fine-tuned weights (those the base folder has)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model")
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
# the progress bar's loss / samples/s refresh at most this often (each refresh syncs the GPU)
_POSTFIX_SECONDS = 0.5


class FinetuneError(ValueError):
    """An argument or data file that fine-tuning cannot use (the message names it)."""


# ---------------------------------------------------------------------------------------- arguments
def _positive(value, name: str, kind=int):
    ok = (not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
          and value > 0 and math.isfinite(value))
    if not ok:
        raise FinetuneError(f"{name}: expected a positive {'number' if kind is float else 'int'}, got {value!r}")
    return value


def _fraction(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < 1):
        raise FinetuneError(f"{name}: expected a number in [0, 1), got {value!r}")
    return float(value)


def resolve_device_dtype(device, dtype) -> tuple:
    """(torch.device, torch.dtype): device None -> cuda when there is a GPU, else cpu; dtype None ->
    bf16 on CUDA, fp32 elsewhere."""
    try:
        dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as e:
        raise FinetuneError(f"device: expected cpu, cuda or cuda:N, got {device!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FinetuneError(f"device: {device!r} asks for CUDA, and torch sees no CUDA GPU")
    if dev.type not in ("cpu", "cuda"):
        raise FinetuneError(f"device: expected cpu, cuda or cuda:N, got {device!r}")
    if dtype is None:
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in (torch.bfloat16, torch.float32):
        return dev, dtype
    if dtype not in DTYPES:
        raise FinetuneError(f"dtype: expected one of {sorted(DTYPES)} (bf16: autocast, float32 weights), got {dtype!r}")
    return dev, DTYPES[dtype]


def _check_out(out, model_dir: Path, overwrite: bool) -> Optional[Path]:
    if out is None:
        return None
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise FinetuneError(f"out: {str(path)!r} exists and is not a folder")
    if path.is_dir() and path.resolve() == model_dir.resolve():
        raise FinetuneError(f"out: {str(path)!r} is the base model's folder; save the fine-tuned model elsewhere")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FinetuneError(f"out: {str(path)!r} exists and is not empty (pass --overwrite / overwrite=True "
                            "to write into it)")
    return path


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ---------------------------------------------------------------------------------------- data
def read_labelled_texts(path: Union[str, Path]) -> tuple:
    """(texts, labels) from a .jsonl file (one {"text": str, "label": str|int} object a line) or a
    .tsv file (text<TAB>label a line; a first line naming the columns "text" and "label", in either
    order, is a header). Blank lines are skipped; labels come back as str. Raises FinetuneError
    naming the file and line of the first bad record."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FinetuneError(f"data: {str(path)!r} is not a file")
    kind = path.suffix.lower()
    if kind not in (".jsonl", ".tsv"):
        raise FinetuneError(f"data: expected a .jsonl or .tsv file, got {path.name!r}")
    texts, labels = [], []
    text_col, label_col = 0, 1
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            where = f"{path}:{n}"
            if kind == ".jsonl":
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise FinetuneError(f"{where}: not a JSON object ({e})") from None
                if not isinstance(rec, dict) or "text" not in rec or "label" not in rec:
                    raise FinetuneError(f"{where}: expected an object with \"text\" and \"label\", got {line!r:.80}")
                text, label = rec["text"], rec["label"]
            else:
                cols = line.split("\t")
                if len(cols) != 2:
                    raise FinetuneError(f"{where}: expected 2 tab-separated columns (text, label), got {len(cols)}")
                if not texts and {c.strip().lower() for c in cols} == {"text", "label"}:
                    text_col = [c.strip().lower() for c in cols].index("text")
                    label_col = 1 - text_col
                    continue
                text, label = cols[text_col], cols[label_col].strip()
            if not isinstance(text, str) or not text.strip():
                raise FinetuneError(f"{where}: \"text\" must be a non-empty string, got {text!r:.80}")
            if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
                raise FinetuneError(f"{where}: \"label\" must be a non-empty string or an int, got {label!r}")
            texts.append(text)
            labels.append(str(label).strip())
    if not texts:
        raise FinetuneError(f"data: {str(path)!r} holds no examples")
    return texts, labels


def label_names(labels: Iterable[str]) -> list:
    """The distinct label names, in id order: numeric order when all are integers, else sorted."""
    names = set(labels)
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def stratified_split(labels: list, eval_fraction: float, seed: int) -> tuple:
    """(train indices, eval indices): round(eval_fraction * n) of each label's n examples (at least
    one) held out, drawn with random.Random(seed); both lists sorted."""
    rng = random.Random(seed)
    by_label: dict = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    train, held = [], []
    for label in sorted(by_label):
        idx = by_label[label]
        if len(idx) < 2:
            raise FinetuneError(f"data: label {label!r} has {len(idx)} example; a held-out split needs at least 2 "
                                "per label")
        rng.shuffle(idx)
        k = min(len(idx) - 1, max(1, round(eval_fraction * len(idx))))
        held += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(held)


# ---------------------------------------------------------------------------------------- training
def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (biases, norm weights and 1-D tensors excluded)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def linear_schedule(optimizer, warmup_steps: int, total_steps: int):
    """Linear warmup from lr / (warmup_steps + 1) to lr over warmup_steps, then linear decay to 0
    at total_steps (torch's LinearLR; SequentialLR chains the two)."""
    from torch.optim.lr_scheduler import LinearLR, SequentialLR
    decay = LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=max(1, total_steps - warmup_steps))
    if warmup_steps <= 0:
        return decay
    warm = LinearLR(optimizer, start_factor=1.0 / (warmup_steps + 1), end_factor=1.0, total_iters=warmup_steps)
    return SequentialLR(optimizer, [warm, decay], milestones=[warmup_steps])


def _show_progress(progress) -> bool:
    if progress is None:
        return sys.stderr.isatty()
    return bool(progress)


def train(model, epoch_batches: Callable[[int], list], *, epochs: int, lr: float, weight_decay: float,
          warmup_ratio: float, max_grad_norm: float, device: torch.device, dtype: torch.dtype,
          progress=None, log: Callable[[str], None] = print) -> dict:
    """Trains `model` (in train mode) for `epochs`; epoch_batches(epoch) -> the epoch's batches, each
    a dict of CPU tensors with "labels" and "attention_mask" (real tokens = its sum). Returns
    {"epoch_loss": [...], "steps", "samples", "tokens", "seconds", "samples_per_s", "tokens_per_s"}."""
    batches0 = epoch_batches(0)
    steps_per_epoch = len(batches0)
    total = steps_per_epoch * epochs
    warmup = int(round(warmup_ratio * total))
    optimizer = make_optimizer(model, lr, weight_decay)
    scheduler = linear_schedule(optimizer, warmup, total)
    log(f"training: {epochs} epoch(s) x {steps_per_epoch} steps, lr {lr:g} (warmup {warmup} steps, linear "
        f"decay to 0), AdamW weight decay {weight_decay:g}, {'bf16 autocast' if dtype == torch.bfloat16 else 'fp32'}"
        f" on {device}")
    bar = None
    if _show_progress(progress):
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
    # epoch lines go through the bar's write when printing to stdout, so a terminal bar is not torn
    write = (lambda s: bar.write(s, file=sys.stdout)) if bar is not None and log is print else log
    model.train()
    samples = tokens = 0
    seconds = 0.0
    epoch_loss = []
    try:
        for epoch in range(epochs):
            batches = batches0 if epoch == 0 else epoch_batches(epoch)
            loss_sum = torch.zeros((), device=device)
            ep_samples = ep_tokens = 0
            t0 = last_postfix = time.perf_counter()
            for step, batch in enumerate(batches):
                ep_samples += batch["labels"].shape[0]
                ep_tokens += int(batch["attention_mask"].sum())        # counted on the CPU copy: no sync
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with _autocast(device, dtype):
                    loss = model(**batch).loss
                loss.backward()
                if max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach().float()
                if bar is not None:
                    now = time.perf_counter()
                    if now - last_postfix >= _POSTFIX_SECONDS or step == len(batches) - 1:
                        last_postfix = now      # the epoch's mean loss so far (.item() syncs the GPU)
                        bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{loss_sum.item() / (step + 1):.4f}",
                                        samples_s=f"{ep_samples / max(now - t0, 1e-9):.1f}", refresh=False)
                    bar.update(1)
            mean = loss_sum.item() / max(1, len(batches))      # .item() syncs: the time below is complete
            dt = time.perf_counter() - t0
            samples, tokens, seconds = samples + ep_samples, tokens + ep_tokens, seconds + dt
            epoch_loss.append(mean)
            write(f"epoch {epoch + 1}/{epochs}: train loss {mean:.4f}, {ep_samples / dt:.1f} samples/s, "
                  f"{ep_tokens / dt:.0f} tokens/s, {dt:.1f} s")
    finally:
        if bar is not None:
            bar.close()
    model.eval()
    return {"epoch_loss": epoch_loss, "steps": total, "warmup_steps": warmup, "samples": samples, "tokens": tokens,
            "seconds": seconds, "samples_per_s": samples / max(seconds, 1e-9),
            "tokens_per_s": tokens / max(seconds, 1e-9)}


def _save(model, tokenizer_dir: Path, out: Path, results: dict, log) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    copied = []
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, out / name)
            copied.append(name)
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    log(f"saved: {out} (config.json, model.safetensors, {', '.join(copied) or 'no tokenizer files'}, {RESULTS_FILE})")


def _common_checks(epochs, lr, batch_size, eval_fraction, warmup_ratio, weight_decay, max_grad_norm, seed):
    _positive(epochs, "epochs")
    _positive(lr, "lr", float)
    _positive(batch_size, "batch_size")
    if _fraction(eval_fraction, "eval_fraction") == 0:
        raise FinetuneError("eval_fraction: expected a number in (0, 1) (the held-out split cannot be empty), got 0")
    _fraction(warmup_ratio, "warmup_ratio")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise FinetuneError(f"weight_decay: expected a number >= 0, got {weight_decay!r}")
    if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)) or max_grad_norm < 0:
        raise FinetuneError(f"max_grad_norm: expected a number >= 0 (0: no clipping), got {max_grad_norm!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise FinetuneError(f"seed: expected an int, got {seed!r}")


# ---------------------------------------------------------------------------------------- text classification
def finetune_text_classification(model: Union[str, Path] = "minilm", data: Union[str, Path, None] = None, *,
                                 epochs: int = 3, lr: float = 1e-4, batch_size: int = 16, max_length: int = 128,
                                 eval_fraction: float = 0.2, warmup_ratio: float = 0.1, weight_decay: float = 0.01,
                                 max_grad_norm: float = 1.0, out: Union[str, Path, None] = None,
                                 overwrite: bool = False, device=None, dtype=None, seed: int = 0,
                                 progress: Optional[bool] = None, log: Callable[[str], None] = print) -> dict:
    """Fine-tunes a sequence classifier on labelled texts (default: SENTIMENT_DATA); see the module
    doc. Returns the results dict (also saved as OUT/finetune_results.json): labels, sizes,
    epoch losses, throughput, "accuracy_before", "accuracy", "baseline_accuracy" (majority class)."""
    _common_checks(epochs, lr, batch_size, eval_fraction, warmup_ratio, weight_decay, max_grad_norm, seed)
    _positive(max_length, "max_length")
    if max_length < 2:
        raise FinetuneError(f"max_length: expected at least 2 (the special tokens take 2), got {max_length}")
    dev, amp = resolve_device_dtype(device, dtype)
    model_dir = resolve_model_dir(model)
    out_dir = _check_out(out, model_dir, overwrite)
    data_path = Path(data).expanduser() if data is not None else SENTIMENT_DATA
    texts, labels = read_labelled_texts(data_path)
    names = label_names(labels)
    if len(names) < 2:
        raise FinetuneError(f"data: expected at least 2 distinct labels, got {names} in {str(data_path)!r}")
    label_id = {name: i for i, name in enumerate(names)}
    train_idx, eval_idx = stratified_split(labels, eval_fraction, seed)

    tokenizer = load_tokenizer(model_dir)
    if tokenizer.pad_token_id is None:
        raise FinetuneError(f"model: the tokenizer of {model_dir} has no pad token; batches of texts need one")
    limit = tokenizer.model_max_length
    if limit is not None and max_length > limit:
        raise FinetuneError(f"max_length: the model takes at most {limit} tokens, got {max_length}")

    from .auto import AutoModelForSequenceClassification
    torch.manual_seed(seed)                      # the new head's init and dropout
    net = AutoModelForSequenceClassification.from_pretrained(
        model_dir, device=dev, ignore_mismatched_sizes=True, id2label=dict(enumerate(names)),
        label2id=label_id, problem_type="single_label_classification")
    info = net.loading_info
    new_head = sorted(set(info["missing_keys"]) | set(info["mismatched_keys"]))
    counts = {n: labels.count(n) for n in names}
    log(f"data: {data_path} -- {len(texts)} texts, labels {counts}; {len(train_idx)} train, {len(eval_idx)} "
        f"held out (stratified, seed {seed})")
    log(f"model: {type(net).__name__} from {model_dir}; initialised: {', '.join(new_head) or 'nothing (head reused)'}")

    y = torch.tensor([label_id[label] for label in labels])

    def encode(rows: list) -> dict:
        enc = tokenizer([texts[i] for i in rows], max_length=max_length, truncation=True, padding=True)
        feed = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        feed["labels"] = y[rows]
        return feed

    def epoch_batches(epoch: int) -> list:
        order = list(train_idx)
        random.Random(seed * 1000003 + epoch).shuffle(order)
        return [encode(order[s:s + batch_size]) for s in range(0, len(order), batch_size)]

    def accuracy() -> tuple:
        net.eval()
        correct = 0
        with torch.no_grad(), _autocast(dev, amp):
            for s in range(0, len(eval_idx), batch_size):
                feed = encode(eval_idx[s:s + batch_size])
                gold = feed.pop("labels")
                logits = net(**{k: v.to(dev) for k, v in feed.items()}).logits
                correct += int((logits.float().argmax(-1).cpu() == gold).sum())
        return correct / len(eval_idx), correct

    train_counts = {n: sum(1 for i in train_idx if labels[i] == n) for n in names}
    majority = max(names, key=lambda n: (train_counts[n], -label_id[n]))
    baseline = sum(1 for i in eval_idx if labels[i] == majority) / len(eval_idx)
    acc_before, _ = accuracy()
    stats = train(net, epoch_batches, epochs=epochs, lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio,
                  max_grad_norm=max_grad_norm, device=dev, dtype=amp, progress=progress, log=log)
    acc, correct = accuracy()
    log(f"held-out accuracy: {acc:.3f} ({correct}/{len(eval_idx)}); majority-class baseline (always "
        f"{majority!r}): {baseline:.3f}; before fine-tuning: {acc_before:.3f}")
    results = {"task": "text-classification", "model": str(model_dir), "data": str(data_path), "labels": names,
               "train_examples": len(train_idx), "eval_examples": len(eval_idx), "epochs": epochs, "lr": lr,
               "batch_size": batch_size, "max_length": max_length, "seed": seed, "device": str(dev),
               "dtype": "bf16" if amp == torch.bfloat16 else "fp32", **stats,
               "accuracy_before": acc_before, "accuracy": acc, "correct": correct, "baseline_accuracy": baseline,
               "majority_label": majority}
    if out_dir is not None:
        _save(net, model_dir, out_dir, results, log)
        results["out"] = str(out_dir)
    return results


# ---------------------------------------------------------------------------------------- causal LM
def read_blocks(tokenizer, path: Union[str, Path], block_size: int) -> torch.Tensor:
    """(N, block_size) int64: the file's tokens (lines encoded with their newlines, eos appended
    when the tokenizer has one) cut into consecutive blocks; the tail shorter than a block is dropped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FinetuneError(f"data: {str(path)!r} is not a file")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise FinetuneError(f"data: {str(path)!r} holds no text")
    lines = text.splitlines(keepends=True)
    enc = tokenizer(lines, padding=False, truncation=False, add_special_tokens=False, return_tensors=None,
                    return_attention_mask=False, return_token_type_ids=False)
    ids = [t for row in enc["input_ids"] for t in row]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // block_size
    return torch.tensor(ids[:n * block_size], dtype=torch.int64).reshape(n, block_size)


def finetune_causal_lm(model: Union[str, Path], data: Union[str, Path], *, epochs: int = 3, lr: float = 5e-5,
                       batch_size: int = 8, block_size: Optional[int] = None, eval_fraction: float = 0.1,
                       warmup_ratio: float = 0.1, weight_decay: float = 0.01, max_grad_norm: float = 1.0,
                       out: Union[str, Path, None] = None, overwrite: bool = False, device=None, dtype=None,
                       seed: int = 0, progress: Optional[bool] = None,
                       log: Callable[[str], None] = print) -> dict:
    """Fine-tunes a causal LM (GPT-2) on a text file; see the module doc. block_size: tokens per
    training row (default min(128, the model's positions)). Returns the results dict: epoch losses,
    throughput, "eval_loss_before"/"eval_loss" and "perplexity_before"/"perplexity" on the held-out blocks."""
    _common_checks(epochs, lr, batch_size, eval_fraction, warmup_ratio, weight_decay, max_grad_norm, seed)
    if block_size is not None:
        _positive(block_size, "block_size")
        if block_size < 2:
            raise FinetuneError(f"block_size: expected at least 2 (a token and the one it predicts), got {block_size}")
    if data is None:
        raise FinetuneError("data: causal-lm needs a text file (--data FILE.txt)")
    dev, amp = resolve_device_dtype(device, dtype)
    model_dir = resolve_model_dir(model)
    out_dir = _check_out(out, model_dir, overwrite)

    from .auto import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(model_dir)
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if block_size is None:
        block_size = min(128, positions) if positions else 128
    elif positions and block_size > positions:
        raise FinetuneError(f"block_size: the model has {positions} positions, got {block_size}")
    tokenizer = load_tokenizer(model_dir)
    blocks = read_blocks(tokenizer, data, block_size)
    if len(blocks) < 2:
        raise FinetuneError(f"data: {str(data)!r} gives {len(blocks)} block(s) of {block_size} tokens; a train and a "
                            "held-out split need at least 2 (more text, or a smaller --block-size)")
    order = list(range(len(blocks)))
    random.Random(seed).shuffle(order)
    k = min(len(blocks) - 1, max(1, round(eval_fraction * len(blocks))))
    eval_rows, train_rows = sorted(order[:k]), sorted(order[k:])
    log(f"data: {data} -- {blocks.numel()} tokens in {len(blocks)} blocks of {block_size}; {len(train_rows)} train, "
        f"{len(eval_rows)} held out (seed {seed})")

    torch.manual_seed(seed)
    net = AutoModelForCausalLM.from_pretrained(model_dir, device=dev, config=config)
    log(f"model: {type(net).__name__} from {model_dir}")

    def feed(rows: list) -> dict:
        ids = blocks[rows]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def epoch_batches(epoch: int) -> list:
        rows = list(train_rows)
        random.Random(seed * 1000003 + epoch).shuffle(rows)
        return [feed(rows[s:s + batch_size]) for s in range(0, len(rows), batch_size)]

    def eval_loss() -> float:
        net.eval()
        total = 0.0
        with torch.no_grad(), _autocast(dev, amp):
            for s in range(0, len(eval_rows), batch_size):
                rows = eval_rows[s:s + batch_size]
                total += net(**{k: v.to(dev) for k, v in feed(rows).items()}).loss.float().item() * len(rows)
        return total / len(eval_rows)       # every block has the same number of predicted tokens

    before = eval_loss()
    log(f"held-out loss before: {before:.4f} (perplexity {math.exp(min(before, 700)):.2f})")
    stats = train(net, epoch_batches, epochs=epochs, lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio,
                  max_grad_norm=max_grad_norm, device=dev, dtype=amp, progress=progress, log=log)
    after = eval_loss()
    log(f"held-out loss: {after:.4f} (perplexity {math.exp(min(after, 700)):.2f}); before fine-tuning: {before:.4f} "
        f"(perplexity {math.exp(min(before, 700)):.2f})")
    results = {"task": "causal-lm", "model": str(model_dir), "data": str(data), "block_size": block_size,
               "train_blocks": len(train_rows), "eval_blocks": len(eval_rows), "epochs": epochs, "lr": lr,
               "batch_size": batch_size, "seed": seed, "device": str(dev),
               "dtype": "bf16" if amp == torch.bfloat16 else "fp32", **stats,
               "eval_loss_before": before, "eval_loss": after, "perplexity_before": math.exp(min(before, 700)),
               "perplexity": math.exp(min(after, 700))}
    if out_dir is not None:
        _save(net, model_dir, out_dir, results, log)
        results["out"] = str(out_dir)
    return results
