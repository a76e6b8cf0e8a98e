"""A child process for the cache fault-injection tests: compile a model, SIGKILLed at a chosen stage.

``python -m tests.cache_faults_child MODEL_DIR CACHE_DIR STAGE [BARRIER_DIR]``

Stages (each kills the process with SIGKILL: no ``finally`` or ``except`` block runs, as with a real kill):
``write``     after the first artifact file is written (an export's or a compile's, whichever comes first),
              before the entry's marker;
``install``   after the marker, before the temporary directory is renamed into place;
``passes``    while the passes run, before anything is written;
``set-aside`` after a damaged entry was renamed aside, before it was deleted;
``race``      no kill: wait at the rename until every process of the race reached it (``BARRIER_DIR``), then go on
              and print the generated token ids as JSON.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

PROMPT = "my name is"
NEW_TOKENS = 8
RACERS = 2


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install_hooks(stage: str, barrier: Path | None) -> None:
    import shutil

    import onnx_ir

    import qgraph.cache as cache
    import qgraph.pass_manager as pass_manager

    if stage == "write":
        save = onnx_ir.save

        def save_then_die(*args, **kwargs):
            save(*args, **kwargs)
            _kill()

        onnx_ir.save = save_then_die
    elif stage == "install":
        cache._install = lambda tmp, final: _kill()
    elif stage == "passes":
        pass_manager.run_pipeline = lambda *args, **kwargs: _kill()  # the compiler imports it when it compiles
    elif stage == "set-aside":
        rmtree = shutil.rmtree

        def rmtree_or_die(path, *args, **kwargs):
            if ".old-" in Path(path).name:
                _kill()
            rmtree(path, *args, **kwargs)

        shutil.rmtree = rmtree_or_die
    elif stage == "race":
        install = cache._install

        def install_together(tmp, final):
            assert barrier is not None
            (barrier / str(os.getpid())).touch()
            deadline = time.monotonic() + 120
            while len(list(barrier.iterdir())) < RACERS and time.monotonic() < deadline:
                time.sleep(0.01)
            install(tmp, final)

        cache._install = install_together
    else:
        raise SystemExit(f"unknown stage {stage!r}")


def main(argv: list[str]) -> int:
    model_dir, cache_dir, stage = argv[:3]
    barrier = Path(argv[3]) if len(argv) > 3 else None
    from transformers import AutoTokenizer

    from qgraph import QEFFAutoModelForCausalLM

    _install_hooks(stage, barrier)
    model = QEFFAutoModelForCausalLM.from_pretrained(model_dir, cache_dir=cache_dir, verbose=False)
    model.compile(prefill_seq_len=8, ctx_len=40)
    tokenizer = AutoTokenizer.from_pretrained(argv[4]) if len(argv) > 4 else None
    if tokenizer is not None:
        result = model.generate(tokenizer, [PROMPT], generation_len=NEW_TOKENS, verbose=False)
        print(json.dumps(result.generated_ids[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
