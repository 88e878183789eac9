// wacall console: live call list, waveforms that seek, live call pages. Plain JS, no build.
"use strict";

(function () {
  const page = document.body.dataset.page;

  function eventNames() {
    const el = document.getElementById("event-names");
    return el ? JSON.parse(el.textContent) : [];
  }

  // Subscribe to the gateway's event stream (the session cookie authenticates it).
  function listen(query, onEvent) {
    const names = eventNames();
    if (!names.length || !window.EventSource) return null;
    const source = new EventSource("/v1/events" + query);
    for (const name of names) {
      source.addEventListener(name, (e) => {
        // (the stream's envelope: {id, type, created_at, call_id, data: {state, entry, call}})
        let payload;
        try { payload = JSON.parse(e.data); } catch (err) { console.warn("bad event", err); return; }
        onEvent(name, payload.data || {});
      });
    }
    return source;
  }

  function text(tag, value, cls) {
    const el = document.createElement(tag);
    if (cls) el.className = cls;
    el.textContent = value == null ? "" : String(value);
    return el;
  }

  function when(iso) {
    if (!iso) return "";
    return String(iso).replace("T", " ").replace(/\.\d+Z$|Z$/, "");
  }

  function duration(seconds) {
    if (seconds == null) return "";
    const s = Math.round(Number(seconds));
    return Math.floor(s / 60) + ":" + String(s % 60).padStart(2, "0");
  }

  const DIRECTIONS = { BUSINESS_INITIATED: "outbound", USER_INITIATED: "inbound" };

  function callRow(call) {
    const tr = document.createElement("tr");
    tr.dataset.callId = call.id;
    tr.dataset.state = call.state;
    const first = document.createElement("td");
    const link = text("a", when(call.created_at));
    link.href = "/console/calls/" + encodeURIComponent(call.id);
    first.appendChild(link);
    tr.appendChild(first);
    tr.appendChild(text("td", DIRECTIONS[call.direction] || call.direction));
    tr.appendChild(text("td", call.user, "user"));
    const state = document.createElement("td");
    state.appendChild(text("span", call.state, "state state-" + call.state));
    tr.appendChild(state);
    tr.appendChild(text("td", duration(call.connected_seconds), "num"));
    tr.appendChild(text("td", call.end_reason));
    const rec = document.createElement("td");
    if ((call.recordings && call.recordings.length) || call.recording) {
      rec.appendChild(text("span", "●", "rec"));
    }
    tr.appendChild(rec);
    return tr;
  }

  function liveCount() {
    const rows = document.querySelectorAll("#calls tbody tr[data-call-id]");
    let live = 0;
    rows.forEach((r) => { if (r.dataset.state !== "ended") live += 1; });
    const el = document.querySelector(".live-count");
    if (el) el.textContent = live + " live";
  }

  function callsPage() {
    const body = document.querySelector("#calls tbody");
    const filtered = document.body.dataset.filtered === "true";
    listen("", (name, data) => {
      const call = data.call;
      if (!call || !call.id) return;
      const row = callRow(call);
      const old = body.querySelector('tr[data-call-id="' + CSS.escape(call.id) + '"]');
      if (old) {
        old.replaceWith(row);
      } else if (!filtered) {
        const empty = body.querySelector("tr.empty");
        if (empty) empty.remove();
        body.insertBefore(row, body.firstChild);
        row.classList.add("flash-row");
      } else {
        return;
      }
      liveCount();
    });
  }

  // -- call page ------------------------------------------------------------------------

  function drawWaveform(canvas, wave, progress) {
    const ctx = canvas.getContext("2d");
    const w = canvas.width, h = canvas.height;
    ctx.clearRect(0, 0, w, h);
    const channels = wave.peaks.length;
    const colours = ["#0b7a5a", "#3b5bdb"];
    const band = h / Math.max(1, channels);
    wave.peaks.forEach((columns, ch) => {
      const mid = band * ch + band / 2;
      const scale = band / 2 - 1;
      ctx.fillStyle = colours[ch % colours.length];
      const step = w / Math.max(1, columns.length);
      columns.forEach(([lo, hi], x) => {
        const top = mid - hi * scale, bottom = mid - lo * scale;
        ctx.fillRect(x * step, top, Math.max(1, step), Math.max(1, bottom - top));
      });
    });
    if (progress != null) {
      ctx.fillStyle = "rgba(29, 36, 48, .85)";
      ctx.fillRect(Math.round(progress * w), 0, 2, h);
    }
  }

  function recording(figure) {
    const canvas = figure.querySelector("canvas.waveform");
    const audio = figure.querySelector("audio");
    if (!canvas || !audio) return;
    fetch(canvas.dataset.peaks, { credentials: "same-origin" })
      .then((r) => (r.ok ? r.json() : Promise.reject(new Error("peaks: HTTP " + r.status))))
      .then((wave) => {
        const total = () => (isFinite(audio.duration) && audio.duration > 0 ? audio.duration : wave.duration_s);
        const redraw = () => drawWaveform(canvas, wave, total() ? audio.currentTime / total() : null);
        redraw();
        canvas.dataset.drawn = "true";
        canvas.addEventListener("click", (e) => {
          const rect = canvas.getBoundingClientRect();
          const fraction = Math.min(1, Math.max(0, (e.clientX - rect.left) / rect.width));
          if (total()) audio.currentTime = fraction * total();
          redraw();
        });
        audio.addEventListener("timeupdate", redraw);
        audio.addEventListener("seeked", redraw);
      })
      .catch((err) => { canvas.dataset.drawn = "error"; canvas.title = String(err); });
  }

  function callPage() {
    document.querySelectorAll("figure.recording").forEach(recording);
    const id = document.body.dataset.callId;
    if (document.body.dataset.state === "ended") return;
    let reloading = false;
    listen("?call_id=" + encodeURIComponent(id), (name, data) => {
      const call = data.call;
      if (!call) return;
      const state = document.getElementById("call-state");
      if (state) { state.textContent = call.state; state.className = "state state-" + call.state; }
      if (call.state === "ended" && !reloading) {
        reloading = true;  // the recordings are listed once the call has ended
        window.setTimeout(() => window.location.reload(), 300);
      }
    });
  }

  if (page === "calls") callsPage();
  else if (page === "call") callPage();
})();
