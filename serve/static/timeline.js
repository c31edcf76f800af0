/*
 * Timeline card: uploads one recording to POST /predict/timeline and reads its NDJSON answer as it streams
 * (a `start` line, one `segment` line per segment in order, a `summary`). Each segment is drawn as it arrives,
 * with a progress bar; clicking a segment plays that span of the recording in the page's player.
 * Cancel (or leaving the page) aborts the request, which stops the server's work on the remaining segments.
 * Plain browser JavaScript, no build step; the API key, if any, is the one app.js keeps for this tab.
 */
"use strict";

(() => {
  const TIMELINE_URL = "predict/timeline";
  const KEY_STORAGE = "emotion-api-key";
  const EMOJI = {
    angry: "😠", disgust: "🤢", fear: "😨", happy: "😄", neutral: "😐", sad: "😢", surprise: "😲",
  };
  const EMOTIONS = Object.keys(EMOJI);

  const $ = (id) => document.getElementById(id);
  const el = {
    form: $("timeline-form"),
    file: $("timeline-file"),
    fileStatus: $("timeline-file-status"),
    segment: $("timeline-segment"),
    button: $("timeline-button"),
    cancel: $("timeline-cancel"),
    error: $("timeline-error"),
    result: $("timeline-result"),
    progress: $("timeline-progress"),
    progressText: $("timeline-progress-text"),
    player: $("timeline-player"),
    track: $("timeline-track"),
    end: $("timeline-end"),
    summary: $("timeline-summary"),
    shares: $("timeline-shares"),
    moments: $("timeline-moments"),
  };
  if (!el.form) return;

  const state = { controller: null, media: null, url: null, duration: 0, total: 0, done: 0, stopAt: null };

  function make(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (v !== undefined && v !== null) node.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  function clock(seconds) {
    const s = Math.max(0, Number(seconds) || 0);
    const m = Math.floor(s / 60);
    const rest = s - m * 60;
    return `${m}:${rest < 10 ? "0" : ""}${rest.toFixed(rest % 1 ? 1 : 0)}`;
  }

  function pct(x) {
    return `${Math.round(Math.max(0, Math.min(1, Number(x) || 0)) * 100)}%`;
  }

  function authHeaders() {
    let key = "";
    try {
      key = sessionStorage.getItem(KEY_STORAGE) || "";
    } catch (_) {
      key = "";
    }
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  function showError(message) {
    el.error.textContent = message;
    el.error.hidden = false;
  }

  function setBusy(busy) {
    el.button.disabled = busy;
    el.button.classList.toggle("busy", busy);
    el.cancel.hidden = !busy;
    el.form.setAttribute("aria-busy", String(busy));
  }

  // ---------------------------------------------------------------- the player

  function loadPlayer(file) {
    if (state.url) URL.revokeObjectURL(state.url);
    state.url = URL.createObjectURL(file);
    const isVideo = /^video\//.test(file.type) || /\.(mp4|mov|mkv|avi|webm)$/i.test(file.name);
    const media = make(isVideo ? "video" : "audio", {
      id: "timeline-media", controls: "", preload: "metadata", src: state.url,
      "aria-label": "The recording; a segment click plays its span",
    });
    media.addEventListener("timeupdate", () => {
      if (state.stopAt !== null && media.currentTime >= state.stopAt) {
        media.pause();
        state.stopAt = null;
      }
    });
    el.player.replaceChildren(media);
    state.media = media;
  }

  function playSpan(start, end) {
    const media = state.media;
    if (!media) return;
    media.currentTime = start;
    state.stopAt = end;
    media.dataset.span = `${start}-${end}`;
    const played = media.play();
    if (played && played.catch) played.catch(() => { /* autoplay refused: the position is still set */ });
    for (const seg of el.track.querySelectorAll(".tl-seg.playing")) seg.classList.remove("playing");
    const seg = el.track.querySelector(`.tl-seg[data-start="${start}"]`);
    if (seg) seg.classList.add("playing");
  }

  // ---------------------------------------------------------------- drawing

  function startTimeline(line) {
    state.duration = line.duration_s;
    state.total = line.segments;
    state.done = 0;
    el.track.replaceChildren();
    el.track.dataset.segments = "0";
    el.end.textContent = clock(line.duration_s);
    el.progress.max = Math.max(1, line.segments);
    el.progress.value = 0;
    el.progressText.textContent = `0 of ${line.segments} segments (${clock(line.duration_s)} of ${line.modalities.join(" + ")})`;
    el.summary.hidden = true;
  }

  function addSegment(line) {
    const duration = state.duration || 1;
    const left = (line.start_s / duration) * 100;
    const width = ((line.end_s - line.start_s) / duration) * 100;
    const emotion = line.emotion || "none";
    const span = `${clock(line.start_s)}–${clock(line.end_s)}`;
    const label = line.emotion
      ? `${span}: ${line.emotion} ${pct(line.confidence)}`
      : `${span}: no answer (${(line.error && line.error.detail) || "failed"})`;
    const seg = make("button", {
      type: "button", class: `tl-seg emo-${emotion}`, role: "listitem", title: label, "aria-label": label,
      "data-index": line.index, "data-start": line.start_s, "data-end": line.end_s, "data-emotion": emotion,
      style: `left:${left.toFixed(3)}%;width:${width.toFixed(3)}%;--conf:${(0.35 + 0.65 * (line.confidence || 0)).toFixed(3)}`,
    });
    seg.addEventListener("click", () => playSpan(line.start_s, line.end_s));
    el.track.append(seg);
    state.done += 1;
    el.track.dataset.segments = String(state.done);
    el.progress.value = state.done;
    el.progressText.textContent = `${state.done} of ${state.total} segments`;
  }

  function showSummary(line) {
    el.shares.replaceChildren();
    const names = EMOTIONS.filter((e) => (line.shares[e] || 0) > 0).sort((a, b) => line.shares[b] - line.shares[a]);
    for (const name of names) {
      const share = line.shares[name];
      el.shares.append(make("li", { class: `bar emo-${name}${name === line.dominant ? " top" : ""}` },
        make("span", { class: "bar-label", text: `${EMOJI[name]} ${name}` }),
        make("span", { class: "bar-track", role: "img", "aria-label": `${name} ${pct(share)} of the time` },
          make("span", { class: "bar-fill", style: `width:${(share * 100).toFixed(2)}%` })),
        make("span", { class: "bar-value", text: pct(share) })));
    }
    el.moments.replaceChildren();
    for (const m of line.strongest) {
      const link = make("button", { type: "button", class: "btn btn-small btn-secondary",
        text: `${clock(m.start_s)}–${clock(m.end_s)} ${EMOJI[m.emotion]} ${m.emotion} ${pct(m.confidence)}` });
      link.addEventListener("click", () => playSpan(m.start_s, m.end_s));
      el.moments.append(make("li", {}, link));
    }
    el.summary.hidden = false;
    const failed = line.failed ? `, ${line.failed} without an answer` : "";
    el.progressText.textContent = `Done: ${line.answered} of ${line.segments} segments answered${failed} in ` +
      `${(line.latency_ms / 1000).toFixed(1)} s.`;
  }

  function handle(line) {
    if (line.type === "start") startTimeline(line);
    else if (line.type === "segment") addSegment(line);
    else if (line.type === "summary") showSummary(line);
  }

  // ---------------------------------------------------------------- the request

  async function readLines(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let summary = false;
    for (;;) {
      const { value, done } = await reader.read();
      if (value) buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n")) >= 0) {
        const text = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 1);
        if (!text) continue;
        const line = JSON.parse(text);
        summary = summary || line.type === "summary";
        handle(line);
      }
      if (done) break;
    }
    if (!summary) throw new Error("the answer ended before its summary (the service stopped)");
  }

  async function errorDetail(response) {
    try {
      const body = await response.json();
      if (typeof body.detail === "string") return body.detail;
      if (Array.isArray(body.detail)) return body.detail.map((d) => d.msg).join("; ");
    } catch (_) {
      /* not JSON */
    }
    return response.statusText || `HTTP ${response.status}`;
  }

  el.file.addEventListener("change", () => {
    const file = el.file.files[0];
    el.fileStatus.textContent = file ? `${file.name} (${(file.size / 1024 / 1024).toFixed(1)} MB)` : "";
  });

  el.cancel.addEventListener("click", () => {
    if (state.controller) state.controller.abort();
  });

  el.form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const file = el.file.files[0];
    el.error.hidden = true;
    if (!file) {
      showError("Choose an audio or video recording first.");
      return;
    }
    const isVideo = /^video\//.test(file.type) || /\.(mp4|mov|mkv|avi)$/i.test(file.name);
    const form = new FormData();
    form.append(isVideo ? "video" : "audio", file, file.name);
    if (el.segment.value === "speech") form.append("segmentation", "speech");
    else form.append("segment_s", el.segment.value);
    state.controller = new AbortController();
    setBusy(true);
    loadPlayer(file);
    el.result.hidden = false;
    el.track.replaceChildren();
    el.summary.hidden = true;
    el.progress.removeAttribute("value"); // indeterminate while the upload is decoded
    el.progressText.textContent = "Uploading and decoding…";
    try {
      const response = await fetch(TIMELINE_URL, {
        method: "POST", body: form, headers: authHeaders(), signal: state.controller.signal,
      });
      if (!response.ok) {
        showError(`${response.status}: ${await errorDetail(response)}`);
        el.result.hidden = true;
        return;
      }
      await readLines(response);
    } catch (err) {
      if (err && err.name === "AbortError") el.progressText.textContent += " Cancelled.";
      else showError(`The timeline failed: ${(err && err.message) || err}`);
    } finally {
      state.controller = null;
      setBusy(false);
    }
  });

  window.addEventListener("pagehide", () => {
    if (state.controller) state.controller.abort();
  });
})();
