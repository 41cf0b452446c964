"""Shared pytest fixtures."""
import pytest


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    """Cache root holding the embedded tiny LLaVA, built once per test session (about 40 s on 2 CPU cores).

    While the session runs it is also $MIRLAB_CACHE_DIR, so `mirlab.tiny.embedded_model()` reuses it anywhere.
    """
    from mirlab.tiny import build as embedded

    root = tmp_path_factory.mktemp("mirlab-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MIRLAB_CACHE_DIR", str(root))
        embedded.ensure_cached(root)
        yield root
