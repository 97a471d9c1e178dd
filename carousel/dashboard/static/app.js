// Carousel dashboard: one live stream (Server-Sent Events read with fetch, so the
// token can travel in the Authorization header), plain DOM updates, plain SVG charts.
// Everything from the server is written with textContent: no HTML is ever parsed from data.
"use strict";

const COLORS = ["#2457a6", "#1b7f3b", "#a05a00", "#7b1fa2", "#00838f", "#b3261e", "#5d4037", "#455a64", "#c2185b"];
const SPAN = 900; // seconds of history the charts show
let token = sessionStorage.getItem("carousel-token") || "";
let history = [];
let doc = null;
let actionsAllowed = false;

const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function authHeaders(extra) {
  const h = Object.assign({}, extra || {});
  if (token) h["Authorization"] = "Bearer " + token;
  return h;
}

function ago(t) {
  if (!t) return "–";
  const s = Math.max(0, Date.now() / 1000 - t);
  if (s < 120) return Math.round(s) + " s ago";
  if (s < 7200) return Math.round(s / 60) + " min ago";
  return (s / 3600).toFixed(1) + " h ago";
}

function fmt(v, digits) {
  if (v === null || v === undefined) return "–";
  return Number(v).toFixed(digits === undefined ? 1 : digits);
}

function pct(v) { return v === null || v === undefined ? "–" : Math.round(v * 100) + "%"; }

function notice(text, good) {
  const n = $("notice");
  n.hidden = !text;
  n.textContent = text || "";
  n.className = good ? "notice good" : "notice";
}

// --- the live stream ------------------------------------------------------------------

async function stream() {
  let backoff = 500;
  for (;;) {
    try {
      const resp = await fetch("/api/events", { headers: authHeaders(), cache: "no-store" });
      if (resp.status === 401) {
        setConn("token needed", "bad");
        notice("This dashboard needs the admin token to show the cluster: enter it above.");
        await waitForToken();
        continue;
      }
      if (!resp.ok || !resp.body) throw new Error("HTTP " + resp.status);
      setConn("live", "ok");
      backoff = 500;
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          handleEvent(buf.slice(0, cut));
          buf = buf.slice(cut + 2);
        }
      }
    } catch (err) {
      // fall through to reconnect
    }
    setConn("reconnecting…", "warn");
    await new Promise((r) => setTimeout(r, backoff));
    backoff = Math.min(backoff * 2, 5000);
  }
}

let tokenWaiter = null;
function waitForToken() { return new Promise((r) => { tokenWaiter = r; }); }

function handleEvent(block) {
  let kind = "message";
  let data = "";
  for (const line of block.split("\n")) {
    if (line.startsWith("event: ")) kind = line.slice(7);
    else if (line.startsWith("data: ")) data += line.slice(6);
  }
  if (!data) return;
  const msg = JSON.parse(data);
  if (kind === "snapshot") {
    history = msg.history || [];
    actionsAllowed = !!(msg.config && msg.config.actions);
    for (const w of document.querySelectorAll(".window")) w.textContent = msg.config ? msg.config.window : 60;
  } else if (msg.points) {
    history = history.concat(msg.points);
    const cutoff = Date.now() / 1000 - SPAN;
    while (history.length && history[0].t < cutoff) history.shift();
  }
  doc = msg;
  render();
}

function setConn(text, cls) {
  const c = $("conn");
  c.textContent = text;
  c.className = "pill " + cls;
}

// --- rendering ------------------------------------------------------------------------

function render() {
  if (!doc) return;
  // When the data first showed, from the navigation's start: what "loads in under 1 s" measures.
  if (!window.carouselFirstRender) window.carouselFirstRender = performance.now();
  renderSummary();
  renderNodes();
  renderDns();
  renderEdges();
  renderBans();
  renderActions();
  renderCharts();
  $("updated").textContent = "Updated " + new Date(doc.t * 1000).toLocaleTimeString();
}

function pill(text, cls, id) {
  const li = el("li", text, "pill " + (cls || ""));
  if (id) li.id = id;
  return li;
}

function renderSummary() {
  const s = $("summary");
  const conn = $("conn");
  s.replaceChildren(conn);
  const edges = doc.nodes.filter((n) => n.service === "edge");
  const healthy = edges.filter((n) => n.state === "healthy").length;
  s.append(pill(healthy + "/" + edges.length + " edges healthy", healthy >= 2 ? "ok" : healthy ? "warn" : "bad"));
  s.append(pill(doc.registry.ok ? "registry ok" : "registry unreachable", doc.registry.ok ? "ok" : "bad"));
  const etcd = doc.nodes.filter((n) => n.service === "etcd");
  for (const e of etcd) {
    const leader = e.checks && e.checks.has_leader;
    s.append(pill(e.node + (e.state !== "healthy" ? " down" : leader ? " has a leader" : " no leader"), leader ? "ok" : "bad"));
  }
  if (doc.dns.last_known_state) s.append(pill("dnsd serving last-known state", "warn"));
  s.append(pill(fmt(doc.dns.qps) + " DNS q/s"));
}

