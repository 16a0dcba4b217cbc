// The dashboard: every deployment the token may see, live from the event
// stream, with its actions. The token stays in sessionStorage and goes out
// as a bearer token only: no cookie, so no cross-site request can act.

const main = document.querySelector("main");
const signIn = document.querySelector("[data-sign-in]");
const signInError = document.querySelector("[data-sign-in-error]");
const signOut = document.querySelector("[data-sign-out]");
const fleet = document.querySelector("[data-fleet]");
const rows = document.querySelector("[data-rows]");
const summary = document.querySelector("[data-summary]");
const panel = document.querySelector("[data-panel]");
const panelTitle = document.querySelector("[data-panel-title]");
const panelBody = document.querySelector("[data-panel-body]");

const KEY = "pipes-token";
const known = new Map(); // deployment -> { row, state, phases, container }
let stream = null;
let tail = null;

// --- the API ---------------------------------------------------------------

const token = () => sessionStorage.getItem(KEY);

function hostOf(deployment) {
  const [user, rest] = deployment.split("/");
  const [repo, tag] = rest.split(":");
  const name = main.dataset.hostPattern.replace("{tag}", tag).replace("{repo}", repo).replace("{user}", user);
  return `${name}.${location.host}`;
}

async function call(method, path, { deployment, body } = {}) {
  const base = deployment ? `${location.protocol}//${hostOf(deployment)}` : "";
  const headers = { Authorization: `Bearer ${token()}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(base + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await response.json().catch(() => ({}));
  return { ok: response.ok, status: response.status, data };
}

// --- formatting ------------------------------------------------------------

const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  node.append(...children);
  return node;
};

function ago(iso) {
  if (!iso) return "—";
  const s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d`;
}

function idle(c) {
  if (!c) return "—";
  if (c.open_connections > 0) return `kept up by ${c.open_connections} open`;
  if (!c.idle_timeout) return "no idle timeout";
  if (!c.idle_at) return `after ${c.idle_timeout}`;
  const s = Math.max(0, Math.round((Date.parse(c.idle_at) - Date.now()) / 1000));
  const action = c.config && c.config.idle_action === "pause" ? "pauses" : "stops";
  return `${action} in ${s} s`;
}

function phases(entry) {
  const p = entry.phases;
  if (!p || Object.keys(p).length === 0) return "—";
  // In the order they were told: pulls, each service (service:db), then the app's.
  return Object.entries(p).map(([k, ms]) => `${k} ${ms} ms`).join(" · ");
}

// --- rows ------------------------------------------------------------------

const ACTIONS = ["stop", "restart", "redeploy", "delete", "logs", "config", "share"];

function row(deployment) {
  let entry = known.get(deployment);
  if (entry) return entry;
  const tr = el("tr", { "data-deployment": deployment, "data-state": "absent" });
  for (const [cell, label] of [["name", "Deployment"], ["state", "State"], ["image", "Image"], ["up", "Up"], ["last", "Last request"], ["open", "Open"], ["idle", "Idle"], ["start", "Last start"], ["actions", "Actions"]]) {
    tr.append(el("td", { "data-cell": cell, "data-label": label }));
  }
  tr.querySelector('[data-cell="name"]').textContent = deployment;
  for (const action of ACTIONS) {
    const button = el("button", { type: "button", "data-action": action }, action);
    button.addEventListener("click", () => act(deployment, action));
    tr.querySelector('[data-cell="actions"]').append(button);
  }
  rows.append(tr);
  entry = { row: tr, state: "absent", phases: {}, container: null };
  known.set(deployment, entry);
  summary.textContent = `${known.size} deployment(s)`;
  return entry;
}

function setState(deployment, state) {
  const entry = row(deployment);
  entry.state = state;
  entry.row.dataset.state = state;
  entry.row.querySelector('[data-cell="state"]').textContent = state;
}

function render(deployment) {
  const entry = row(deployment);
  const c = entry.container;
  const cell = (name) => entry.row.querySelector(`[data-cell="${name}"]`);
  const digest = c && c.container && c.container.digest;
  cell("image").replaceChildren(digest ? el("code", { title: digest }, digest.slice(7, 19)) : "—");
  cell("up").textContent = c && c.container && c.container.running ? ago(c.container.started_at) : "—";
  cell("last").textContent = c && c.last_request_at ? `${ago(c.last_request_at)} ago` : "—";
  cell("open").textContent = c ? String(c.open_connections) : "—";
  cell("idle").textContent = c && c.state === "running" ? idle(c) : "—";
  cell("start").textContent = phases(entry);
  // When it is removed for going unused (expire_after), if it ever is.
  entry.row.dataset.expiresAt = (c && c.expires_at) || "";
  const expires = c && c.expires_at ? ` · expires ${new Date(c.expires_at).toLocaleString()}` : "";
  cell("last").textContent += expires;
}

async function refresh(deployment) {
  const { ok, data } = await call("GET", "/__proxyapi/container", { deployment });
  if (!ok) return;
  const entry = row(deployment);
  entry.container = data;
  setState(deployment, data.state);
  render(deployment);
}

// --- actions ---------------------------------------------------------------

async function act(deployment, action) {
  if (action === "logs") return showLogs(deployment);
  if (action === "config") return editConfig(deployment);
  if (action === "share") return share(deployment);
  if (action === "delete" && !confirm(`Delete the container of ${deployment}? Its config stays.`)) return;
  const [method, path] = {
    stop: ["POST", "/__proxyapi/container/stop"],
    restart: ["POST", "/__proxyapi/container/restart"],
    redeploy: ["POST", "/__proxyapi/container/redeploy"],
    delete: ["DELETE", "/__proxyapi/container"],
  }[action];
  if (action === "restart") setState(deployment, "starting");
  const { ok, data } = await call(method, path, { deployment });
  if (!ok) alert(`${action} ${deployment}: ${data.message || "failed"}`);
  await refresh(deployment);
}

function openPanel(title, ...content) {
  clearInterval(tail);
  panelTitle.textContent = title;
  panelBody.replaceChildren(...content);
  panel.hidden = false;
}

function showLogs(deployment) {
  const pre = el("pre", { "data-logs": deployment });
  openPanel(`Logs of ${deployment}`, pre);
  const poll = async () => {
    const { ok, data } = await call("GET", "/__proxyapi/container/logs?tail=200", { deployment });
    pre.textContent = ok ? data.lines.join("\n") : data.message;
  };
  poll();
  tail = setInterval(poll, 2000);
}

// A share link: opens the deployment without credentials until it expires.
async function share(deployment) {
  const { ok, data } = await call("POST", "/__proxyapi/container/share", { deployment, body: { ttl: "24h" } });
  if (!ok) return openPanel(`Share ${deployment}`, el("p", { class: "bad" }, data.message || "cannot share"));
  const url = el("input", { "data-share-url": "", readonly: "", value: data.url });
  const revoke = el("button", { type: "button", "data-revoke": "" }, "revoke every link");
  const said = el("p", { "data-share-status": "" }, `valid until ${new Date(data.expires).toLocaleString()}`);
  revoke.addEventListener("click", async () => {
    const answer = await call("POST", "/__proxyapi/container/share/revoke", { deployment });
    said.textContent = answer.ok ? "every link of this deployment is revoked" : answer.data.message || "cannot revoke";
  });
  openPanel(`Share ${deployment}`, url, said, revoke);
  url.select();
}

// The config editor: one form per layer; the API's errors land at their field.
const FIELDS = [
  ["port", "number"], ["memory", "text"], ["cpus", "number"], ["pids", "number"],
  ["idle_timeout", "text"], ["idle_action", ["", "stop", "pause"]], ["pause_timeout", "text"],
  ["restart", ["", "no", "on-failure", "always", "unless-stopped"]], ["pull", ["", "missing", "always"]],
  ["watch", "text"], ["health.path", "text"], ["health.timeout", "text"],
  ["env", "lines"], ["cmd", "lines"], ["capabilities", "text"],
  ["noindex", ["", "true", "false"]],
  ["access", ["", "own rules"]], ["access.allow_ips", "text"], ["access.basic", "lines"],
  ["access.forward_auth.url", "text"], ["access.forward_auth.copy_headers", "text"],
];
// What the form edits; every other field of a layer (services, volumes) is
// kept as it was loaded.
const EDITED = ["port", "memory", "cpus", "pids", "idle_timeout", "idle_action", "pause_timeout", "restart", "pull", "watch", "health", "env", "cmd", "capabilities", "noindex", "access"];

function fieldInput(name, kind, value) {
  let input;
  if (Array.isArray(kind)) {
    input = el("select", { name });
    for (const option of kind) input.append(el("option", { value: option }, option || "(default)"));
    input.value = value ?? "";
  } else if (kind === "lines") {
    input = el("textarea", { name });
    input.value = value ?? "";
  } else {
    input = el("input", { name, type: kind === "number" ? "text" : kind, inputmode: kind === "number" ? "decimal" : "text" });
    input.value = value ?? "";
  }
  return el("label", { "data-field": name }, name, input, el("span", { class: "field-error" }));
}

function toForm(config) {
  const c = config || {};
  return {
    port: c.port, memory: c.memory, cpus: c.cpus, pids: c.pids, idle_timeout: c.idle_timeout, idle_action: c.idle_action,
    pause_timeout: c.pause_timeout, restart: c.restart, pull: c.pull, watch: c.watch,
    "health.path": c.health && c.health.path, "health.timeout": c.health && c.health.timeout,
    env: c.env ? Object.entries(c.env).map(([k, v]) => `${k}=${v}`).join("\n") : "",
    cmd: c.cmd ? c.cmd.join("\n") : "",
    capabilities: c.capabilities ? c.capabilities.join(",") : "",
    noindex: c.noindex === undefined ? "" : String(c.noindex),
    access: c.access ? "own rules" : "",
    "access.allow_ips": c.access && c.access.allow_ips ? c.access.allow_ips.join(", ") : "",
    // Hashes, never passwords: the API keeps nothing else.
    "access.basic": c.access && c.access.basic ? Object.entries(c.access.basic).map(([u, h]) => `${u}:${h}`).join("\n") : "",
    "access.forward_auth.url": c.access && c.access.forward_auth ? c.access.forward_auth.url : "",
    "access.forward_auth.copy_headers": c.access && c.access.forward_auth && c.access.forward_auth.copy_headers ? c.access.forward_auth.copy_headers.join(", ") : "",
  };
}

const list = (text) => text.split(",").map((v) => v.trim()).filter(Boolean);

// The layer's `access`, or none (the repository's, else the operator's default).
function accessFromForm(value) {
  const access = {};
  if (value("access.allow_ips")) access.allow_ips = list(value("access.allow_ips"));
  if (value("access.basic")) {
    access.basic = Object.fromEntries(value("access.basic").split("\n").map((l) => l.trim()).filter(Boolean).map((l) => [l.split(":")[0], l.split(":").slice(1).join(":")]));
  }
  if (value("access.forward_auth.url")) {
    access.forward_auth = { url: value("access.forward_auth.url") };
    if (value("access.forward_auth.copy_headers")) access.forward_auth.copy_headers = list(value("access.forward_auth.copy_headers"));
  }
  const any = Object.keys(access).length > 0;
  return value("access") || any ? access : undefined;
}

function fromForm(form, loaded) {
  const value = (name) => form.elements[name].value.trim();
  const config = Object.fromEntries(Object.entries(loaded || {}).filter(([k]) => !EDITED.includes(k)));
  const number = (name) => (value(name) === "" ? undefined : Number.isNaN(Number(value(name))) ? value(name) : Number(value(name)));
  for (const name of ["port", "cpus", "pids"]) if (number(name) !== undefined) config[name] = number(name);
  for (const name of ["memory", "idle_timeout", "idle_action", "pause_timeout", "restart", "pull", "watch"]) if (value(name)) config[name] = value(name);
  if (value("health.path") || value("health.timeout")) {
    config.health = {};
    if (value("health.path")) config.health.path = value("health.path");
    if (value("health.timeout")) config.health.timeout = value("health.timeout");
  }
  if (value("env")) config.env = Object.fromEntries(value("env").split("\n").filter(Boolean).map((l) => [l.split("=")[0], l.split("=").slice(1).join("=")]));
  if (value("cmd")) config.cmd = value("cmd").split("\n").filter(Boolean);
  if (value("capabilities")) config.capabilities = value("capabilities").split(",").map((c) => c.trim()).filter(Boolean);
  if (value("noindex")) config.noindex = value("noindex") === "true";
  const access = accessFromForm(value);
  if (access) config.access = access;
  return config;
}

// A user and password for `access.basic`: the API hashes the password
// (bcrypt), and only the hash goes into the form.
function passwordAdder(form) {
  const user = el("input", { name: "new-user", placeholder: "user", autocomplete: "off" });
  const password = el("input", { name: "new-password", type: "password", placeholder: "password", autocomplete: "new-password" });
  const add = el("button", { type: "button", "data-add-user": "" }, "add user");
  add.addEventListener("click", async () => {
    const error = form.querySelector('[data-field="access.basic"] .field-error');
    error.textContent = "";
    const { ok, data } = await call("POST", "/__proxyapi/password-hash", { body: { password: password.value } });
    if (!ok) {
      error.textContent = data.message || "cannot hash the password";
      return;
    }
    const basic = form.elements["access.basic"];
    basic.value = [basic.value.trim(), `${user.value.trim()}:${data.hash}`].filter(Boolean).join("\n");
    form.elements.access.value = "own rules";
    password.value = "";
  });
  return el("div", { class: "fields", "data-password-adder": "" }, user, password, add);
}

function layerForm(deployment, title, path, config) {
  const values = toForm(config);
  const form = el("form", { "data-layer": path.includes("repository") ? "repository" : "deployment" });
  const fields = el("div", { class: "fields" }, ...FIELDS.map(([name, kind]) => fieldInput(name, kind, values[name])));
  const status = el("p", { "data-status": "" });
  form.append(el("h3", {}, title), fields, passwordAdder(form), el("button", { type: "submit" }, "Save"), status);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    for (const span of form.querySelectorAll(".field-error")) span.textContent = "";
    status.textContent = "saving…";
    const { ok, data } = await call("PUT", path, { deployment, body: fromForm(form, config) });
    if (ok) {
      status.textContent = "saved";
      refresh(deployment);
      return;
    }
    status.textContent = data.message || "refused";
    // The nearest field the form has: access.basic.alice is at access.basic.
    const parts = data.field ? data.field.replace(/\[\d+\]$/, "").split(".") : [];
    let field = null;
    while (parts.length && !field) {
      field = form.querySelector(`[data-field="${parts.join(".")}"]`);
      parts.pop();
    }
    if (field) field.querySelector(".field-error").textContent = data.message;
  });
  return form;
}

