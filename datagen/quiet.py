"""Library chatter off: the build's own progress bar and summary replace the per-component
bars and notices of diffusers and transformers (in the driver and in every worker process or
Ray actor, which do not inherit the driver's settings)."""

from __future__ import annotations


def quiet_libraries() -> None:
    """Silence diffusers' and transformers' progress bars and notices.

    Prompt truncation to ``generation.max_sequence_length`` is expected (the tiny preset reads
    32 tokens) and the whole prompt is still stored in each sample.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()
