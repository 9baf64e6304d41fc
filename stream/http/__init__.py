"""The server's HTTP endpoints, one module per concern (stream/app.py routes to them):

- state.py: the application state every handler shares (`Server`: engine, sessions, metrics)
  and what every handler does first (find the session a request may act on, check the content
  type, build links);
- sessions.py: the sessions REST API; signalling.py: WebRTC offer/answer, WHEP and the bot
  WebSocket upgrade; mpegts.py: stream.ts; pages.py: pages, health, readiness, metrics.
"""