async function editConfig(deployment) {
  const [own, repo] = await Promise.all([
    call("GET", "/__proxyapi/container/config", { deployment }),
    call("GET", "/__proxyapi/repository/config", { deployment }),
  ]);
  openPanel(
    `Config of ${deployment}`,
    layerForm(deployment, "This tag (saving recreates its container)", "/__proxyapi/container/config", own.data.config),
    layerForm(deployment, `Repository ${deployment.split(":")[0]} (reaches containers at their next start or restart)`, "/__proxyapi/repository/config", repo.data.config),
  );
}

document.querySelector("[data-close]").addEventListener("click", () => {
  clearInterval(tail);
  panel.hidden = true;
});

// --- the event stream ------------------------------------------------------

function onEvent(name, data) {
  if (name === "deployments") {
    for (const d of data.deployments) {
      setState(d.deployment, d.state);
      refresh(d.deployment);
    }
    return;
  }
  if (!data.deployment) return;
  const entry = row(data.deployment);
  if (name === "starting") {
    entry.phases = {};
    setState(data.deployment, "starting");
  } else if (name === "phase") {
    entry.phases[data.phase] = data.ms;
    render(data.deployment);
  } else if (name === "ready" || name === "failed" || name === "state" || name === "redeployed") {
    refresh(data.deployment);
  }
}

