"""How the entry scripts start and end: known third-party noise filtered, and an expected error (bad data, a model
that does not load, a damaged checkpoint...) printed as one line by rank 0 with a non-zero exit, never a traceback.

Under torchrun or accelerate launch every rank usually meets the same error at the same time; only rank 0 prints
it. Another rank prints its own line after a short delay, which it only lives to do when rank 0 did not fail (the
launcher ends the other ranks as soon as one exits with an error). The launcher then adds its own failure summary
(`ChildFailedError`), which no child process can suppress. Unexpected errors keep their traceback: they are bugs.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Callable

logger = logging.getLogger("sdxl_trainer")

# Messages that every run prints and that need no action (issue 16): matched on the message text.
KNOWN_NOISE = (
    ("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward from kernels-community"),
    ("transformers.tokenization_utils_base", r"Token indices sequence length is longer than the specified maximum"),
    ("", r"`torch_dtype` is deprecated"),
)
OTHER_RANK_DELAY_SECONDS = 10.0  # long enough for the launcher to end this rank when rank 0 failed too


class _DropKnownNoise(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def filter_known_noise() -> None:
    """Silence the known harmless messages of bitsandbytes, transformers and diffusers (before they are imported,
    so import-time messages are caught too); said once at debug level."""
    for logger_name, pattern in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=f".*{pattern}")
        for name in {logger_name, "transformers", "diffusers"} - {""}:
            target = logging.getLogger(name)
            if not any(isinstance(f, _DropKnownNoise) and f.pattern.pattern == pattern for f in target.filters):
                target.addFilter(_DropKnownNoise(pattern))
    logger.debug("filtered known third-party messages: %s", "; ".join(p for _, p in KNOWN_NOISE))


def rank() -> int:
    value = os.environ.get("RANK", "")
    return int(value) if value.isdigit() else 0


def one_line(exc: BaseException, limit: int = 1000) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_on_rank0(parse: Callable[[], object]) -> object:
    """Run an argparse parse: a usage error is printed by rank 0 only (another rank after the delay, if alive)."""
    if rank() == 0:
        return parse()
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return parse()
    except SystemExit as exc:
        if exc.code not in (0, None):
            time.sleep(OTHER_RANK_DELAY_SECONDS)
        sys.stderr.write(captured.getvalue())
        raise


def run_main(main: Callable[[], int | None], expected: Callable[[], tuple[type[BaseException], ...]]) -> int:
    """Run an entry point's `main`; an error of one of the `expected()` types becomes one line and exit status 1."""
    filter_known_noise()
    try:
        return int(main() or 0)
    except Exception as exc:
        if not isinstance(exc, expected()):
            raise
        if rank() != 0:
            time.sleep(OTHER_RANK_DELAY_SECONDS)  # rank 0 says it, unless it did not fail
            print(f"error (rank {rank()}): {one_line(exc)}", file=sys.stderr, flush=True)
        else:
            print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
        return 1


def trainer_errors() -> tuple[type[BaseException], ...]:
    """The trainer's expected errors: each message names the flag or file to fix."""
    from sdxl_trainer.data.cache_format import CacheError
    from sdxl_trainer.data.sampler import DataError
    from sdxl_trainer.evaluation.eval_args import EvaluationArgsError
    from sdxl_trainer.evaluation.sampling import SamplePromptsError
    from sdxl_trainer.evaluation.support import EvaluationError
    from sdxl_trainer.models.loading import ModelLoadError
    from sdxl_trainer.training.checkpoint import CheckpointError
    from sdxl_trainer.training.data_setup import DataSetupError
    from sdxl_trainer.training.sharding import ShardingError
    from sdxl_trainer.training.state import TrainingError
    from sdxl_trainer.training.train_args import ArgsError

    return (
        CacheError, DataError, DataSetupError, ModelLoadError, CheckpointError, ShardingError, TrainingError,
        ArgsError, EvaluationArgsError, EvaluationError, SamplePromptsError,
    )  # fmt: skip


def caching_errors() -> tuple[type[BaseException], ...]:
    from sdxl_trainer.caching.run import CachingError

    return (CachingError,)
