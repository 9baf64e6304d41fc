// The speaker's page: sends the microphone, shows the avatar (audio muted by default).
import {
  api, createSession, params, readStats, showEngineBadge, showServerStats, showStats,
  waitForIceGathering,
} from './common.js';

const $ = (id) => document.getElementById(id);
const video = $('avatar');
let pc = null, session = null, mic = null, timers = [];

window.avatarStats = { state: 'idle', framesDecoded: 0, audioPackets: 0 };

function status(text) { $('status').textContent = text; }

async function start() {
  $('start').disabled = true;
  try {
    if (!navigator.mediaDevices) {
      throw new Error('this page needs a secure context for the microphone: open it over ' +
                      'https:// (or http://localhost)');
    }
    if (session) {
      // a second start after hanging up: same session
    } else if (params.get('session')) {  // a call link made by a backend: the session exists
      const token = params.get('token');
      const response = await api(`/v1/sessions/${params.get('session')}`, {
        headers: { Authorization: `Bearer ${token}` } });
      session = { ...(await response.json()), token };
    } else {  // no link: make a session (works when the server needs no API key)
      session = await createSession(params.get('size') ? { size: params.get('size') } : {});
    }
    const { session_id: sid, token } = session;
    showEngineBadge($('badge'), session.engine);
    const face = session.avatar && session.avatar.face;
    if (face && face.found === false) {  // the preview found no face: it shows the picture still
      $('badge').textContent = 'PREVIEW ENGINE · NO FACE FOUND';
      $('badge').title = session.avatar.note || '';
    }
    status('Asking for the microphone…');
    // echo cancellation stays on: with "hear the avatar" ticked and no headphones, the
    // avatar's voice (the speaker's own, delayed) would otherwise feed back into the model
    mic = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: false, autoGainControl: true } });
    window.avatarStats.echoCancellation = mic.getAudioTracks()[0].getSettings().echoCancellation;
    pc = new RTCPeerConnection({ iceServers: session.ice_servers || [] });
    mic.getTracks().forEach((t) => pc.addTrack(t, mic));
    pc.addTransceiver('video', { direction: 'recvonly' });
    const remote = new MediaStream();
    pc.ontrack = (e) => { remote.addTrack(e.track); video.srcObject = remote; };
    pc.onconnectionstatechange = () => {
      window.avatarStats.state = pc.connectionState;
      status(`Connection: ${pc.connectionState}`);
    };
    await pc.setLocalDescription(await pc.createOffer());
    await waitForIceGathering(pc);
    status('Connecting…');
    const response = await api(`/v1/sessions/${sid}/offer`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${token}` },
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: 'offer' }),
    });
    const answer = await response.json();
    session.peer_url = answer.peer_url;
    await pc.setRemoteDescription({ type: 'answer', sdp: answer.sdp });
    // the server's viewer link (a view-scope token); the call token never goes into it
    const link = session.urls && session.urls.viewer;
    if (link) {
      $('viewer-link').href = link;
      $('viewer-link').textContent = link;
      $('viewer').hidden = false;
      window.avatarStats.viewerLink = link;
    }
    $('hangup').disabled = false;
    if (params.get('probe')) {  // glass-to-glass marks (`avatar latency-probe`)
      const { startProbe } = await import('./probe.js');
      await startProbe(video, mic);
    }
    let server = null;  // the session's own figures: generation tier, latency by stage
    timers.push(setInterval(async () => {
      const s = await readStats(pc, server ? server.playout_delay_ms : session.playout_delay_ms);
      Object.assign(window.avatarStats, s);
      showStats($('stats'), s);
      showServerStats($('server-stats'), server);
    }, 1000));
    timers.push(setInterval(async () => {
      try {
        const r = await fetch(`/v1/sessions/${sid}`, {
          headers: { Authorization: `Bearer ${token}` } });
        if (r.ok) {
          server = await r.json();
          window.avatarStats.server = {
            latency: server.latency, generation: server.generation, blocks: server.blocks,
            silent_blocks: server.silent_blocks, frames_sent: server.frames_sent,
            audio_in_resyncs: server.audio_in_resyncs };
        }
      } catch (e) { /* the next poll will tell */ }
    }, 2000));
    timers.push(setInterval(async () => {  // keep the session alive while the page is open
      try {
        const r = await fetch(`/v1/sessions/${sid}/keepalive`, { method: 'POST',
          headers: { Authorization: `Bearer ${token}` } });
        if (r.status === 401 || r.status === 404) status('The session has ended.');
      } catch (e) { /* the next try will tell */ }
    }, 20000));
  } catch (err) {
    status(`Could not start: ${err.message}`);
    window.avatarStats.state = 'error';
    window.avatarStats.error = err.message;
    $('start').disabled = false;
  }
}

async function hangup() {
  timers.forEach(clearInterval);
  timers = [];
  if (mic) mic.getTracks().forEach((t) => t.stop());  // the browser's mic indicator goes off
  mic = null;
  if (session && session.peer_url) {
    fetch(session.peer_url, { method: 'DELETE',
      headers: { Authorization: `Bearer ${session.token}` } }).catch(() => {});
    session.peer_url = null;
  }
  if (pc) pc.close();
  pc = null;
  $('hangup').disabled = true;
  $('start').disabled = false;
  status('Call ended.');
}

$('start').onclick = start;
$('hangup').onclick = hangup;
$('listen').onchange = (e) => { video.muted = !e.target.checked; };
$('copy').onclick = () => navigator.clipboard.writeText($('viewer-link').href);
window.addEventListener('pagehide', () => {
  if (session && session.peer_url) {
    fetch(session.peer_url, { method: 'DELETE', keepalive: true,
      headers: { Authorization: `Bearer ${session.token}` } }).catch(() => {});
  }
  if (pc) pc.close();
});
