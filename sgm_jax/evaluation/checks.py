"""What every metric checks of its inputs before it runs."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def check_conditioning(evaluator: Any, conditioning: Sequence[Any] | None, n: int) -> None:
    """ValueError (one line) unless `conditioning` holds what `evaluator.needs` for each of n images."""
    needs = getattr(evaluator, "needs", None)
    if needs is None:
        return
    kind, what = ((int, np.integer), "a class id") if needs == "classes" else (str, "a prompt")
    if conditioning is None or len(conditioning) != n or not all(isinstance(c, kind) for c in conditioning):
        raise ValueError(f"the {evaluator.name} metric needs {what} for every image (--classes / --prompts with "
                         "--workdir; PNG 'class' / 'prompt' metadata or --captions FILE with --images)")
