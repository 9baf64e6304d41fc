"""The chatbot WebSocket API: GET /v1/sessions/{id}/ws (docs/protocol.md).

protocol.py: message types, validation against protocol.schema.json, event and media framing;
handler.py: the aiohttp handler. The audio queue and utterances live in stream/media/.
"""
