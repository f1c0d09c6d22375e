"""Per-rank entry point started by the `deepspeed` launcher: `python -m rmkit.train.worker RUN`.

It reads only the run directory (recipe.yaml, ds_config.json, run.json, data/), builds the model
and the DeepSpeed engine, and hands over to the loop. Errors a user can fix are printed once by
rank 0 and the process exits 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = [a for a in argv if not a.startswith("--local_rank")]
    if len(args) < 1:
        print("usage: python -m rmkit.train.worker RUN_DIR [--resume]", file=sys.stderr)
        sys.exit(2)
    run_dir = Path(args[0])
    resume = "--resume" in args[1:]
    from rmkit.errors import RmkitError

    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # rank 0's rich bar is the progress display
        from rmkit.train.loop import fit

        fit(run_dir, resume=resume)
    except RmkitError as e:
        if os.environ.get("RANK", "0") == "0":
            from rmkit.console import fail

            fail(e.render(), 2)
        sys.exit(2)
    finally:
        # gloo's threads must stop before the interpreter exits, or a rank can die with
        # "terminate called without an active exception" (SIGABRT) after a finished run
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
