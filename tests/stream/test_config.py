"""config.toml for the server parses into frozen dataclasses; errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.api import ConfigError
from stream.config import StreamConfig
from tests.conftest import REPO


def test_shipped_config_is_valid() -> None:
    cfg = StreamConfig.load(REPO / "config.toml")
    assert cfg.engine.checkpoint == ""  # the preview engine by default
    assert cfg.webrtc.ice_servers == ()  # never a public STUN server by default
    assert cfg.server.host == "127.0.0.1"


@pytest.mark.parametrize("text, needle", [
    ("[server]\nport = 70000\n", "server.port=70000 is out of range"),
    ("[server]\napi_keys = ['short']\n", "server.api_keys"),
    ("[webrtc]\nvideo_codecs = ['AV1']\n", "webrtc.video_codecs"),
    ("[webrtc]\nice_servers = [{url = 'stun:x'}]\n", "webrtc.ice_servers[0]"),
    ("[media]\nbitrate_kbps = 'fast'\n", "media.bitrate_kbps='fast': expected int"),
    ("[sessions]\nidle = 3\n", "[sessions] has unknown key(s) ['idle']"),
    ("[nope]\n", "unknown section(s) ['nope']"),
    ("[engine]\ndtype = 'fp4'\n", "engine.dtype"),
    ("[websocket]\nrelease_ahead_s = 9.0\n", "websocket.release_ahead_s=9.0 is out of range"),
    ("[websocket]\nmax_message_bytes = 'big'\n", "websocket.max_message_bytes='big'"),
    ("not toml [", "not valid TOML"),
])
def test_bad_config_is_named(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        StreamConfig.load(path)
    assert needle in str(err.value)


def test_paths_are_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("[engine]\ncheckpoint = 'ckpt'\n[avatars]\nme = 'me.jpg'\n")
    cfg = StreamConfig.load(tmp_path / "c.toml")
    assert cfg.engine.checkpoint == str(tmp_path / "ckpt")
    assert cfg.avatars["me"] == str(tmp_path / "me.jpg")


def test_the_engine_compiles_the_governor_s_sizes_ahead() -> None:
    # a compiling engine warms up every size the latency governor may move a session to
    cfg = StreamConfig.parse({"engine": {"max_size": "576*320", "warm_up_sizes": "256*128"}})
    assert cfg.engine_config().warm_up_sizes == "256*128,576*320,448*256"
    assert cfg.engine_config().extra_warm_up_sizes() == ("256*128", "448*256")
    off = StreamConfig.parse({"latency": {"governor": False}})
    assert off.engine_config() == off.engine
