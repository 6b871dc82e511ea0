import pytest

from rid_fast import streaming


@pytest.fixture
def small_tiles(monkeypatch):
    """Stream in 16 × 32 tiles so that odd shapes span several tiles, ragged edges and diagonal offsets."""
    monkeypatch.setattr(streaming, "DEFAULT_BLOCK", (16, 32))
