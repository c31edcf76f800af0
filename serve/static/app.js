/*
 * Emotion recognition page: collects text / audio / video (files, microphone, webcam), sends them
 * together to POST /predict as multipart form data and renders the fused answer. When the service
 * requires an API key (health says so, or a request gets 401) the page asks for one and keeps it in
 * sessionStorage: for this browser tab only, sent as `Authorization: Bearer <key>`.
 * Plain browser JavaScript, no build step, no third-party code.
 */
"use strict";

(() => {
  const EMOTIONS = ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"];
  const EMOJI = {
    angry: "😠", disgust: "🤢", fear: "😨", happy: "😄", neutral: "😐", sad: "😢", surprise: "😲",
  };
  const MODALITY_LABEL = { text: "Text", audio: "Audio", video: "Video", transcript: "Transcript" };
  const MODALITY_ICON = { text: "💬", audio: "🎙️", video: "🙂", transcript: "📝" };
  const MAX_MIC_SECONDS = 30;
  const CLIP_SECONDS = 3;

  // Endpoints are relative so the page also works behind a route prefix.
  const PREDICT_URL = "predict";
  const HEALTH_URL = "api/health";
  const KEY_STORAGE = "emotion-api-key";

  const $ = (id) => document.getElementById(id);
  const el = {
    form: $("predict-form"),
    text: $("text-input"),
    audioFile: $("audio-file"),
    audioPreview: $("audio-preview"),
    audioStatus: $("audio-status"),
    micButton: $("mic-button"),
    videoFile: $("video-file"),
    videoPreview: $("video-preview"),
    videoStatus: $("video-status"),
    cameraButton: $("camera-button"),
    cameraPanel: $("camera-panel"),
    cameraView: $("camera-view"),
    snapshotButton: $("snapshot-button"),
    clipButton: $("clip-button"),
    analyze: $("analyze-button"),
    output: $("output"),
    error: $("error"),
    loading: $("loading"),
    placeholder: $("placeholder"),
    live: $("live"),
    result: $("result"),
    emoji: $("result-emoji"),
    emotion: $("result-emotion"),
    confidence: $("result-confidence"),
    probabilities: $("probabilities"),
    contribStack: $("contrib-stack"),
    contributions: $("contributions"),
    perModality: $("per-modality"),
    transcribeMode: $("transcribe-mode"),
    transcriptBlock: $("transcript-block"),
    transcriptText: $("transcript-text"),
    transcriptMeta: $("transcript-meta"),
    droppedBlock: $("dropped-block"),
    dropped: $("dropped"),
    meta: $("result-meta"),
    health: $("health"),
    healthText: $("health-text"),
    keyForm: $("key-form"),
    keyInput: $("api-key-input"),
    keyStatus: $("key-status"),
    forgetKey: $("forget-key"),
  };

  /** Inputs chosen so far: a File per media modality (from a picker, the microphone or the webcam). */
  const state = {
    audio: null,
    video: null,
    maxUploadBytes: null,
    busy: false,
    mic: null, // {recorder, stream, timer}
    camera: null, // MediaStream
    clip: null, // {recorder, timer}
  };

  // ---------------------------------------------------------------- API key

  /** The key entered in this tab ("" if none); sessionStorage can be unavailable (privacy modes). */
  function apiKey() {
    try {
      return sessionStorage.getItem(KEY_STORAGE) || "";
    } catch (_) {
      return "";
    }
  }

  function storeKey(key) {
    try {
      if (key) sessionStorage.setItem(KEY_STORAGE, key);
      else sessionStorage.removeItem(KEY_STORAGE);
    } catch (_) {
      /* nothing stored: the key is asked for again */
    }
    el.forgetKey.hidden = !key;
  }

  function authHeaders() {
    const key = apiKey();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  function askForKey(message) {
    el.keyForm.hidden = false;
    el.keyStatus.textContent = message || "";
    el.health.dataset.state = "locked";
    el.healthText.textContent = "API key required";
  }

  el.keyForm.addEventListener("submit", async (e) => {
    e.preventDefault();
    const key = el.keyInput.value.trim();
    if (!key) {
      el.keyStatus.textContent = "Enter the API key first.";
      el.keyInput.focus();
      return;
    }
    storeKey(key);
    el.keyInput.value = "";
    el.keyStatus.textContent = "Checking the key…";
    if (await checkHealth()) {
      el.keyStatus.textContent = "";
      el.text.focus();
    } else {
      el.keyInput.focus();
    }
  });

  el.forgetKey.addEventListener("click", () => {
    storeKey("");
    checkHealth();
  });

  // ---------------------------------------------------------------- helpers

  function pct(x) {
    const v = Math.max(0, Math.min(1, Number(x) || 0)) * 100;
    return v >= 99.95 || v === 0 ? `${v.toFixed(0)}%` : `${v.toFixed(1)}%`;
  }

  function ms(x) {
    const v = Number(x);
    if (!Number.isFinite(v)) return "—";
    return v >= 100 ? `${Math.round(v)} ms` : `${v.toFixed(1)} ms`;
  }

  function bytes(n) {
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
    return `${(n / 1024 / 1024).toFixed(1)} MB`;
  }

  function cap(s) {
    return s ? s.charAt(0).toUpperCase() + s.slice(1) : s;
  }

  function make(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") node.className = v;
      else if (k === "style") node.setAttribute("style", v);
      else if (k === "text") node.textContent = v;
      else if (v !== undefined && v !== null) node.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  /** MIME type for MediaRecorder that this browser supports, or "" to let it choose. */
  function pickMime(candidates) {
    if (typeof MediaRecorder === "undefined" || !MediaRecorder.isTypeSupported) return "";
    return candidates.find((t) => MediaRecorder.isTypeSupported(t)) || "";
  }

  function extensionFor(mime, fallback) {
    if (/mp4/.test(mime)) return "mp4";
    if (/ogg/.test(mime)) return "ogg";
    if (/webm/.test(mime)) return "webm";
    return fallback;
  }

  function stopStream(stream) {
    if (stream) stream.getTracks().forEach((t) => t.stop());
  }

  function mediaErrorMessage(err, what) {
    const name = err && err.name;
    if (name === "NotAllowedError" || name === "SecurityError") {
      return `Permission to use the ${what} was denied. Allow it in the browser, or upload a file instead.`;
    }
    if (name === "NotFoundError" || name === "OverconstrainedError") return `No ${what} was found on this device.`;
    if (!window.isSecureContext) return `The ${what} needs a secure page (https:// or localhost).`;
    return `Could not use the ${what}: ${(err && err.message) || err}`;
  }

  // ---------------------------------------------------------------- chosen media

  function setMedia(kind, file, source) {
    state[kind] = file;
    const preview = kind === "audio" ? el.audioPreview : el.videoPreview;
    const status = kind === "audio" ? el.audioStatus : el.videoStatus;
    const old = preview.querySelector("[data-url]");
    if (old) URL.revokeObjectURL(old.dataset.url);
    preview.replaceChildren();
    if (!file) {
      preview.hidden = true;
      status.textContent = "";
      return;
    }
    const url = URL.createObjectURL(file);
    let media;
    const type = file.type || "";
    if (type.startsWith("image/")) {
      media = make("img", { src: url, alt: `Selected image ${file.name}`, "data-url": url });
    } else if (kind === "video" && !type.startsWith("audio/")) {
      media = make("video", { src: url, controls: "", muted: "", playsinline: "", "data-url": url,
        "aria-label": `Selected video ${file.name}` });
    } else {
      media = make("audio", { src: url, controls: "", "data-url": url, "aria-label": `Selected audio ${file.name}` });
    }
    const remove = make("button", { type: "button", class: "btn btn-ghost btn-small",
      "aria-label": `Remove ${kind} ${file.name}`, text: "Remove" });
    remove.addEventListener("click", () => {
      if (kind === "audio") el.audioFile.value = "";
      else el.videoFile.value = "";
      setMedia(kind, null);
      (kind === "audio" ? el.audioFile : el.videoFile).focus();
    });
    const name = make("span", { class: "file-name", text: `${file.name} · ${bytes(file.size)}` });
    preview.append(media, make("div", { class: "file-row" }, name, remove));
    preview.hidden = false;
    status.textContent = `${source}: ${file.name} (${bytes(file.size)}) will be analysed.`;
    if (state.maxUploadBytes && file.size > state.maxUploadBytes) {
      status.textContent += ` Warning: larger than the ${bytes(state.maxUploadBytes)} upload limit.`;
    }
  }

  el.audioFile.addEventListener("change", () => {
    const f = el.audioFile.files && el.audioFile.files[0];
    setMedia("audio", f || null, "Audio file");
  });
  el.videoFile.addEventListener("change", () => {
    const f = el.videoFile.files && el.videoFile.files[0];
    setMedia("video", f || null, f && f.type.startsWith("image/") ? "Image" : "Video file");
  });

  // ---------------------------------------------------------------- microphone

  function setMicUi(recording) {
    el.micButton.classList.toggle("recording", recording);
    el.micButton.querySelector(".label").textContent = recording ? "Stop recording" : "Record microphone";
  }

  async function startMic() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia || typeof MediaRecorder === "undefined") {
      el.audioStatus.textContent = "This browser cannot record audio. Upload a file instead.";
      return;
    }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (err) {
      el.audioStatus.textContent = mediaErrorMessage(err, "microphone");
      return;
    }
    const mime = pickMime(["audio/webm;codecs=opus", "audio/webm", "audio/ogg;codecs=opus", "audio/mp4"]);
    const recorder = new MediaRecorder(stream, mime ? { mimeType: mime } : undefined);
    const chunks = [];
    const started = performance.now();
    recorder.addEventListener("dataavailable", (e) => { if (e.data && e.data.size) chunks.push(e.data); });
    recorder.addEventListener("stop", () => {
      clearInterval(state.mic && state.mic.timer);
      stopStream(stream);
      state.mic = null;
      setMicUi(false);
      const type = (recorder.mimeType || mime || "audio/webm").split(";")[0];
      const blob = new Blob(chunks, { type });
      if (!blob.size) {
        el.audioStatus.textContent = "The recording is empty; try again.";
        return;
      }
      const file = new File([blob], `recording.${extensionFor(type, "webm")}`, { type });
      el.audioFile.value = "";
      setMedia("audio", file, "Microphone recording");
    });
    const timer = setInterval(() => {
      const s = (performance.now() - started) / 1000;
      el.audioStatus.textContent = `Recording… ${s.toFixed(0)} s (max ${MAX_MIC_SECONDS} s). Press Stop when done.`;
      if (s >= MAX_MIC_SECONDS) stopMic();
    }, 250);
    state.mic = { recorder, stream, timer };
    recorder.start(250);
    setMicUi(true);
    el.audioStatus.textContent = "Recording… speak now, then press Stop.";
  }

  function stopMic() {
    if (state.mic && state.mic.recorder.state !== "inactive") state.mic.recorder.stop();
  }

  el.micButton.addEventListener("click", () => (state.mic ? stopMic() : startMic()));

  // ---------------------------------------------------------------- webcam

  function setCameraUi(open) {
    el.cameraPanel.hidden = !open;
    el.cameraButton.setAttribute("aria-expanded", String(open));
    el.cameraButton.querySelector(".label").textContent = open ? "Close webcam" : "Use webcam";
  }

  async function openCamera() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      el.videoStatus.textContent = "This browser cannot use a webcam. Upload a file instead.";
      return;
    }
    let stream;
    try {
      // Ask for sound as well so a recorded clip also feeds the audio encoder; fall back to video only.
      stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "user" }, audio: true })
        .catch(() => navigator.mediaDevices.getUserMedia({ video: { facingMode: "user" } }));
    } catch (err) {
      el.videoStatus.textContent = mediaErrorMessage(err, "webcam");
      return;
    }
    state.camera = stream;
    el.cameraView.srcObject = stream;
    setCameraUi(true);
    el.videoStatus.textContent = "Webcam on. Take a snapshot or record a short clip.";
    el.snapshotButton.focus();
  }

  function closeCamera() {
    if (state.clip) state.clip.recorder.stop();
    stopStream(state.camera);
    state.camera = null;
    el.cameraView.srcObject = null;
    setCameraUi(false);
  }

  el.cameraButton.addEventListener("click", () => (state.camera ? closeCamera() : openCamera()));

  el.snapshotButton.addEventListener("click", () => {
    const v = el.cameraView;
    if (!state.camera || !v.videoWidth) {
      el.videoStatus.textContent = "The webcam is not ready yet; try again in a moment.";
      return;
    }
    const canvas = document.createElement("canvas");
    canvas.width = v.videoWidth;
    canvas.height = v.videoHeight;
    canvas.getContext("2d").drawImage(v, 0, 0);
    canvas.toBlob((blob) => {
      if (!blob) return;
      el.videoFile.value = "";
      setMedia("video", new File([blob], "webcam-snapshot.jpg", { type: "image/jpeg" }), "Webcam snapshot");
    }, "image/jpeg", 0.92);
  });

  el.clipButton.addEventListener("click", () => {
    if (!state.camera || state.clip || typeof MediaRecorder === "undefined") return;
    const mime = pickMime(["video/webm;codecs=vp8,opus", "video/webm", "video/mp4"]);
    const recorder = new MediaRecorder(state.camera, mime ? { mimeType: mime } : undefined);
    const chunks = [];
    let left = CLIP_SECONDS;
    recorder.addEventListener("dataavailable", (e) => { if (e.data && e.data.size) chunks.push(e.data); });
    recorder.addEventListener("stop", () => {
      clearInterval(state.clip && state.clip.timer);
      state.clip = null;
      el.clipButton.disabled = false;
      el.clipButton.classList.remove("recording");
      const type = (recorder.mimeType || mime || "video/webm").split(";")[0];
      const blob = new Blob(chunks, { type });
      if (!blob.size) {
        el.videoStatus.textContent = "The clip is empty; try again.";
        return;
      }
      el.videoFile.value = "";
      setMedia("video", new File([blob], `webcam-clip.${extensionFor(type, "webm")}`, { type }), "Webcam clip");
    });
    const timer = setInterval(() => {
      left -= 1;
      if (left <= 0) {
        if (recorder.state !== "inactive") recorder.stop();
      } else {
        el.videoStatus.textContent = `Recording clip… ${left} s`;
      }
    }, 1000);
    state.clip = { recorder, timer };
    el.clipButton.disabled = true;
    el.clipButton.classList.add("recording");
    el.videoStatus.textContent = `Recording clip… ${CLIP_SECONDS} s`;
    recorder.start(250);
  });

  // ---------------------------------------------------------------- errors

  /** Human-readable text for a pydantic / FastAPI `detail` value (string, list of errors or object). */
  function formatDetail(detail) {
    if (detail === undefined || detail === null) return "";
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) {
      return detail.map((d) => {
        if (typeof d === "string") return d;
        const loc = Array.isArray(d.loc) ? d.loc.filter((p) => p !== "body").join(".") : "";
        return loc ? `${loc}: ${d.msg || JSON.stringify(d)}` : d.msg || JSON.stringify(d);
      }).join("; ");
    }
    if (typeof detail === "object") return detail.message || detail.msg || JSON.stringify(detail);
    return String(detail);
  }

  function errorTitle(status) {
    switch (status) {
      case 400: return "The file could not be read";
      case 401: return "An API key is needed";
      case 413: return "The upload is too large";
      case 415: return "Unsupported file type";
      case 422: return "The input is not valid";
      case 429:
      case 503: return "The service is busy";
      default: return status >= 500 ? "The service had a problem" : `Request failed (HTTP ${status})`;
    }
  }

  function errorHint(status, retryAfter) {
    switch (status) {
      case 400: return "It may be corrupt, truncated or not a media file. Try another file or record one here.";
      case 401: return "Enter the service's API key at the top of the page, then try again.";
      case 413: return state.maxUploadBytes
        ? `Uploads are limited to ${bytes(state.maxUploadBytes)}. Trim the recording or pick a shorter clip.`
        : "Trim the recording or pick a shorter clip.";
      case 415: return "Use a common audio (WAV, MP3, OGG, WebM…), video (MP4, WebM…) or image (JPEG, PNG) file.";
      case 422: return "Check the text and files and try again.";
      case 429:
      case 503: return Number(retryAfter) > 0
        ? `Please try again in ${Number(retryAfter)} s.`
        : "Please try again in a moment.";
      default: return status >= 500 ? "Please try again; if it keeps happening, check the server logs." : "";
    }
  }

  function showError(title, message, hint, status) {
    el.error.replaceChildren(
      make("span", { class: "error-icon", "aria-hidden": "true", text: "⚠️" }),
      make("div", {},
        make("p", { class: "error-title", text: title }),
        message ? make("p", { class: "error-message", text: message }) : null,
        hint ? make("p", { class: "error-hint", text: hint }) : null),
    );
    if (status) el.error.dataset.status = String(status);
    else delete el.error.dataset.status;
    el.error.hidden = false;
    el.placeholder.hidden = true;
    revealOutput();
  }

  function clearError() {
    el.error.hidden = true;
    el.error.replaceChildren();
    delete el.error.dataset.status;
  }

  // ---------------------------------------------------------------- rendering

  function renderBars(probabilities, top) {
    el.probabilities.replaceChildren();
    const names = EMOTIONS.filter((e) => e in probabilities)
      .concat(Object.keys(probabilities).filter((e) => !EMOTIONS.includes(e)));
    for (const name of names) {
      const p = Number(probabilities[name]) || 0;
      const fill = make("span", { class: "bar-fill", style: `width:${(Math.max(0, Math.min(1, p)) * 100).toFixed(2)}%` });
      const track = make("span", { class: "bar-track", role: "img", "aria-label": `${name} ${pct(p)}` }, fill);
      const li = make("li", { class: `bar emo-${name}${name === top ? " top" : ""}`, "data-emotion": name },
        make("span", { class: "bar-label" }, make("span", { "aria-hidden": "true", text: `${EMOJI[name] || "•"} ` }), name),
        track,
        make("span", { class: "bar-value", text: pct(p) }));
      el.probabilities.append(li);
    }
  }

  function renderContributions(contributions) {
    el.contribStack.replaceChildren();
    el.contributions.replaceChildren();
    const entries = Object.entries(contributions || {}).sort((a, b) => b[1] - a[1]);
    if (!entries.length) {
      el.contributions.append(make("li", { text: "No modality information." }));
      return;
    }
    for (const [mod, w] of entries) {
      const label = MODALITY_LABEL[mod] || cap(mod);
      el.contribStack.append(make("span", { class: `stack-seg mod-${mod}`,
        style: `flex-grow:${Math.max(0.0001, Number(w) || 0)}`, title: `${label} ${pct(w)}` }));
      el.contributions.append(make("li", { class: `contrib mod-${mod}`, "data-modality": mod },
        make("span", { class: "swatch", "aria-hidden": "true" }),
        make("span", { class: "contrib-name" }, make("span", { "aria-hidden": "true", text: `${MODALITY_ICON[mod] || ""} ` }), label),
        make("span", { class: "contrib-value", text: pct(w) })));
    }
  }

  /** Short notes from what an encoder reports about its input (truncation, duration, frames, face). */
  function modalityNotes(info) {
    const notes = [];
    if (info.truncated === true) notes.push("cut to the model window");
    if (typeof info.characters === "number") notes.push(`${info.characters} characters`);
    if (typeof info.duration_s === "number") notes.push(`${info.duration_s.toFixed(1)} s of audio`);
    if (typeof info.frames === "number") notes.push(`${info.frames} frame${info.frames === 1 ? "" : "s"}`);
    if (info.face_detected === true) notes.push("face found");
    if (info.face_detected === false) notes.push("no face detected");
    if (info.source === "transcript") notes.push("from the transcript");
    return notes.join(" · ");
  }

  /** "decode 40 ms · model 8 ms (batch of 3)" under the latency, when the encoder reports its timings. */
  function latencyNotes(info) {
    const parts = [];
    // Text has no decode step (0 ms): only show a decode time that is there.
    if (Number(info.decode_ms) >= 0.05) parts.push(`decode ${ms(info.decode_ms)}`);
    if (Number(info.model_ms) >= 0) parts.push(`model ${ms(info.model_ms)}`);
    if (Number(info.batch_size) > 1) parts.push(`batch of ${info.batch_size}`);
    // Keep each part on one line; only break between parts.
    return parts.map((p) => p.replace(/ /g, "\u00a0")).join(" · ");
  }

  function renderPerModality(modalities) {
    const body = el.perModality.tBodies[0];
    body.replaceChildren();
    const order = ["text", "audio", "video"];
    const mods = Object.keys(modalities || {}).sort((a, b) => order.indexOf(a) - order.indexOf(b));
    for (const mod of mods) {
      const m = modalities[mod] || {};
      const notes = modalityNotes(m);
      const emotionCell = make("td", {},
        make("span", { "aria-hidden": "true", text: `${EMOJI[m.emotion] || ""} ` }),
        m.emotion || "—",
        notes ? make("span", { class: "notes", text: notes }) : null);
      body.append(make("tr", { "data-modality": mod },
        make("th", { scope: "row" }, make("span", { "aria-hidden": "true", text: `${MODALITY_ICON[mod] || ""} ` }),
          MODALITY_LABEL[mod] || cap(mod)),
        emotionCell,
        make("td", { "data-label": "Confidence", text: m.confidence === undefined ? "—" : pct(m.confidence) }),
        make("td", { "data-label": "Latency" }, ms(m.latency_ms),
          latencyNotes(m) ? make("span", { class: "notes", text: latencyNotes(m) }) : null)));
    }
    if (!mods.length) body.append(make("tr", {}, make("td", { colspan: "4", text: "—" })));
  }

  function renderDropped(dropped) {
    const entries = Object.entries(dropped || {});
    el.dropped.replaceChildren();
    el.droppedBlock.hidden = entries.length === 0;
    for (const [mod, reason] of entries) {
      el.dropped.append(make("li", { "data-modality": mod },
        make("strong", { text: `${MODALITY_LABEL[mod] || cap(mod)}: ` }),
        formatDetail(reason) || "dropped"));
    }
  }

  /** The words of the uploaded audio or video (`transcript` of the answer), or nothing. */
  function renderTranscript(transcript) {
    el.transcriptBlock.hidden = !transcript;
    if (!transcript) return;
    const text = String(transcript.text || "").trim();
    el.transcriptText.textContent = text || "No speech found.";
    el.transcriptText.dataset.empty = String(!text);
    const parts = [];
    if (transcript.language) parts.push(`language: ${transcript.language}`);
    if (typeof transcript.duration_s === "number") parts.push(`${transcript.duration_s.toFixed(1)} s of audio`);
    if (transcript.latency_ms !== undefined) parts.push(`transcribed in ${ms(transcript.latency_ms)}`);
    if (transcript.fused) parts.push("used as the text");
    el.transcriptMeta.textContent = parts.join(" · ");
  }

  function renderResult(data) {
    const emotion = String(data.emotion || "");
    el.emoji.textContent = EMOJI[emotion] || "❓";
    el.emotion.textContent = emotion;
    el.emotion.dataset.emotion = emotion;
    el.result.className = `result emo-${emotion}`;
    el.confidence.textContent = pct(data.confidence);
    renderBars(data.probabilities || {}, emotion);
    renderContributions(data.contributions);
    renderPerModality(data.modalities);
    renderTranscript(data.transcript);
    renderDropped(data.dropped);
    const meta = [];
    if (data.model_version) meta.push(`Model ${data.model_version}`);
    if (data.latency_ms !== undefined) meta.push(`answered in ${ms(data.latency_ms)}`);
    el.meta.textContent = meta.join(" · ");
    el.placeholder.hidden = true;
    el.result.hidden = false;
    revealOutput();

    const used = Object.keys(data.contributions || {}).map((m) => MODALITY_LABEL[m] || m).join(", ");
    const droppedNames = Object.keys(data.dropped || {});
    el.live.textContent = `Detected emotion: ${emotion}, ${pct(data.confidence)} confidence` +
      (used ? `, from ${used}` : "") + (droppedNames.length ? `. Not used: ${droppedNames.join(", ")}.` : ".");
  }

  /** On narrow screens the result sits below the form: bring it into view if it is off screen. */
  function revealOutput() {
    const top = el.output.getBoundingClientRect().top;
    if (top > window.innerHeight * 0.6 || top < 0) {
      const smooth = !window.matchMedia("(prefers-reduced-motion: reduce)").matches;
      el.output.scrollIntoView({ behavior: smooth ? "smooth" : "auto", block: "start" });
    }
  }

  // ---------------------------------------------------------------- submit

  function setBusy(busy) {
    state.busy = busy;
    el.analyze.disabled = busy;
    el.analyze.classList.toggle("busy", busy);
    el.analyze.querySelector(".label").textContent = busy ? "Analysing…" : "Analyze emotion";
    el.loading.hidden = !busy;
    el.output.setAttribute("aria-busy", String(busy));
    if (busy) el.placeholder.hidden = true;
  }

  async function submit() {
    if (state.busy) return;
    if (state.mic) {
      el.audioStatus.textContent = "Stop the recording first.";
      el.micButton.focus();
      return;
    }
    clearError();
    const text = el.text.value.trim();
    const body = new FormData();
    if (text) body.append("text", text);
    if (state.audio) body.append("audio", state.audio, state.audio.name);
    if (state.video) body.append("video", state.video, state.video.name);
    body.append("transcribe", el.transcribeMode.value);
    if (!text && !state.audio && !state.video) {
      el.result.hidden = true;
      showError("Nothing to analyse", "Type some text, add an audio recording, or add a video or photo.", "");
      el.text.focus();
      return;
    }

    setBusy(true);
    el.live.textContent = "Analysing…";
    const apiKeyWasSent = Boolean(apiKey());
    let response;
    try {
      const headers = { Accept: "application/json", ...authHeaders() };
      response = await fetch(PREDICT_URL, { method: "POST", body, headers });
    } catch (err) {
      setBusy(false);
      el.result.hidden = true;
      const big = [state.audio, state.video].some((f) => f && state.maxUploadBytes && f.size > state.maxUploadBytes);
      showError(big ? errorTitle(413) : "Could not reach the service",
        big ? "The server closed the connection during the upload." : String((err && err.message) || err),
        big ? errorHint(413) : "Check that the service is running, then try again.");
      el.live.textContent = "";
      return;
    }
    let data = null;
    try {
      data = await response.json();
    } catch (_) {
      data = null;
    }
    setBusy(false);
    if (response.status === 401) {
      storeKey("");
      askForKey(apiKeyWasSent ? "The API key was not accepted; enter a valid one." : "");
    }
    if (!response.ok || !data || typeof data !== "object" || !("emotion" in data)) {
      el.result.hidden = true;
      const status = response.ok ? 502 : response.status;
      const detail = data && typeof data === "object" ? formatDetail(data.detail) : "";
      showError(errorTitle(status), detail || response.statusText || "Unexpected answer from the server.",
        errorHint(status, response.headers.get("Retry-After")), status);
      el.live.textContent = "";
      return;
    }
    renderResult(data);
  }

  el.form.addEventListener("submit", (e) => {
    e.preventDefault();
    submit();
  });

  el.text.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      submit();
    }
  });

  el.form.addEventListener("reset", () => {
    stopMic();
    if (state.camera) closeCamera();
    setMedia("audio", null);
    setMedia("video", null);
    clearError();
    el.result.hidden = true;
    el.placeholder.hidden = false;
    el.live.textContent = "";
    setTimeout(() => el.text.focus(), 0);
  });

  window.addEventListener("pagehide", () => {
    stopMic();
    stopStream(state.camera);
    stopLive();
  });

  // ---------------------------------------------------------------- live mode

  /*
   * Live mode streams the microphone (AudioContext -> 16 kHz mono PCM16) and the webcam (canvas -> JPEG) over
   * the WebSocket `ws/stream` (protocol in serve/stream.py: binary 0x01 + PCM, 0x02 + JPEG; JSON text
   * {"type": "text"}, {"type": "transcribe"}) and draws each update on a one-minute timeline, with the words of
   * the last window under it.
   */
  const LIVE_URL = "ws/stream";
  const LIVE_WINDOW_S = 60;
  const LIVE_FPS = 4;
  const LIVE_SAMPLE_RATE = 16000;
  const LIVE_MAX_BUFFERED = 1 << 20; // bytes waiting in the socket: above this, frames are skipped
  const LIVE_FRAME_SIDE = 320;
  const SVG_NS = "http://www.w3.org/2000/svg";
  const live = {
    ws: null, stream: null, audio: null, frameTimer: null, textTimer: null, points: [], skipped: 0,
  };
  const liveEl = {
    button: $("live-button"),
    status: $("live-status"),
    view: $("live-view"),
    emoji: $("live-emoji"),
    emotion: $("live-emotion"),
    confidence: $("live-confidence"),
    modalities: $("live-modalities"),
    timeline: $("live-timeline"),
    transcript: $("live-transcript"),
  };

  function setLiveUi(on) {
    liveEl.button.classList.toggle("recording", on);
    liveEl.button.setAttribute("aria-pressed", String(on));
    liveEl.button.querySelector(".label").textContent = on ? "Stop live" : "Start live";
    liveEl.view.hidden = !on;
  }

  function liveSocketUrl() {
    const url = new URL(LIVE_URL, window.location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    const key = apiKey();
    if (key) url.searchParams.set("api_key", key); // browsers cannot set headers on a WebSocket
    return url.toString();
  }

  function liveSend(data) {
    if (live.ws && live.ws.readyState === WebSocket.OPEN) live.ws.send(data);
  }

  function typed(kind, bytes) {
    const out = new Uint8Array(bytes.byteLength + 1);
    out[0] = kind;
    out.set(new Uint8Array(bytes), 1);
    return out;
  }

  /** Float samples at `rate` -> 16 kHz PCM16 (averaging decimation; the context usually runs at 16 kHz already). */
  function toPcm16(input, rate) {
    const ratio = rate / LIVE_SAMPLE_RATE;
    const n = Math.floor(input.length / ratio);
    const out = new Int16Array(n);
    for (let i = 0; i < n; i++) {
      const from = Math.floor(i * ratio);
      const to = Math.max(from + 1, Math.floor((i + 1) * ratio));
      let sum = 0;
      for (let j = from; j < to; j++) sum += input[j];
      const v = Math.max(-1, Math.min(1, sum / (to - from)));
      out[i] = v < 0 ? v * 0x8000 : v * 0x7fff;
    }
    return out;
  }

  function startLiveAudio(stream) {
    if (!stream.getAudioTracks().length) return null;
    const Ctx = window.AudioContext || window.webkitAudioContext;
    let ctx;
    try {
      ctx = new Ctx({ sampleRate: LIVE_SAMPLE_RATE });
    } catch (_) {
      ctx = new Ctx(); // resampled below
    }
    const source = ctx.createMediaStreamSource(stream);
    const processor = ctx.createScriptProcessor(4096, 1, 1);
    const mute = ctx.createGain();
    mute.gain.value = 0;
    processor.onaudioprocess = (e) => {
      const pcm = toPcm16(e.inputBuffer.getChannelData(0), ctx.sampleRate);
      if (live.ws && live.ws.bufferedAmount < LIVE_MAX_BUFFERED) liveSend(typed(0x01, pcm.buffer));
    };
    source.connect(processor);
    processor.connect(mute);
    mute.connect(ctx.destination);
    ctx.resume().catch(() => {});
    return { ctx, source, processor };
  }

  function startLiveFrames(stream) {
    if (!stream.getVideoTracks().length) return;
    liveEl.view.srcObject = stream;
    const canvas = document.createElement("canvas");
    live.frameTimer = setInterval(() => {
      const v = liveEl.view;
      if (!v.videoWidth || !live.ws || live.ws.readyState !== WebSocket.OPEN) return;
      if (live.ws.bufferedAmount > LIVE_MAX_BUFFERED) { // the network is behind: drop this frame
        live.skipped += 1;
        return;
      }
      const scale = Math.min(1, LIVE_FRAME_SIDE / Math.max(v.videoWidth, v.videoHeight));
      canvas.width = Math.round(v.videoWidth * scale);
      canvas.height = Math.round(v.videoHeight * scale);
      canvas.getContext("2d").drawImage(v, 0, 0, canvas.width, canvas.height);
      canvas.toBlob((blob) => {
        if (blob) blob.arrayBuffer().then((buf) => liveSend(typed(0x02, buf)));
      }, "image/jpeg", 0.8);
    }, 1000 / LIVE_FPS);
  }

  function sendLiveText() {
    liveSend(JSON.stringify({ type: "text", text: el.text.value.trim().slice(0, 5000) }));
  }

  /** Ask the stream for (or stop) each window's words, as the page's "words spoken" choice says. */
  function sendLiveTranscribe() {
    liveSend(JSON.stringify({ type: "transcribe", mode: el.transcribeMode.value }));
  }

  function renderLiveTranscript(msg) {
    const node = liveEl.transcript;
    if (msg.transcript) {
      const text = String(msg.transcript.text || "").trim();
      node.textContent = text || "(no speech)";
      node.dataset.state = text ? "words" : "silence";
      node.dataset.seq = String(msg.seq);
    } else if (msg.dropped && msg.dropped.transcript) {
      node.textContent = `Not transcribed: ${formatDetail(msg.dropped.transcript)}`;
      node.dataset.state = "dropped";
    } else if (el.transcribeMode.value === "off") {
      node.textContent = "Transcription is off.";
      node.dataset.state = "off";
    }
  }

  async function startLive() {
    if (live.ws) return;
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia || typeof WebSocket === "undefined") {
      liveEl.status.textContent = "This browser cannot stream the microphone and webcam.";
      return;
    }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: true, video: { facingMode: "user" } })
        .catch(() => navigator.mediaDevices.getUserMedia({ audio: true }))
        .catch(() => navigator.mediaDevices.getUserMedia({ video: true }));
    } catch (err) {
      liveEl.status.textContent = mediaErrorMessage(err, "microphone and webcam");
      return;
    }
    live.stream = stream;
    live.points = [];
    live.skipped = 0;
    renderTimeline();
    setLiveUi(true);
    liveEl.status.textContent = "Connecting…";
    const ws = new WebSocket(liveSocketUrl());
    ws.binaryType = "arraybuffer";
    live.ws = ws;
    ws.addEventListener("open", () => {
      liveEl.status.textContent = "Live: waiting for the first answer…";
      sendLiveText();
      sendLiveTranscribe();
      live.audio = startLiveAudio(stream);
      startLiveFrames(stream);
    });
    ws.addEventListener("message", (e) => {
      let msg;
      try {
        msg = JSON.parse(e.data);
      } catch (_) {
        return;
      }
      if (msg.type === "update") onLiveUpdate(msg);
      else if (msg.type === "error") liveEl.status.textContent = `Live: no answer for this moment (${formatDetail(msg.detail)})`;
    });
    ws.addEventListener("close", (e) => {
      const mine = live.ws === ws;
      stopLiveCapture();
      if (!mine) return;
      live.ws = null;
      setLiveUi(false);
      if (e.code === 1000 || e.code === 1005) liveEl.status.textContent = "Live stopped.";
      else liveEl.status.textContent = `Live stream closed (${e.code})${e.reason ? `: ${e.reason}` : ""}.`;
      if (e.code === 1008 && /API key/i.test(e.reason || "")) askForKey("Live mode needs a valid API key.");
    });
  }

  function stopLiveCapture() {
    clearInterval(live.frameTimer);
    live.frameTimer = null;
    if (live.audio) {
      live.audio.processor.onaudioprocess = null;
      live.audio.source.disconnect();
      live.audio.processor.disconnect();
      live.audio.ctx.close().catch(() => {});
      live.audio = null;
    }
    stopStream(live.stream);
    live.stream = null;
    liveEl.view.srcObject = null;
  }

  function stopLive() {
    const ws = live.ws;
    stopLiveCapture();
    if (ws) {
      live.ws = null;
      ws.close(1000, "stopped by the user");
    }
    setLiveUi(false);
    if (ws) liveEl.status.textContent = "Live stopped.";
  }

  function onLiveUpdate(msg) {
    const now = performance.now() / 1000;
    const mods = {};
    for (const [m, r] of Object.entries(msg.modalities || {})) mods[m] = Number(r.confidence) || 0;
    live.points.push({ t: now, seq: msg.seq, emotion: msg.emotion, confidence: Number(msg.confidence) || 0, mods });
    live.points = live.points.filter((p) => p.t >= now - LIVE_WINDOW_S);
    const emotion = String(msg.emotion || "");
    liveEl.emoji.textContent = EMOJI[emotion] || "❓";
    liveEl.emotion.textContent = emotion;
    liveEl.emotion.dataset.emotion = emotion;
    liveEl.emotion.className = `verdict-emotion emo-${emotion}`;
    liveEl.confidence.textContent = `${pct(msg.confidence)} confidence`;
    liveEl.modalities.replaceChildren(...Object.entries(msg.contributions || {}).map(([m, w]) =>
      make("li", { class: `mod-${m}`, "data-modality": m },
        `${MODALITY_LABEL[m] || cap(m)}: ${msg.modalities && msg.modalities[m] ? msg.modalities[m].emotion : "—"} ` +
        `(${pct(mods[m])}), weight ${pct(w)}`)));
    const win = msg.window || {};
    const span = Number(win.end_s) - Number(win.start_s);
    liveEl.status.textContent = `Live · update ${msg.seq} · ${Number.isFinite(span) ? span.toFixed(1) : "?"} s window` +
      `${win.frames ? `, ${win.frames} frames` : ""} · ${ms(msg.update_ms)}` +
      (msg.dropped_frames || live.skipped ? ` · frames dropped: ${msg.dropped_frames + live.skipped}` : "");
    renderTimeline();
    renderLiveTranscript(msg);
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    return node;
  }

  function renderTimeline() {
    const W = 600, H = 180, PAD = 8;
    const now = performance.now() / 1000;
    const x = (t) => (PAD + ((t - (now - LIVE_WINDOW_S)) / LIVE_WINDOW_S) * (W - 2 * PAD)).toFixed(1);
    const y = (c) => (H - PAD - c * (H - 2 * PAD)).toFixed(1);
    const nodes = [];
    for (const level of [0, 0.5, 1]) nodes.push(svg("line", { class: "grid", x1: 0, x2: W, y1: y(level), y2: y(level) }));
    for (const m of ["text", "audio", "video"]) {
      const pts = live.points.filter((p) => m in p.mods).map((p) => `${x(p.t)},${y(p.mods[m])}`);
      if (pts.length) nodes.push(svg("polyline", { class: `series mod-${m}`, "data-series": m, points: pts.join(" ") }));
    }
    if (live.points.length) {
      nodes.push(svg("polyline", { class: "series fused", "data-series": "fused",
        points: live.points.map((p) => `${x(p.t)},${y(p.confidence)}`).join(" ") }));
    }
    for (const p of live.points) {
      const dot = svg("circle", { class: `point emo-${p.emotion}`, cx: x(p.t), cy: y(p.confidence), r: 4,
        "data-seq": p.seq, "data-emotion": p.emotion });
      const title = svg("title", {});
      title.textContent = `${p.emotion} ${pct(p.confidence)}`;
      dot.append(title);
      nodes.push(dot);
    }
    liveEl.timeline.replaceChildren(...nodes);
    liveEl.timeline.dataset.points = String(live.points.length);
  }

  liveEl.button.addEventListener("click", () => (live.ws ? stopLive() : startLive()));
  el.transcribeMode.addEventListener("change", sendLiveTranscribe);
  el.text.addEventListener("input", () => {
    if (!live.ws) return;
    clearTimeout(live.textTimer);
    live.textTimer = setTimeout(sendLiveText, 400);
  });

  // ---------------------------------------------------------------- health

  /** Find an upload limit in the health answer if the server publishes one (any of a few likely names). */
  function findUploadLimit(obj, depth = 0) {
    if (!obj || typeof obj !== "object" || depth > 3) return null;
    for (const [k, v] of Object.entries(obj)) {
      if (typeof v === "number" && /upload/i.test(k)) {
        if (/mb$/i.test(k)) return v * 1024 * 1024;
        if (/bytes$/i.test(k)) return v;
      }
      if (v && typeof v === "object") {
        const found = findUploadLimit(v, depth + 1);
        if (found) return found;
      }
    }
    return null;
  }

  /** Show the service's state; true when predictions can be sent (no key needed, or the key is accepted). */
  async function checkHealth() {
    try {
      const keySent = Boolean(apiKey());
      const r = await fetch(HEALTH_URL, { headers: { Accept: "application/json", ...authHeaders() } });
      const data = await r.json().catch(() => ({}));
      if (data.api_key_required && !data.models) { // liveness only: no key, or a key that is not valid
        if (keySent) storeKey("");
        askForKey(keySent ? "The API key was not accepted; enter a valid one." : "");
        return false;
      }
      el.keyForm.hidden = true;
      el.forgetKey.hidden = !data.api_key_required || !apiKey();
      state.maxUploadBytes = findUploadLimit(data);
      const status = String(data.status || (r.ok ? "ok" : "unavailable"));
      const ready = r.ok && /^(ok|ready|healthy|up)$/i.test(status);
      el.health.dataset.state = ready ? "ok" : "warn";
      let models = "";
      if (data.models && typeof data.models === "object") {
        const loaded = Array.isArray(data.models)
          ? data.models
          : Object.entries(data.models).filter(([, v]) => v && (v === true || v.loaded !== false)).map(([k]) => k);
        if (loaded.length) models = ` · ${loaded.join(", ")}`;
      }
      el.healthText.textContent = ready ? `Service ready${models}` : `Service ${status}`;
      return true;
    } catch (_) {
      el.health.dataset.state = "down";
      el.healthText.textContent = "Service unreachable";
      return false;
    }
  }

  checkHealth();
})();
