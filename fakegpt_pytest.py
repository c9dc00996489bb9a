"""pytest plugin: the mock upstream as fixtures for your own tests.

Installed with fakegpt (a ``pytest11`` entry point), so the fixtures are simply there::

    import fakegpt
    import pytest


    def test_my_bot(fakegpt_provider):
        reply = fakegpt_provider.create_completion("", [{"role": "user", "content": "Hello"}], stream=False)
        assert "Hello" in reply


    @pytest.mark.fakegpt_mock(fault="status:429:5", framing="close")
    def test_my_bot_backs_off(fakegpt_provider):
        with pytest.raises(fakegpt.RateLimitError):
            fakegpt_provider.create_completion("", [{"role": "user", "content": "Hi"}], stream=False)

``fakegpt_mock`` is a running ``MockServer`` of the bundled mock on 127.0.0.1 (``.url``,
``.requests``, ``.count()``, ``.fail_next()``, ``.expire_tokens()``); the marker's
keywords are its ``MockOptions``, checked when the fixture starts. ``fakegpt_provider``
is ``fakegpt.FakeGpt.isolated(fakegpt_mock.url)``. The bundled mock is loaded from its
own file (``fakegpt.load_mock_server()``), so a project's own ``mock_server`` module is
never touched, and a test run that uses neither fixture loads nothing but this module.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "fakegpt_mock(**options): mock_server.MockOptions for the fakegpt_mock fixture"
    )


@pytest.fixture
def fakegpt_mock(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A mock upstream on loopback for the test, configured by ``@pytest.mark.fakegpt_mock``."""
    import fakegpt

    marker = request.node.get_closest_marker("fakegpt_mock")
    options = dict(marker.kwargs) if marker else {}
    with fakegpt.load_mock_server().serve_in_thread(**options) as server:
        yield server


@pytest.fixture
def fakegpt_provider(fakegpt_mock: Any) -> Any:
    """A FakeGpt subclass that talks to ``fakegpt_mock``, with its own token and cookies."""
    import fakegpt

    return fakegpt.FakeGpt.isolated(fakegpt_mock.url)
