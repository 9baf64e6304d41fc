// The OBS browser source / viewer page: full-bleed video, no controls; audio with ?audio=1.
// Plays the session over WHEP and reconnects by itself if the connection drops, until the
// server says the session has ended or the link is not valid (then it says so and stops).
import {
  api, isFinal, params, readStats, showEngineBadge, waitForIceGathering,
} from './common.js';

const video = document.getElementById('avatar');
const message = document.getElementById('message');
const sid = location.pathname.split('/').filter(Boolean).pop();
const token = params.get('token');
const withAudio = params.get('audio') === '1';
let pc = null, resource = null, retry = 1000, servers = null, lostTimer = null, ended = false;

window.avatarStats = { state: 'idle', framesDecoded: 0, audioPackets: 0 };
video.muted = !withAudio;

function show(text) { message.textContent = text; message.hidden = !text; }

async function connect() {
  if (servers === null) {  // the server's ICE (STUN/TURN) configuration
    const info = await (await api(`/v1/sessions/${sid}`, {
      headers: { Authorization: `Bearer ${token}` } })).json();
    servers = info.ice_servers || [];
    showEngineBadge(document.getElementById('badge'), info.engine);
  }
  pc = new RTCPeerConnection({ iceServers: servers });
  pc.addTransceiver('video', { direction: 'recvonly' });
  pc.addTransceiver('audio', { direction: 'recvonly' });
  const remote = new MediaStream();
  pc.ontrack = (e) => { remote.addTrack(e.track); video.srcObject = remote; };
  const mine = pc;
  pc.onconnectionstatechange = () => {
    window.avatarStats.state = mine.connectionState;
    clearTimeout(lostTimer);
    if (mine.connectionState === 'failed') reconnect();
    if (mine.connectionState === 'disconnected') {  // give ICE a few seconds to recover
      lostTimer = setTimeout(() => { if (mine.connectionState !== 'connected') reconnect(); }, 5000);
    }
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

function leave() {
  if (resource) {  // tell the server, so the old peer does not count as a viewer
    fetch(resource, { method: 'DELETE', keepalive: true,
      headers: { Authorization: `Bearer ${token}` } }).catch(() => {});
    resource = null;
  }
  if (pc) pc.close();
  pc = null;
}

function stop(err) {
  ended = true;
  leave();
  window.avatarStats.state = 'ended';
  show(err.status === 404 || err.status === 410
    ? 'This session has ended.' : `This link does not work any more (${err.message}).`);
}

function failed(err) {
  if (isFinal(err)) { stop(err); return; }
  show(err.message);
  retry = Math.min(retry * 2, 15000);
  reconnect();
}

function reconnect() {
  if (ended) return;
  leave();
  show('reconnecting…');
  setTimeout(() => connect().catch(failed), retry);
}

connect().catch(failed);
setInterval(async () => {
  if (pc) Object.assign(window.avatarStats, await readStats(pc, 0));
}, 1000);
window.addEventListener('pagehide', leave);
