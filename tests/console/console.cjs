// The console's browser test, run by tests/console.rs with a gateway that already did a
// fallback, blocked an image, mirrored to a candidate and holds an image for review.
// Drives Debian's chromium through playwright-core (never a downloaded browser).
//
// Env: ACC_CHROMIUM, ACC_ADMIN (admin listener base URL), ACC_TOKEN, ACC_FALLBACK_TRACE,
// ACC_BLOCKED_TRACE, ACC_HELD_TRACE, ACC_REJECT_TRACE, ACC_XSS_PROMPT, ACC_XSS_COHORT, ACC_SHOTS (screenshot dir).
"use strict";

const assert = require("node:assert/strict");
const path = require("node:path");
const { chromium } = require("playwright-core");

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};
const BASE = env("ACC_ADMIN");
const TOKEN = env("ACC_TOKEN");
const FALLBACK = env("ACC_FALLBACK_TRACE");
const BLOCKED = env("ACC_BLOCKED_TRACE");
const HELD = env("ACC_HELD_TRACE");
const REJECT = env("ACC_REJECT_TRACE");
const XSS_PROMPT = env("ACC_XSS_PROMPT");
const XSS_COHORT = env("ACC_XSS_COHORT");
const SHOTS = env("ACC_SHOTS");

let step = 0;
async function shot(page, name) {
  step += 1;
  const file = path.join(SHOTS, `${String(step).padStart(2, "0")}-${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  console.log(`screenshot ${file}`);
}

function log(msg) {
  console.log(`ok - ${msg}`);
}

async function main() {
  const browser = await chromium.launch({
    executablePath: env("ACC_CHROMIUM"),
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  });
  const context = await browser.newContext({ viewport: { width: 1360, height: 900 } });
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => {
    if (m.type() === "error") errors.push(m.text());
  });
  // Nothing is fetched from anywhere but the admin listener.
  const foreign = [];
  page.on("request", (r) => {
    if (!r.url().startsWith(BASE)) foreign.push(r.url());
  });

  // --- Sign-in ---------------------------------------------------------------------------
  let resp = await page.goto(`${BASE}/console/`);
  assert.match(page.url(), /\/console\/signin\?next=/, "a page without a session sends to sign-in");
  await shot(page, "signin");

  await page.fill("input[name=token]", "wrong-token-123");
  await page.fill("input[name=reviewer]", "e2e-reviewer");
  [resp] = await Promise.all([page.waitForNavigation(), page.click("button[type=submit]")]);
  assert.equal(resp.status(), 401, "a wrong token is refused");
  assert.match(await page.textContent("#error"), /Wrong admin token/);
  assert.ok(!(await page.content()).includes("wrong-token-123"), "the token is never echoed");
  assert.equal((await context.cookies()).length, 0, "no session cookie for a wrong token");
  await shot(page, "signin-refused");
  log("wrong token refused (401), not echoed");

  await page.fill("input[name=token]", TOKEN);
  await page.fill("input[name=reviewer]", "e2e-reviewer");
  [resp] = await Promise.all([page.waitForNavigation(), page.click("button[type=submit]")]);
  assert.equal(resp.status(), 200);
  assert.equal(new URL(page.url()).pathname, "/console/");
  const cookies = await context.cookies();
  assert.equal(cookies.length, 1, JSON.stringify(cookies));
  const c = cookies[0];
  assert.equal(c.name, "acc_console");
  assert.equal(c.httpOnly, true);
  assert.equal(c.sameSite, "Strict");
  assert.equal(c.path, "/console");
  assert.equal(c.secure, false, "Secure only over TLS (see over_tls_the_session_cookie_is_secure)");
  assert.ok(c.expires > Date.now() / 1000 + 3600, "the cookie has an expiry");
  assert.equal(await page.evaluate(() => document.cookie), "", "script cannot read the session cookie");
  log("signed in: HttpOnly, SameSite=Strict, Path=/console cookie with an expiry");

  // --- Overview --------------------------------------------------------------------------
  const day = page.locator("#window-2");
  const dayRequests = Number(await day.locator("dd.requests").textContent());
  assert.ok(dayRequests >= 10, `day requests ${dayRequests} (1 fallback, 6 mirrored, 1 blocked, 2 held)`);
  assert.equal(Number(await day.locator("dd.blocked").textContent()), 1, "one blocked image");
  const fallbackRate = await day.locator("dd.fallback-rate").textContent();
  assert.notEqual(fallbackRate.trim(), "0.0%", "the fallback shows in the fallback rate");
  assert.equal((await page.textContent("#queue-depth")).trim(), "2", "two images wait for review");
  assert.ok(await page.locator("svg.chart").count() >= 2, "charts are drawn");
  const cohorts = await page.textContent("#cohorts");
  assert.ok(cohorts.includes(XSS_COHORT), "the cohort sent shows as text");
  assert.equal(await page.locator("#cohorts b").count(), 0, "cohort markup is not interpreted");
  await shot(page, "overview");
  log("overview: requests, blocked, fallback rate, queue depth, eval-fail by cohort");

  // --- Routes ----------------------------------------------------------------------------
  await page.click("nav >> text=Routes");
  assert.equal(new URL(page.url()).pathname, "/console/routes");
  assert.ok((await page.textContent("#policy-version")).trim().length > 0);
  assert.match(await page.textContent("#reload-error"), /none/);
  for (const name of ["main", "backup", "mirrored", "guarded", "held"]) {
    assert.equal(await page.locator(`#route-${name}`).count(), 1, `route ${name} shown`);
  }
  const downRow = page.locator("#providers tr[data-provider=down]");
  assert.equal(await downRow.count(), 1);
  assert.match(await downRow.textContent(), /\bopen\b/, "the failed provider's breaker shows open");
  const mainTargets = await page.textContent("#route-main .targets");
  assert.match(mainTargets, /down/);
  assert.equal(await page.locator("#providers tr[data-provider=good] form.reset").count(), 0, "nothing to reset on a healthy provider");
  await shot(page, "routes");
  log("routes: every route, provider breakers, policy version");
  // Reset by hand: the breaker closes, and the page says so.
  await Promise.all([page.waitForNavigation(), downRow.locator("form.reset button").click()]);
  assert.equal(new URL(page.url()).pathname, "/console/routes");
  assert.match(await page.textContent("#done"), /Provider down reset: any 429 pause lifted, breaker closed/);
  const after = page.locator("#providers tr[data-provider=down]");
  assert.match(await after.locator(".badge").first().textContent(), /closed/);
  assert.match(await after.textContent(), /reset by hand/);
  assert.equal(await after.locator("form.reset").count(), 0);
  await shot(page, "routes-reset");
  log("routes: a provider's breaker reset from the console");

  // --- Migrations ------------------------------------------------------------------------
  await page.click("nav >> text=Migrations");
  const cand = page.locator('section.candidate[data-route="mirrored"]');
  assert.equal(await cand.count(), 1, "the mirror candidate of route mirrored");
  const samples = await cand.locator("table.report tbody tr").first().locator("td").nth(2).textContent();
  assert.ok(Number(samples) >= 6, `candidate samples ${samples}`);
  assert.match(await cand.getAttribute("data-candidate"), /^cand/);
  assert.match(await cand.locator("table.report").textContent(), /error rate[\s\S]*latency p50 ms/);
  assert.equal(await cand.locator("svg.chart").count(), 2, "latency and fail-rate charts");
  await shot(page, "migrations");
  log("migrations: mirror report side by side with charts");

  // --- Traces ----------------------------------------------------------------------------
  await page.click("nav >> text=Traces");
  const fbRow = page.locator(`tr.trace-row[data-trace="${FALLBACK}"]`);
  assert.equal(await fbRow.count(), 1, "the fallback's trace is listed");
  const attempts = await fbRow.locator("td.attempts").textContent();
  assert.match(attempts, /down:/);
  assert.match(attempts, /good:ok/);
  assert.ok((await fbRow.locator("td.prompt").textContent()).includes("<script>"), "the prompt shows as text");
  assert.equal(await page.evaluate(() => window.__xss), undefined, "no markup from a prompt ran");
  assert.equal(await page.locator(`tr.trace-row[data-trace="${BLOCKED}"] .badge`).textContent(), "blocked");
  await shot(page, "traces");
  // The store's filters.
  await page.fill("input[name=decision]", "blocked");
  await Promise.all([page.waitForNavigation(), page.click("form.filters button[type=submit]")]);
  const rows = await page.locator("tr.trace-row").evaluateAll((trs) => trs.map((t) => t.dataset.trace));
  assert.deepEqual(rows, [BLOCKED], "decision=blocked lists the blocked trace only");
  // Pagination: the store's keyset cursor, page by page.
  await page.goto(`${BASE}/console/traces?route=mirrored&provider=good&limit=4`);
  const first = await page.locator("tr.trace-row").evaluateAll((trs) => trs.map((t) => t.dataset.trace));
  assert.equal(first.length, 4, "a page of four");
  await Promise.all([page.waitForNavigation(), page.click("#next-page")]);
  const second = await page.locator("tr.trace-row").evaluateAll((trs) => trs.map((t) => t.dataset.trace));
  assert.equal(second.length, 2, "the last two of six mirrored requests");
  assert.equal(await page.locator("#next-page").count(), 0, "no page after the last");
  assert.ok(second.every((id) => !first.includes(id)), "pages do not overlap");
  // A limit the store does not take is shown as the API's error, not silently replaced.
  for (const bad of ["0", "501", "ten"]) {
    await page.goto(`${BASE}/console/traces?limit=${bad}`);
    assert.match(await page.locator("#filter-error").textContent(), /limit/, `limit=${bad} is refused`);
    assert.equal(await page.locator("tr.trace-row").count(), 0);
  }
  log("traces: listing, escaping, filters");

  // A trace's page: the fallback's attempts on a timeline.
  await page.goto(`${BASE}/console/traces/${FALLBACK}`);
  assert.equal(await page.locator("#attempts tbody tr").count(), 2, "two attempts");
  const roles = await page.locator("#attempts tbody tr td:nth-child(2)").allTextContents();
  assert.deepEqual(roles, ["primary", "fallback"]);
  assert.equal(await page.locator('svg.chart[aria-label="Attempts"] rect').count(), 2, "two bars on the timeline");
  assert.ok((await page.textContent("#summary .prompt")).includes(XSS_PROMPT), "the whole prompt, as text");
  assert.equal(await page.evaluate(() => window.__xss), undefined);
  await shot(page, "trace-fallback");
  await page.goto(`${BASE}/console/traces/${BLOCKED}`);
  assert.equal((await page.textContent("#decision")).trim(), "blocked");
  assert.match(await page.textContent("#evaluations"), /sanity[\s\S]*fail/);
  await shot(page, "trace-blocked");
  log("trace pages: timeline, evaluator scores, decision");

  // --- Review queue ----------------------------------------------------------------------
  // Without a session the held image is not served (another browser context, no cookie).
  const anon = await browser.newContext();
  const anonResp = await anon.request.get(`${BASE}/console/reviews/${HELD}/images/0`, { maxRedirects: 0 });
  assert.equal(anonResp.status(), 303, "no image without a session");
  await anon.close();

  await page.click("nav >> text=Review queue");
  const item = page.locator(`.review-item[data-trace="${HELD}"]`);
  assert.equal(await item.count(), 1, "the held image waits");
  assert.match(await item.locator(".reasons").textContent(), /sanity/);
  assert.equal((await item.locator(".cohort").textContent()).trim(), "beta");
  const natural = await item.locator("img").first().evaluate((img) => img.complete && img.naturalWidth);
  assert.equal(natural, 256, "the thumbnail loads for the signed-in session");
  const otherItem = page.locator(`.review-item[data-trace="${REJECT}"]`);
  assert.equal((await otherItem.locator(".cohort").textContent()).trim(), XSS_COHORT, "the cohort shows as text");
  assert.equal(await otherItem.locator(".cohort b").count(), 0, "cohort markup is not interpreted");
  await shot(page, "reviews");

  // A POST without the CSRF token, or with another, is refused.
  let r = await page.request.post(`${BASE}/console/reviews/${HELD}/approve`, { form: { reason: "no token" }, maxRedirects: 0 });
  assert.equal(r.status(), 403, "approve without CSRF token");
  assert.match(await r.text(), /missing CSRF token/);
  r = await page.request.post(`${BASE}/console/reviews/${HELD}/approve`, { form: { csrf: "0".repeat(64) }, maxRedirects: 0 });
  assert.equal(r.status(), 403, "approve with a wrong CSRF token");
  r = await page.request.post(`${BASE}/console/signout`, { form: {}, maxRedirects: 0 });
  assert.equal(r.status(), 403, "sign-out without CSRF token");
  await page.goto(`${BASE}/console/reviews`);
  assert.equal(await item.count(), 1, "still pending after the refused POSTs");
  log("POSTs without or with a wrong CSRF token refused (403)");

  // Reject the second by keyboard, with a reason: j moves to it, the reason is typed, Escape
  // leaves the field, r rejects.
  const other = page.locator(`.review-item[data-trace="${REJECT}"]`);
  await item.focus();
  await page.keyboard.press("j");
  assert.equal(await other.evaluate((el) => el === document.activeElement), true, "j moves to the next item");
  await other.locator("input[name=reason]").fill("not on brand");
  await other.locator("input[name=reason]").press("Escape");
  await Promise.all([page.waitForNavigation(), page.keyboard.press("r")]);
  assert.match(await page.textContent("#done"), new RegExp(`rejected:${REJECT}`));
  assert.equal(await other.count(), 0, "the rejected item left the queue");
  log("rejected with a reason by keyboard (j, then r)");

  // Approve with the mouse (a plain form: it works without the script too).
  await item.locator("input[name=reason]").fill("looks fine");
  await Promise.all([page.waitForNavigation(), item.locator("button.approve").click()]);
  assert.match(page.url(), /\/console\/reviews\?done=approved/);
  assert.match(await page.textContent("#done"), new RegExp(`approved:${HELD}`));
  assert.equal(await page.locator(`.review-item[data-trace="${HELD}"]`).count(), 0, "the item left the queue");
  await shot(page, "reviews-after-decisions");
  log("approved by click; the item left the queue");

  // The refusal page itself (for the screenshot): a form posted without its token.
  await Promise.all([
    page.waitForNavigation(),
    page.evaluate(() => {
      const f = document.createElement("form");
      f.method = "post";
      f.action = "/console/signout";
      document.body.appendChild(f);
      f.submit();
    }),
  ]);
  assert.match(await page.textContent("h1"), /missing CSRF token/);
  await shot(page, "csrf-refused");

  // --- Sign-out --------------------------------------------------------------------------
  await page.goto(`${BASE}/console/`);
  await Promise.all([page.waitForNavigation(), page.click("header form.signout button")]);
  assert.equal(new URL(page.url()).pathname, "/console/signin");
  await page.goto(`${BASE}/console/routes`);
  assert.match(page.url(), /\/console\/signin/, "signed out: pages send to sign-in again");
  log("signed out");

  assert.deepEqual(foreign, [], "no request left the admin listener");
  // The refusal pages (401 wrong token, 403 without CSRF token) are expected; nothing else.
  const unexpected = errors.filter((e) => !/status of (401|403)/.test(e));
  assert.deepEqual(unexpected, [], "no script or console errors, no missing asset");
  await browser.close();
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