function actionButton(label, onClick, testid) {
  const b = el("button", label);
  b.type = "button";
  b.disabled = !actionsAllowed || !token;
  b.title = !actionsAllowed ? "this dashboard is read-only" : !token ? "enter the admin token first" : "";
  if (testid) b.dataset.testid = testid;
  b.addEventListener("click", onClick);
  return b;
}

function renderNodes() {
  const body = $("nodes").tBodies[0];
  const rows = [];
  for (const n of doc.nodes) {
    const tr = el("tr");
    tr.dataset.node = n.node;
    tr.dataset.service = n.service;
    tr.append(el("td", n.node), el("td", n.service), el("td", n.address || "–"));
    const st = el("td");
    const badge = el("span", n.state, "state " + n.state);
    badge.dataset.state = n.state;
    st.append(badge);
    tr.append(st);
    tr.append(el("td", n.ttl_left === null || n.ttl_left === undefined ? "–" : n.ttl_left + " s", "num"));
    tr.append(el("td", ago(n.last_change)));
    let checks = "–";
    if (n.checks && n.service === "etcd") checks = n.checks.is_leader ? "leader" : "follower";
    else if (n.checks) checks = (n.checks.healthy ? "passing" : "failing") + (n.checks.last_check ? ": " + n.checks.last_check : "");
    else if (n.agent_error) checks = "agent: " + n.agent_error;
    if (n.maintenance_reason) checks += " — " + n.maintenance_reason;
    tr.append(el("td", checks, "checks"));
    const act = el("td");
    if (n.service === "edge" || n.service === "app" || n.service === "-") {
      const drained = n.state === "draining" || n.state === "maintenance";
      act.append(drained
        ? actionButton("Undrain", () => act_("undrain", { node: n.node }), "undrain-" + n.node)
        : actionButton("Drain", () => act_("drain", { node: n.node, reason: "" }), "drain-" + n.node));
    }
    tr.append(act);
    rows.push(tr);
  }
  body.replaceChildren(...rows);
}

function renderDns() {
  const d = doc.dns;
  $("dns-qps").textContent = fmt(d.qps);
  $("dns-rrl").textContent = fmt(d.rrl_drops_per_s);
  $("dns-rrl-total").textContent = "(" + Math.round(d.rrl_drops) + " in all)";
  $("dns-lks").textContent = d.last_known_state ? "memory" : "etcd";
  $("dns-lks").className = "big " + (d.last_known_state ? "warn" : "");
  const items = d.first_place.map((s) => {
    const li = el("li");
    li.dataset.node = s.node;
    const bar = el("div", null, "bar");
    bar.style.width = Math.round(s.share * 100) + "%";
    const wrap = el("div");
    wrap.append(bar);
    li.append(el("span", s.node + " "), wrap, el("span", pct(s.share), "num"));
    return li;
  });
  $("shares").replaceChildren(...(items.length ? items : [el("li", "no answers in the window yet", "muted")]));
  $("dns-servers").replaceChildren(...d.servers.map((s) => el("li",
    s.name + " (" + s.url + "): " + (!s.scraped ? "not reachable " + (s.error || "") :
      s.last_known_state ? "serving its last-known state, etcd last seen " + s.seconds_since_sync + " s ago" : "following etcd"))));
}

function mixBar(mix) {
  const m = el("div", null, "mix");
  m.title = Object.entries(mix).map(([k, v]) => k + " " + pct(v)).join(", ");
  for (const [k, v] of Object.entries(mix)) {
    const s = el("span", null, "c" + k);
    s.style.width = (v * 100) + "%";
    m.append(s);
  }
  return m;
}

function renderEdges() {
  const rows = doc.edges.map((e) => {
    const tr = el("tr");
    tr.dataset.node = e.node;
    tr.append(el("td", e.node));
    if (!e.scraped) {
      const td = el("td", "admin endpoint not reachable: " + (e.error || ""), "muted");
      td.colSpan = 9;
      tr.append(td);
      return tr;
    }
    tr.append(el("td", fmt(e.rps), "num"));
    const mix = el("td");
    mix.append(mixBar(e.status_mix));
    tr.append(mix);
    tr.append(el("td", pct(e.hit_ratio), "num"));
    tr.append(el("td", Math.round(e.upstream_errors) + " (" + fmt(e.upstream_errors_per_s) + "/s)", "num"));
    tr.append(el("td", Math.round(e.queue_depth), "num"));
    tr.append(el("td", Math.round(e.queue_timeouts), "num"));
    tr.append(el("td", Math.round(e.bans), "num"));
    tr.append(el("td", Math.round(e.dos.rejected || 0) + " / " + Math.round(e.dos.blocked || 0), "num"));
    tr.append(el("td", Math.round(e.connections), "num"));
    return tr;
  });
  $("edges").tBodies[0].replaceChildren(...rows);
}

