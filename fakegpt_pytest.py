"""pytest plugin: the mock FakeGpt upstream as fixtures for your own tests.

Installed with fakegpt (a ``pytest11`` entry point), so the fixtures are simply there::

    def test_my_bot(fakegpt_provider):
        assert "Hello" in my_bot.ask(fakegpt_provider, "Hello")

    @pytest.mark.fakegpt_mock(fault="status:429:5", framing="close")
    def test_my_bot_backs_off(fakegpt_mock): ...

``fakegpt_mock`` is a running `mock_server.MockServer` on 127.0.0.1 (``.url``,
``.requests``, ``.fail_next()``, ``.expire_tokens()``); the marker's keywords are its
`mock_server.MockOptions`. ``fakegpt_provider`` is a `fakegpt.FakeGpt` subclass aimed at
it, with a session of its own.
"""

from __future__ import annotations

from typing import Iterator

import pytest

import fakegpt
import mock_server


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "fakegpt_mock(**options): mock_server.MockOptions for the fakegpt_mock fixture"
    )


@pytest.fixture
def fakegpt_mock(request: pytest.FixtureRequest) -> Iterator[mock_server.MockServer]:
    """A mock upstream on loopback for the test, configured by ``@pytest.mark.fakegpt_mock``."""
    marker = request.node.get_closest_marker("fakegpt_mock")
    options = dict(marker.kwargs) if marker else {}
    with mock_server.serve_in_thread(**options) as server:
        yield server


@pytest.fixture
def fakegpt_provider(fakegpt_mock: mock_server.MockServer) -> "type[fakegpt.FakeGpt]":
    """A FakeGpt subclass that talks to ``fakegpt_mock``, with its own token and cookies."""
    return fakegpt.FakeGpt.isolated(fakegpt_mock.url)
