"""avatar_client: the Python SDK of the avatar-stream chatbot WebSocket API (docs/protocol.md).

Create a session over REST, connect, stream TTS audio (bytes, a WAV/MP3 file, or an async
iterator of chunks), and get typed events and media frames back::

    from avatar_client import AvatarSocket, create_session

    session = await create_session("http://127.0.0.1:8080")
    async with await AvatarSocket.connect(session) as bot:
        spoken = await bot.say(pcm_16k_mono)
        print(spoken.started.t_first_frame_ms, spoken.ended.played_ms)
"""

from avatar_client.audio import chunks, read_pcm
from avatar_client.client import AvatarSocket, ServerError, Spoken
from avatar_client.events import (
    BufferLevel,
    Error,
    Event,
    InputAudioCleared,
    MediaFrame,
    SessionReady,
    SessionUpdated,
    Stats,
    TierChanged,
    UtteranceEnded,
    UtteranceStarted,
    parse_event,
    parse_media,
)
from avatar_client.rest import ApiError, SessionInfo, create_session, delete_session

__all__ = [
    "ApiError", "AvatarSocket", "BufferLevel", "Error", "Event", "InputAudioCleared",
    "MediaFrame", "ServerError", "SessionInfo", "SessionReady", "SessionUpdated", "Spoken",
    "Stats", "TierChanged", "UtteranceEnded", "UtteranceStarted", "chunks", "create_session",
    "delete_session", "parse_event", "parse_media", "read_pcm",
]
