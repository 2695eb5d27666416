"""The stage registry: a lookup loads only the stage it names; every stage is reachable."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bob_cache.errors import BobCacheError
from bob_cache.pipelines import get_stage, list_stages, registry


def test_every_stage_module_registers_the_name_it_is_listed_under() -> None:
    assert list_stages() == sorted(registry._STAGE_NAMES)
    for name in registry._STAGE_NAMES:
        assert callable(get_stage(name))


def test_a_lookup_imports_only_the_module_of_its_stage() -> None:
    code = (
        "import sys\n"
        "from bob_cache.pipelines import get_stage\n"
        "get_stage('extract')\n"
        "print(sorted(m for m in ('bob_cache.pipelines.probe', 'bob_cache.pipelines.battle',"
        " 'bob_cache.pipelines.finetune', 'faiss', 'sklearn') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_an_unknown_stage_is_named_with_the_known_ones() -> None:
    with pytest.raises(BobCacheError, match="Unknown stage 'probes'.*Did you mean.*probe"):
        get_stage("probes")
