// Drives Debian's chromium (playwright-core, no downloaded browser) against a running demo's dashboard.
// Started by tests/browser/test_dashboard_browser.py, which passes the demo's addresses in the
// environment, checks the exit status and prints the timings this script writes as its last line.
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const env = process.env;
const URL_ = env.DASHBOARD_URL;            // http://127.0.0.1:PORT/
const TOKEN = env.DASHBOARD_TOKEN;
const [DNS_HOST, DNS_PORT] = env.DNS.split(":");
const EDGE = env.EDGE;                     // "127.0.0.11:PORT": edge1's client listener
const ZONE_HOST = env.WWW;                 // "www.example.test"
const DRAIN_DELAY = Number(env.DRAIN_DELAY) * 1000;
const NODES = env.NODES.split(",");        // every node the page must show
const EDGE2_IP = env.EDGE2_IP;
const ETCD = env.ETCD;                     // "127.0.0.1:PORT", for a ban written through etcd's JSON gateway
const SCREENSHOT = env.SCREENSHOT;
const FLAGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
  "--disable-component-update", "--disable-sync",
];

const timings = {};
const started = Date.now();

function log(msg) { process.stderr.write(`[${((Date.now() - started) / 1000).toFixed(2)}s] ${msg}\n`); }

function check(cond, msg) {
  if (!cond) throw new Error("check failed: " + msg);
}

function dig() {
  const out = execFileSync("dig", [`@${DNS_HOST}`, "-p", DNS_PORT, "+short", "+time=1", "+tries=1", ZONE_HOST],
    { encoding: "utf8", timeout: 5000 });
  return out.split("\n").filter((l) => l.trim());
}

async function until(what, limitMs, probe, stepMs = 50) {
  const t0 = Date.now();
  for (;;) {
    if (await probe()) return Date.now() - t0;
    if (Date.now() - t0 > limitMs) throw new Error(`${what}: not within ${limitMs} ms`);
    await new Promise((r) => setTimeout(r, stepMs));
  }
}

function cacheStatus(path) {
  const [ip, port] = EDGE.split(":");
  const out = execFileSync("curl", ["-s", "-D", "-", "-o", "/dev/null", "--resolve", `${ZONE_HOST}:${port}:${ip}`,
    `http://${ZONE_HOST}:${port}${path}`], { encoding: "utf8", timeout: 5000 });
  const line = out.split("\r\n").find((l) => l.toLowerCase().startsWith("cache-status:")) || "";
  return line.toLowerCase();
}

function curlFrom(address, url) {
  // A banned client's connection is closed at once: curl exits non-zero and prints 000.
  try {
    return execFileSync("curl", ["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3", "--interface", address, url],
      { encoding: "utf8", timeout: 5000 }).trim();
  } catch (err) {
    return String(err.stdout || "000").trim();
  }
}

async function etcdPut(key, value, ttl) {
  const b64 = (s) => Buffer.from(s).toString("base64");
  const lease = await (await fetch(`http://${ETCD}/v3/lease/grant`, { method: "POST", body: JSON.stringify({ TTL: ttl }) })).json();
  const r = await fetch(`http://${ETCD}/v3/kv/put`, { method: "POST", body: JSON.stringify({ key: b64(key), value: b64(value), lease: lease.ID }) });
  check(r.ok, "etcd put " + r.status);
}

const stateOf = (page, node, service) =>
  page.locator(`#nodes tr[data-node="${node}"][data-service="${service}"] .state`).getAttribute("data-state");