function renderBans() {
  const rows = doc.bans.map((b) => {
    const tr = el("tr");
    tr.dataset.address = b.address;
    tr.append(el("td", b.address), el("td", b.reason), el("td", b.left + " s", "num"), el("td", b.by || "–"));
    const td = el("td");
    td.append(actionButton("Lift", () => act_("unban", { address: b.address }), "unban-" + b.address));
    tr.append(td);
    return tr;
  });
  $("bans").tBodies[0].replaceChildren(...rows);
  $("no-bans").hidden = rows.length > 0;
}

function renderActions() {
  $("actions").replaceChildren(...doc.actions.map((a) => el("li",
    new Date(a.t * 1000).toLocaleTimeString() + " " + a.who + " (" + a.client + ") " + a.action + " " +
    a.target + (a.detail && a.action === "purge" ? " [" + a.detail + "]" : "") + ": " + a.result)));
}

// --- charts: plain SVG polylines over the last 15 minutes ---------------------------------

function drawChart(name, series, fixedMax) {
  const svg = $("chart-" + name);
  const now = Date.now() / 1000;
  // Up to 15 minutes; a dashboard that started a minute ago spreads the minute it has.
  const first = history.length ? history[0].t : now;
  const span = Math.min(SPAN, Math.max(60, now - first));
  let max = fixedMax || 0;
  if (!fixedMax) for (const s of series) for (const p of s.points) if (p[1] > max) max = p[1];
  if (!fixedMax) max = max > 0 ? max * 1.1 : 1;
  const lines = series.map((s, i) => {
    const pl = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    pl.setAttribute("stroke", s.color || COLORS[i % COLORS.length]);
    pl.setAttribute("points", s.points.filter((p) => p[1] !== null && p[1] !== undefined)
      .map((p) => ((p[0] - (now - span)) / span * 300).toFixed(1) + "," + (100 - p[1] / max * 100).toFixed(1)).join(" "));
    return pl;
  });
  svg.replaceChildren(...lines);
  const last = span >= SPAN ? "15 min" : Math.round(span) + " s";
  $("max-" + name).textContent = "last " + last + ", top " + (fixedMax ? pct(fixedMax) : fmt(max / 1.1, 1));
  $("legend-" + name).replaceChildren(...series.map((s, i) => {
    const li = el("li");
    const sw = el("i");
    sw.style.background = s.color || COLORS[i % COLORS.length];
    li.append(sw, document.createTextNode(s.name));
    return li;
  }));
}

function renderCharts() {
  const names = doc.edges.map((e) => e.node);
  const per = (key) => names.map((n) => ({ name: n, points: history.map((p) => [p.t, p.edges[n] ? p.edges[n][key] : null]) }));
  drawChart("rps", per("rps"));
  drawChart("qps", [{ name: "all dnsd", points: history.map((p) => [p.t, p.qps]) }]);
  drawChart("hit", per("hit"), 1);
  const sum = (key) => history.map((p) => [p.t, Object.values(p.edges).reduce((a, e) => a + (e[key] || 0), 0)]);
  drawChart("err", [
    { name: "5xx/s", points: sum("err"), color: "#b3261e" },
    { name: "upstream errors/s", points: sum("up_err"), color: "#a05a00" },
  ]);
}

// --- actions --------------------------------------------------------------------------

async function act_(action, body) {
  try {
    const resp = await fetch("/api/" + action, {
      method: "POST",
      headers: authHeaders({ "Content-Type": "application/json" }),
      body: JSON.stringify(body),
      cache: "no-store",
    });
    const out = await resp.json().catch(() => ({}));
    if (!resp.ok) notice(action + " refused: " + (out.error || "HTTP " + resp.status));
    else notice(action + " " + out.target + ": " + out.result, true);
    return resp.status;
  } catch (err) {
    notice(action + " failed: " + err);
    return 0;
  }
}

$("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  token = $("token").value.trim();
  if (token) sessionStorage.setItem("carousel-token", token);
  else sessionStorage.removeItem("carousel-token");
  $("token").value = "";
  $("token").placeholder = token ? "token set (this tab only)" : "needed for actions";
  notice("");
  if (tokenWaiter) { const w = tokenWaiter; tokenWaiter = null; w(); }
  render();
});

$("purge-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const target = $("purge-target").value.trim();
  if (!target) return;
  act_("purge", { kind: $("purge-kind").value, target: target });
});

if (token) $("token").placeholder = "token set (this tab only)";
stream();
