"""``k2`` for ``test_parallel_faults``: one rank SIGKILLs itself inside a checkpoint save, right after
``torch.distributed.checkpoint.save`` returned (its shard is written; the save has not committed).

``K2_TEST_DIE_IN_SAVE=RANK:N``: rank RANK dies after its N-th save. Used as torchrun's worker in place of ``k2``.
"""

from __future__ import annotations

import os
import signal
import sys

import torch.distributed.checkpoint as dcp

from k2.cli import main

_rank, _nth = map(int, os.environ["K2_TEST_DIE_IN_SAVE"].split(":"))
_save = dcp.save
_calls = 0


def _save_then_die(*args, **kwargs):
    global _calls
    result = _save(*args, **kwargs)
    _calls += 1
    if int(os.environ.get("RANK", "0")) == _rank and _calls == _nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return result


dcp.save = _save_then_die

if __name__ == "__main__":
    sys.exit(main())
