// The OBS browser source / viewer page: full-bleed video, no controls; audio with ?audio=1.
// Plays the session over WHEP and reconnects by itself if the connection drops.
import { api, iceServers, params, readStats, waitForIceGathering } from './common.js';

const video = document.getElementById('avatar');
const message = document.getElementById('message');
const sid = location.pathname.split('/').filter(Boolean).pop();
const token = params.get('token');
const withAudio = params.get('audio') === '1';
let pc = null, resource = null, retry = 1000;

window.avatarStats = { state: 'idle', framesDecoded: 0, audioPackets: 0 };
video.muted = !withAudio;

function show(text) { message.textContent = text; message.hidden = !text; }

async function connect() {
  pc = new RTCPeerConnection({ iceServers: iceServers() });
  pc.addTransceiver('video', { direction: 'recvonly' });
  pc.addTransceiver('audio', { direction: 'recvonly' });
  const remote = new MediaStream();
  pc.ontrack = (e) => { remote.addTrack(e.track); video.srcObject = remote; };
  pc.onconnectionstatechange = () => {
    window.avatarStats.state = pc.connectionState;
    if (pc.connectionState === 'failed' || pc.connectionState === 'closed') reconnect();
  };
  await pc.setLocalDescription(await pc.createOffer());
  await waitForIceGathering(pc);
  const response = await api(`/v1/sessions/${sid}/whep`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/sdp', Authorization: `Bearer ${token}` },
    body: pc.localDescription.sdp,
  });
  resource = response.headers.get('Location');
  await pc.setRemoteDescription({ type: 'answer', sdp: await response.text() });
  show('');
  retry = 1000;
}

function reconnect() {
  if (pc) pc.close();
  pc = null;
  show('reconnecting…');
  setTimeout(() => connect().catch((err) => { show(err.message); retry = Math.min(retry * 2, 15000); reconnect(); }), retry);
}

connect().catch((err) => { show(err.message); reconnect(); });
setInterval(async () => {
  if (pc) Object.assign(window.avatarStats, await readStats(pc, 0));
}, 1000);
window.addEventListener('pagehide', () => {
  if (resource) {
    fetch(resource, { method: 'DELETE', keepalive: true,
      headers: { Authorization: `Bearer ${token}` } }).catch(() => {});
  }
  if (pc) pc.close();
});
