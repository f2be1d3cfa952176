"""Helpers shared by the Python tests: a temporary work folder per test class, and llm.c's
shard format written with numpy (independently of the C++ writer)."""
import hashlib
import os
import shutil
import tempfile
import unittest

import numpy as np


def write_shard(path, tokens, width=2):
    header = np.zeros(256, dtype=np.int32)
    header[:3] = (20240520, 1, len(tokens)) if width == 2 else (20240801, 7, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16 if width == 2 else np.uint32).tobytes())


def tree_hashes(folder):
    """sha256 of every file under folder, by relative path: what a test compares before and
    after a command that must not touch the user's files."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            p = os.path.join(root, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def reproducible_env():
    """MKL's reproducible branch for a process we start, as train.deterministic sets it
    (core/reproducible_math.h). Otherwise MKL picks its kernel by how busy the machine is:
    two evals of one model on one shard, beside other tests, gave losses 1.5e-5 apart."""
    with open("/proc/cpuinfo") as f:
        flags = set(f.read().split())
    return {"MKL_CBWR": os.environ.get("MKL_CBWR", "AVX2" if {"avx2", "fma"} <= flags else "COMPATIBLE")}


class WorkDirTest(unittest.TestCase):
    """cls.tmp is a fresh folder for the class, removed afterwards; self.path(...) is a path
    inside a folder of the running test. The environment variables named in `required_env`
    must be set (ctest sets them)."""

    required_env = ("GPT2FT_BIN",)

    @classmethod
    def setUpClass(cls):
        missing = [v for v in cls.required_env if not os.environ.get(v)]
        if missing:
            raise RuntimeError(f"{', '.join(missing)} must be set (run through ctest)")
        cls.tmp = tempfile.mkdtemp(prefix=f"gpt2ft-{cls.__name__}-")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def path(self, *parts):
        p = os.path.join(self.tmp, self._testMethodName, *parts)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p
