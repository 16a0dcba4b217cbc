// The waiting page: follows its deployment's events and moves on to the app
// (the same URL) once Pipes says a request would be served.

const page = document.querySelector("[data-deployment]");
const phase = page.querySelector("[data-phase]");
const elapsed = page.querySelector("[data-elapsed]");
const expected = page.querySelector("[data-expected]");
const bar = page.querySelector("progress");
const failure = page.querySelector("[data-failure]");
const since = Date.now() - Number(page.dataset.elapsedMs || 0);

const seconds = (ms) => `${(ms / 1000).toFixed(1)} s`;
const megabytes = (bytes) => `${(bytes / 1e6).toFixed(1)} MB`;
const phases = { pull: "pulling the image", create: "creating the container", start: "starting the container", probe: "waiting for it to answer" };
const next = { pull: "create", create: "start", start: "probe" };

const tick = setInterval(() => { elapsed.textContent = seconds(Date.now() - since); }, 200);

function show(state) {
  page.dataset.state = state;
}

function fail(error) {
  clearInterval(tick);
  show("failed");
  phase.textContent = "the start failed";
  bar.hidden = true;
  failure.hidden = false;
  failure.querySelector("[data-message]").textContent = error.message || error.error;
  const logs = error.logs || [];
  const pre = failure.querySelector("pre");
  pre.textContent = logs.join("\n");
  pre.hidden = logs.length === 0;
}

const events = new EventSource("/__proxyapi/events");
const on = (name, handle) => events.addEventListener(name, (e) => handle(JSON.parse(e.data)));

on("status", (d) => {
  show(d.state);
  if (d.expected_ms) expected.textContent = `last start took ${seconds(d.expected_ms)}`;
  if (d.state === "failed" && d.error) fail(d.error);
});
on("starting", (d) => {
  show("starting");
  if (d.expected_ms) expected.textContent = `last start took ${seconds(d.expected_ms)}`;
});
on("phase", (d) => {
  const upcoming = next[d.phase];
  if (upcoming) phase.textContent = phases[upcoming];
  // A service beside the app (service:db) is ready; the app starts after the last.
  if (d.phase.startsWith("service:")) phase.textContent = `service ${d.phase.slice(8)} is ready`;
  if (d.phase === "pull") bar.hidden = true;
});
on("pulling", (d) => {
  phase.textContent = `${phases.pull}: ${megabytes(d.done_bytes)} of ${megabytes(d.total_bytes)}`;
  bar.hidden = false;
  bar.max = d.total_bytes || 1;
  bar.value = d.done_bytes;
});
on("failed", (d) => {
  events.close();
  fail(d.error);
});
on("ready", () => {
  events.close();
  clearInterval(tick);
  show("running");
  phase.textContent = "ready";
  // The same URL again: this time the request is served by the app.
  location.replace(location.href);
});