async function follow() {
  stream = new AbortController();
  try {
    const response = await fetch("/__proxyapi/events", { headers: { Authorization: `Bearer ${token()}` }, signal: stream.signal });
    if (!response.ok) return false;
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const name = /^event: (.*)$/m.exec(block);
        const data = /^data: (.*)$/m.exec(block);
        if (name && data) onEvent(name[1], JSON.parse(data[1]));
      }
    }
  } catch (e) {
    if (stream.signal.aborted) return true;
  }
  // The stream ended (Pipes restarted, network): follow again shortly.
  setTimeout(() => token() && follow(), 2000);
  return true;
}

// --- signing in ------------------------------------------------------------

async function start() {
  const { ok, status, data } = await call("GET", "/__proxyapi/deployments");
  if (!ok) {
    sessionStorage.removeItem(KEY);
    signIn.hidden = false;
    signInError.hidden = false;
    signInError.textContent = status === 401 ? "That token is not valid." : data.message || `refused (${status})`;
    return;
  }
  signIn.hidden = true;
  signInError.hidden = true;
  signOut.hidden = false;
  fleet.hidden = false;
  for (const d of data.deployments) setState(d.deployment, d.state);
  summary.textContent = `${known.size} deployment(s)`;
  for (const d of data.deployments) refresh(d.deployment);
  follow();
}

signIn.addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(KEY, signIn.elements.token.value);
  signIn.elements.token.value = "";
  start();
});

signOut.addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  if (stream) stream.abort();
  location.reload();
});

// Countdowns and "ago" move on by themselves.
setInterval(() => { for (const d of known.keys()) render(d); }, 1000);

if (token()) start();
