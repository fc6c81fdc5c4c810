"""`bigmodel <stage> --name RUN`: validate params first, then run one stage instance (the DVC
stage `<stage>@RUN`). User errors → one line, exit 2."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bigmodel import workspace
from bigmodel.errors import (EXIT_TRANSIENT, BigModelError, DiskFull, Terminated, TransientError,
                             unreachable)
from bigmodel.io import refused_write
from bigmodel.stages import KINDS

EXIT_USER_ERROR = 2
EXIT_DISK = 74  # EX_IOERR: the filesystem refused a write


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bigmodel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    extra = {"check": "validate params.yaml and exit",
             "promote": "move the champion alias to the new models if they score better",
             "generate": "complete a prompt with a pretrained GPT",
             "translate": "turn a source text into its output with a trained seq2seq model",
             "export": "write a trained model as a Hugging Face folder or an ONNX file"}
    for name in [*KINDS, *extra]:
        help_ = extra.get(name, f"run one {name} stage (dvc: {name}@RUN)")
        p = sub.add_parser(name, help=help_)
        if name in KINDS or name in ("generate", "translate"):
            section = KINDS[name][1] if name in KINDS else "pretrain"
            p.add_argument("--name", default=None, metavar="RUN",
                           help=f"which {section} run of params.yaml (default: the only one)")
        p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="SECTION.KEY=VALUE",
            help="override one param (repeatable); value parsed as YAML",
        )
        if name == "pretrain":
            p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
            p.add_argument("--nproc", type=positive_int, default=1, metavar="N",
                           help="train in N processes under torchrun: DDP, or FSDP with "
                                "pretrain.parallel=fsdp (default: 1)")
        if name == "generate":
            p.add_argument("--prompt", required=True)
            p.add_argument("--max-new-tokens", type=int, default=64)
            p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
            p.add_argument("--top-k", type=int, default=50, help="0: no top-k filter")
            p.add_argument("--top-p", type=float, default=1.0)
            p.add_argument("--seed", type=int, default=None)
        if name == "export":
            p.add_argument("name", metavar="RUN", help="a pretrain or finetune run of params.yaml")
            p.add_argument("--format", required=True, choices=["hf", "onnx"],
                           help="hf: a transformers model folder (from_pretrained); onnx: "
                                "model.onnx for onnxruntime")
            p.add_argument("--out", required=True, metavar="DIR", help="a new or empty folder")
        if name == "translate":
            p.add_argument("--source", required=True, help="the text to turn into its output")
            p.add_argument("--beam-size", type=positive_int, default=None,
                           help="default: the run's beam_size (1: greedy)")
            p.add_argument("--max-new-tokens", type=positive_int, default=None,
                           help="default: the run's max_len_a × source tokens + max_len_b")
    return parser


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


STOPS = (signal.SIGTERM, signal.SIGHUP)


@contextmanager
def terminable() -> Iterator[None]:
    """SIGTERM and SIGHUP raise `Terminated` where the command is (Python's default would end
    the process on the spot, leaving its MLflow run RUNNING for ever); the handlers before are
    restored after. Only the main thread can take signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: object) -> None:
        raise Terminated(signum)

    before = {sig: signal.signal(sig, stop) for sig in STOPS}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with terminable():
        return _command(args)


def _command(args: argparse.Namespace) -> int:
    try:
        from bigmodel import config

        params = config.load(args.params, args.overrides)
        if args.command == "check":
            print(f"{args.params}: ok")
            return 0
        if args.command == "promote":
            from bigmodel import promote

            with workspace.held(params.root, "promote"):
                for decision in promote.run(params):
                    print(decision.line())
            return 0
        if args.command == "generate":
            from bigmodel.tasks.clm import TextGenerator

            gpts = {k: v for k, v in params.pretrain.items() if v.objective == "clm"}
            name = config.pick_run(gpts, args.name, "pretrain (clm)")
            gen = TextGenerator.load(params.path("pretrain", name))
            print(args.prompt + gen.complete(args.prompt, args.max_new_tokens, args.temperature,
                                             args.top_k, args.top_p, args.seed))
            return 0
        if args.command == "export":
            from pathlib import Path

            from bigmodel import export

            print(export.export(params, args.name, args.format, Path(args.out)))
            return 0
        if args.command == "translate":
            from bigmodel.tasks.seq2seq import Translator

            models = {k: v for k, v in params.pretrain.items() if v.objective == "seq2seq"}
            name = config.pick_run(models, args.name, "pretrain (seq2seq)")
            translator = Translator(params.path("pretrain", name))
            print(translator.translate([args.source], args.beam_size, args.max_new_tokens)[0])
            return 0
        module_name, section = KINDS[args.command]
        name = config.pick_run(getattr(params, section), args.name, section)
        with workspace.held(params.root, f"{args.command}@{name}"):
            return run_stage(args, params, module_name, name)
    except TransientError as e:
        print(f"error (transient): {e}", file=sys.stderr)
        return EXIT_TRANSIENT
    except DiskFull as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DISK
    except BigModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as e:
        if not refused_write(e):
            raise
        print(f"error: {e.filename or 'a write'}: the filesystem refused it ({refused_write(e)}); "
              f"free some space and run again", file=sys.stderr)
        return EXIT_DISK
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated as t:
        print(f"stopped by {signal.Signals(t.signum).name}", file=sys.stderr)
        return 128 + t.signum
    except Exception as e:
        if not unreachable(e):
            raise  # a bug: its traceback is the report
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        print(f"error (transient): the tracking server did not answer ({first}); the stage can "
              f"be retried: it resumes from its last checkpoint", file=sys.stderr)
        return EXIT_TRANSIENT


def run_stage(args: argparse.Namespace, params: Any, module_name: str, name: str) -> int:
    """One stage instance, in this process or (`--nproc`) under torchrun."""
    if args.command == "pretrain" and args.nproc > 1:
        from bigmodel.train import distributed

        # a batch that does not split fails here, before any process starts
        distributed.World(size=args.nproc).share(params.pretrain[name].batch_size,
                                                 f"pretrain.{name}.batch_size")
        return distributed.launch(args.nproc, [
            "pretrain", "--params", args.params, "--name", name,
            *[a for o in args.overrides for a in ("--set", o)],
            *(["--resume"] if args.resume else []),
        ])
    module = importlib.import_module(module_name)
    kwargs = {"resume": args.resume} if args.command == "pretrain" else {}
    start = time.perf_counter()
    summary = module.run(params, name, **kwargs)
    print(f"{args.command}@{name}: done in {time.perf_counter() - start:.1f}s  "
          f"{summary or ''}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
