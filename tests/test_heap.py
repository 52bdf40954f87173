"""proxy.ground.heap: start-up's objects leave the cyclic GC's sight once the proxy serves."""

from __future__ import annotations

import gc

import pytest

from proxy.ground.heap import freeze_startup

pytestmark = pytest.mark.timeout(30)


def test_freeze_startup_moves_what_is_alive_out_of_the_collectors_sight() -> None:
    gc.collect()
    before = len(gc.get_objects())
    try:
        freeze_startup()
        assert gc.get_freeze_count() > before // 2 > 0
        assert len(gc.get_objects()) < before  # a full pass no longer walks them
    finally:
        gc.unfreeze()
