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

    code = 0
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # rank 0's rich bar is the progress display
        from rmkit.train.loop import fit

        fit(run_dir, resume=resume)
    except RmkitError as e:
        if os.environ.get("RANK", "0") == "0":
            from rmkit.console import print_error

            print_error(e.render())
        code = 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    # The run is finished and every file it wrote is closed. A normal interpreter exit runs the
    # C++ static destructors of gloo/DeepSpeed, and one of them destroys a still-joinable std::thread
    # now and then ("terminate called without an active exception", SIGABRT, about 1 run in 12 with
    # two processes even after destroy_process_group). Nothing is left to tear down, so leave
    # without them; an unexpected exception above still exits the normal way, with its traceback.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
