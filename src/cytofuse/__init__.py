"""cytofuse: organelle-aware fusion classifiers for microscopy images.

Arrays follow one axis order everywhere: (C, Z, Y, X) for images and
(C, Y, X) for 2D patches.
"""

import os

# OpenMP threads that spin while waiting made CPU training ~9x slower whenever another
# process (a data loader, a second job) shared the cores; passive waiting costs little when
# the cores are free. Takes effect only if cytofuse is imported before torch; a value set by
# the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# glibc unmapped and re-faulted every large training batch: a third of CPU training time
# was system time. Fix its mmap threshold at 64 MiB and raise its trim threshold for this
# process (and the DataLoader workers it forks); CYTOFUSE_MALLOPT=0 or the user's own
# MALLOC_*_THRESHOLD_ turns it off.
from cytofuse.runtime import tune_malloc  # noqa: E402

tune_malloc()

__version__ = "0.1.0"
