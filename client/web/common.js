// Shared by the call page and the OBS/viewer page: sessions, signalling, stats. No build step.

export const params = new URLSearchParams(location.search);

// fetch that throws on an error answer; the error carries the HTTP status and the error code
export async function api(path, options = {}) {
  const response = await fetch(path, options);
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`, code = '';
    try {
      const body = await response.json();
      if (body.error) { code = body.error.code; message = `${code}: ${body.error.message}`; }
    } catch (e) { /* not JSON */ }
    const error = new Error(message);
    error.status = response.status;
    error.code = code;
    throw error;
  }
  return response;
}

// An answer that will not change by retrying: the session is gone, or the link is not valid.
export function isFinal(error) {
  return [401, 403, 404, 410].includes(error.status);
}

export async function createSession(fields = {}) {
  const response = await api('/v1/sessions', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(fields),
  });
  return response.json();
}

export function waitForIceGathering(pc, timeoutMs = 5000) {
  if (pc.iceGatheringState === 'complete') return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { pc.removeEventListener('icegatheringstatechange', check); resolve(); };
    const check = () => { if (pc.iceGatheringState === 'complete') done(); };
    pc.addEventListener('icegatheringstatechange', check);
    setTimeout(done, timeoutMs);  // send what we have rather than hang
  });
}

// Live figures from getStats(): what the overlay shows and what tests read (window.avatarStats).
export async function readStats(pc, playoutDelayMs) {
  const out = { framesDecoded: 0, fps: 0, width: 0, height: 0, audioPackets: 0,
                audioSamples: 0, latencyMs: null, avOffsetMs: null, codec: '' };
  let videoJb = null, audioJb = null;
  const stats = await pc.getStats();
  const codecs = {};
  stats.forEach((r) => { if (r.type === 'codec') codecs[r.id] = r.mimeType; });
  stats.forEach((r) => {
    if (r.type !== 'inbound-rtp') return;
    if (r.kind === 'video') {
      out.framesDecoded = r.framesDecoded || 0;
      out.fps = r.framesPerSecond || 0;
      out.width = r.frameWidth || 0;
      out.height = r.frameHeight || 0;
      out.codec = codecs[r.codecId] || '';
      if (r.jitterBufferEmittedCount) videoJb = 1000 * r.jitterBufferDelay / r.jitterBufferEmittedCount;
    } else if (r.kind === 'audio') {
      out.audioPackets = r.packetsReceived || 0;
      out.audioSamples = r.totalSamplesReceived || 0;
      if (r.jitterBufferEmittedCount) audioJb = 1000 * r.jitterBufferDelay / r.jitterBufferEmittedCount;
    }
  });
  if (videoJb !== null) out.latencyMs = Math.round((playoutDelayMs || 0) + videoJb);
  if (videoJb !== null && audioJb !== null) out.avOffsetMs = Math.round(videoJb - audioJb);
  return out;
}

export function showStats(el, s) {
  const fmt = (v, unit) => (v === null || v === undefined ? '–' : `${v}${unit}`);
  el.textContent = `${s.fps ? s.fps.toFixed(0) : 0} fps · ${s.width}×${s.height} · ` +
    `latency ${fmt(s.latencyMs, ' ms')} · A/V ${fmt(s.avOffsetMs, ' ms')} · ${s.codec}`;
}

// The server's side of the overlay (the session's info): the generation tier the latency
// governor runs at and its last change, and the latency by stage (docs/latency.md).
export function showServerStats(el, info) {
  if (!el) return;
  if (!info || !info.generation || !info.latency) { el.textContent = ''; return; }
  const g = info.generation, l = info.latency, st = l.stages_ms || {};
  const ms = (v) => (v === null || v === undefined ? '–' : `${v}`);
  let text = `tier ${g.width}×${g.height}/${g.steps} steps` +
    (g.governor ? ` (governor, ${g.changes} change${g.changes === 1 ? '' : 's'})` : '') +
    ` · server ${ms(st.total)} ms = wait ${ms(st.wait)} + compute ${ms(st.compute)} + ` +
    `buffer ${ms(st.buffer)} + send ${ms(st.send)} · delay ${ms(l.target_delay_ms)} ms`;
  if (l.skipped_blocks) text += ` · ${l.skipped_blocks} blocks skipped`;
  if (g.last_change) text += ` · last: ${g.last_change.from} → ${g.last_change.to}`;
  el.textContent = text;
  el.title = g.last_change ? g.last_change.reason : '';
}

// Label what is generating the video: the preview engine (no model) or random weights (real
// engine, no checkpoint: noise). `engine` is the session info's engine object.
export function showEngineBadge(element, engine) {
  if (!element || !engine) return;
  const text = engine.random_weights ? 'RANDOM WEIGHTS' : engine.preview ? 'PREVIEW ENGINE' : '';
  element.textContent = text;
  element.title = engine.description || '';
  element.hidden = !text;
}
