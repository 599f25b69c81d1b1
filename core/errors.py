"""The errors every layer shares: bad input, and which failures a retry cannot fix."""
from __future__ import annotations

import errno


class InputError(ValueError):
    """Bad input (params, data, a checkpoint) that the message names with what was expected; the
    stage commands print it as one line instead of a traceback."""


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def permanent(err: BaseException | None) -> bool:
    """Whether a failure would happen again on a retry: bad input (InputError: params, data, a run
    stopped by its learning rate) or a full disk (retrying only fills it sooner)."""
    return isinstance(err, InputError) or isinstance(err, OSError) and err.errno in NO_SPACE
