// The glass-to-glass probe of the call page (`/call?probe=1`; `avatar latency-probe` drives it).
//
// It needs a server whose preview engine stamps its marks ([engine] preview_marks = true;
// engine/preview_marks.py): a white patch in the top-right corner on the frames whose audio
// starts a sound after a quiet stretch (an onset), and the frame number as black and white cells
// along the bottom edge. The page records, on the page's clock (performance.now(), ms):
//
// - `onsets`: when a sound started in the microphone, as the page's own audio graph hears it
//   (an AudioWorklet on the same track the call sends; the fake microphone's WAV has clicks);
// - `marks`: every decoded video frame with a white patch, when it was due on screen
//   (requestVideoFrameCallback's expectedDisplayTime) and the frame number it carries.
//
// Matching the two (which mark shows which onset) is done by whoever reads window.avatarProbe
// (stream/latency_probe.py): it uses the frame numbers, so it holds at any latency.

const WORKLET = `
class OnsetProcessor extends AudioWorkletProcessor {
  constructor() { super(); this.quiet = 0; }
  process(inputs) {
    const ch = inputs[0] && inputs[0][0];
    if (!ch) return true;
    let sum = 0;
    for (let i = 0; i < ch.length; i++) sum += ch[i] * ch[i];
    const db = 10 * Math.log10(sum / ch.length + 1e-12);
    const quietNeeded = Math.round(0.12 * sampleRate / ch.length);  // 120 ms of quiet first
    if (db >= -30 && this.quiet >= quietNeeded) this.port.postMessage(currentTime);
    this.quiet = db < -45 ? this.quiet + 1 : 0;
    return true;
  }
}
registerProcessor('onset-processor', OnsetProcessor);
`;

const CODE_BITS = 16;

// The mark geometry of engine/preview_marks.py, on the decoded frame's size.
function patchBox(w, h) {
  const side = Math.max(8, Math.floor(Math.min(w, h) / 5));
  return [w - side, 0, w, side];
}

function meanLuma(data, w, x0, y0, x1, y1) {
  let sum = 0, n = 0;
  for (let y = y0; y < y1; y++) {
    for (let x = x0; x < x1; x++) {
      const i = 4 * (y * w + x);
      sum += (data[i] + data[i + 1] + data[i + 2]) / 3;
      n++;
    }
  }
  return n ? sum / n : 0;
}

function readMarks(data, w, h) {
  const [x0, y0, x1, y1] = patchBox(w, h);
  const q = Math.floor((x1 - x0) / 4);
  const lit = meanLuma(data, w, x0 + q, y0 + q, x1 - q, y1 - q) > 160;
  // cells of w/32, fractional: the page may see a scaled output rung (engine/preview_marks.py)
  const cell = Math.max(4, w / 32);
  const top = h - Math.round(cell), m = Math.max(1, Math.round(cell / 4));
  const bits = [];
  for (let i = 0; i <= CODE_BITS; i++) {
    const a = Math.round((i + 1) * cell), b = Math.round((i + 2) * cell);
    bits.push(meanLuma(data, w, a + m, top + m, b - m, h - m) > 128 ? 1 : 0);
  }
  const ones = bits.slice(0, CODE_BITS).reduce((a, b) => a + b, 0);
  const code = ones % 2 === bits[CODE_BITS]
    ? bits.slice(0, CODE_BITS).reduce((acc, bit, i) => acc + (bit << i), 0) : null;
  return { lit, code };
}

export async function startProbe(video, micStream) {
  const probe = { onsets: [], marks: [], frames: 0, unreadable: 0, error: null };
  window.avatarProbe = probe;
  try {
    const ctx = new AudioContext();
    const url = URL.createObjectURL(new Blob([WORKLET], { type: 'application/javascript' }));
    await ctx.audioWorklet.addModule(url);
    const node = new AudioWorkletNode(ctx, 'onset-processor');
    node.port.onmessage = (e) => {
      // the context's clock -> the page's: the two are tied by getOutputTimestamp()
      const ts = ctx.getOutputTimestamp();
      probe.onsets.push(ts.performanceTime + 1000 * (e.data - ts.contextTime));
    };
    ctx.createMediaStreamSource(micStream).connect(node);
    await ctx.resume();
  } catch (err) {
    probe.error = `microphone analysis: ${err.message}`;
    return probe;
  }
  const canvas = document.createElement('canvas');
  const g = canvas.getContext('2d', { willReadFrequently: true });
  let litBefore = false;
  const onFrame = (now, meta) => {
    const w = video.videoWidth, h = video.videoHeight;
    if (w && h) {
      if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
      g.drawImage(video, 0, 0, w, h);
      const { lit, code } = readMarks(g.getImageData(0, 0, w, h).data, w, h);
      probe.frames++;
      if (code === null) probe.unreadable++;
      if (lit && !litBefore && code !== null) {
        probe.marks.push({ t: meta.expectedDisplayTime, frame: code });
      }
      litBefore = lit;
    }
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
  return probe;
}
