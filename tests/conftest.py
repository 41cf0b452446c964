"""Shared pytest fixtures, the `slow` marker rule and the nbval settings.

- Every test that uses the `embedded_cache` fixture (directly or through another fixture) is marked `slow`:
  it builds or runs the embedded model. `make quick` (pytest -m "not slow ...") leaves those out.
- When the nbval plugin is active, the committed notebooks are executed and compared with their outputs, in
  this environment, with the sanitizers of tests/nbval_sanitize.cfg: what `--nbval --nbval-current-env
  --nbval-sanitize-with tests/nbval_sanitize.cfg` would ask for. They are set here rather than in pyproject's
  addopts so that `pytest -p no:nbval` still works (those options do not exist without the plugin).
"""
import pytest

SANITIZERS = "tests/nbval_sanitize.cfg"


def pytest_configure(config):
    if not config.pluginmanager.hasplugin("nbval"):
        return
    option = config.option
    if not (option.nbval or option.nbval_lax):
        option.nbval = True
    option.nbval_current_env = True
    if option.nbval_sanitize_with is None:
        option.nbval_sanitize_with = str(config.rootpath / SANITIZERS)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if "embedded_cache" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    """Cache root holding the embedded tiny LLaVA, built once per test session (about 40 s on 2 CPU cores).

    While the session runs it is also $MIRLAB_CACHE_DIR, so `mirlab.tiny.embedded_model()` reuses it anywhere.
    Tests using it are marked `slow` automatically (see the module docstring).
    """
    from mirlab.tiny import build as embedded

    root = tmp_path_factory.mktemp("mirlab-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MIRLAB_CACHE_DIR", str(root))
        embedded.ensure_cached(root)
        yield root
