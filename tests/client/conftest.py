"""The SDK's tests run against the real server (the stream tests' `running` fixture)."""

from tests.stream.conftest import running  # noqa: F401
