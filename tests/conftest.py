"""Settings shared by every test.

Hypothesis runs derandomized by default: the same examples on every run, so CI results are
reproducible and a failure seen once can be replayed. Set ``VFU_HYPOTHESIS_PROFILE=explore`` to
search with fresh random examples (and a local example database) while developing.
"""

import os

from hypothesis import settings

settings.register_profile("deterministic", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", print_blob=True)
settings.load_profile(os.environ.get("VFU_HYPOTHESIS_PROFILE", "deterministic"))
