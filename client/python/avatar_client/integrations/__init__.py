"""Adapters for voice-agent frameworks, each a thin layer over the SDK and an optional extra:

- `avatar_client.integrations.pipecat`: `AvatarStreamVideoService`, a Pipecat frame processor
  placed after TTS (`pip install 'avatar-stream[pipecat]'`);
- `avatar_client.integrations.livekit`: `AvatarWorker` / `run_worker`, an avatar worker in the
  shape of LiveKit's avatar plug-ins, and `AvatarSession`, the agent side that starts it
  (`pip install 'avatar-stream[livekit]'`).

Nothing here is imported by `avatar_client` itself: the SDK works without either framework.
"""

from __future__ import annotations


def missing_extra(extra: str, package: str, tested: str, error: ImportError) -> ImportError:
    """The error raised when an adapter's framework is not installed: it says what to run."""
    return ImportError(
        f"avatar_client.integrations.{extra} needs {package} ({error.name or error} is not "
        f"importable): pip install 'avatar-stream[{extra}]' (tested with {tested}), or "
        f"pip install -e '.[{extra}]' in a checkout of the repository")