const userDataDir = mkdtempSync(join(tmpdir(), "carousel-chromium-"));
let context;
try {
  let t0 = Date.now();
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: env.CHROMIUM || "/usr/bin/chromium",
    headless: false, // the flags above carry --headless themselves, exactly as listed
    args: FLAGS,
    viewport: { width: 1280, height: 900 },
    timeout: 60000,
  });
  timings.browser_start_ms = Date.now() - t0;
  const page = context.pages()[0] || await context.newPage();
  page.setDefaultTimeout(15000);

  // 1. The page loads under 1 s and shows every node, live. The first navigation of a fresh
  // profile also pays for the browser's own start-up work: it is reported, and the bound is
  // checked on the next load, as a user with a running browser sees it.
  t0 = Date.now();
  await page.goto(URL_, { waitUntil: "load" });
  for (const node of NODES) await page.locator(`#nodes tr[data-node="${node}"]`).first().waitFor();
  timings.cold_all_nodes_shown_ms = Date.now() - t0;
  await page.reload({ waitUntil: "load" });
  for (const node of NODES) await page.locator(`#nodes tr[data-node="${node}"]`).first().waitFor();
  const nav = await page.evaluate(() => {
    const n = performance.getEntriesByType("navigation")[0];
    const bytes = performance.getEntriesByType("resource").reduce((a, r) => a + r.transferSize, n.transferSize);
    return { load: n.loadEventEnd - n.startTime, shown: window.carouselFirstRender - n.startTime, bytes };
  });
  timings.page_load_ms = Math.round(nav.load);
  timings.all_nodes_shown_ms = Math.round(nav.shown);
  timings.page_bytes = nav.bytes;
  check(timings.page_load_ms < 1000, `page load ${timings.page_load_ms} ms >= 1000 ms`);
  check(timings.all_nodes_shown_ms < 1000, `all nodes shown after ${timings.all_nodes_shown_ms} ms >= 1000 ms`);
  for (const e of ["edge1", "edge2", "edge3"]) check(await stateOf(page, e, "edge") === "healthy", `${e} healthy`);
  log(`page loaded in ${timings.page_load_ms} ms, ${NODES.length} nodes shown after ${timings.all_nodes_shown_ms} ms`);

  // 2. Without the token: buttons disabled, the API refuses, and another origin cannot act either.
  check(await page.locator('[data-testid="drain-edge2"]').isDisabled(), "drain button disabled without a token");
  const noToken = await page.evaluate(() => fetch("/api/drain", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ node: "edge2" }),
  }).then((r) => r.status));
  check(noToken === 401, `no token -> ${noToken}`);
  const wrongToken = await page.evaluate(() => fetch("/api/drain", {
    method: "POST", headers: { "Content-Type": "application/json", Authorization: "Bearer not-the-token-at-all" },
    body: JSON.stringify({ node: "edge2" }),
  }).then((r) => r.status));
  check(wrongToken === 401, `wrong token -> ${wrongToken}`);
  // localhost and 127.0.0.1 are different origins: a page there holding the token still cannot
  // send the JSON action (the preflight is never granted), and a form post is refused.
  const other = await context.newPage();
  await other.goto(URL_.replace("127.0.0.1", "localhost"), { waitUntil: "load" });
  const crossFetch = await other.evaluate(([target, token]) => fetch(target + "api/drain", {
    method: "POST", headers: { "Content-Type": "application/json", Authorization: "Bearer " + token },
    body: JSON.stringify({ node: "edge2" }),
  }).then((r) => "status " + r.status, (e) => "blocked: " + e.name), [URL_, TOKEN]);
  check(crossFetch.startsWith("blocked"), `cross-origin fetch ${crossFetch}`);
  // What a cross-site <form> can send: text/plain, no token. Whatever the browser reports, it must change nothing.
  const crossForm = await other.evaluate((target) => fetch(target + "api/drain", {
    method: "POST", mode: "no-cors", body: '{"node":"edge2"}', headers: { "Content-Type": "text/plain" },
  }).then((r) => r.type, (e) => "error " + e.name), URL_);
  await other.close();
  await new Promise((r) => setTimeout(r, 300));
  check(await stateOf(page, "edge2", "edge") === "healthy", `edge2 untouched by refused requests (${crossForm})`);
  check(dig().includes(EDGE2_IP), "edge2 still in DNS");
  log("no token / wrong token -> 401, cross-origin fetch blocked, cross-origin form refused");

  // 3. Token in, drain edge2: "draining" on the page, out of dig within the drain delay.
  await page.fill("#token", TOKEN);
  await page.click("#token-form button");
  await page.locator('[data-testid="drain-edge2"]:not([disabled])').waitFor();
  t0 = Date.now();
  await page.click('[data-testid="drain-edge2"]');
  await page.locator('#nodes tr[data-node="edge2"][data-service="edge"] .state[data-state="draining"]').waitFor({ timeout: DRAIN_DELAY });
  timings.drain_shown_ms = Date.now() - t0;
  await until("edge2 out of dig", DRAIN_DELAY, () => !dig().includes(EDGE2_IP));
  timings.drain_out_of_dns_ms = Date.now() - t0;
  check(timings.drain_out_of_dns_ms < DRAIN_DELAY, `out of DNS after ${timings.drain_out_of_dns_ms} ms`);
  await page.locator('#nodes tr[data-node="edge2"][data-service="edge"] .state[data-state="maintenance"]').waitFor({ timeout: DRAIN_DELAY + 3000 });
  timings.drain_to_maintenance_ms = Date.now() - t0;
  log(`drain: draining shown after ${timings.drain_shown_ms} ms, out of dig after ${timings.drain_out_of_dns_ms} ms`);
  await page.locator("#actions li", { hasText: "admin (127.0.0.1) drain edge2: done" }).waitFor();

  // 4. Undrain brings it back, on the page and in dig.
  t0 = Date.now();
  await page.click('[data-testid="undrain-edge2"]');
  await page.locator('#nodes tr[data-node="edge2"][data-service="edge"] .state[data-state="healthy"]').waitFor({ timeout: 5000 });
  timings.undrain_shown_ms = Date.now() - t0;
  await until("edge2 back in dig", 5000, () => dig().includes(EDGE2_IP));
  timings.undrain_in_dns_ms = Date.now() - t0;
  log(`undrain: healthy after ${timings.undrain_shown_ms} ms, back in dig after ${timings.undrain_in_dns_ms} ms`);

  // 5. Purge a URL from the page: the next request is a MISS.
  const path = `/cacheable?v=browser${Date.now()}`;
  cacheStatus(path);
  check(cacheStatus(path).includes("hit"), "second request is a hit");
  const port = EDGE.split(":")[1];
  await page.selectOption("#purge-kind", "url");
  await page.fill("#purge-target", `http://${ZONE_HOST}:${port}${path}`);
  t0 = Date.now();
  await page.click("#purge-form button");
  await page.locator("#notice", { hasText: "purge" }).waitFor();
  check((await page.textContent("#notice")).includes("published"), "purge published");
  timings.purge_answered_ms = Date.now() - t0;
  // Each edge applies the event when its etcd watch delivers it (milliseconds).
  timings.purge_to_miss_ms = await until("MISS after purge", 1000, () => cacheStatus(path).includes("fwd=uri-miss"), 20) + timings.purge_answered_ms;
  log(`purge: answered after ${timings.purge_answered_ms} ms, MISS after ${timings.purge_to_miss_ms} ms`);

  // 6. A ban (written to etcd as an edge would) shows, and "Lift" ends it on every edge.
  const banned = "127.0.0.98";
  await etcdPut(`/carousel/bans/${banned}`, JSON.stringify({ v: 1, address: banned, reason: "browser test", until: Date.now() / 1000 + 120, by: "test" }), 120);
  await page.locator(`#bans tr[data-address="${banned}"]`).waitFor();
  await until("ban enforced", 2000, () => curlFrom(banned, `http://${EDGE}/`) !== "200");
  t0 = Date.now();
  await page.click(`[data-testid="unban-${banned}"]`);
  await page.locator(`#bans tr[data-address="${banned}"]`).waitFor({ state: "detached" });
  await until("ban lifted", 2000, () => curlFrom(banned, `http://${EDGE}/`) === "200");
  timings.unban_ms = Date.now() - t0;
  log(`lift ban: gone from the page and served again after ${timings.unban_ms} ms`);

  // 7. Readable on a narrow screen: nothing wider than the viewport but the scrolling tables.
  await page.setViewportSize({ width: 375, height: 800 });
  await page.waitForTimeout(200);
  const [wide, room] = await page.evaluate(() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]);
  check(wide <= room, `narrow screen: page is ${wide} px wide in ${room} px`);
  timings.narrow_width_px = wide;
  await page.screenshot({ path: SCREENSHOT.replace(/\.png$/, "-narrow.png") });

  // 8. The screenshot for docs/, with a few minutes of charts if the demo has run that long.
  await page.setViewportSize({ width: 1280, height: 900 });
  await page.waitForTimeout(300);
  await page.screenshot({ path: SCREENSHOT, fullPage: true });
  timings.total_ms = Date.now() - started;
  process.stdout.write(JSON.stringify(timings) + "\n");
} finally {
  if (context) await context.close();
  rmSync(userDataDir, { recursive: true, force: true });
}
