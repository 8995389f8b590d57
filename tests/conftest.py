"""Test-session settings shared by every test.

Tiny models are dominated by per-op overhead, so one intra-op thread is faster than two and
keeps parallel test processes (training subprocesses included, through OMP_NUM_THREADS) from
fighting over the 2 CI cores.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

import torch  # noqa: E402

torch.set_num_threads(1)
